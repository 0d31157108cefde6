#pragma once

// Runs CUDA kernel code on the CPU for tests: every thread of a block is a
// fiber (ucontext) on the calling thread, __syncthreads() is a barrier over
// the block, warp shuffles exchange values through memory with a barrier
// over the warp. A fiber runs until it waits at a barrier, then the next one
// runs, in thread order. Blocks run one after another. Only what
// csrc/ops/cuda/cuda_compat.h names is provided, but it executes the real
// indexing, reductions and barriers of folded_attention_pool_kernel.cuh on
// machines without a GPU.
//
// Why fibers, not a host thread per CUDA thread: the suite spent its time in
// the kernel waking 64-128 threads at every barrier (futex waits and wakes
// were 80% of a perf profile): 75 s of CTest and 110 s under ASan, on a
// 2-core EPYC. The fixed order also makes a missing barrier fail every run:
// a thread that reads what a later thread writes before a barrier reads the
// NaN bytes shared memory starts with.

#include <ATen/OpMathType.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define ATTNPOOL_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTNPOOL_EMULATION_ASAN 1
#endif
#endif
#if defined(ATTNPOOL_EMULATION_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

namespace attnpool_emulation {

struct Index {
  unsigned x = 0;
  unsigned y = 0;
  unsigned z = 0;
};

// A barrier over `count` fibers: the last to arrive opens it for the others.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  // Returns the generation the caller waits for to end, or -1 when the
  // caller was the last to arrive and need not wait.
  int64_t arrive() {
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return -1;
    }
    return generation_;
  }

  int64_t generation() const {
    return generation_;
  }

 private:
  int count_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

// Where a fiber's stack is, for AddressSanitizer's switch annotations.
struct Stack {
  const void* bottom = nullptr;
  size_t size = 0;
};

// Tells AddressSanitizer which stack the code runs on from here (its
// documented protocol for user-level context switches); nothing without it.
inline void start_switch(void** fake_stack, const Stack& to) {
#if defined(ATTNPOOL_EMULATION_ASAN)
  __sanitizer_start_switch_fiber(fake_stack, to.bottom, to.size);
#else
  (void)fake_stack;
  (void)to;
#endif
}

inline void finish_switch(void* fake_stack, Stack* from) {
#if defined(ATTNPOOL_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(
      fake_stack,
      from != nullptr ? &from->bottom : nullptr,
      from != nullptr ? &from->size : nullptr);
#else
  (void)fake_stack;
  (void)from;
#endif
}

// 64 KB per thread, below it a page that faults: the kernels' frames take a
// few KB, under ASan at -O0 too. Small, because ASan's swapcontext clears
// the shadow of the whole stack it switches to (a 256 KB stack made that
// memset 58% of the run).
constexpr size_t kFiberStackBytes = size_t{64} << 10;
constexpr size_t kGuardBytes = 4096;

// A fiber's stack from mmap, with a guard page below it: an overflow stops
// the test at once instead of writing over other memory.
class FiberStack {
 public:
  FiberStack() {
    void* mapping = mmap(
        nullptr,
        kGuardBytes + kFiberStackBytes,
        PROT_READ | PROT_WRITE,
        MAP_PRIVATE | MAP_ANONYMOUS,
        -1,
        0);
    if (mapping == MAP_FAILED || mprotect(mapping, kGuardBytes, PROT_NONE) != 0) {
      std::perror("emulated kernel: fiber stack");
      std::abort();
    }
    mapping_ = static_cast<char*>(mapping);
  }
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  ~FiberStack() {
    munmap(mapping_, kGuardBytes + kFiberStackBytes);
  }

  char* bottom() const {
    return mapping_ + kGuardBytes;
  }

 private:
  char* mapping_;
};

struct Fiber {
  ucontext_t context{};
  std::unique_ptr<FiberStack> stack;
  void* fake_stack = nullptr;
  const Barrier* waits_at = nullptr;
  int64_t waits_for = 0;  // the generation of waits_at that must end
  bool done = false;

  bool runnable() const {
    return !done && (waits_at == nullptr || waits_at->generation() != waits_for);
  }
};

// Operands a thread hands to a warp-wide tensor-core instruction.
constexpr int kWarpSlots = 10;

