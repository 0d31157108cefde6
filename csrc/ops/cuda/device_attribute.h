#pragma once

// An attribute of the current GPU, read through the CUDA runtime (not ATen's
// CUDAContext.h, which needs the cuBLAS/cuSPARSE headers) so that a bare
// CUDA toolkit builds the files that include it.

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace attnpool::cuda {

inline int device_attribute(cudaDeviceAttr attribute) {
  int device = 0;
  int value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

}  // namespace attnpool::cuda
