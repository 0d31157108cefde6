#pragma once

// CPU compute kernels of attention_pool. This file is compiled once per
// instruction set through the attention_pool_kernel_<isa>.cpp wrappers,
// which define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) first so that
// at::vec::Vectorized picks that instruction set, as ATen's own kernels do.

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including attention_pool_kernel_impl.h"
#endif

#include "ops/cpu/attention_pool_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// Rows of x are handled in blocks: one load of a shared vector (u, grad_out,
// an accumulator) then serves every row of the block, and the block's rows
// stay in L1 between the score pass and the accumulation pass. The sizes are
// measured: the forward also holds the next block's prefetched rows (and,
// pipelined, the previous block's) in L1 and was no faster with 8 rows; the
// backward, which loads and stores its du accumulator once per block, was 15%
// faster with 8 than with 4.
constexpr int kForwardBlockRows = 4;
constexpr int kBackwardBlockRows = 8;

template <typename T>
T reduce_add(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// A vector of T in its accumulation dtype: float16/bfloat16 are widened to
// float32 as they are loaded, so rows of x are never copied.
template <typename T>
Vectorized<at::opmath_type<T>> load_acc(const T* p) {
  if constexpr (at::is_reduced_floating_point_v<T>) {
    Vectorized<float> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  } else {
    return Vectorized<T>::loadu(p);
  }
}

// A hint that the line `ahead` elements after p is read soon. A prefetch never
// faults, so that line may lie past the end of x; the address is computed as
// an integer because such a pointer could not be formed.
template <typename T>
inline void prefetch(const T* p, int64_t ahead) {
#if defined(__GNUC__) || defined(__clang__)
  const auto address = reinterpret_cast<std::uintptr_t>(p) + ahead * sizeof(T);
  __builtin_prefetch(reinterpret_cast<const void*>(address), 0, 3);
#else
  (void)p;
  (void)ahead;
#endif
}

// sum_e a[e] * b[e]. Four accumulators hide the latency of dependent FMAs.
template <typename T, typename A>
A dot(const T* a, const A* b, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t e = 0;
  for (; e + 4 * W <= n; e += 4 * W) {
    s0 = at::vec::fmadd(load_acc(a + e), Vec::loadu(b + e), s0);
    s1 = at::vec::fmadd(load_acc(a + e + W), Vec::loadu(b + e + W), s1);
    s2 = at::vec::fmadd(load_acc(a + e + 2 * W), Vec::loadu(b + e + 2 * W), s2);
    s3 = at::vec::fmadd(load_acc(a + e + 3 * W), Vec::loadu(b + e + 3 * W), s3);
  }
  for (; e + W <= n; e += W) {
    s0 = at::vec::fmadd(load_acc(a + e), Vec::loadu(b + e), s0);
  }
  A tail(0);
  for (; e < n; ++e) {
    tail += static_cast<A>(a[e]) * b[e];
  }
  return reduce_add((s0 + s1) + (s2 + s3)) + tail;
}

// out[r] = rows[r] . v for the R rows of a block. The rows come from memory,
// and the block's second pass (the accumulation) then runs from L1 with the
// memory idle, unless this pass also asks for the rows `ahead` elements on
// (the next block's) in time; ahead = 0 asks for nothing.
template <int R, typename T, typename A>
void dot_rows(const T* const* rows, const A* v, int64_t n, A* out, int64_t ahead = 0) {
  if constexpr (R == 1) {
    out[0] = dot(rows[0], v, n);
  } else {
    using Vec = Vectorized<A>;
    constexpr int64_t W = Vec::size();
    // Two accumulators per row for small blocks: 2R chains of dependent FMAs
    // keep both FMA units busy. Larger blocks have enough chains already (and
    // more would not fit in the 16 registers of AVX2).
    constexpr int kChains = R <= 4 ? 2 : 1;
    Vec acc[kChains][R];
    for (int c = 0; c < kChains; ++c) {
      for (int r = 0; r < R; ++r) {
        acc[c][r] = Vec(A(0));
      }
    }
    int64_t e = 0;
    for (; e + kChains * W <= n; e += kChains * W) {
      for (int c = 0; c < kChains; ++c) {
        const Vec shared = Vec::loadu(v + e + c * W);
        for (int r = 0; r < R; ++r) {
          if (ahead != 0) {
            prefetch(rows[r] + e + c * W, ahead);
          }
          acc[c][r] = at::vec::fmadd(load_acc(rows[r] + e + c * W), shared, acc[c][r]);
        }
      }
    }
    for (; e + W <= n; e += W) {
      const Vec shared = Vec::loadu(v + e);
      for (int r = 0; r < R; ++r) {
        acc[0][r] = at::vec::fmadd(load_acc(rows[r] + e), shared, acc[0][r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      Vec sum = acc[0][r];
      if constexpr (kChains == 2) {
        sum = sum + acc[1][r];
      }
      A total = reduce_add(sum);
      for (int64_t t = e; t < n; ++t) {
        total += static_cast<A>(rows[r][t]) * v[t];
      }
      out[r] = total;
    }
  }
}

// y += sum_r w[r] * rows[r]
template <int R, typename T, typename A>
void axpy_rows(const A* w, const T* const* rows, A* y, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  // Local copies, so that the stores to y do not force reloads of them.
  Vec weights[R];
  const T* xr[R];
  for (int r = 0; r < R; ++r) {
    weights[r] = Vec(w[r]);
    xr[r] = rows[r];
  }
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    Vec acc = Vec::loadu(y + e);
    for (int r = 0; r < R; ++r) {
      acc = at::vec::fmadd(weights[r], load_acc(xr[r] + e), acc);
    }
    acc.store(y + e);
  }
  for (; e < n; ++e) {
    for (int r = 0; r < R; ++r) {
      y[e] += w[r] * static_cast<A>(rows[r][e]);
    }
  }
}

// bfloat16 is the upper half of a float32. Read as 32-bit lanes, 2W values
// widen with one shift (those at even positions) and one mask (odd positions):
// half the instructions of widening them in order, which is what bounds the
// bfloat16 forward on CPUs without AVX512-BF16. The vectors they meet (u, the
// accumulators) are then kept in "paired" order: per block of 2W elements,
// the W at even positions first, then the W at odd positions.
constexpr int64_t kPairWidth = 2 * Vectorized<float>::size();

struct WidenedPairs {
  Vectorized<float> even;
  Vectorized<float> odd;
};

inline WidenedPairs load_pairs(const at::BFloat16* p) {
  const auto bits = Vectorized<int32_t>::loadu(p);
  const auto even = bits << Vectorized<int32_t>(16);
  const auto odd = bits & Vectorized<int32_t>(static_cast<int32_t>(0xFFFF0000u));
  return {at::vec::cast<float>(even), at::vec::cast<float>(odd)};
}

// dst = src in paired order; n is a multiple of kPairWidth.
inline void to_paired_order(const float* src, float* dst, int64_t n) {
  constexpr int64_t W = Vectorized<float>::size();
  for (int64_t block = 0; block < n; block += kPairWidth) {
    for (int64_t j = 0; j < W; ++j) {
      dst[block + j] = src[block + 2 * j];
      dst[block + W + j] = src[block + 2 * j + 1];
    }
  }
}

// dst = src back in natural order; n is a multiple of kPairWidth.
inline void to_natural_order(const float* src, float* dst, int64_t n) {
  constexpr int64_t W = Vectorized<float>::size();
  for (int64_t block = 0; block < n; block += kPairWidth) {
    for (int64_t j = 0; j < W; ++j) {
      dst[block + 2 * j] = src[block + j];
      dst[block + 2 * j + 1] = src[block + W + j];
    }
  }
}

// How the forward reads a row in vectors of the accumulation dtype: one
// vector per chunk of W elements or, for bfloat16 in paired order, two (even
// and odd positions) per chunk of 2W.
template <typename T, bool kPaired>
struct ChunkReader {
  using Vec = Vectorized<at::opmath_type<T>>;
  static constexpr int64_t kWidth = (kPaired ? 2 : 1) * Vec::size();

  // Returned by value, not written through a pointer: that kept the callers'
  // accumulators in registers (through a pointer, GCC spilled them).
  struct Chunk {
    Vec first;
    Vec second;  // paired only
  };

  static Chunk load(const T* p) {
    if constexpr (kPaired) {
      const WidenedPairs xv = load_pairs(p);
      return {xv.even, xv.odd};
    } else {
      return {load_acc(p), Vec()};
    }
  }
};

// scores[r] = rows[r] . v for R rows and y += sum_p w[p] * prev[p] for P
// other rows, in one pass; either count may be 0. The forward scores a block
// from memory while it adds the block before it, still in L1: as a pass of
// its own, that accumulation left the memory idle. kPaired: bfloat16 rows
// against v and y in paired order, n a multiple of kPairWidth.
template <int R, int P, bool kPaired, typename T, typename A>
void score_and_accumulate_rows(
    const T* const* rows,
    const A* v,
    int64_t n,
    A* scores,
    int64_t ahead,
    const A* w,
    const T* const* prev,
    A* y) {
  using Reader = ChunkReader<T, kPaired>;
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec acc_first[std::max(R, 1)];
  Vec acc_second[std::max(R, 1)];
  for (int r = 0; r < R; ++r) {
    acc_first[r] = Vec(A(0));
    acc_second[r] = Vec(A(0));
  }
  // Local copies, so that the stores to y do not force reloads of them.
  Vec weights[std::max(P, 1)];
  const T* pr[std::max(P, 1)] = {};
  for (int q = 0; q < P; ++q) {
    weights[q] = Vec(w[q]);
    pr[q] = prev[q];
  }
  int64_t e = 0;
  for (; e + Reader::kWidth <= n; e += Reader::kWidth) {
    if constexpr (R > 0) {
      const Vec v_first = Vec::loadu(v + e);
      const Vec v_second = kPaired ? Vec::loadu(v + e + W) : Vec();
      for (int r = 0; r < R; ++r) {
        prefetch(rows[r] + e, ahead);
        const auto xv = Reader::load(rows[r] + e);
        acc_first[r] = at::vec::fmadd(xv.first, v_first, acc_first[r]);
        if constexpr (kPaired) {
          acc_second[r] = at::vec::fmadd(xv.second, v_second, acc_second[r]);
        }
      }
    }
    if constexpr (P > 0) {
      Vec y_first = Vec::loadu(y + e);
      Vec y_second = kPaired ? Vec::loadu(y + e + W) : Vec();
      for (int q = 0; q < P; ++q) {
        const auto xv = Reader::load(pr[q] + e);
        y_first = at::vec::fmadd(weights[q], xv.first, y_first);
        if constexpr (kPaired) {
          y_second = at::vec::fmadd(weights[q], xv.second, y_second);
        }
      }
      y_first.store(y + e);
      if constexpr (kPaired) {
        y_second.store(y + e + W);
      }
    }
  }
  // Unrolled, so that the accumulators are registers, not an array in memory.
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    scores[r] = reduce_add(kPaired ? acc_first[r] + acc_second[r] : acc_first[r]);
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t t = e; t < n; ++t) {
      scores[r] += static_cast<A>(rows[r][t]) * v[t];
    }
  }
  for (; e < n; ++e) {
    for (int q = 0; q < P; ++q) {
      y[e] += w[q] * static_cast<A>(prev[q][e]);
    }
  }
}

// The forward's two passes over a block, each on its own: dot_rows and
// axpy_rows, or score_and_accumulate_rows in paired order for bfloat16 rows.
template <int R, typename T, typename A>
void score_rows(const T* const* rows, const A* v, int64_t n, A* out, int64_t ahead, bool paired) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (paired) {
      return score_and_accumulate_rows<R, 0, true, T, A>(
          rows, v, n, out, ahead, nullptr, nullptr, nullptr);
    }
  }
  dot_rows<R>(rows, v, n, out, ahead);
}

