#pragma once

// Buffers that start on a cache line (64 bytes), for everything the kernels
// load as vectors or AMX tiles: u's copies (in columns, in pairs, rounded,
// as tiles) and the per-thread scratch. std::vector's memory starts 16
// bytes in, so three of four 64-byte vectors loaded from it straddle two
// lines and take two loads. Per instruction set, like every file in isa/
// (ops/cpu/README.md).
//
// Measured on a Xeon with AMX: tileloadd of a 1 KB tile from L1 took 8 ns
// aligned against 20 ns 16 bytes off, and a 32-row tile's scores (two
// loads of x and one of u per product) 30 against 60 ns a product. A loop
// of the forward's scores by columns (8 rows, a column of u loaded per
// element of x) took 165 ns a row with u's columns on a line and 211 ns 16
// bytes off; the op's float32 forward, 2 threads, with u's columns on a
// line against in a std::vector (medians of 5 paired runs): 1 x 12 0.90,
// 1 x 16 0.88, 4 x 12 0.88, so400m's full width 0.90 of the time.

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kCacheLineBytes = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{kCacheLineBytes};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), kAlignment));
  }
  void deallocate(T* p, size_t) {
    ::operator delete(p, kAlignment);
  }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const {
    return false;
  }
};

template <typename T>
using CacheLineBuffer = std::vector<T, CacheLineAllocator<T>>;

// `count` values of T rounded up to whole cache lines, so that what
// follows them in a CacheLineBuffer starts on one too.
template <typename T>
constexpr int64_t whole_lines(int64_t count) {
  constexpr int64_t kPerLine = kCacheLineBytes / static_cast<int64_t>(sizeof(T));
  return (count + kPerLine - 1) / kPerLine * kPerLine;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