struct Block {
  std::unique_ptr<Barrier> barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<double> lanes;    // one slot per thread for shuffles
  std::vector<uint64_t> words;  // kWarpSlots per thread for tensor-core operands
  // Each thread's cp.async copies (to, from) not yet waited for: they land at
  // the wait, so that a read before it sees shared memory's NaN bytes.
  std::vector<std::vector<std::pair<void*, const void*>>> copies;
  std::vector<unsigned char> shared;
  std::vector<Fiber> fibers;
  ucontext_t scheduler{};  // zeroed: ASan reads its uc_stack when switching to it
  Stack scheduler_stack;
  void* scheduler_fake_stack = nullptr;
  int current = 0;
  std::function<void()> body;  // the kernel call, the same for every thread
};

inline thread_local Index thread_index;
inline thread_local Index block_index;
inline thread_local Block* current_block = nullptr;
inline Index block_dim;

// Back to the scheduler, from the running fiber; returns when it runs again.
inline void yield_to_scheduler() {
  Block& block = *current_block;
  Fiber& fiber = block.fibers[block.current];
  start_switch(&fiber.fake_stack, block.scheduler_stack);
  swapcontext(&fiber.context, &block.scheduler);
  finish_switch(fiber.fake_stack, &block.scheduler_stack);
}

inline void wait_at(Barrier& barrier) {
  const int64_t generation = barrier.arrive();
  if (generation < 0) {
    return;
  }
  Fiber& fiber = current_block->fibers[current_block->current];
  fiber.waits_at = &barrier;
  fiber.waits_for = generation;
  yield_to_scheduler();
  fiber.waits_at = nullptr;
}

inline void fiber_main() {
  Block& block = *current_block;
  finish_switch(nullptr, &block.scheduler_stack);
  block.body();
  Fiber& fiber = block.fibers[block.current];
  fiber.done = true;
  // A null fake stack: this fiber's is freed, it never runs again.
  start_switch(nullptr, block.scheduler_stack);
  swapcontext(&fiber.context, &block.scheduler);
  std::abort();  // unreachable: nothing resumes a finished fiber
}

// Runs the fibers of `block` round the thread order until all finish.
inline void run_block(Block& block) {
  const int threads = static_cast<int>(block.fibers.size());
  int finished = 0;
  while (finished < threads) {
    bool ran = false;
    for (int t = 0; t < threads; ++t) {
      Fiber& fiber = block.fibers[t];
      if (!fiber.runnable()) {
        continue;
      }
      ran = true;
      block.current = t;
      thread_index = {static_cast<unsigned>(t), 0, 0};
      start_switch(&block.scheduler_fake_stack, {fiber.stack->bottom(), kFiberStackBytes});
      swapcontext(&block.scheduler, &fiber.context);
      finish_switch(block.scheduler_fake_stack, nullptr);
      finished += fiber.done ? 1 : 0;
    }
    if (!ran) {
      std::fprintf(stderr, "emulated kernel: its threads wait at different barriers\n");
      std::abort();
    }
  }
}

// Launches kernel<<<blocks, threads, shared_bytes>>>(args...). Shared memory
// starts as NaN bytes so that a read before a write shows up in results.
template <typename... Params, typename... Args>
void launch(
    void (*kernel)(Params...), int64_t blocks, int threads, int64_t shared_bytes, Args&&... args) {
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  Block block;
  block.fibers.resize(threads);
  for (auto& fiber : block.fibers) {
    fiber.stack = std::make_unique<FiberStack>();
  }
  block.body = [&] { kernel(args...); };
  current_block = &block;
  for (int64_t b = 0; b < blocks; ++b) {
    block.barrier = std::make_unique<Barrier>(threads);
    block.warp_barriers.clear();
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      block.warp_barriers.push_back(std::make_unique<Barrier>(32));
    }
    block.lanes.assign(threads, 0.0);
    block.words.assign(static_cast<size_t>(threads) * kWarpSlots, 0);
    block.copies.assign(threads, {});
    block.shared.assign(static_cast<size_t>(shared_bytes) + 16, 0xFF);
    block_index = {static_cast<unsigned>(b), 0, 0};
    for (auto& fiber : block.fibers) {
      fiber.done = false;
      fiber.waits_at = nullptr;
      fiber.fake_stack = nullptr;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack->bottom();
      fiber.context.uc_stack.ss_size = kFiberStackBytes;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, &fiber_main, 0);
    }
    run_block(block);
  }
  current_block = nullptr;
}

}  // namespace attnpool_emulation

#define threadIdx (attnpool_emulation::thread_index)
#define blockIdx (attnpool_emulation::block_index)
#define blockDim (attnpool_emulation::block_dim)

