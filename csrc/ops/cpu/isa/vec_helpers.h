#pragma once

// Vector helpers of the CPU kernels: loads that widen float16/bfloat16, dot
// products and weighted sums over tiles of rows, bfloat16 read in pairs.
// Compiled once per instruction set, through isa/kernels.h (see
// ops/cpu/README.md); everything here is in an anonymous namespace inside
// CPU_CAPABILITY, so each instruction set's copy stays its own.

// The guard of every file in isa/: each includes this one first.
#ifndef CPU_CAPABILITY
#error "include ops/cpu/isa/kernels.h from an isa/kernels_<isa>.cpp file"
#endif

#include "ops/cpu/isa/amx_scores.h"
#include "ops/pool_params.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
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

// [Note: tile sizes] Rows of x are handled in tiles: one load of a shared
// vector (u, grad_out, an accumulator) then serves every row of the tile, and
// the tile's rows stay in L1 between the score pass and the accumulation
// pass. The sizes were measured on a 2-core Xeon (AVX-512): the forward also
// holds the next tile's prefetched rows (and, pipelined, the previous
// tile's) in L1, where they fit ([Note: prefetches from memory]), and was
// no faster with 8 rows; the backward, which loads and stores its du
// accumulator once per tile, was 15% faster with 8 than with 4.
constexpr int kForwardTileRows = 4;
constexpr int kBackwardTileRows = 8;

// How many rows ahead the one-score kernels prefetch when they read float
// rows one at a time (the forward's score_and_accumulate_row_by_row, the
// backward's backward_rows_one_score): 4, 8 and 16 rows of 768 floats were
// alike on a 2-core EPYC, 2 slower.
constexpr int kRowByRowAhead = 8;

// [Note: rows one at a time] Whether the one-score kernels read rows of
// type T (summed in A) one at a time when x does not fit the last-level
// cache (ForwardParams::x_fits_cache): rows read as they are (float32,
// float64) do, as one stream of loads reads memory faster than a tile's rows
// interleaved on a 2-core EPYC (32 MB of L3). From the cache the tile is
// faster: each row's score is one chain of dependent FMAs, and a tile runs R
// chains at once. float32, 2 threads, both ways in one process, times over
// x.sum()'s: forward 32x128x768 2.74 -> 1.72, 16x512x768 1.90 -> 1.48;
// forward+backward over x.sum() + x.clone() 1.91 -> 1.57 and 1.58 -> 1.46.
// At 64x768x768 (150 MB) the tile's forward took 1.37 against 1.20 one row
// at a time; at 35 to 50 MB runs disagreed. Both sum every score and every
// weighted sum in the same order, so the choice never changes a result.
// Rows widened from 16 bits always keep the tile: its rows share the loads
// of u and of the sums and the widening, and were slower one at a time.
template <typename T, typename A>
constexpr bool kReadsRowByRow = std::is_same_v<T, A>;

// Vector registers of this instruction set: kernels that keep a block of
// sums in registers size it by this, so that AVX2 does not spill.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// Whether the one-score forward, too, reads such rows one at a time from
// memory ([Note: rows one at a time]): only where a vector holds 16 floats
// (AVX-512). With 8 (AVX2, and the default level), a row's one chain of
// FMAs adds half as much per step as there, and the tile, R chains at once,
// was faster at every size: float32 forward, 2 threads, a 2-core Zen 4 EPYC
// whose CPU shows only AVX2, both ways in one process (median of 15 paired
// ratios, tile over one row at a time; two runs): 32, 64 and 128 x 512 x
// 768 (50 to 201 MB against a 32 MB L3) 0.93-0.94, 0.97-0.98, 0.95. Its
// backward kept one row at a time: with the tile, forward+backward took
// 1.02-1.10x the time at 16 to 64 x 512 x 768.
template <typename T, typename A>
constexpr bool kForwardReadsRowByRow = kReadsRowByRow<T, A> && kVectorRegisters == 32;

// The register type behind Vectorized<A> (__m512 for float with AVX-512),
// or Vectorized<A> itself at the default level. Arrays of sums that must
// stay in registers are arrays of this: an array of Vectorized is built by
// a loop of its constructor that walks a pointer over the array, and GCC
// then keeps the array in memory (each multiply-add loading its sum and
// storing it back) wherever its loop-invariant motion does not move it
// into registers afterwards, as with 12 or more sums and a prefetch per row
// (score_dot_rows_float<6, 2> of bfloat16 rows: 11 of 12 FMAs on the stack).
// With the sums of score_dot_rows_float and score_block_by_columns and the
// widened rows of accumulate_rows_into held so, FMAs with a stack operand in
// the whole library (objdump): 1,409 in 171 functions -> 693 in 103. At the
// AVX512 level (bfloat16 and float16 rows without vdpbf16ps), 2 threads,
// one process per build taking turns on a 2-core Xeon, new / old: bfloat16
// 16 x 12 forward 0.95, forward+backward 0.93, 4 x 12 and 8 x 1 0.98;
// float16 16 x 12 0.94. Not in score_and_accumulate_rows (the one-score
// forward): there the same change had bfloat16 1 x 1 1.11x slower.
#if defined(CPU_CAPABILITY_AVX512)
using FloatRegister = __m512;
using DoubleRegister = __m512d;
#elif defined(CPU_CAPABILITY_AVX2)
using FloatRegister = __m256;
using DoubleRegister = __m256d;
#else
using FloatRegister = Vectorized<float>;
using DoubleRegister = Vectorized<double>;
#endif
template <typename A>
using VecRegister = std::conditional_t<
    std::is_same_v<A, float>,
    FloatRegister,
    std::conditional_t<std::is_same_v<A, double>, DoubleRegister, Vectorized<A>>>;

