#pragma once

// The few CUDA features attention_pool_kernel.cuh uses, behind names that a
// CPU emulation can provide too (tests/cpp/emulation/cuda_emulation.h).

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)

#include <ATen/OpMathType.h>

#define ATTNPOOL_GLOBAL __global__
#define ATTNPOOL_DEVICE __device__
#define ATTNPOOL_HOST_DEVICE __host__ __device__
// Unrolls the loop that follows: loops over registers must be unrolled, or
// the registers go to local memory.
#define ATTNPOOL_UNROLL _Pragma("unroll")
// Unrolls the loop that follows n times (an integral constant expression):
// loads of later iterations are then issued before earlier ones are used.
#define ATTNPOOL_PRAGMA(text) _Pragma(#text)
#define ATTNPOOL_UNROLL_BY(n) ATTNPOOL_PRAGMA(unroll n)
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

// The tensor-core instructions of tensor_core_kernel.cuh (sm_80 and later;
// the entry points choose that kernel only there). Each is warp-wide: every
// lane of the warp takes part. Fragments are laid out as in PTX's
// documentation of mma.m16n8k16 and ldmatrix (the emulation computes them
// from that layout).

// d += a . b for A 16 x 16 (row-major), B 16 x 8 (column-major), both
// bfloat16 pairs, D 16 x 8 float32.
__device__ inline void attnpool_mma_bf16(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// d += a . b for A 16 x 8 (row-major), B 8 x 8 (column-major), both
// tf32 (float32 bit patterns whose low 13 bits are zero: tf32_hi and
// tf32_lo in tensor_core_kernel.cuh), D 16 x 8 float32.
__device__ inline void attnpool_mma_tf32(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// Four 8 x 8 matrices of 16-bit elements from shared memory: lane 8 j + i
// gives the address of row i of matrix j; r[j] gets matrix j's elements
// (row lane / 4, columns 2 (lane % 4) and + 1), or with `trans` its
// transpose's.
template <bool kTrans>
__device__ inline void attnpool_ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
  }
#else
  __trap();
#endif
}

// 16 bytes from global to shared memory without passing through registers;
// attnpool_copy_async_wait waits for this thread's copies.
__device__ inline void attnpool_copy_async_16(void* shared, const void* global) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global)
               : "memory");
#else
  __trap();
#endif
}

__device__ inline void attnpool_copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#else
  __trap();
#endif
}

// The lanes of the warp wait for each other, their writes to shared memory
// ordered before the reads that follow.
__device__ inline void attnpool_syncwarp() {
  __syncwarp();
}

#else

#include "cuda_emulation.h"

#endif