template <int R, typename T, typename A>
void accumulate_rows(const A* w, const T* const* rows, A* y, int64_t n, bool paired) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (paired) {
      return score_and_accumulate_rows<0, R, true, T, A>(
          nullptr, nullptr, n, nullptr, 0, w, rows, y);
    }
  }
  axpy_rows<R>(w, rows, y, n);
}

// v.store(p), or with kStream a non-temporal store (p aligned to the vector)
// where this instruction set has one; store_fence() then orders them.
template <bool kStream, typename T>
inline void store(const Vectorized<T>& v, T* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kStream && std::is_same_v<T, float>) {
    return _mm512_stream_ps(p, v);
  } else if constexpr (kStream && std::is_same_v<T, double>) {
    return _mm512_stream_pd(p, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStream && std::is_same_v<T, float>) {
    return _mm256_stream_ps(p, v);
  } else if constexpr (kStream && std::is_same_v<T, double>) {
    return _mm256_stream_pd(p, v);
  }
#endif
  v.store(p);
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// scores[r] = rows[r] . u and dprobs[r] = rows[r] . g in one pass over the rows.
// (No prefetch here: the backward's second pass writes dx, which keeps the
// memory busy; prefetching the next block measured slower.)
template <int R, typename T, typename A>
void dot2_rows(const T* const* rows, const A* u, const A* g, int64_t n, A* scores, A* dprobs) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec su[R];
  Vec sg[R];
  for (int r = 0; r < R; ++r) {
    su[r] = Vec(A(0));
    sg[r] = Vec(A(0));
  }
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    const Vec uv = Vec::loadu(u + e);
    const Vec gv = Vec::loadu(g + e);
    for (int r = 0; r < R; ++r) {
      const Vec xv = load_acc(rows[r] + e);
      su[r] = at::vec::fmadd(xv, uv, su[r]);
      sg[r] = at::vec::fmadd(xv, gv, sg[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    A tu = reduce_add(su[r]);
    A tg = reduce_add(sg[r]);
    for (int64_t t = e; t < n; ++t) {
      tu += static_cast<A>(rows[r][t]) * u[t];
      tg += static_cast<A>(rows[r][t]) * g[t];
    }
    scores[r] = tu;
    dprobs[r] = tg;
  }
}

// dx[r] = p[r] * g + ds[r] * u and du += sum_r ds[r] * rows[r], in one pass.
// dx rows of a reduced dtype D are rounded as they are stored, the same
// rounding as computing them in float and converting the row afterwards.
template <int R, bool kStream, typename T, typename A, typename D>
void dx_du_rows(
    const A* p,
    const A* ds,
    const A* g,
    const A* u,
    const T* const* rows,
    D* const* dx,
    A* du,
    int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  constexpr bool kNarrow = !std::is_same_v<D, A>;
  static_assert(!kNarrow || !kStream, "non-temporal stores are for float and double dx");
  // Local copies: the stores below could alias the caller's arrays, which
  // would make the compiler reload every pointer and weight per vector.
  const T* xr[R];
  D* out[R];
  Vec pv[R];
  Vec dsv[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = rows[r];
    out[r] = dx[r];
    pv[r] = Vec(p[r]);
    dsv[r] = Vec(ds[r]);
  }
  auto dx_at = [&](int r, int64_t e) {
    return at::vec::fmadd(dsv[r], Vec::loadu(u + e), pv[r] * Vec::loadu(g + e));
  };
  int64_t e = 0;
  if constexpr (kNarrow) {
    // Two float vectors make one vector of D.
    for (; e + 2 * W <= n; e += 2 * W) {
      Vec acc_lo = Vec::loadu(du + e);
      Vec acc_hi = Vec::loadu(du + e + W);
      for (int r = 0; r < R; ++r) {
        at::vec::convert_from_float<D>(dx_at(r, e), dx_at(r, e + W)).store(out[r] + e);
        acc_lo = at::vec::fmadd(dsv[r], load_acc(xr[r] + e), acc_lo);
        acc_hi = at::vec::fmadd(dsv[r], load_acc(xr[r] + e + W), acc_hi);
      }
      acc_lo.store(du + e);
      acc_hi.store(du + e + W);
    }
  }
  for (; e + W <= n; e += W) {
    Vec acc = Vec::loadu(du + e);
    for (int r = 0; r < R; ++r) {
      if constexpr (kNarrow) {
        at::vec::convert_from_float<D>(dx_at(r, e), Vec(A(0))).store(out[r] + e, W);
      } else {
        store<kStream>(dx_at(r, e), out[r] + e);
      }
      acc = at::vec::fmadd(dsv[r], load_acc(xr[r] + e), acc);
    }
    acc.store(du + e);
  }
  for (; e < n; ++e) {
    for (int r = 0; r < R; ++r) {
      dx[r][e] = static_cast<D>(p[r] * g[e] + ds[r] * u[e]);
      du[e] += ds[r] * static_cast<A>(rows[r][e]);
    }
  }
}

// ys[r] = w[r] * v (kAccumulate: ys[r] += w[r] * v)
template <int R, bool kAccumulate, typename T>
void scaled_into_rows(const T* w, const T* v, T* const* ys, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  // Local copies, so that the stores to ys do not force reloads of them.
  Vec weights[R];
  T* out[R];
  for (int r = 0; r < R; ++r) {
    weights[r] = Vec(w[r]);
    out[r] = ys[r];
  }
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    const Vec shared = Vec::loadu(v + e);
    for (int r = 0; r < R; ++r) {
      const Vec scaled = weights[r] * shared;
      (kAccumulate ? scaled + Vec::loadu(out[r] + e) : scaled).store(out[r] + e);
    }
  }
  for (; e < n; ++e) {
    for (int r = 0; r < R; ++r) {
      ys[r][e] = kAccumulate ? ys[r][e] + w[r] * v[e] : w[r] * v[e];
    }
  }
}

// y *= alpha
template <typename T>
void scale_in_place(T alpha, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec a(alpha);
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    (a * Vec::loadu(y + e)).store(y + e);
  }
  for (; e < n; ++e) {
    y[e] *= alpha;
  }
}