// The forward with several scores per row scores a tile kForwardTileRows
// rows at a time but adds it to its weighted sums this many rows at a time:
// each sum is loaded and stored once per tile, and at 12-16 sums that
// traffic, more than the FMAs, bounded it at 4 rows (8: 5-15% faster on a
// 2-core EPYC; 16 was slower, its rows no longer all in registers).
constexpr int kWideTileRows = 8;

template <typename T>
T reduce_add(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// out[i] = reduce_add(v[i]) for i < kCount, bitwise. [Note: lanes of 16 sums
// at once] With AVX-512, 16 float vectors at a time: reduce_add adds the
// lanes 8 apart, then 4, 2 and 1 apart, 8 additions (4 shuffles, 4 adds) a
// vector; the same pairs of the same values, added two, four, eight, then
// sixteen vectors per instruction, take 30 shuffles and 15 adds for 16
// vectors instead of 128 instructions, and every sum is bitwise reduce_add's
// (IEEE addition commutes exactly). The scores of 8 rows against 3 vectors
// of u spent a fifth of their instructions on reduce_add.
// Inlined, with a constant count and its loops unrolled, so that v stays in
// registers (called, it went through the stack twice).
template <int kCount, typename T>
__attribute__((always_inline)) inline void reduce_add_each(const Vectorized<T>* v, T* out) {
  int i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
#pragma GCC unroll 4
    for (; i + 16 <= kCount; i += 16) {
      // Slot s takes v[4 (s % 4) + s / 4], so that lane j ends with v[j]'s sum.
      auto slot = [&](int s) { return static_cast<__m512>(v[i + 4 * (s % 4) + s / 4]); };
      __m512 halves[8];  // lanes 8 apart: two vectors' 8 partial sums each
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const __m512 a = slot(2 * k);
        const __m512 b = slot(2 * k + 1);
        halves[k] =
            _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
      }
      __m512 quarters[4];  // 4 apart: four vectors' 4 sums
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m512 a = halves[2 * k];
        const __m512 b = halves[2 * k + 1];
        quarters[k] =
            _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
      }
      __m512 pairs[2];  // 2 apart: eight vectors' 2 sums
#pragma GCC unroll 2
      for (int k = 0; k < 2; ++k) {
        const __m512 a = quarters[2 * k];
        const __m512 b = quarters[2 * k + 1];
        pairs[k] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
      }
      // 1 apart: lane 4 b + j holds slot b + 4 j's sum, v[4 b + j]'s.
      _mm512_storeu_ps(
          out + i,
          _mm512_add_ps(
              _mm512_shuffle_ps(pairs[0], pairs[1], 0x88),
              _mm512_shuffle_ps(pairs[0], pairs[1], 0xDD)));
    }
  }
#endif
#pragma GCC unroll 16
  for (; i < kCount; ++i) {
    out[i] = reduce_add(v[i]);
  }
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

// load_acc of the first `count` values from p (count < the vector's
// size), the other lanes 0; nothing past them is read.
template <typename T>
Vectorized<at::opmath_type<T>> load_acc(const T* p, int64_t count) {
  if constexpr (at::is_reduced_floating_point_v<T>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_cvtph_ps(bits);
    }
#else
    T values[Vectorized<float>::size()] = {};
    std::copy(p, p + count, values);
    return load_acc(values);
#endif
  } else {
    return Vectorized<T>::loadu(p, count);
  }
}

// Where a prefetch brings its line: L1 (and L2), or L2 only, for a line
// read after those in L1 now.
enum class CacheLevel { kL1, kL2 };

// [Note: prefetches from memory] The one-score kernels prefetch the rows
// ahead into L2, not L1, where x does not fit the last-level cache
// (ForwardParams::x_fits_cache), and the forward's tiles do so too where L1
// cannot hold the next tile beside the current and previous ones, the
// weighted sum and u (next_tile_in_l2 in forward.h). Likely why, from
// memory: a prefetch into L1 holds one of L1's few miss buffers for the
// whole trip, so few lines are in flight; with no prefetch at all the
// forward was as slow as into L1. Float rows with 2 to 11 scores of one
// head prefetch the next tile into L2 from their weighted sums ([Note: the
// next tile of float rows] in forward.h); elsewhere the kernels keep L1.
// 2 threads on a 2-core EPYC (Zen 4: 32 KB of L1, 32 MB of L3), both in
// one process, into L2 against L1 (median of paired ratios):
//   from memory: float32 1x1, 32x512x768 (50 MB, read one row at a time)
//     forward 0.62, forward+backward 0.80; bfloat16 1x1 (tiles) at
//     64x512x768 forward 0.67, at 32x512x768, whose backward reads x and dx
//     from memory, forward+backward 0.89;
//   in cache, float32 1x1 forward at 8x512xH: H = 384 1.01 and 512 0.98
//     (three tiles and two vectors: 21 and 28 KB), 640 0.83 and 1024 0.83
//     (35 and 56 KB); 768 0.83-0.88 at 4 to 16 x 512; bfloat16 at 768 (23
//     KB) 1.01.

