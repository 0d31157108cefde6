#pragma once

// Runs CUDA kernel code on the CPU for tests: every thread of a block is a
// host thread, __syncthreads() is a barrier over the block, warp shuffles
// exchange values through memory with a barrier over the warp. Blocks run one
// after another. Slow, and only what csrc/ops/cuda/cuda_compat.h names is
// provided, but it executes the real indexing, reductions and barriers of
// folded_attention_pool_kernel.cuh on machines without a GPU.

#include <ATen/OpMathType.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace attnpool_emulation {

struct Index {
  unsigned x = 0;
  unsigned y = 0;
  unsigned z = 0;
};

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int waiting_ = 0;
  int64_t generation_ = 0;
};

struct Block {
  std::unique_ptr<Barrier> barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<double> lanes;  // one slot per thread for shuffles
  std::vector<unsigned char> shared;
};

inline thread_local Index thread_index;
inline thread_local Index block_index;
inline thread_local Block* current_block = nullptr;
inline Index block_dim;

// Launches kernel<<<blocks, threads, shared_bytes>>>(args...). Shared memory
// starts as NaN bytes so that a read before a write shows up in results.
template <typename... Params, typename... Args>
void launch(
    void (*kernel)(Params...), int64_t blocks, int threads, int64_t shared_bytes, Args&&... args) {
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  for (int64_t b = 0; b < blocks; ++b) {
    Block block;
    block.barrier = std::make_unique<Barrier>(threads);
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      block.warp_barriers.push_back(std::make_unique<Barrier>(32));
    }
    block.lanes.assign(threads, 0.0);
    block.shared.assign(static_cast<size_t>(shared_bytes) + 16, 0xFF);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_index = {static_cast<unsigned>(t), 0, 0};
        block_index = {static_cast<unsigned>(b), 0, 0};
        current_block = &block;
        kernel(args...);
      });
    }
    for (auto& thread : pool) {
      thread.join();
    }
  }
}

}  // namespace attnpool_emulation

#define threadIdx (attnpool_emulation::thread_index)
#define blockIdx (attnpool_emulation::block_index)
#define blockDim (attnpool_emulation::block_dim)

#define ATTNPOOL_GLOBAL
#define ATTNPOOL_DEVICE
#define ATTNPOOL_HOST_DEVICE
#define ATTNPOOL_UNROLL
#define ATTNPOOL_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(attnpool_emulation::current_block->shared.data())

template <typename T>
using attnpool_opmath_t = at::opmath_type<T>;

template <typename T>
T attnpool_shfl_xor(T value, int lane_mask) {
  auto& block = *attnpool_emulation::current_block;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  block.lanes[tid] = static_cast<double>(value);
  block.warp_barriers[warp]->wait();
  const T other = static_cast<T>(block.lanes[warp * 32 + ((tid % 32) ^ lane_mask)]);
  block.warp_barriers[warp]->wait();
  return other;
}

inline void attnpool_syncthreads() {
  attnpool_emulation::current_block->barrier->wait();
}

template <typename T>
T attnpool_exp(T v) {
  return std::exp(v);
}

template <typename T>
T attnpool_log(T v) {
  return std::log(v);
}

template <typename T>
T attnpool_fma(T a, T b, T c) {
  return std::fma(a, b, c);
}

template <typename T>
T attnpool_mul_rn(T a, T b) {
  return a * b;
}

template <typename T>
constexpr T attnpool_infinity() {
  return std::numeric_limits<T>::infinity();
}