#define ATTNPOOL_GLOBAL
#define ATTNPOOL_DEVICE
#define ATTNPOOL_HOST_DEVICE
#define ATTNPOOL_UNROLL
#define ATTNPOOL_UNROLL_BY(n)
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
  attnpool_emulation::wait_at(*block.warp_barriers[warp]);
  const T other = static_cast<T>(block.lanes[warp * 32 + ((tid % 32) ^ lane_mask)]);
  attnpool_emulation::wait_at(*block.warp_barriers[warp]);
  return other;
}

namespace attnpool_emulation {

// The warp-wide instructions, named in their last slot: every lane of a
// warp must take part in the same one (on a GPU, lanes that issue different
// ones, or skip one, are undefined behaviour).
enum class WarpInstruction : uint64_t { kMma = 1, kMmaTf32, kLdmatrix, kLdmatrixTrans };

// A warp-wide instruction: this lane's operands go to its slots, the warp
// waits for all of them, compute(slots of lane 0 of the warp, lane) gives
// this lane's result, and the warp waits again before any slot is reused.
// operands' last slot is left for the instruction's name.
template <typename F>
void warp_wide(WarpInstruction instruction, const uint64_t (&operands)[kWarpSlots], F&& compute) {
  auto& block = *current_block;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  uint64_t* mine = block.words.data() + tid * kWarpSlots;
  std::copy(std::begin(operands), std::end(operands), mine);
  mine[kWarpSlots - 1] = static_cast<uint64_t>(instruction);
  wait_at(*block.warp_barriers[warp]);
  const uint64_t* slots = block.words.data() + warp * 32 * kWarpSlots;
  for (int lane = 0; lane < 32; ++lane) {
    if (slots[lane * kWarpSlots + kWarpSlots - 1] != static_cast<uint64_t>(instruction)) {
      std::fprintf(
          stderr, "emulated kernel: lanes of a warp at different warp-wide instructions\n");
      std::abort();
    }
  }
  compute(slots, tid % 32);
  wait_at(*block.warp_barriers[warp]);
}

inline float bf16_to_float(uint32_t bits) {
  uint32_t widened = (bits & 0xFFFFu) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// Element `half` (0: low 16 bits) of slot `slot` of lane `lane`.
inline uint32_t half_of(const uint64_t* slots, int lane, int slot, int half) {
  return static_cast<uint32_t>(slots[lane * kWarpSlots + slot] >> (16 * half)) & 0xFFFFu;
}

}  // namespace attnpool_emulation

namespace attnpool_emulation {

// Stops the test where a tensor-core instruction would fault or misbehave on
// a GPU: an address that is not 16-byte aligned, or not in the block's
// shared memory.
inline void expect_shared_16(const void* address, const char* what) {
  const auto& shared = current_block->shared;
  const auto* byte = static_cast<const unsigned char*>(address);
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0 || byte < shared.data() ||
      byte + 16 > shared.data() + shared.size()) {
    std::fprintf(stderr, "emulated kernel: %s address not 16-byte aligned shared memory\n", what);
    std::abort();
  }
}

}  // namespace attnpool_emulation

namespace attnpool_emulation {

// d += a . b for a warp-wide mma of A 16 x K, B K x 8: product(slots, m, n,
// k) gives A's (m, k) times B's (k, n) from the warp's operands, exactly;
// D is laid out as every mma.m16n8kK's (lane = 4 g + t holds (g, 2t), (g,
// 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)). Each sum is taken in double and
// rounded once (the hardware's order of addition is its own).
template <typename Product>
void mma_16x8(
    WarpInstruction instruction,
    float (&d)[4],
    const uint32_t (&a)[4],
    const uint32_t (&b)[2],
    int k_size,
    Product&& product) {
  const uint64_t operands[kWarpSlots] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  float result[4];
  warp_wide(instruction, operands, [&](const uint64_t* slots, int lane) {
    const int g = lane / 4;
    const int t = lane % 4;
    for (int c = 0; c < 4; ++c) {
      const int m = g + 8 * (c / 2);
      const int n = 2 * t + c % 2;
      double sum = 0;
      for (int k = 0; k < k_size; ++k) {
        sum += product(slots, m, n, k);
      }
      result[c] = static_cast<float>(double{d[c]} + sum);
    }
  });
  std::copy(std::begin(result), std::end(result), std::begin(d));
}

// A tf32 operand of lane `lane`, slot `slot`, as a double: one that is not
// a tf32 value (low 13 bits set) stops the test, since the kernels split
// every operand into tf32 terms first.
inline double tf32_of(const uint64_t* slots, int lane, int slot) {
  const auto bits = static_cast<uint32_t>(slots[lane * kWarpSlots + slot]);
  if ((bits & 0x1FFFu) != 0) {
    std::fprintf(stderr, "emulated kernel: a tf32 operand with its low 13 bits set\n");
    std::abort();
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return double{value};
}

}  // namespace attnpool_emulation

// mma.m16n8k16 (bfloat16 in, float32 sums): lane = 4 g + t holds A's
// (g, 2t..2t+1) in a[0], (g + 8, ..) in a[1], (g, 2t + 8..) in a[2], (g + 8,
// 2t + 8..) in a[3]; B's (2t..2t+1, g) in b[0], (2t + 8.., g) in b[1].
inline void attnpool_mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using attnpool_emulation::bf16_to_float;
  using attnpool_emulation::half_of;
  attnpool_emulation::mma_16x8(
      attnpool_emulation::WarpInstruction::kMma,
      d,
      a,
      b,
      16,
      [](const uint64_t* slots, int m, int n, int k) {
        const int a_lane = (m % 8) * 4 + (k % 8) / 2;
        const int a_slot = 2 * (k / 8) + m / 8;
        const int b_lane = n * 4 + (k % 8) / 2;
        const int b_slot = 4 + k / 8;
        return double{bf16_to_float(half_of(slots, a_lane, a_slot, k % 2))} *
               double{bf16_to_float(half_of(slots, b_lane, b_slot, k % 2))};
      });
}