// A hint that the line `ahead` elements after p is read soon. A prefetch never
// faults, so that line may lie past the end of x; the address is computed as
// an integer because such a pointer could not be formed.
template <CacheLevel kLevel = CacheLevel::kL1, typename T>
inline void prefetch(const T* p, int64_t ahead) {
#if defined(__GNUC__) || defined(__clang__)
  const auto address = reinterpret_cast<std::uintptr_t>(p) + ahead * sizeof(T);
  __builtin_prefetch(reinterpret_cast<const void*>(address), 0, kLevel == CacheLevel::kL1 ? 3 : 2);
#else
  (void)p;
  (void)ahead;
#endif
}

// prefetch for each line of a row of `width` elements.
template <CacheLevel kLevel = CacheLevel::kL1, typename T>
void prefetch_row(const T* row, int64_t width, int64_t ahead) {
  for (int64_t e = 0; e < width; e += 64 / static_cast<int64_t>(sizeof(T))) {
    prefetch<kLevel>(row + e, ahead);
  }
}

// [Note: no subnormal weights] A softmax weight e^(s - max) below 2^-100
// (float32; 2^-996 in float64) is 0: 26 binary orders above the smallest
// normal number, so that the weights and what they multiply (any |x| or
// |dp - delta| from 2^-26 up) stay clear of subnormals, and 76 below what a
// float32 sum of weights (at least 1) resolves. Arithmetic that makes or
// takes a subnormal costs this Xeon a microcode assist, and trained heads
// score rows tens apart (u of standard deviation 1, 768 wide, spreads
// scores 27 apart): there, with every weight kept, the float32 forward took
// 3.1x and the bfloat16 forward 5x as long as at scores 3 apart (16 x 512 x
// 768, one query and head, 1 thread); full width at so400m's shape,
// float32, 2 threads, 10.5x. The weights cut at the smallest normal, 2^-126,
// left 1.3x there (products of tiny weights summed from zero). Only the
// weights are cut: x, u and grad_out keep their subnormals
// (benchmarks/score_spread.py).
template <typename A>
constexpr A kLogSmallestWeight = std::is_same_v<A, float> ? A(-69.3147181f)          // ln 2^-100
                                                          : A(-690.37459183770550);  // ln 2^-996

// [Note: the softmax's exponential] At the AVX2 and AVX-512 levels the
// softmax's exponentials of float32 lanes are computed here, inlined, in few
// short steps: x = n ln2 + r with n = round(x / ln2) by the 1.5 * 2^23
// rounding trick, r = x - n ln2 with ln2 in two parts (n times the first is
// exact), e^r by its Taylor polynomial of degree 7 (below 6e-9 relative for
// |r| <= ln2 / 2) in Estrin's order, then times 2^n, rounded once. Against
// exp in double for every float32 in [-69.3, 90]: at most 1.8 ulp; below
// that 0 ([Note: no subnormal weights]), -inf gives 0, NaN stays NaN,
// overflow gives inf (test_cpu_isa.py checks the softmax weights at each
// level). float64 and the default level keep at::vec's exp.
// Why: at::vec's exp (Sleef's, called per vector) has a long chain of
// dependent steps, and in the bfloat16 forward with AMX tiles the chains'
// length, not their count, cost time. 16 x 12 forward, 1 thread, a 2-core
// Xeon with AMX, one process taking turns: every exponential replaced by its
// argument took 13.5 -> 8.9 ms; by 13 dependent FMAs, 13.4, as slow as the
// exponentials; by 13 independent multiplies and adds, 9.4. These
// exponentials in Horner's order behind a clamp (a longer chain) gained 3%.
// Timed apart, the 16 x 12 exponentials take 7% of that forward. Our reading:
// a chain holds the instruction window, and the next rows' tile products
// start late. The forward, 2 threads, new / old (median of paired ratios):
// bfloat16 16 x 12 0.87, 4 x 12 0.90, 1 x 12 0.92, 1 x 16 0.94, 8 x 1 0.96,
// so400m's full width and 1 x 1 0.98; float32 16 x 12 0.91, 4 x 12 0.94,
// 8 x 1 0.94, 1 x 12 0.96, the others 0.98; forward+backward 0.96-1.0.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// n and p = e^r with e^x = p * 2^n ([Note: the softmax's exponential]);
// n is a whole number for |x| < 2^22.
inline std::pair<Vectorized<float>, Vectorized<float>> exp_parts(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  using at::vec::fmadd;
  const Vec shifter(12582912.0f);  // 1.5 * 2^23: adding it rounds to a whole number
  const Vec n = fmadd(x, Vec(1.44269504f), shifter) - shifter;
  // ln2 = 0.693145752 (14 significant bits) + 1.42860677e-6.
  const Vec r = fmadd(n, Vec(-1.42860677e-6f), fmadd(n, Vec(-0.693145752f), x));
  const Vec r2 = r * r;
  const Vec low = fmadd(fmadd(r, Vec(1.0f / 6), Vec(0.5f)), r2, r + Vec(1.0f));
  const Vec high = fmadd(
      fmadd(r, Vec(1.0f / 5040), Vec(1.0f / 720)), r2, fmadd(r, Vec(1.0f / 120), Vec(1.0f / 24)));
  return {n, fmadd(high, r2 * r2, low)};
}

// Above this e^x overflows: there n could leave the range that 2^n is built
// for. (Below kLogSmallestWeight<float> the weight is 0.)
constexpr float kExpInfAbove = 89.0f;