// y += x
template <typename T>
void add_in_place(const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    (Vec::loadu(y + e) + Vec::loadu(x + e)).store(y + e);
  }
  for (; e < n; ++e) {
    y[e] += x[e];
  }
}

// dst = src, converting to the accumulation dtype (or back) when they differ.
template <typename src_t, typename dst_t>
void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::copy(src, src + n, dst);
  } else if constexpr (at::is_reduced_floating_point_v<src_t>) {
    using bVec = Vectorized<src_t>;
    using fVec = Vectorized<float>;
    int64_t e = 0;
    for (; e + bVec::size() <= n; e += bVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<src_t>(bVec::loadu(src + e));
      lo.store(dst + e);
      hi.store(dst + e + fVec::size());
    }
    for (; e < n; ++e) {
      dst[e] = static_cast<float>(src[e]);
    }
  } else {
    using bVec = Vectorized<dst_t>;
    using fVec = Vectorized<float>;
    int64_t e = 0;
    for (; e + bVec::size() <= n; e += bVec::size()) {
      const auto lo = fVec::loadu(src + e);
      const auto hi = fVec::loadu(src + e + fVec::size());
      at::vec::convert_from_float<dst_t>(lo, hi).store(dst + e);
    }
    for (; e < n; ++e) {
      dst[e] = static_cast<dst_t>(src[e]);
    }
  }
}

