#pragma once

// What the standalone CUDA kernel benchmarks (one_score_kernels.cu,
// tensor_core_kernels.cu) share: error checks, the L2 flush, a read of x as
// the floor, random fills, event timing, and comparisons of results.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <vector>

namespace attnpool::bench {

inline void check(cudaError_t status, int line) {
  if (status != cudaSuccess) {
    std::printf("CUDA error at line %d: %s\n", line, cudaGetErrorString(status));
    std::exit(1);
  }
}
#define CHECK(call) attnpool::bench::check((call), __LINE__)

constexpr size_t kFlushBytes = size_t{512} << 20;

struct Device {
  int sms = 0;
  void* flush = nullptr;  // written before every timed call: L2 holds none of x
};

// One read of x: every 16 bytes loaded once, summed so that the loads stay.
__global__ void read_kernel(const uint4* x, size_t words, float* sink) {
  float total = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < words;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint4 w = x[i];
    total +=
        __uint_as_float(w.x) + __uint_as_float(w.y) + __uint_as_float(w.z) + __uint_as_float(w.w);
  }
  if (total == 1.25f) {  // (almost never: the sum is kept, not stored)
    *sink = total;
  }
}

// Values in [-amplitude, amplitude) from a hash of the index.
template <typename T>
__global__ void fill_kernel(T* p, size_t n, unsigned seed, float amplitude) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = T(amplitude * ((h & 0xffff) / 32768.0f - 1.0f));
  }
}

template <typename F>
float time_ms(const Device& device, F&& call) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  CHECK(cudaMemsetAsync(device.flush, 0, kFlushBytes));
  CHECK(cudaEventRecord(start));
  call();
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  CHECK(cudaGetLastError());
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  return ms;
}

inline float median(std::vector<float> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

template <typename Kernel>
void prepare(Kernel* kernel, int warps, int64_t shared, bool describe, const char* what) {
  CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  if (describe) {
    cudaFuncAttributes attributes;
    CHECK(cudaFuncGetAttributes(&attributes, kernel));
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * warps, shared));
    std::printf(
        "    %s: %d registers, %zu bytes of local memory, %d blocks of %d warps per SM\n",
        what,
        attributes.numRegs,
        attributes.localSizeBytes,
        per_sm,
        warps);
  }
}

template <typename T>
std::vector<float> copy_to_host(const T* p, size_t n) {
  std::vector<T> values(n);
  CHECK(cudaMemcpy(values.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return std::vector<float>(values.begin(), values.end());
}

// The largest difference from `want`, relative to want's largest magnitude.
inline double relative_difference(const std::vector<float>& got, const std::vector<float>& want) {
  double most = 0;
  double scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    most = std::max(most, std::abs(double{got[i]} - double{want[i]}));
    scale = std::max(scale, std::abs(double{want[i]}));
  }
  return most / (scale > 0 ? scale : 1);
}

// The GPU a benchmark runs on, with its L2 flush buffer; prints a line
// naming the GPU, `what` is timed and how.
inline Device open_device(const char* what, int rounds, cudaDeviceProp& properties) {
  Device device;
  CHECK(cudaGetDeviceProperties(&properties, 0));
  device.sms = properties.multiProcessorCount;
  CHECK(cudaMalloc(&device.flush, kFlushBytes));
  std::printf(
      "%s, %d SMs: %s alone; CUDA events, L2 flushed before each call, medians of %d rounds\n",
      properties.name,
      device.sms,
      what,
      rounds);
  return device;
}

inline void free_all(std::initializer_list<void*> pointers) {
  for (void* p : pointers) {
    CHECK(cudaFree(p));
  }
}

}  // namespace attnpool::bench