#if defined(CPU_CAPABILITY_AVX512)
// kMayOverflow false: x is at most 0 (or NaN), and the check for overflow
// is left out.
template <bool kMayOverflow = true>
inline Vectorized<float> exp_lanes(const Vectorized<float>& x) {
  const auto [n, p] = exp_parts(x);
  const __mmask16 zero =
      _mm512_cmp_ps_mask(x, _mm512_set1_ps(kLogSmallestWeight<float>), _CMP_LT_OQ);
  const __m512 e = _mm512_maskz_scalef_ps(static_cast<__mmask16>(~zero), p, n);
  if constexpr (!kMayOverflow) {
    return e;
  }
  const __mmask16 inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpInfAbove), _CMP_GT_OQ);
  return _mm512_mask_mov_ps(e, inf, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}
#else
// 2^k as a float, k a normal exponent (-126..127).
inline __m256 power_of_two(__m256i k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

template <bool kMayOverflow = true>
inline Vectorized<float> exp_lanes(const Vectorized<float>& x) {
  const auto [n, p] = exp_parts(x);
  // 2^n in two factors, each a normal float for n in [-150, 129], so that
  // only the second product rounds.
  const __m256i whole = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(whole, 1);
  const __m256 e = _mm256_mul_ps(
      _mm256_mul_ps(p, power_of_two(half)), power_of_two(_mm256_sub_epi32(whole, half)));
  const __m256 zero = _mm256_cmp_ps(x, _mm256_set1_ps(kLogSmallestWeight<float>), _CMP_LT_OQ);
  const __m256 finite = _mm256_andnot_ps(zero, e);
  if constexpr (!kMayOverflow) {
    return finite;
  }
  const __m256 inf = _mm256_cmp_ps(x, _mm256_set1_ps(kExpInfAbove), _CMP_GT_OQ);
  return _mm256_blendv_ps(finite, _mm256_set1_ps(std::numeric_limits<float>::infinity()), inf);
}
#endif
#endif

// e^v lane by lane, for the softmax ([Note: the softmax's exponential]),
// 0 below 2^-100 ([Note: no subnormal weights]).
// kMayOverflow false: every lane is at most 0 (or NaN), as the softmax's
// score - max is, and the check for overflow is left out.
template <bool kMayOverflow = true, typename A>
inline Vectorized<A> exp_of(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    return exp_lanes<kMayOverflow>(v);
  }
#endif
  return Vectorized<A>::blendv(
      v.exp(), Vectorized<A>(A(0)), v < Vectorized<A>(kLogSmallestWeight<A>));
}

// e^x for one of the softmax's weights or rescales, as exp_of gives it.
template <typename A>
inline A exp_of(A x) {
  return x < kLogSmallestWeight<A> ? A(0) : std::exp(x);
}

// The larger of m and v lane by lane, m where v is NaN: blendv(m, v, v > m)
// in one instruction instead of four (at::vec's blendv goes through a
// vector of the mask). max_ps returns its second operand where either is
// NaN or both are zeros, as the blend keeps m.
template <typename A>
inline Vectorized<A> running_max(const Vectorized<A>& m, const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    return _mm512_max_ps(v, m);
  } else if constexpr (std::is_same_v<A, double>) {
    return _mm512_max_pd(v, m);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    return _mm256_max_ps(v, m);
  } else if constexpr (std::is_same_v<A, double>) {
    return _mm256_max_pd(v, m);
  }
#endif
  return Vectorized<A>::blendv(m, v, v > m);
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

// [Note: one order for every score] The backward recomputes p = exp(score -
// lse) from the forward's lse. A score summed in another order differs by an
// ulp or so, and at large scores an ulp is large: p then exceeded 1 by
// exp(ulp), and the gradients were off by percents at |x| ~ 1e6 and NaN at
// 1e10. So every score, forward and backward, is summed in one order: one
// accumulator per row over whole vectors, its lanes (reduce_add), then the
// tail in order; for bfloat16 rows in paired order (the forward's fast read),
// an even and an odd accumulator, added before reduce_add. Where a lane holds
// one score (by columns, from u's tiles: [Note: scores by columns], [Note:
// scores on AMX tiles], [Note: scores from u's tiles by vdpbf16ps]), that
// lane's chain along the row is the order, whatever the tile. The kernels are
// compiled with -ffp-contract=off, so that scalar steps such as
// scale * score - lse round alike wherever they are written. A score then
// never exceeds the running max the forward saw, and p <= 1.

// score_dot_rows_impl in the accumulation dtype. v_stride: how far apart
// the S vectors of v are (n where they follow one another; the backward's G
// of several queries against one head's slice of the rows, H).
template <int R, int S, bool kPrefetch, bool kPerRow, typename T, typename A>
void score_dot_rows_float(
    const T* const* rows, const A* v, int64_t n, int64_t v_stride, A* out, const int64_t* ahead) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  VecRegister<A> acc[S][R];
  for (int s = 0; s < S; ++s) {
    for (int r = 0; r < R; ++r) {
      acc[s][r] = Vec(A(0));
    }
  }
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    Vec shared[S];
    for (int s = 0; s < S; ++s) {
      shared[s] = Vec::loadu(v + s * v_stride + e);
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (kPrefetch) {
        prefetch(rows[r] + e, kPerRow ? ahead[r] : ahead[0]);
      }
      const Vec xv = load_acc(rows[r] + e);
      for (int s = 0; s < S; ++s) {
        acc[s][r] = at::vec::fmadd(xv, shared[s], Vec(acc[s][r]));
      }
    }
  }
  // Copied out, so that acc itself is never addressed: GCC then keeps it in
  // registers through the loop above.
  Vec sums[S * R];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      sums[s * R + r] = Vec(acc[s][r]);
    }
  }
  reduce_add_each<S * R>(sums, out);
  if (e < n) {
    for (int s = 0; s < S; ++s) {
      for (int r = 0; r < R; ++r) {
        A total = out[s * R + r];
        for (int64_t t = e; t < n; ++t) {
          total += static_cast<A>(rows[r][t]) * v[s * v_stride + t];
        }
        out[s * R + r] = total;
      }
    }
  }
}