// Calls f with std::integral_constant<int, count> (1 <= count <= kMax), so
// that the per-block loops are unrolled for the block's actual number of rows.
template <int kMax, typename F>
void with_block_size(int count, F&& f) {
  if constexpr (kMax > 1) {
    if (count < kMax) {
      return with_block_size<kMax - 1>(count, std::forward<F>(f));
    }
  }
  f(std::integral_constant<int, kMax>{});
}

// Up to kCapacity unmasked rows of x, read in place.
template <typename scalar_t, int kCapacity>
class RowBlock {
 public:
  void add(const scalar_t* row) {
    rows_[count_++] = row;
  }
  bool full() const {
    return count_ == kCapacity;
  }
  int count() const {
    return count_;
  }
  const scalar_t* const* rows() const {
    return rows_;
  }
  void clear() {
    count_ = 0;
  }

 private:
  const scalar_t* rows_[kCapacity] = {};
  int count_ = 0;
};

template <int R, typename T>
void offset_rows(const T* const* rows, int64_t offset, const T** out) {
  for (int r = 0; r < R; ++r) {
    out[r] = rows[r] + offset;
  }
}

// Geometry shared by every loop: sizes and strides of x and the mask.
struct Rows {
  PoolShape shape;
  int64_t head_dim;
  int64_t num_scores;
  int64_t x_batch_stride;
  int64_t x_seq_stride;
  const bool* mask;
  int64_t mask_batch_stride;
  int64_t mask_seq_stride;

  template <typename Params>
  static Rows of(const Params& p) {
    return {
        p.shape,
        p.shape.num_heads > 0 ? p.shape.hidden / p.shape.num_heads : 0,
        p.shape.num_queries * p.shape.num_heads,
        p.x_batch_stride,
        p.x_seq_stride,
        p.mask,
        p.mask_batch_stride,
        p.mask_seq_stride};
  }

  bool attends(int64_t b, int64_t l) const {
    return mask == nullptr || mask[b * mask_batch_stride + l * mask_seq_stride];
  }

  template <typename scalar_t>
  const scalar_t* row(const scalar_t* x, int64_t b, int64_t l) const {
    return x + b * x_batch_stride + l * x_seq_stride;
  }
};

// Online-softmax state of one (piece of a) sequence for all Q*n scores:
// [any_valid, running max[K], running sum[K], weighted sum of x[Q*H]],
// one flat array so that a piece's state can live in the partials buffer.
template <typename acc_t>
class SoftmaxState {
 public:
  static int64_t size(const Rows& r) {
    return 1 + 2 * r.num_scores + r.shape.num_queries * r.shape.hidden;
  }

  // paired: the weighted sums are kept in paired order (see load_pairs).
  SoftmaxState(acc_t* data, const Rows& r, bool paired) : data_(data), r_(r), paired_(paired) {}

  acc_t* max() const {
    return data_ + 1;
  }
  acc_t* sum() const {
    return data_ + 1 + r_.num_scores;
  }
  acc_t* weighted() const {
    return data_ + 1 + 2 * r_.num_scores;
  }
  bool any_valid() const {
    return data_[0] != acc_t(0);
  }

  void reset() {
    data_[0] = acc_t(0);
    std::fill_n(max(), r_.num_scores, kNegInf<acc_t>);
    std::fill_n(sum(), r_.num_scores + r_.shape.num_queries * r_.shape.hidden, acc_t(0));
  }

