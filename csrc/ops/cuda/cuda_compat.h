#pragma once

// The few CUDA features attention_pool_kernel.cuh uses, behind names that a
// CPU emulation can provide too (tests/cpp/emulation/cuda_emulation.h).

#include <limits>

#if defined(__CUDACC__)

#include <ATen/OpMathType.h>

#define ATTNPOOL_GLOBAL __global__
#define ATTNPOOL_DEVICE __device__
#define ATTNPOOL_HOST_DEVICE __host__ __device__
// Unrolls the loop that follows: loops over registers must be unrolled, or
// the registers go to local memory.
#define ATTNPOOL_UNROLL _Pragma("unroll")
#define ATTNPOOL_DYNAMIC_SHARED(type, name)                       \
  extern __shared__ __align__(16) unsigned char attnpool_smem_[]; \
  type* name = reinterpret_cast<type*>(attnpool_smem_)

template <typename T>
using attnpool_opmath_t = at::opmath_type<T>;

template <typename T>
__device__ inline T attnpool_shfl_xor(T value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}

__device__ inline void attnpool_syncthreads() {
  __syncthreads();
}

// Accurate (not __expf) so that float64 and float32 results track the CPU.
__device__ inline float attnpool_exp(float v) {
  return expf(v);
}
__device__ inline double attnpool_exp(double v) {
  return exp(v);
}
__device__ inline float attnpool_log(float v) {
  return logf(v);
}
__device__ inline double attnpool_log(double v) {
  return log(v);
}

// a * b + c rounded once: written out where two sums must round alike.
__device__ inline float attnpool_fma(float a, float b, float c) {
  return __fmaf_rn(a, b, c);
}
__device__ inline double attnpool_fma(double a, double b, double c) {
  return __fma_rn(a, b, c);
}

// a * b rounded on its own, never fused with a following add: the backward's
// scale * score must round as the forward's did (see the backward kernel).
__device__ inline float attnpool_mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ inline double attnpool_mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

template <typename T>
__host__ __device__ constexpr T attnpool_infinity() {
  return std::numeric_limits<T>::infinity();
}

#else

#include "cuda_emulation.h"

#endif