// [Note: bfloat16 products] On a CPU with AVX512-BF16, the scores of
// bfloat16 rows against several vectors (num_scores > 1, where the scores,
// not the read of x, bound the kernels), or against one when the rows are
// read in pairs (scores_from_bf16_products), are summed from bfloat16 products:
// u is rounded to bfloat16 once per call and each vdpbf16ps adds 32 exact
// products of x and u into 16 float32 sums. That is twice the multiply-adds
// per instruction of float32 FMAs, and x is never widened: the bfloat16
// 16 x 12 forward went from 34 to 20 ms (with the vector exponentials of
// SoftmaxState::weigh_tile), the one-score forward of 32 x 512 x 768 from
// 0.57 to 0.39 ms (2 threads, 2-core EPYC, x in cache). u's rounding (2^-9
// relative) is that of x itself, and of the einsum in bfloat16 that the op
// replaces. vdpbf16ps also flushes products below float32's normal range
// (1.2e-38) to zero: a score made only of such products is 0, which shows
// only when a scale near 1e34 or more brings it back up (a fuzz case:
// x ~ 1e-19, u ~ 5e-20, scale 3e38). The scores are dot products
// (bf16_score_dot_rows_impl), or from 12 scores on, where they fill their
// blocks of 16 lanes (scores_on_tiles), sums along u's tiles ([Note:
// scores from u's tiles by vdpbf16ps]); the backward and the jvp
// recompute them the same way, in the forward's order, so p stays the
// forward's ([Note: one order for every score]).
#if defined(CPU_CAPABILITY_AVX512_BF16)
constexpr bool kBFloat16Products = true;

// The bits of c10::BFloat16(v) (round to nearest even, NaN to 0x7FC0) in
// the low half of each lane.
inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000)), 16);
}

// 32 bfloat16 values from p; with kTail only the first `count` (< 32), the
// others zero, so a vector tail needs no scalar loop.
template <bool kTail>
inline __m512bh load_bf16(const at::BFloat16* p, int64_t count) {
  if constexpr (kTail) {
    const auto mask = static_cast<__mmask32>((uint64_t{1} << count) - 1);
    return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, p));
  } else {
    (void)count;
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
  }
}

// score_dot_rows_impl for bfloat16 rows against bfloat16 vectors.
// v_stride: how far apart the S vectors of v are, as in score_dot_rows_float.
template <int R, int S, bool kPrefetch, bool kPerRow>
void bf16_score_dot_rows_impl(
    const at::BFloat16* const* rows,
    const at::BFloat16* v,
    int64_t n,
    int64_t v_stride,
    float* out,
    const int64_t* ahead) {
  constexpr int64_t W = 32;  // bfloat16 values per vector
  __m512 acc[S][R];
  for (int s = 0; s < S; ++s) {
    for (int r = 0; r < R; ++r) {
      acc[s][r] = _mm512_setzero_ps();
    }
  }
  auto add_chunk = [&](int64_t e, auto tail) {
    constexpr bool kTail = decltype(tail)::value;
    __m512bh shared[S];
    for (int s = 0; s < S; ++s) {
      shared[s] = load_bf16<kTail>(v + s * v_stride + e, n - e);
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (kPrefetch) {
        prefetch(rows[r] + e, kPerRow ? ahead[r] : ahead[0]);
      }
      const __m512bh xv = load_bf16<kTail>(rows[r] + e, n - e);
      for (int s = 0; s < S; ++s) {
        acc[s][r] = _mm512_dpbf16_ps(acc[s][r], xv, shared[s]);
      }
    }
  };
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    add_chunk(e, std::false_type{});
  }
  if (e < n) {
    add_chunk(e, std::true_type{});
  }
  Vectorized<float> sums[S * R];  // copied out, as in score_dot_rows_float
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      sums[s * R + r] = acc[s][r];
    }
  }
  reduce_add_each<S * R>(sums, out);
}
#else
constexpr bool kBFloat16Products = false;
#endif

// score_dot_rows, below. acc must stay in registers; GCC kept it in memory,
// each FMA waiting on a store and a reload (the forward at 16 scores took
// twice as long), when a run-time test of `ahead` sat inside the loop (so
// kPrefetch is a template argument) or when the last loop over acc was not
// unrolled (at 16 sums; hence the pragmas).
// ahead: one distance for every row, or with kPerRow one per row. v in
// bfloat16: [Note: bfloat16 products].
template <int R, int S, bool kPrefetch, bool kPerRow = false, typename T, typename V, typename A>
void score_dot_rows_impl(
    const T* const* rows, const V* v, int64_t n, A* out, const int64_t* ahead) {
  if constexpr (std::is_same_v<V, at::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512_BF16)
    static_assert(std::is_same_v<T, at::BFloat16> && std::is_same_v<A, float>);
    return bf16_score_dot_rows_impl<R, S, kPrefetch, kPerRow>(rows, v, n, n, out, ahead);
#else
    static_assert(!std::is_same_v<V, V>, "bfloat16 products need AVX512-BF16");
#endif
  } else {
    score_dot_rows_float<R, S, kPrefetch, kPerRow>(rows, v, n, n, out, ahead);
  }
}