  // Adds a block of R unmasked rows of x with score vectors u.
  template <int R, typename scalar_t>
  void add_rows(const scalar_t* const* rows, const acc_t* u, acc_t scale) {
    const int64_t H = r_.shape.hidden;
    const int64_t n = r_.shape.num_heads;
    const int64_t d = r_.head_dim;
    data_[0] = acc_t(1);
    acc_t scores[R];
    acc_t weights[R];
    const scalar_t* segments[R];
    for (int64_t i = 0; i < r_.shape.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t k = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        // The first head's score pass brings in the next block; the other
        // heads read this block again, from L1.
        score_rows<R>(rows, u + k * H, H, scores, k == 0 ? R * r_.x_seq_stride : 0, paired_);
        weigh_rows<R>(k, scale, scores, weights, acc, d);
        offset_rows<R>(rows, h * d, segments);
        accumulate_rows<R>(weights, segments, acc, d, paired_);
      }
    }
  }

  // add_rows for one query and one head, a block behind: scores this block's
  // R rows while adding the previous block's P rows (prev, with the weights
  // the previous call returned) to the weighted sum. This block's weights
  // come back in `weights`; the last block goes in with add_previous_rows.
  template <int R, int P, typename scalar_t>
  void add_rows_pipelined(
      const scalar_t* const* rows,
      const acc_t* u,
      acc_t scale,
      const scalar_t* const* prev,
      const acc_t* prev_weights,
      acc_t* weights) {
    const int64_t H = r_.shape.hidden;
    const int64_t ahead = R * r_.x_seq_stride;
    data_[0] = acc_t(1);
    acc_t scores[R];
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (paired_) {
        score_and_accumulate_rows<R, P, true>(
            rows, u, H, scores, ahead, prev_weights, prev, weighted());
        return weigh_rows<R>(0, scale, scores, weights, weighted(), H);
      }
    }
    score_and_accumulate_rows<R, P, false>(
        rows, u, H, scores, ahead, prev_weights, prev, weighted());
    weigh_rows<R>(0, scale, scores, weights, weighted(), H);
  }

  template <int P, typename scalar_t>
  void add_previous_rows(const scalar_t* const* prev, const acc_t* prev_weights) {
    accumulate_rows<P>(prev_weights, prev, weighted(), r_.shape.hidden, paired_);
  }

  // Folds another piece's state into this one. Pieces are merged in a fixed
  // order by the caller, so the result does not depend on the thread count.
  void merge(const SoftmaxState& other) {
    const int64_t H = r_.shape.hidden;
    const int64_t n = r_.shape.num_heads;
    const int64_t d = r_.head_dim;
    if (!other.any_valid()) {
      return;
    }
    data_[0] = acc_t(1);
    for (int64_t i = 0; i < r_.shape.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t k = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        const acc_t* other_acc = other.weighted() + i * H + h * d;
        const acc_t m = std::max(max()[k], other.max()[k]);
        // Both maxima -inf: every score so far is -inf and weighs 0 (sums are
        // 0); keep the zero-weighted accumulations, as a softmax would.
        const bool none_finite = m == kNegInf<acc_t>;
        const acc_t mine = none_finite ? acc_t(1) : std::exp(max()[k] - m);
        const acc_t theirs = none_finite ? acc_t(1) : std::exp(other.max()[k] - m);
        sum()[k] = sum()[k] * mine + other.sum()[k] * theirs;
        scale_in_place(mine, acc, d);
        const acc_t* other_rows[1] = {other_acc};
        axpy_rows<1>(&theirs, other_rows, acc, d);
        max()[k] = m;
      }
    }
  }

  // out[i, D_h] = weighted / sum and lse = max + log(sum); a sequence with
  // no unmasked position gives zeros and lse = -inf.
  void finish(acc_t* out, acc_t* lse) {
    const int64_t H = r_.shape.hidden;
    const int64_t n = r_.shape.num_heads;
    const int64_t d = r_.head_dim;
    for (int64_t i = 0; i < r_.shape.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t k = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        if (any_valid()) {
          scale_in_place(acc_t(1) / sum()[k], acc, d);
          lse[k] = max()[k] + std::log(sum()[k]);
        } else {
          std::fill_n(acc, d, acc_t(0));
          lse[k] = kNegInf<acc_t>;
        }
        if constexpr (std::is_same_v<acc_t, float>) {
          if (paired_) {
            to_natural_order(acc, out + i * H + h * d, d);
            continue;
          }
        }
        convert_row(acc, out + i * H + h * d, d);
      }
    }
  }

 private:
  // Scales score k of R rows, moves its running max (rescaling its sum and
  // its weighted sum acc, d wide) and sets weights[r] = exp(score - max).
  template <int R>
  void weigh_rows(int64_t k, acc_t scale, acc_t* scores, acc_t* weights, acc_t* acc, int64_t d) {
    acc_t block_max = kNegInf<acc_t>;
    for (int r = 0; r < R; ++r) {
      scores[r] *= scale;
      block_max = scores[r] > block_max ? scores[r] : block_max;
    }
    if (block_max > max()[k]) {
      // exp(-inf) = 0 also covers the first valid rows.
      const acc_t correction = std::exp(max()[k] - block_max);
      sum()[k] *= correction;
      scale_in_place(correction, acc, d);
      max()[k] = block_max;
    }
    for (int r = 0; r < R; ++r) {
      // A -inf score weighs 0 even while the running max is still -inf.
      weights[r] = scores[r] == kNegInf<acc_t> ? acc_t(0) : std::exp(scores[r] - max()[k]);
      sum()[k] += weights[r];
    }
  }

  acc_t* data_;
  Rows r_;
  bool paired_;
};