// mma.m16n8k8 (tf32 in, float32 sums): lane = 4 g + t holds A's (g, t) in
// a[0], (g + 8, t) in a[1], (g, t + 4) in a[2], (g + 8, t + 4) in a[3]; B's
// (t, g) in b[0], (t + 4, g) in b[1].
inline void attnpool_mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using attnpool_emulation::tf32_of;
  attnpool_emulation::mma_16x8(
      attnpool_emulation::WarpInstruction::kMmaTf32,
      d,
      a,
      b,
      8,
      [](const uint64_t* slots, int m, int n, int k) {
        return tf32_of(slots, (m % 8) * 4 + k % 4, m / 8 + 2 * (k / 4)) *
               tf32_of(slots, n * 4 + k % 4, 4 + k / 4);
      });
}

// ldmatrix.x4 of 16-bit elements (see cuda_compat.h).
template <bool kTrans>
void attnpool_ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  attnpool_emulation::expect_shared_16(row, "ldmatrix's row");
  const uint64_t operands[attnpool_emulation::kWarpSlots] = {reinterpret_cast<uintptr_t>(row)};
  const auto instruction = kTrans ? attnpool_emulation::WarpInstruction::kLdmatrixTrans
                                  : attnpool_emulation::WarpInstruction::kLdmatrix;
  attnpool_emulation::warp_wide(instruction, operands, [&](const uint64_t* slots, int lane) {
    const auto element = [&](int matrix, int i, int j) {
      const auto* address = reinterpret_cast<const uint16_t*>(
          static_cast<uintptr_t>(slots[(8 * matrix + i) * attnpool_emulation::kWarpSlots]));
      return static_cast<uint32_t>(address[j]);
    };
    for (int m = 0; m < 4; ++m) {
      const int i = kTrans ? 2 * (lane % 4) : lane / 4;
      const int j = kTrans ? lane / 4 : 2 * (lane % 4);
      r[m] = kTrans ? element(m, i, j) | element(m, i + 1, j) << 16
                    : element(m, i, j) | element(m, i, j + 1) << 16;
    }
  });
}

inline void attnpool_copy_async_16(void* shared, const void* global) {
  attnpool_emulation::expect_shared_16(shared, "cp.async's shared");
  if (reinterpret_cast<uintptr_t>(global) % 16 != 0) {
    std::fprintf(stderr, "emulated kernel: cp.async's global address not 16-byte aligned\n");
    std::abort();
  }
  attnpool_emulation::current_block->copies[threadIdx.x].emplace_back(shared, global);
}

inline void attnpool_copy_async_wait() {
  auto& pending = attnpool_emulation::current_block->copies[threadIdx.x];
  for (const auto& [to, from] : pending) {
    std::memcpy(to, from, 16);
  }
  pending.clear();
}

// __syncwarp(): the warp's lanes wait for each other (and see each other's
// writes to shared memory).
inline void attnpool_syncwarp() {
  auto& block = *attnpool_emulation::current_block;
  attnpool_emulation::wait_at(*block.warp_barriers[threadIdx.x / 32]);
}

inline void attnpool_syncthreads() {
  attnpool_emulation::wait_at(*attnpool_emulation::current_block->barrier);
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