// out[s * R + r] = rows[r] . v[s * n : (s + 1) * n] for S consecutive vectors
// of v, each summed in the one order of the note above. Several vectors at a
// time give S * R independent sums, enough to keep the FMA units busy when
// R alone is not; each sum is the same whatever S and R. ahead != 0: the
// rows `ahead` elements further are prefetched.
template <int R, int S = 1, typename T, typename A>
void score_dot_rows(const T* const* rows, const A* v, int64_t n, A* out, int64_t ahead = 0) {
  if (ahead != 0) {
    return score_dot_rows_impl<R, S, true>(rows, v, n, out, &ahead);
  }
  score_dot_rows_impl<R, S, false>(rows, v, n, out, nullptr);
}

// How many scores score_dot_rows_each takes per pass over R rows: as many
// as the registers hold, their sums and one vector of each score's v beside
// a row. Four where that fits, else two; from bfloat16 products three (at
// eight rows, 28 registers): 11 loads per 24 products instead of 10 per 16,
// as the loads, not the products, bound the pass.
template <int R, typename T, typename V>
constexpr int at_once() {
  if constexpr (std::is_same_v<V, at::BFloat16>) {
    if (3 * R + 4 <= kVectorRegisters) {
      return 3;
    }
  }
  return 4 * R + 5 <= kVectorRegisters ? 4 : 2 * R + 3 <= kVectorRegisters ? 2 : 1;
}

// out[k * R + r] = rows[r] . v[k * n : (k + 1) * n] for `count`
// consecutive vectors of v, as many at a time as the registers hold: one
// load of a row then serves up to four scores. score_dot_rows sums each
// score alike however many it is given. ahead != 0: the rows `ahead`
// elements further (the next tile) are prefetched, row r during pass
// r % passes, so that the misses are spread over the passes instead of
// all waiting on free miss buffers in the first (the other rows prefetch
// lines they are reading: hits, no memory traffic): 1.3-1.7x faster
// forwards at 12-16 scores.
template <int R, typename T, typename V, typename A>
void score_dot_rows_each(
    const T* const* rows, const V* v, int64_t n, int64_t count, A* out, int64_t ahead = 0) {
  constexpr int kAtOnce = at_once<R, T, V>();
  const int64_t rest = count % kAtOnce;
  const int64_t passes = count / kAtOnce + (kAtOnce > 2 ? rest / 2 + rest % 2 : rest);
  int64_t pass = 0;
  auto score = [&](auto at_once, int64_t k) {
    constexpr int kScores = decltype(at_once)::value;
    // Past the first R passes no row of the next tile is left to prefetch:
    // those passes issue no prefetch, which would take a load slot per row.
    if (ahead == 0 || pass >= R) {
      return score_dot_rows_impl<R, kScores, false>(rows, v + k * n, n, out + k * R, nullptr);
    }
    int64_t aheads[R];
    for (int r = 0; r < R; ++r) {
      aheads[r] = r % passes == pass ? ahead : 0;
    }
    if constexpr (at::is_reduced_floating_point_v<T> && !std::is_same_v<V, T> && kScores > 2) {
      // Two scores in the prefetching part: with four, GCC spilled the
      // sums of the widening loop.
      score_dot_rows_impl<R, 2, true, true>(rows, v + k * n, n, out + k * R, aheads);
      return score_dot_rows_impl<R, kScores - 2, false>(
          rows, v + (k + 2) * n, n, out + (k + 2) * R, nullptr);
    }
    score_dot_rows_impl<R, kScores, true, true>(rows, v + k * n, n, out + k * R, aheads);
  };
  int64_t k = 0;
  for (; k + kAtOnce <= count; k += kAtOnce, ++pass) {
    score(std::integral_constant<int, kAtOnce>{}, k);
  }
  if constexpr (kAtOnce > 2) {
    for (; k + 2 <= count; k += 2, ++pass) {
      score(std::integral_constant<int, 2>{}, k);
    }
  }
  for (; k < count; ++k, ++pass) {
    score(std::integral_constant<int, 1>{}, k);
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
// accumulators) are then kept in "paired" order: per group of 2W elements,
// the W at even positions first, then the W at odd positions.
constexpr int64_t kPairWidth = 2 * Vectorized<float>::size();

// Whether the kernels read rows of x in pairs: bfloat16 rows whose head
// slices are whole groups of kPairWidth, with one score. With several, each
// widened vector serves several scores (score_dot_rows_each,
// accumulate_rows_into), which the paired read, one score at a time, does
// not: 1.4x slower at 12 heads.
template <typename T>
bool reads_pairs(const PoolShape& s) {
  return std::is_same_v<T, at::BFloat16> && s.num_scores() == 1 && s.head_dim > 0 &&
         s.head_dim % kPairWidth == 0;
}

// Whether this instruction set scores rows of T from bfloat16 products
// ([Note: bfloat16 products]): with several scores, and with one where the
// rows are read in pairs (reads_pairs), whose one-score forward then takes
// one vdpbf16ps per 32 values of a row instead of widening them for the
// score (and is otherwise bound by those instructions when x is in cache).
template <typename T>
bool scores_from_bf16_products(const PoolShape& s) {
  return kBFloat16Products && std::is_same_v<T, at::BFloat16> &&
         (s.num_scores() > 1 || reads_pairs<T>(s));
}

// to[i] = c10::BFloat16(from[i]) for i < count: 16 at a time where the
// CPU has AVX512-BF16 (bf16_bits), one at a time elsewhere.
inline void round_to_bf16(const float* from, int64_t count, at::BFloat16* to) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512_BF16)
  for (; i + 16 <= count; i += 16) {
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(to + i),
        _mm512_cvtepi32_epi16(bf16_bits(_mm512_loadu_ps(from + i))));
  }