// x: [B, L, H] rows contiguous; u: [K, H]; out: [B, Q, H] and lse: [B, K],
// both in the accumulation dtype.
// One pass over x. Work item = (sequence b, piece of its rows); a sequence
// cut into several pieces keeps each piece's state in `partials` and the
// pieces are merged in order afterwards (flash-decoding on the CPU).
template <typename scalar_t>
void forward_impl(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Rows r = Rows::of(p);
  const PoolShape& s = p.shape;
  const WorkPlan& plan = p.plan;
  const int64_t K = r.num_scores;
  const int64_t state_size = SoftmaxState<acc_t>::size(r);
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* u = static_cast<const acc_t*>(p.u);
  auto* out = static_cast<acc_t*>(p.out);
  auto* lse = static_cast<acc_t*>(p.lse);
  auto* partials = static_cast<acc_t*>(p.partials);
  const auto scale = static_cast<acc_t>(p.scale);
  const bool split = plan.splits > 1;
  const bool pipelined = K == 1;
  const bool paired =
      std::is_same_v<scalar_t, at::BFloat16> && r.head_dim > 0 && r.head_dim % kPairWidth == 0;
  std::vector<acc_t> u_paired;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (paired) {
      u_paired.resize(K * s.hidden);
      to_paired_order(u, u_paired.data(), K * s.hidden);
      u = u_paired.data();
    }
  }

  at::parallel_for(0, s.batch * plan.splits, plan.forward_grain, [&](int64_t begin, int64_t end) {
    RowBlock<scalar_t, kForwardBlockRows> block;
    // With one score per row, each block is added to the weighted sum while
    // the next one is scored (SoftmaxState::add_rows_pipelined).
    RowBlock<scalar_t, kForwardBlockRows> previous;
    acc_t previous_weights[kForwardBlockRows] = {};
    std::vector<acc_t> local(split ? 0 : state_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / plan.splits;
      const int64_t first = (item % plan.splits) * plan.rows_per_split;
      const int64_t last = std::min(s.seq_len, first + plan.rows_per_split);
      SoftmaxState<acc_t> state(split ? partials + item * state_size : local.data(), r, paired);
      state.reset();
      auto flush = [&] {
        if (!pipelined) {
          with_block_size<kForwardBlockRows>(block.count(), [&](auto rows) {
            state.template add_rows<decltype(rows)::value>(block.rows(), u, scale);
          });
          block.clear();
          return;
        }
        // Only a piece's last block can be short, so the previous one is full.
        TORCH_INTERNAL_ASSERT_DEBUG_ONLY(previous.count() == 0 || previous.full());
        acc_t weights[kForwardBlockRows];
        with_block_size<kForwardBlockRows>(block.count(), [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          if (previous.count() == 0) {
            state.template add_rows_pipelined<R, 0>(
                block.rows(), u, scale, previous.rows(), previous_weights, weights);
          } else {
            state.template add_rows_pipelined<R, kForwardBlockRows>(
                block.rows(), u, scale, previous.rows(), previous_weights, weights);
          }
        });
        previous = block;
        std::copy_n(weights, block.count(), previous_weights);
        block.clear();
      };
      for (int64_t l = first; l < last; ++l) {
        if (r.attends(b, l)) {
          block.add(r.row(x, b, l));
          if (block.full()) {
            flush();
          }
        }
      }
      if (block.count() > 0) {
        flush();
      }
      if (previous.count() > 0) {
        with_block_size<kForwardBlockRows>(previous.count(), [&](auto rows) {
          state.template add_previous_rows<decltype(rows)::value>(
              previous.rows(), previous_weights);
        });
        previous.clear();
      }
      if (!split) {
        state.finish(out + b * s.num_queries * s.hidden, lse + b * K);
      }
    }
  });
  if (!split) {
    return;
  }
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> merged(state_size);
    for (int64_t b = begin; b < end; ++b) {
      SoftmaxState<acc_t> state(merged.data(), r, paired);
      state.reset();
      for (int64_t piece = 0; piece < plan.splits; ++piece) {
        state.merge(
            SoftmaxState<acc_t>(partials + (b * plan.splits + piece) * state_size, r, paired));
      }
      state.finish(out + b * s.num_queries * s.hidden, lse + b * K);
    }
  });
}

// delta[b, k] = sum over head h's dims of grad_out[b, i] * out[b, i].
template <typename acc_t>
void compute_delta(const BackwardParams& p, const Rows& r, acc_t* delta) {
  const auto* g = static_cast<const acc_t*>(p.grad_out);
  const auto* o = static_cast<const acc_t*>(p.out);
  const PoolShape& s = p.shape;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t i = 0; i < s.num_queries; ++i) {
      for (int64_t h = 0; h < s.num_heads; ++h) {
        const int64_t offset = (b * s.num_queries + i) * s.hidden + h * r.head_dim;
        delta[b * r.num_scores + i * s.num_heads + h] = dot(g + offset, o + offset, r.head_dim);
      }
    }
  }
}

// out = sum over the parts of partials [parts, width], in part order, so
// that the sum does not depend on which thread computed which part.
template <typename T>
void sum_parts_in_order(const T* partials, int64_t parts, int64_t width, T* out) {
  at::parallel_for(0, width, 4096, [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, T(0));
    for (int64_t part = 0; part < parts; ++part) {
      add_in_place(partials + part * width + begin, out + begin, end - begin);
    }
  });
}

// backward_rows for one query and one head: two passes over the rows instead
// of five, and dx written in x's dtype directly.
template <int R, typename scalar_t, typename acc_t>
void backward_rows_one_score(
    const Rows& r,
    int64_t b,
    const scalar_t* const* rows,
    scalar_t* const* dx_rows,
    const acc_t* u,
    const acc_t* g,
    const acc_t* lse,
    const acc_t* delta,
    acc_t scale,
    acc_t* du,
    bool stream_dx) {
  const int64_t H = r.shape.hidden;
  const acc_t* g0 = g + b * H;
  acc_t scores[R];
  acc_t dprobs[R];
  acc_t probs[R];
  acc_t dscores[R];
  dot2_rows<R>(rows, u, g0, H, scores, dprobs);
  for (int j = 0; j < R; ++j) {
    probs[j] = std::exp(scale * scores[j] - lse[b]);
    dscores[j] = scale * probs[j] * (dprobs[j] - delta[b]);
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stream_dx) {
      return dx_du_rows<R, true>(probs, dscores, g0, u, rows, dx_rows, du, H);
    }
  }
  dx_du_rows<R, false>(probs, dscores, g0, u, rows, dx_rows, du, H);
}

