#pragma once

// A scope in which every thread of ATen's pool treats subnormal numbers as 0
// (x86's MXCSR flags FTZ, results flushed, and DAZ, inputs read as 0) for
// ATen kernels whose inner loops would otherwise meet them
// (ops/attention_without_subnormals.h). torch.set_flush_denormal sets only
// the calling thread; the kernels' parallel loops run on the others too.

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace attnpool::cpu {

class SubnormalsFlushed {
 public:
  SubnormalsFlushed() {
#if defined(__x86_64__) || defined(_M_X64)
    // One chunk per thread: with OpenMP, chunk i runs on the team's thread
    // i, the same thread that the kernel's own parallel loops give chunk i,
    // and that the destructor's loop restores.
    saved_.resize(at::get_num_threads());
    for_each_thread([this](int64_t i) {
      saved_[i] = _mm_getcsr();
      _mm_setcsr(saved_[i] | kFlushToZero | kDenormalsAreZero);
    });
#endif
  }

  ~SubnormalsFlushed() {
#if defined(__x86_64__) || defined(_M_X64)
    for_each_thread([this](int64_t i) { _mm_setcsr(saved_[i]); });
#endif
  }

  SubnormalsFlushed(const SubnormalsFlushed&) = delete;
  SubnormalsFlushed& operator=(const SubnormalsFlushed&) = delete;

 private:
  static constexpr unsigned kFlushToZero = 0x8000;
  static constexpr unsigned kDenormalsAreZero = 0x0040;

  template <typename F>
  void for_each_thread(const F& f) {
    at::parallel_for(0, static_cast<int64_t>(saved_.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        f(i);
      }
    });
  }

  std::vector<unsigned> saved_;
};

}  // namespace attnpool::cpu