#endif
  for (; i < count; ++i) {
    to[i] = c10::BFloat16(from[i]);
  }
}

// u rounded to bfloat16 if the kernels score from bfloat16 products
// (scores_from_bf16_products), followed by it laid out as AMX tiles where the
// scores come from those (scores_on_tiles, u_tiles_of); empty otherwise.
template <typename scalar_t, typename acc_t>
CacheLineBuffer<at::BFloat16> u_in_bf16(const PoolShape& s, const acc_t* u) {
  CacheLineBuffer<at::BFloat16> rounded;
  if (!scores_from_bf16_products<scalar_t>(s)) {
    return rounded;
  }
  const int64_t size = s.num_scores() * s.hidden;
  const bool tiles = scores_on_tiles<scalar_t>(s.num_scores());
  const int64_t tiles_size = tiles ? u_tiles_size(s.num_scores(), s.hidden) : 0;
  rounded.reserve(whole_lines<at::BFloat16>(size) + tiles_size);
  if constexpr (std::is_same_v<acc_t, float>) {
    rounded.resize(size);
    round_to_bf16(u, size, rounded.data());
  } else {
    rounded.assign(u, u + size);
  }
  if (tiles) {
    // The tiles start on the next cache line (a pad of under 32 values).
    // They are laid out as words, then appended: growing rounded by
    // resize() to hold them stored its zeros one bfloat16 at a time. A
    // bfloat16 call at 16 x 12 on a 2 x 8 x 768 x took 0.37 ms with that
    // and u's tiles laid out a value at a time, 0.19 now.
    rounded.resize(whole_lines<at::BFloat16>(size));
    std::vector<uint32_t> words(tiles_size / 2, 0u);
    pack_u_tiles(rounded.data(), s.num_scores(), s.hidden, s.hidden, words.data());
    const auto* halves = reinterpret_cast<const at::BFloat16*>(words.data());
    rounded.insert(rounded.end(), halves, halves + tiles_size);
  }
  return rounded;
}

struct WidenedPairs {
  Vectorized<float> even;
  Vectorized<float> odd;
};

inline WidenedPairs load_pairs(const at::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i bits = _mm512_loadu_si512(p);
  const __m512i high_halves = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  return {
      Vectorized<float>(_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16))),
      Vectorized<float>(_mm512_castsi512_ps(_mm512_and_si512(bits, high_halves)))};
#else
  const auto bits = Vectorized<int32_t>::loadu(p);
  const auto even = bits << Vectorized<int32_t>(16);
  const auto odd = bits & Vectorized<int32_t>(static_cast<int32_t>(0xFFFF0000u));
  return {at::vec::cast<float>(even), at::vec::cast<float>(odd)};
#endif
}

// dst = src in paired order; n is a multiple of kPairWidth.
inline void to_paired_order(const float* src, float* dst, int64_t n) {
  constexpr int64_t W = Vectorized<float>::size();
  for (int64_t group = 0; group < n; group += kPairWidth) {
    for (int64_t j = 0; j < W; ++j) {
      dst[group + j] = src[group + 2 * j];
      dst[group + W + j] = src[group + 2 * j + 1];
    }
  }
}

// u [num_scores, H] in the order the forward read bfloat16 rows in, if it
// read them in pairs (reads_pairs); empty otherwise.
template <typename scalar_t, typename acc_t>
CacheLineBuffer<acc_t> u_in_paired_order(const PoolShape& s, const acc_t* u) {
  CacheLineBuffer<acc_t> paired;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (reads_pairs<scalar_t>(s)) {
      paired.resize(s.num_scores() * s.hidden);
      to_paired_order(u, paired.data(), s.num_scores() * s.hidden);
    }
  }
  return paired;
}

// dst = src back in natural order; n is a multiple of kPairWidth.
inline void to_natural_order(const float* src, float* dst, int64_t n) {
  constexpr int64_t W = Vectorized<float>::size();
  for (int64_t group = 0; group < n; group += kPairWidth) {
    for (int64_t j = 0; j < W; ++j) {
      dst[group + 2 * j] = src[group + j];
      dst[group + 2 * j + 1] = src[group + W + j];
    }
  }
}