// Backward of one block of R unmasked rows of sequence b:
//   p = exp(scale * x.u_k - lse), ds = scale * p * (G_i[D_h].x[D_h] - delta)
//   dx = sum_k p * G_i[D_h] + ds * u_k,   du_k += ds * x
template <int R, typename scalar_t, typename acc_t>
void backward_rows(
    const Rows& r,
    int64_t b,
    const scalar_t* const* rows,
    acc_t* const* dx_rows,
    const acc_t* u,
    const acc_t* g,
    const acc_t* lse,
    const acc_t* delta,
    acc_t scale,
    acc_t* probs,    // [K][R] scratch
    acc_t* dscores,  // [K][R] scratch
    acc_t* du) {
  const PoolShape& s = r.shape;
  const int64_t H = s.hidden;
  const int64_t n = s.num_heads;
  const int64_t d = r.head_dim;
  const int64_t K = r.num_scores;
  const scalar_t* segments[R];
  acc_t* dx_segments[R];
  acc_t scores[R];
  acc_t dprobs[R];
  for (int64_t i = 0; i < s.num_queries; ++i) {
    const acc_t* gi = g + (b * s.num_queries + i) * H;
    for (int64_t h = 0; h < n; ++h) {
      const int64_t k = i * n + h;
      dot_rows<R>(rows, u + k * H, H, scores);
      offset_rows<R>(rows, h * d, segments);
      dot_rows<R>(segments, gi + h * d, d, dprobs);
      for (int j = 0; j < R; ++j) {
        const acc_t prob = std::exp(scale * scores[j] - lse[b * K + k]);
        probs[k * R + j] = prob;
        dscores[k * R + j] = scale * prob * (dprobs[j] - delta[b * K + k]);
      }
    }
  }
  if (s.num_queries == 0) {
    for (int j = 0; j < R; ++j) {
      std::fill_n(dx_rows[j], H, acc_t(0));
    }
  }
  for (int64_t i = 0; i < s.num_queries; ++i) {
    const acc_t* gi = g + (b * s.num_queries + i) * H;
    for (int64_t h = 0; h < n; ++h) {
      for (int j = 0; j < R; ++j) {
        dx_segments[j] = dx_rows[j] + h * d;
      }
      const acc_t* weights = probs + (i * n + h) * R;
      if (i == 0) {
        scaled_into_rows<R, false>(weights, gi + h * d, dx_segments, d);
      } else {
        scaled_into_rows<R, true>(weights, gi + h * d, dx_segments, d);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    scaled_into_rows<R, true>(dscores + k * R, u + k * H, dx_rows, H);
    axpy_rows<R>(dscores + k * R, rows, du + k * H, H);
  }
}

// x: [B, L, H]; grad_out, out: [B, Q, H]; lse, delta: [B, K]; u: [K, H].
// One pass over x writing dx; each work item (a run of rows of the flattened
// [B * L]) accumulates its own du partial, reduced afterwards in item order.
template <typename scalar_t>
void backward_impl(const BackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDxInPlace = std::is_same_v<scalar_t, acc_t>;
  const Rows r = Rows::of(p);
  const PoolShape& s = p.shape;
  const WorkPlan& plan = p.plan;
  const int64_t H = s.hidden;
  const int64_t K = r.num_scores;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* u = static_cast<const acc_t*>(p.u);
  const auto* g = static_cast<const acc_t*>(p.grad_out);
  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* delta = static_cast<const acc_t*>(p.delta);
  auto* dx = static_cast<scalar_t*>(p.dx);
  auto* du_partials = static_cast<acc_t*>(p.du_partials);
  const auto scale = static_cast<acc_t>(p.scale);
  const int64_t rows = s.batch * s.seq_len;

  at::parallel_for(0, plan.items, plan.backward_grain, [&](int64_t begin, int64_t end) {
    RowBlock<scalar_t, kBackwardBlockRows> block;
    std::vector<acc_t> dx_buffer(kDxInPlace || K == 1 ? 0 : kBackwardBlockRows * H);
    std::vector<acc_t> scratch(2 * K * kBackwardBlockRows);
    scalar_t* dx_out[kBackwardBlockRows] = {};
    int64_t block_batch = 0;
    for (int64_t item = begin; item < end; ++item) {
      acc_t* du = du_partials + item * K * H;
      std::fill_n(du, K * H, acc_t(0));
      auto flush = [&] {
        const int count = block.count();
        if (K == 1) {
          with_block_size<kBackwardBlockRows>(count, [&](auto size) {
            backward_rows_one_score<decltype(size)::value>(
                r, block_batch, block.rows(), dx_out, u, g, lse, delta, scale, du, p.stream_dx);
          });
          block.clear();
          return;
        }
        acc_t* dx_rows[kBackwardBlockRows];
        for (int j = 0; j < count; ++j) {
          if constexpr (kDxInPlace) {
            dx_rows[j] = dx_out[j];
          } else {
            dx_rows[j] = dx_buffer.data() + j * H;
          }
        }
        with_block_size<kBackwardBlockRows>(count, [&](auto size) {
          backward_rows<decltype(size)::value>(
              r,
              block_batch,
              block.rows(),
              dx_rows,
              u,
              g,
              lse,
              delta,
              scale,
              scratch.data(),
              scratch.data() + K * kBackwardBlockRows,
              du);
        });
        if constexpr (!kDxInPlace) {
          for (int j = 0; j < count; ++j) {
            convert_row(dx_rows[j], dx_out[j], H);
          }
        }
        block.clear();
      };
      const int64_t last = std::min(rows, (item + 1) * plan.rows_per_item);
      for (int64_t row = item * plan.rows_per_item; row < last; ++row) {
        const int64_t b = row / s.seq_len;
        const int64_t l = row % s.seq_len;
        if (block.count() > 0 && b != block_batch) {
          flush();
        }
        if (!r.attends(b, l)) {
          std::fill_n(dx + row * H, H, scalar_t(0));
          continue;
        }
        dx_out[block.count()] = dx + row * H;
        block_batch = b;
        block.add(r.row(x, b, l));
        if (block.full()) {
          flush();
        }
      }
      if (block.count() > 0) {
        flush();
      }
    }
    if (p.stream_dx) {
      store_fence();
    }
  });
  sum_parts_in_order(du_partials, plan.items, K * H, static_cast<acc_t*>(p.du));
}

// Calls f(task, first_row, end_row) for every task of the fold's cut
// (FoldShape), tasks spread over the threads.
template <typename F>
void for_each_fold_task(const FoldShape& s, const F& f) {
  const int64_t d = s.hidden / s.num_heads;
  const int64_t run_rows = (d + s.runs_per_head - 1) / s.runs_per_head;
  at::parallel_for(0, s.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / s.runs_per_head;
      const int64_t run = task % s.runs_per_head;
      const int64_t first = h * d + std::min(d, run * run_rows);
      f(task, first, h * d + std::min(d, (run + 1) * run_rows));
    }
  });
}

// Asks for row j + 2 of each weight while row j is read. Without it the fold
// read its two weights about 10% slower.
template <typename T>
void prefetch_weight_rows(const T* a, const T* b, int64_t j, int64_t H) {
  for (int64_t e = 0; e < H; e += 64 / static_cast<int64_t>(sizeof(T))) {
    prefetch(a + j * H + e, 2 * H);
    prefetch(b + j * H + e, 2 * H);
  }
}

// q'[i, j] = query[i] . w_q[j], and u[i*n + h] = sum over j in D_h of
// q'[i, j] * w_k[j], in one parallel pass that reads row j of both weights
// together. With one head the runs' partial u are summed in order at the
// end. (Two at::matmul calls, or a pass over w_q and then one over w_k cut by
// columns, took about twice as long as reading both weights: at BERT size
// 10-15% of the whole forward.)
template <typename T>
void fold_impl(const FoldParams& p) {
  const FoldShape& s = p.shape;
  const int64_t H = s.hidden;
  const int64_t Q = s.num_queries;
  const int64_t n = s.num_heads;
  const int64_t K = Q * n;
  const auto* query = static_cast<const T*>(p.query);
  const auto* w_q = static_cast<const T*>(p.w_q);
  const auto* w_k = static_cast<const T*>(p.w_k);
  auto* projected = static_cast<T*>(p.projected);
  auto* partials = static_cast<T*>(p.partials);
  const bool in_runs = s.runs_per_head > 1;
  auto* u = in_runs ? partials : static_cast<T*>(p.u);

  for_each_fold_task(s, [&](int64_t task, int64_t first, int64_t end) {
    const int64_t h = task / s.runs_per_head;
    T* sums = u + (in_runs ? task % s.runs_per_head * K * H : 0);
    for (int64_t i = 0; i < Q; ++i) {
      std::fill_n(sums + (i * n + h) * H, H, T(0));
    }
    for (int64_t j = first; j < end; ++j) {
      prefetch_weight_rows(w_q, w_k, j, H);
      const T* w_k_row = w_k + j * H;
      for (int64_t i = 0; i < Q; ++i) {
        const T z = dot(w_q + j * H, query + i * H, H);
        projected[i * H + j] = z;
        axpy_rows<1>(&z, &w_k_row, sums + (i * n + h) * H, H);
      }
    }
  });
  if (in_runs) {
    sum_parts_in_order(partials, s.runs_per_head, K * H, static_cast<T*>(p.u));
  }
}

// The fold's backward in the same cut, one pass over row j of both weights:
//   dq'[i, j] = grad_u[i*n + h] . w_k[j]          (h the head of row j)
//   grad_w_k[j] = sum_i q'[i, j] * grad_u[i*n + h]
//   grad_w_q[j] = sum_i dq'[i, j] * query[i]
//   grad_query[i] = sum_j dq'[i, j] * w_q[j]      (a partial per task)
// Matmuls here gave gradients that changed with the number of threads.
template <typename T>
void unfold_impl(const UnfoldParams& p) {
  const FoldShape& s = p.shape;
  const int64_t H = s.hidden;
  const int64_t Q = s.num_queries;
  const int64_t n = s.num_heads;
  const auto* query = static_cast<const T*>(p.query);
  const auto* w_q = static_cast<const T*>(p.w_q);
  const auto* w_k = static_cast<const T*>(p.w_k);
  const auto* projected = static_cast<const T*>(p.projected);
  const auto* grad_u = static_cast<const T*>(p.grad_u);
  auto* grad_w_q = static_cast<T*>(p.grad_w_q);
  auto* grad_w_k = static_cast<T*>(p.grad_w_k);
  const bool in_parts = s.tasks() > 1;
  auto* grad_query = in_parts ? static_cast<T*>(p.partials) : static_cast<T*>(p.grad_query);

  for_each_fold_task(s, [&](int64_t task, int64_t first, int64_t end) {
    const int64_t h = task / s.runs_per_head;
    T* query_sums = grad_query + (in_parts ? task * Q * H : 0);
    std::fill_n(query_sums, Q * H, T(0));
    for (int64_t j = first; j < end; ++j) {
      prefetch_weight_rows(w_q, w_k, j, H);
      T* const w_k_grad_row = grad_w_k + j * H;
      T* const w_q_grad_row = grad_w_q + j * H;
      const T* w_q_row = w_q + j * H;
      for (int64_t i = 0; i < Q; ++i) {
        const T* du = grad_u + (i * n + h) * H;
        const T dq = dot(w_k + j * H, du, H);
        const T q = projected[i * H + j];
        if (i == 0) {
          scaled_into_rows<1, false>(&q, du, &w_k_grad_row, H);
          scaled_into_rows<1, false>(&dq, query, &w_q_grad_row, H);
        } else {
          scaled_into_rows<1, true>(&q, du, &w_k_grad_row, H);
          scaled_into_rows<1, true>(&dq, query + i * H, &w_q_grad_row, H);
        }
        axpy_rows<1>(&dq, &w_q_row, query_sums + i * H, H);
      }
    }
  });
  if (in_parts) {
    sum_parts_in_order(grad_query, s.tasks(), Q * H, static_cast<T*>(p.grad_query));
  }
}

void forward(const ForwardParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "attention_pool_forward", [&] {
    forward_impl<scalar_t>(p);
  });
}

void fold(const FoldParams& p) {
  AT_DISPATCH_FLOATING_TYPES(p.dtype, "attention_pool_fold", [&] { fold_impl<scalar_t>(p); });
}

void unfold(const UnfoldParams& p) {
  AT_DISPATCH_FLOATING_TYPES(p.dtype, "attention_pool_unfold", [&] { unfold_impl<scalar_t>(p); });
}

void backward(const BackwardParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.dtype, "attention_pool_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        compute_delta<acc_t>(p, Rows::of(p), static_cast<acc_t*>(p.delta));
        backward_impl<scalar_t>(p);
      });
}

#define ATTNPOOL_STRINGIFY_(x) #x
#define ATTNPOOL_STRINGIFY(x) ATTNPOOL_STRINGIFY_(x)

[[maybe_unused]] const bool registered = register_kernels(
    {Isa::CPU_CAPABILITY, ATTNPOOL_STRINGIFY(CPU_CAPABILITY), &forward, &backward, &fold, &unfold});

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