// score_dot_rows for bfloat16 rows read in pairs, against v in paired order
// (n a multiple of kPairWidth): the order of the forward's paired read.
template <int R>
void paired_score_dot_rows(const at::BFloat16* const* rows, const float* v, int64_t n, float* out) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  Vec even[R];
  Vec odd[R];
  for (int r = 0; r < R; ++r) {
    even[r] = Vec(0.f);
    odd[r] = Vec(0.f);
  }
  for (int64_t e = 0; e + kPairWidth <= n; e += kPairWidth) {
    const Vec v_even = Vec::loadu(v + e);
    const Vec v_odd = Vec::loadu(v + e + W);
    for (int r = 0; r < R; ++r) {
      const WidenedPairs xv = load_pairs(rows[r] + e);
      even[r] = at::vec::fmadd(xv.even, v_even, even[r]);
      odd[r] = at::vec::fmadd(xv.odd, v_odd, odd[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r] = reduce_add(even[r] + odd[r]);
  }
}

// How the kernels read a row in vectors of the accumulation dtype: one
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

// ys[g] += sum_r w[g * R + r] * rows[r] for G weighted sums of the same R
// rows (the queries of one head slice, or every score at full width): each
// chunk of the rows is loaded once for all G sums. Every element is summed
// in the order of axpy_rows (of the forward's paired accumulation, for
// kPaired: bfloat16 rows and ys in paired order), so the result is the same
// as G passes of it.
template <int R, int G, bool kPaired, typename T, typename A>
void accumulate_rows_into(const A* w, const T* const* rows, A* const* ys, int64_t n) {
  using Reader = ChunkReader<T, kPaired>;
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const T* xr[R];
  A* out[G];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    xr[r] = rows[r];
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    out[g] = ys[g];
  }
  int64_t e = 0;
  for (; e + Reader::kWidth <= n; e += Reader::kWidth) {
    // Registers, not Chunks: an array of those stayed on the stack (see
    // VecRegister).
    VecRegister<A> x_first[R];
    VecRegister<A> x_second[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const auto xv = Reader::load(xr[r] + e);
      x_first[r] = xv.first;
      x_second[r] = xv.second;
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      Vec first = Vec::loadu(out[g] + e);
      Vec second = kPaired ? Vec::loadu(out[g] + e + W) : Vec();
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vec weight(w[g * R + r]);
        first = at::vec::fmadd(weight, Vec(x_first[r]), first);
        if constexpr (kPaired) {
          second = at::vec::fmadd(weight, Vec(x_second[r]), second);
        }
      }
      first.store(out[g] + e);
      if constexpr (kPaired) {
        second.store(out[g] + e + W);
      }
    }
  }
  for (; e < n; ++e) {
    for (int g = 0; g < G; ++g) {
      for (int r = 0; r < R; ++r) {
        out[g][e] += w[g * R + r] * static_cast<A>(xr[r][e]);
      }
    }
  }
}

// accumulate_rows_into with the paired read chosen at run time.
template <int R, int G, typename T, typename A>
void accumulate_rows_into(const A* w, const T* const* rows, A* const* ys, int64_t n, bool paired) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (paired) {
      return accumulate_rows_into<R, G, true>(w, rows, ys, n);
    }
  }
  accumulate_rows_into<R, G, false>(w, rows, ys, n);
}

// The number of weighted sums accumulate_rows_into adds at once: enough that
// a load of x serves several FMAs, few enough that the sums, the rows and
// the weights stay in registers.
constexpr int kSumsPerPass = 4;

// Columns of a tile's rows that the forward adds to all its weighted sums
// before it moves on (SoftmaxState::add_weighted_rows): a multiple of the
// paired read's width, so that every sum is added in the same order. 8 rows
// and 16 sums of 256 columns take 24 KB of L1.
constexpr int64_t kColumnBlock = 256;
static_assert(kColumnBlock % kPairWidth == 0);

// v.store(p), or with kStream a non-temporal store (p aligned to the vector)
// where this instruction set has one; store_fence() then orders them.
template <bool kStream, typename T>
inline void store(const Vectorized<T>& v, T* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kStream && std::is_same_v<T, float>) {
    return _mm512_stream_ps(p, v);
  } else if constexpr (kStream && std::is_same_v<T, double>) {
    return _mm512_stream_pd(p, v);
  } else if constexpr (kStream && at::is_reduced_floating_point_v<T>) {
    return _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStream && std::is_same_v<T, float>) {
    return _mm256_stream_ps(p, v);
  } else if constexpr (kStream && std::is_same_v<T, double>) {
    return _mm256_stream_pd(p, v);
  } else if constexpr (kStream && at::is_reduced_floating_point_v<T>) {
    return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#endif
  v.store(p);
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
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
  const Vectorized<T> factor(alpha);
  at::vec::map([factor](Vectorized<T> v) { return v * factor; }, y, y, n);
}

// Calls f with std::integral_constant<int, count> (1 <= count <= kMax), so
// that the per-tile loops are unrolled for the tile's actual number of rows.
template <int kMax, typename F>
void with_tile_size(int count, F&& f) {
  if constexpr (kMax > 1) {
    if (count < kMax) {
      return with_tile_size<kMax - 1>(count, std::forward<F>(f));
    }
  }
  f(std::integral_constant<int, kMax>{});
}

// f(std::integral_constant<int, i>{}) for i = 0 .. N - 1 in order: a loop
// unrolled with its index a constant in each step, so that arrays of
// vectors indexed by it stay in registers where GCC would not unroll the
// loop itself. Inlined, as f must be too: an array whose address reaches a
// call stays in memory.
template <typename F, int... I>
__attribute__((always_inline)) inline void for_each_index(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
__attribute__((always_inline)) inline void for_each_index(F&& f) {
  for_each_index(f, std::make_integer_sequence<int, N>{});
}

// A tile: up to kCapacity unmasked rows of x, read in place.
template <typename scalar_t, int kCapacity>
class RowTile {
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

// out = sum over the parts of partials [parts, width], in part order, so
// that the sum does not depend on which thread computed which part. (The
// backward's du partials and the fold's partial sums.)
template <typename T>
void sum_parts_in_order(const T* partials, int64_t parts, int64_t width, T* out) {
  at::parallel_for(0, width, 4096, [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, T(0));
    for (int64_t part = 0; part < parts; ++part) {
      at::vec::map2(
          [](Vectorized<T> sum, Vectorized<T> part) { return sum + part; },
          out + begin,
          out + begin,
          partials + part * width + begin,
          end - begin);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
