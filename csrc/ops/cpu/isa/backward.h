#pragma once

// The backward of folded_attention_pool on the CPU: one pass over x that
// recomputes the softmax from the saved log-sum-exp and writes dx and du.
// Per instruction set, like every file in isa/ (ops/cpu/README.md).

#include "ops/cpu/isa/backward_bf16.h"
#include "ops/cpu/isa/layer_norm.h"
#include "ops/cpu/isa/recompute.h"
#include "ops/cpu/isa/vec_helpers.h"
#include "ops/cpu/kernel_set.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// scores[r] = rows[r] . u and dprobs[r] = rows[r] . g in one pass over the
// rows, both summed as score_dot_rows sums ([Note: one order for every
// score], [Note: delta as G . x]). No prefetch here: backward_rows_one_score
// asks for the rows ahead (on a Xeon, prefetching the next tile from this
// loop had measured slower; on a 2-core EPYC the caller's prefetch is faster).
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
// kStream: non-temporal stores ([Note: non-temporal dx]); streamed rows are
// whole 64-byte lines, so a reduced dx never reaches the half-vector tail.
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
        store<kStream>(at::vec::convert_from_float<D>(dx_at(r, e), dx_at(r, e + W)), out[r] + e);
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

// [Note: G . x from bfloat16 products] With bfloat16 rows and several
// scores, grad_out is the gradient of a bfloat16 output, handed to the
// kernels in float32: each value is exactly a bfloat16. G . x then takes
// vdpbf16ps products too, each exact, summed in float32 in the order of
// bf16_score_dot_rows_impl. delta = G . out must be summed alike ([Note:
// delta as G . x]), but the saved out is float32: it is split into three
// bfloat16 parts (8 bits of its significand each, so that they add up to
// out), and delta sums G . part for each, the first as G . x is summed. Where
// out is a row of x (a one-hot softmax), the other two parts are 0 and delta
// equals that row's G . x exactly. At 16 x 12, G . x in float32 (each slice
// of 64 widened for 2 queries at a time, then 16 horizontal sums) took 14%
// of the backward. vdpbf16ps flushes products under float32's normal range
// to 0, which a float32 FMA keeps: grad_out of 1e-34 against x of 1e-4 lost
// dx (a fuzz case). So a sequence whose largest |G| is under 2^-64 has its
// G scaled up by the power of two 2^k that takes that largest value to
// [2^-64, 2^-63) (exact), and its ds scaled back: bitwise the float32
// result's where nothing underflows. Scaling every G to 1 instead made G . x
// overflow where x was near float32's largest (x of 1e37, G of 1e-3), and
// one scale for the whole batch left a sequence of tiny G among ordinary
// ones unscaled (fuzz cases). Where a value of grad_out is not a bfloat16
// (the backward op called with a float32 grad_out) or out is not finite,
// both stay in float32.
struct GradDotsBf16 {
  std::vector<at::BFloat16> g;             // grad_out * 2^k[b], [B, num_scores, head_dim]
  std::vector<float> unscale;              // 2^-k[b]
  std::vector<at::BFloat16> out_parts[3];  // out = parts[0] + parts[1] + parts[2]
  // [B, n] blocks of head_tile_words(s): g's head slices as u's tiles, or
  // empty ([Note: G . x from G's tiles]).
  CacheLineBuffer<uint32_t> g_tiles;
  const at::BFloat16* g_of(const PoolShape& s, int64_t b) const {
    return g.empty() ? nullptr : g.data() + b * s.num_queries * s.hidden;
  }
  const uint32_t* g_tiles_of(const PoolShape& s, int64_t b) const;
  float unscale_of(int64_t b) const {
    return g.empty() ? 1.0f : unscale[b];
  }
};

// The exponent k of the power of two that takes `largest` (a sequence's
// largest |G|) to [2^-64, 2^-63) if it is smaller; 0 otherwise.
inline int tiny_grad_exponent(float largest) {
  constexpr int kLowest = -64;
  if (!(largest > 0.0f) || std::ilogb(largest) >= kLowest) {
    return 0;  // also for NaN, which the exactness check then refuses
  }
  return kLowest - std::ilogb(largest);  // at most 85: 2^-k stays a normal float
}

// [Note: G . x from G's tiles] Without AMX, where the queries of a head fill
// three quarters of their blocks of 16 lanes (scores_on_tiles), G . x takes
// each sequence's G laid out as u's tiles, one per head: the head slices of
// its Q queries are the tiles' vectors, and dp_score_rows leaves the Q
// products of a row's slice in lanes, each summed along the slice in one
// chain, with no sum across lanes. delta sums G . out the same way (lane i of
// out_i's slice against the same tiles, delta_from_tiles), so that ds stays
// 0 where out is a row of x ([Note: delta as G . x]). The dot products they
// replace take two vdpbf16ps per 64-value slice and end each of a row's
// Q * n sums in a sum across lanes: at 16 x 12, bfloat16, 32 x 512 x 768,
// they took 5% of forward+backward. (scores_on_tiles asks this of a head's
// queries as it asks it of the scores: 12 to 16 queries, 24 to 32, 36 to
// 48, then from 49.) 2 threads, a 2-core Zen 4 EPYC, one process taking
// turns (median of 12 paired ratios, tiles over dot products),
// forward+backward at 32 x 512 x 768: 16 x 12 0.96-0.97, 12 x 12 0.96,
// 16 x 16 0.95, 16 x 8 (slices of 96) and 12 x 4 (192) level. With one head
// (one query's G . x runs along the whole row) the tiles lost: 16 x 1 1.03,
// so400m's full width 1.02; those keep the dot products.
inline bool grad_dots_on_tiles(const PoolShape& s) {
#if defined(CPU_CAPABILITY_AVX512_BF16) && !defined(CPU_CAPABILITY_AMX_BF16)
  return s.num_heads > 1 && scores_on_tiles<at::BFloat16>(s.num_queries);
#else
  (void)s;
  return false;
#endif
}

// Words of one head's tiles of G (GradDotsBf16::g_tiles).
inline int64_t head_tile_words(const PoolShape& s) {
  return u_tiles_size(s.num_queries, s.head_dim) / 2;
}

inline const uint32_t* GradDotsBf16::g_tiles_of(const PoolShape& s, int64_t b) const {
  return g_tiles.empty() ? nullptr : g_tiles.data() + b * s.num_heads * head_tile_words(s);
}

// Lays out every sequence's G (dots.g) as tiles, head by head.
inline void tile_grad_heads(const PoolShape& s, GradDotsBf16& dots) {
  const int64_t words = head_tile_words(s);
  dots.g_tiles.assign(s.batch * s.num_heads * words, 0u);
  at::parallel_for(0, s.batch * s.num_heads, 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const int64_t b = j / s.num_heads;
      const int64_t h = j % s.num_heads;
      pack_u_tiles(
          dots.g.data() + b * s.num_queries * s.hidden + h * s.head_dim,
          s.num_queries,
          s.head_dim,
          s.hidden,
          dots.g_tiles.data() + j * words);
    }
  });
}

#if defined(CPU_CAPABILITY_AVX512_BF16) && !defined(CPU_CAPABILITY_AMX_BF16)
// lanes[r * stride + i] = G_i[D_h] . rows[r][D_h] for every query i of R
// rows, from head h's tiles of G (g_tiles: the sequence's; [Note: G . x from
// G's tiles]); stride: score_blocks(Q) * kTileScores.
template <int R>
void head_slice_dots_on_tiles(
    const at::BFloat16* const* rows,
    const uint32_t* g_tiles,
    const PoolShape& s,
    int64_t h,
    float* lanes,
    int64_t stride) {
  const at::BFloat16* slices[R];
  offset_rows<R>(rows, h * s.head_dim, slices);
  dp_score_rows(
      slices,
      R,
      reinterpret_cast<const at::BFloat16*>(g_tiles + h * head_tile_words(s)),
      s.head_dim,
      s.num_queries,
      lanes,
      stride);
}

// delta[b * S + i * n + h] for every query i and head h of sequence b from
// its tiles of G: the Q slices of each part of out against head h's tiles
// at once, lane i of out_i's row, added part by part (0 + part 0 + part 1 +
// part 2), as G . x is summed ([Note: G . x from G's tiles]).
inline void delta_from_tiles(
    const PoolShape& s, const GradDotsBf16& dots, int64_t b, float* delta) {
  const int64_t Q = s.num_queries;
  const int64_t stride = score_blocks(Q) * kTileScores;
  thread_local CacheLineBuffer<float> lanes;
  lanes.resize(Q * stride);
  thread_local std::vector<const at::BFloat16*> slices;
  slices.resize(Q);
  float* sums = delta + b * s.num_scores();
  std::fill_n(sums, s.num_scores(), 0.0f);
  for (int64_t h = 0; h < s.num_heads; ++h) {
    const auto* tiles =
        reinterpret_cast<const at::BFloat16*>(dots.g_tiles_of(s, b) + h * head_tile_words(s));
    for (const auto& part : dots.out_parts) {
      for (int64_t i = 0; i < Q; ++i) {
        slices[i] = part.data() + (b * Q + i) * s.hidden + h * s.head_dim;
      }
      dp_score_rows(slices.data(), static_cast<int>(Q), tiles, s.head_dim, Q, lanes.data(), stride);
      for (int64_t i = 0; i < Q; ++i) {
        sums[i * s.num_heads + h] += lanes[i * stride + i];
      }
    }
  }
}
#endif

// Elementwise over [0, count) on the threads; the loops below vectorize.
template <typename F>
void in_parallel(int64_t count, F&& f) {
  at::parallel_for(0, count, int64_t{1} << 14, f);
}

// values as bfloat16, or empty if one of them is not exactly a bfloat16.
inline std::vector<at::BFloat16> exact_bf16(const float* values, int64_t count) {
  std::vector<at::BFloat16> rounded(count);
  std::vector<float> back(count);
  std::atomic<bool> exact{true};
  in_parallel(count, [&](int64_t begin, int64_t end) {
    at::vec::convert(values + begin, rounded.data() + begin, end - begin);
    at::vec::convert(rounded.data() + begin, back.data() + begin, end - begin);
    bool same = true;
    for (int64_t i = begin; i < end; ++i) {
      same &= back[i] == values[i];
    }
    if (!same) {
      exact = false;
    }
  });
  return exact ? rounded : std::vector<at::BFloat16>{};
}

// Splits finite values into three bfloat16 parts; false if one is not finite.
inline bool split_in_bf16(const float* values, int64_t count, std::vector<at::BFloat16>* parts) {
  std::vector<float> rest(values, values + count);
  std::vector<float> part(count);
  for (int k = 0; k < 3; ++k) {
    parts[k].resize(count);
  }
  std::atomic<bool> finite{true};
  in_parallel(count, [&](int64_t begin, int64_t end) {
    bool all = true;
    for (int64_t i = begin; i < end; ++i) {
      all &= std::abs(values[i]) <= std::numeric_limits<float>::max();  // false for NaN
    }
    if (!all) {
      finite = false;
    }
    for (int k = 0; k < 3; ++k) {
      at::vec::convert(rest.data() + begin, parts[k].data() + begin, end - begin);
      at::vec::convert(parts[k].data() + begin, part.data() + begin, end - begin);
      for (int64_t i = begin; i < end; ++i) {
        rest[i] -= part[i];  // exact: the bits the rounding left
      }
    }
  });
  return finite;
}

template <typename scalar_t, typename acc_t>
GradDotsBf16 grad_dots_in_bf16(const BackwardParams& p) {
  GradDotsBf16 dots;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (scores_from_bf16_products<scalar_t>(p) && p.num_scores() > 1) {
      const int64_t count = p.batch * p.num_scores() * p.head_dim;
      const auto* g = static_cast<const float*>(p.grad_out);
      const int64_t per_sequence = p.num_scores() * p.head_dim;
      std::vector<float> scaled(g, g + count);
      std::vector<int> exponents(p.batch, 0);
      at::parallel_for(0, p.batch, 1, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last && per_sequence > 0; ++b) {
          float* values = scaled.data() + b * per_sequence;
          const float largest = at::vec::map_reduce_all<float>(
              [](Vectorized<float> v) { return v.abs(); },
              [](Vectorized<float> x, Vectorized<float> y) { return at::vec::maximum(x, y); },
              values,
              per_sequence);
          exponents[b] = tiny_grad_exponent(largest);
          if (exponents[b] > 0) {
            const float factor = std::ldexp(1.0f, exponents[b]);
            for (int64_t i = 0; i < per_sequence; ++i) {
              values[i] *= factor;
            }
          }
        }
      });
      dots.g = exact_bf16(scaled.data(), count);
      if (!dots.g.empty() &&
          !split_in_bf16(static_cast<const float*>(p.out), count, dots.out_parts)) {
        dots.g.clear();
      }
      if (!dots.g.empty() && grad_dots_on_tiles(p)) {
        tile_grad_heads(p, dots);
      }
      for (const int k : exponents) {
        dots.unscale.push_back(std::ldexp(1.0f, -k));
      }
    }
  }
  return dots;
}

// delta[b, s] = grad_out[b, s] . out[b, s] over score s's head_dim columns.
// [Note: delta as G . x] ds = scale * p * (G . x - delta). When the softmax
// puts all its weight on one row, out is that row exactly and ds must be 0;
// summed in another order than G . x, the two differ by an ulp of |G||x|,
// which times a large scale was a large wrong gradient (|x| ~ 1e10, or
// scale = 1e30). So every G . x of the backward (dot2_rows, score_dot_rows)
// and delta are summed alike: one accumulator over whole vectors, its lanes,
// then the tail in order; or, where G's tiles serve, one chain per lane
// ([Note: G . x from G's tiles]).
template <typename acc_t>
void compute_delta(const BackwardParams& p, const GradDotsBf16& dots, acc_t* delta) {
  const auto* g = static_cast<const acc_t*>(p.grad_out);
  const auto* o = static_cast<const acc_t*>(p.out);
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, p.num_scores() * p.head_dim));
  at::parallel_for(0, p.batch, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
#if defined(CPU_CAPABILITY_AVX512_BF16) && !defined(CPU_CAPABILITY_AMX_BF16)
      if constexpr (std::is_same_v<acc_t, float>) {
        if (!dots.g_tiles.empty()) {
          delta_from_tiles(p, dots, b, delta);
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < p.num_queries; ++i) {
        for (int64_t h = 0; h < p.num_heads; ++h) {
          const int64_t offset = (b * p.num_queries + i) * p.hidden + h * p.head_dim;
          acc_t* sum = delta + b * p.num_scores() + i * p.num_heads + h;
          // Summed as the backward sums G . x ([Note: delta as G . x]).
#if defined(CPU_CAPABILITY_AVX512_BF16)
          if constexpr (std::is_same_v<acc_t, float>) {
            if (!dots.g.empty()) {
              *sum = 0.0f;
              for (const auto& part : dots.out_parts) {
                const at::BFloat16* out_row[1] = {part.data() + offset};
                float part_sum = 0.0f;
                bf16_score_dot_rows_impl<1, 1, false, false>(
                    out_row, dots.g.data() + offset, p.head_dim, p.head_dim, &part_sum, nullptr);
                *sum += part_sum;
              }
              continue;
            }
          }
#endif
          const acc_t* out_row[1] = {o + offset};
          score_dot_rows<1>(out_row, g + offset, p.head_dim, sum);
        }
      }
    }
  });
}

// backward_rows for one query and one head: two passes over the rows instead
// of four (scores, G . x, dx, du).
template <int R, typename scalar_t, typename acc_t>
void backward_rows_one_score(
    const ForwardParams& s,
    int64_t b,
    const scalar_t* const* rows,
    scalar_t* const* dx_rows,
    const acc_t* u,
    const acc_t* u_paired,
    const at::BFloat16* u_bf16,
    const acc_t* g,
    const acc_t* lse,
    const acc_t* delta,
    acc_t scale,
    const acc_t* bias,
    acc_t* du,
    bool stream_dx) {
  const int64_t H = s.hidden;
  const acc_t* g0 = g + b * H;
  acc_t scores[R];
  acc_t dprobs[R];
  acc_t probs[R];
  acc_t dscores[R];
  if (kReadsRowByRow<scalar_t, acc_t> && !s.x_fits_cache) {
    // One row at a time, as the forward reads float rows
    // (score_and_accumulate_row_by_row), into L2 ([Note: prefetches from
    // memory]): 2 threads, 32x512x768 float32, forward+backward 5.1 -> 4.0
    // ms on a 2-core EPYC.
    for (int r = 0; r < R; ++r) {
      prefetch_row<CacheLevel::kL2>(rows[r], H, kRowByRowAhead * s.x_seq_stride);
      dot2_rows<1>(rows + r, u, g0, H, scores + r, dprobs + r);
    }
  } else {
    // Rows widened as they load keep the tile (one stream each was slower
    // in the forward); the next tile is asked for first: bfloat16
    // forward+backward 4.7 -> 4.0 ms there.
    for (int r = 0; r < R; ++r) {
      if (s.x_fits_cache) {
        prefetch_row(rows[r], H, R * s.x_seq_stride);
      } else {
        prefetch_row<CacheLevel::kL2>(rows[r], H, R * s.x_seq_stride);
      }
    }
    if (u_bf16 != nullptr || u_paired != nullptr) {
      forward_scores<R>(rows, u, u_paired, u_bf16, decltype(u)(nullptr), H, 1, scores);
      score_dot_rows<R>(rows, g0, H, dprobs);
    } else {
      dot2_rows<R>(rows, u, g0, H, scores, dprobs);
    }
  }
  for (int j = 0; j < R; ++j) {
    probs[j] = probability(biased_score(scale, scores[j], bias, j), lse + 2 * b);
    dscores[j] = scale * probs[j] * (dprobs[j] - delta[b]);
  }
  if (stream_dx) {
    return dx_du_rows<R, true>(probs, dscores, g0, u, rows, dx_rows, du, H);
  }
  dx_du_rows<R, false>(probs, dscores, g0, u, rows, dx_rows, du, H);
}

// dx[r][e] for the columns [e, end) of head h, C vectors at a time:
//   sum_i p[i, h][r] * G_i[e]  +  sum_k ds[k][r] * u_k[e]
// with the R rows' sums in registers, so that each element of dx is
// written once, in x's dtype, and each vector of G and u loaded serves R
// rows. kProducts: the second sum from bfloat16 products of the paired ds
// and u ([Note: bfloat16 products in the backward]). Returns where it
// stopped (the columns left are under C vectors). kTail: C is 1 and the
// columns left, under one vector, are summed the same way in part of one.
template <int R, int C, bool kStream, bool kProducts, bool kTail = false, typename A, typename D>
int64_t dx_columns(
    const PoolShape& s,
    int64_t h,
    int64_t e,
    int64_t end,
    const A* probs,
    const A* dscores,
    const A* g,
    const A* u,
    const Bf16Products& products,
    D* const* dx) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  constexpr bool kNarrow = !std::is_same_v<D, A>;
  static_assert(!kNarrow || !kStream, "non-temporal stores are for float and double dx");
  static_assert(!kTail || (C == 1 && !kStream), "a tail is under one vector, stored as it is");
  const int64_t H = s.hidden;
  const int64_t n = s.num_heads;
  const int64_t num_scores = s.num_scores();
  const int64_t lanes = kTail ? end - e : C * W;
  auto load = [&](const A* from) { return kTail ? Vec::loadu(from, lanes) : Vec::loadu(from); };
  for (; kTail ? e < end : e + C * W <= end; e += lanes) {
    Vec acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) {
        acc[r][c] = Vec(A(0));
      }
    }
    auto add = [&](const A* weights, const A* v) {
      Vec shared[C];
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) {
        shared[c] = load(v + e + c * W);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vec weight(weights[r]);
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) {
          acc[r][c] = at::vec::fmadd(weight, shared[c], acc[r][c]);
        }
      }
    };
    for (int64_t i = 0; i < s.num_queries; ++i) {
      add(probs + (i * n + h) * R, g + i * H);
    }
    if constexpr (kProducts) {
      add_score_pair_products<R, C, kTail>(acc, products, (num_scores + 1) / 2, H, e, lanes);
    } else {
      for (int64_t k = 0; k < num_scores; ++k) {
        add(dscores + k * R, u + k * H);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if constexpr (kNarrow) {
        if constexpr (C == 2) {
          at::vec::convert_from_float<D>(acc[r][0], acc[r][1]).store(dx[r] + e);
        } else {
          at::vec::convert_from_float<D>(acc[r][0], Vec(A(0))).store(dx[r] + e, lanes);
        }
      } else if constexpr (kTail) {
        acc[r][0].store(dx[r] + e, lanes);
      } else {
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) {
          store<kStream>(acc[r][c], dx[r] + e + c * W);
        }
      }
    }
  }
  return e;
}

// dx of a tile for every score (dx_columns), head slice by head slice, the
// columns left over by whole vectors in part of one. (One by one they took
// the bfloat16 backward of 64 heads of 12 columns, 32 x 512 x 768, 0.5 s.)
// kProducts: dscores already rounded to bfloat16, products paired for
// dx_columns.
template <int R, bool kStream, bool kProducts, typename A, typename D>
void dx_rows_all_scores(
    const PoolShape& s,
    const A* probs,
    const A* dscores,
    const A* g,
    const A* u,
    const Bf16Products& products,
    D* const* dx) {
  constexpr int64_t W = Vectorized<A>::size();
  // Two vectors of columns where the registers hold 2 * R sums; a narrow dx
  // needs two float vectors per stored vector.
  constexpr int kC = 2 * R + 4 <= kVectorRegisters ? 2 : 1;
  const int64_t n = s.num_heads;
  const int64_t d = s.head_dim;
  // Non-temporal stores need every vector aligned: whole vectors per slice.
  const bool aligned = d % W == 0;
  for (int64_t h = 0; h < n; ++h) {
    const int64_t end = (h + 1) * d;
    int64_t e = h * d;
    bool streamed = false;
    if constexpr (kStream) {
      if (aligned) {
        e = dx_columns<R, kC, true, kProducts>(s, h, e, end, probs, dscores, g, u, products, dx);
        e = dx_columns<R, 1, true, kProducts>(s, h, e, end, probs, dscores, g, u, products, dx);
        streamed = true;
      }
    }
    if (!streamed) {
      e = dx_columns<R, kC, false, kProducts>(s, h, e, end, probs, dscores, g, u, products, dx);
      e = dx_columns<R, 1, false, kProducts>(s, h, e, end, probs, dscores, g, u, products, dx);
    }
    dx_columns<R, 1, false, kProducts, true>(s, h, e, end, probs, dscores, g, u, products, dx);
  }
}

// du_k += sum_r ds[k][r] * rows[r] for every score k, kSumsPerPass scores
// per pass over the rows.
template <int R, typename T, typename A>
void du_rows_all_scores(
    const T* const* rows, const A* dscores, int64_t num_scores, int64_t H, A* du) {
  for (int64_t k = 0; k < num_scores; k += kSumsPerPass) {
    const int count = static_cast<int>(std::min<int64_t>(kSumsPerPass, num_scores - k));
    A* sums[kSumsPerPass];
    for (int j = 0; j < count; ++j) {
      sums[j] = du + (k + j) * H;
    }
    with_tile_size<kSumsPerPass>(count, [&](auto size) {
      accumulate_rows_into<R, decltype(size)::value, false>(dscores + k * R, rows, sums, H);
    });
  }
}

// dscores[(i * n + h) * R + r] = G_i[D_h] . rows[r][D_h] for every query i,
// as many queries per pass over the rows' slices as the registers hold (at
// 16 queries, one query a pass widened each bfloat16 slice 16 times). Each
// sum is summed as score_dot_rows sums it ([Note: delta as G . x]).
// g_bf16: G in bfloat16, or null ([Note: G . x from bfloat16 products]).
template <int R, typename T, typename A>
void head_slice_dots(
    const T* const* rows,
    const A* g,
    const at::BFloat16* g_bf16,
    const PoolShape& s,
    int64_t h,
    A* dscores) {
  constexpr int kAtOnce = std::min(at_once<R, T, A>(), 2);
  const int64_t H = s.hidden;
  const int64_t n = s.num_heads;
  const int64_t d = s.head_dim;
  const T* segments[R];
  offset_rows<R>(rows, h * d, segments);
#if defined(CPU_CAPABILITY_AVX512_BF16)
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<A, float>) {
    if (g_bf16 != nullptr) {
      constexpr int kProducts = at_once<R, T, at::BFloat16>();
      A sums[kProducts * R];
      int64_t i = 0;
      for (; i + kProducts <= s.num_queries; i += kProducts) {
        bf16_score_dot_rows_impl<R, kProducts, false, false>(
            segments, g_bf16 + i * H + h * d, d, H, sums, nullptr);
        for (int q = 0; q < kProducts; ++q) {
          std::copy_n(sums + q * R, R, dscores + ((i + q) * n + h) * R);
        }
      }
      for (; i < s.num_queries; ++i) {
        bf16_score_dot_rows_impl<R, 1, false, false>(
            segments, g_bf16 + i * H + h * d, d, H, dscores + (i * n + h) * R, nullptr);
      }
      return;
    }
  }
#endif
  (void)g_bf16;
  A sums[kAtOnce * R];
  int64_t i = 0;
  for (; i + kAtOnce <= s.num_queries; i += kAtOnce) {
    score_dot_rows_float<R, kAtOnce, false, false>(
        segments, g + i * H + h * d, d, H, sums, nullptr);
    for (int q = 0; q < kAtOnce; ++q) {
      std::copy_n(sums + q * R, R, dscores + ((i + q) * n + h) * R);
    }
  }
  for (; i < s.num_queries; ++i) {
    score_dot_rows<R>(segments, g + i * H + h * d, d, dscores + (i * n + h) * R);
  }
}

// dscores[(i * n + h) * R + r] = G_i[D_h] . rows[r][D_h] for every query i
// and head h from the sequence's tiles of G ([Note: G . x from G's tiles]).
template <int R>
void grad_dots_from_tiles(
    const at::BFloat16* const* rows, const uint32_t* g_tiles, const PoolShape& s, float* dscores) {
#if defined(CPU_CAPABILITY_AVX512_BF16) && !defined(CPU_CAPABILITY_AMX_BF16)
  const int64_t stride = score_blocks(s.num_queries) * kTileScores;
  thread_local CacheLineBuffer<float> lanes;
  lanes.resize(R * stride);
  for (int64_t h = 0; h < s.num_heads; ++h) {
    head_slice_dots_on_tiles<R>(rows, g_tiles, s, h, lanes.data(), stride);
    for (int64_t i = 0; i < s.num_queries; ++i) {
      for (int r = 0; r < R; ++r) {
        dscores[(i * s.num_heads + h) * R + r] = lanes[r * stride + i];
      }
    }
  }
#else
  (void)rows, (void)g_tiles, (void)s, (void)dscores;
  TORCH_INTERNAL_ASSERT(false, "G's tiles need AVX512-BF16 without AMX");
#endif
}

// dscores[k * count + r] = scale * p * (G . x - delta_k) * unscale for every
// score k of `count` rows, in place of their G . x; delta: the sequence's
// [num_scores]. unscale: 1, or 2^-k where G . x and delta are of G * 2^k
// ([Note: G . x from bfloat16 products]).
template <typename acc_t>
void score_gradients(
    int count,
    int64_t num_scores,
    acc_t scale,
    const acc_t* delta,
    acc_t unscale,
    const acc_t* probs,
    acc_t* dscores) {
  for (int64_t k = 0; k < num_scores; ++k) {
    for (int r = 0; r < count; ++r) {
      const int64_t j = k * count + r;
      dscores[j] = scale * probs[j] * (dscores[j] - delta[k]) * unscale;
    }
  }
}

// The scores of a tile of R unmasked rows of sequence b, then p and ds:
//   p = exp(scale * x.u_k - lse), ds = scale * p * (G_i[D_h].x[D_h] - delta)
// into probs and dscores ([num_scores][R] each). scored: probs already
// holds the tile's scores, as forward_scores makes them
// (backward_tile_on_amx). g_tiles: sequence b's tiles of G, or null.
template <int R, typename scalar_t, typename acc_t>
void tile_score_gradients(
    const PoolShape& s,
    int64_t b,
    const scalar_t* const* rows,
    const acc_t* u,
    const acc_t* u_paired,
    const at::BFloat16* u_bf16,
    const acc_t* u_columns,
    const acc_t* g,
    const acc_t* lse,
    const acc_t* delta,
    acc_t scale,
    const acc_t* bias,
    acc_t* probs,
    acc_t* dscores,
    const at::BFloat16* g_bf16,
    const uint32_t* g_tiles,
    acc_t g_unscale,
    bool scored) {
  const int64_t H = s.hidden;
  const int64_t n = s.num_heads;
  const int64_t num_scores = s.num_scores();
  const acc_t* g_b = g + b * s.num_queries * H;
  // The scores into probs and G . x into dscores, overwritten below.
  if (!scored) {
    forward_scores<R>(rows, u, u_paired, u_bf16, u_columns, H, num_scores, probs);
  }
  if (g_tiles != nullptr) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
      grad_dots_from_tiles<R>(rows, g_tiles, s, dscores);
    } else {
      TORCH_INTERNAL_ASSERT(false, "only bfloat16 rows have G's tiles");
    }
  } else if (n == 1) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> && kBFloat16Products) {
      if (g_bf16 != nullptr) {
        score_dot_rows_each<R>(rows, g_bf16, H, num_scores, dscores);
      } else {
        score_dot_rows_each<R>(rows, g_b, H, num_scores, dscores);
      }
    } else {
      score_dot_rows_each<R>(rows, g_b, H, num_scores, dscores);
    }
  } else {
    for (int64_t h = 0; h < n; ++h) {
      head_slice_dots<R>(rows, g_b, g_bf16, s, h, dscores);
    }
  }
  probabilities(R, scale, bias, lse + 2 * b * num_scores, num_scores, probs);
  score_gradients(R, num_scores, scale, delta + b * num_scores, g_unscale, probs, dscores);
}

// Backward of one tile of R unmasked rows of sequence b:
//   p = exp(scale * x.u_k - lse), ds = scale * p * (G_i[D_h].x[D_h] - delta)
//   dx = sum_k p * G_i[D_h] + ds * u_k,   du_k += ds * x
// in three steps: the scores and G . x of every score
// (tile_score_gradients), then dx (written once, in x's dtype), then du.
template <int R, typename scalar_t, typename acc_t>
void backward_rows(
    const PoolShape& s,
    int64_t b,
    const scalar_t* const* rows,
    scalar_t* const* dx_rows,
    const acc_t* u,
    const acc_t* u_paired,
    const at::BFloat16* u_bf16,
    const acc_t* u_columns,
    const acc_t* g,
    const acc_t* lse,
    const acc_t* delta,
    acc_t scale,
    const acc_t* bias,
    acc_t* probs,    // [num_scores][R] scratch
    acc_t* dscores,  // [num_scores][R] scratch
    acc_t* du,
    bool stream_dx,
    Bf16Products& products,
    const at::BFloat16* g_bf16,
    const uint32_t* g_tiles,
    acc_t g_unscale) {
  const int64_t H = s.hidden;
  const int64_t num_scores = s.num_scores();
  const acc_t* g_b = g + b * s.num_queries * H;
  tile_score_gradients<R>(
      s,
      b,
      rows,
      u,
      u_paired,
      u_bf16,
      u_columns,
      g,
      lse,
      delta,
      scale,
      bias,
      probs,
      dscores,
      g_bf16,
      g_tiles,
      g_unscale,
      false);
#if defined(CPU_CAPABILITY_AVX512_BF16)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (products.u_pairs != nullptr) {
      round_and_pair_scores<R>(
          num_scores, dscores, products.ds_pairs, products.ds_row_pairs + products.gathered);
#if defined(CPU_CAPABILITY_AMX_BF16)
      ds_pairs_by_row<R>(products, num_scores, 0);
      ds_u_on_tiles(products, R, num_scores, H);
#endif
      dx_rows_all_scores<R, false, true>(s, probs, dscores, g_b, u, products, dx_rows);
      return du_rows_bf16<R>(rows, dscores, num_scores, H, products, du);
    }
  }
#endif
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stream_dx) {
      dx_rows_all_scores<R, true, false>(s, probs, dscores, g_b, u, products, dx_rows);
      return du_rows_all_scores<R>(rows, dscores, num_scores, H, du);
    }
  }
  dx_rows_all_scores<R, false, false>(s, probs, dscores, g_b, u, products, dx_rows);
  du_rows_all_scores<R>(rows, dscores, num_scores, H, du);
}

#if defined(CPU_CAPABILITY_AMX_BF16)
// [Note: the backward's tiles on AMX] With bfloat16 rows scored on AMX
// tiles, the backward takes tiles of up to kColumnTileRows rows, as the
// forward does, and runs its two products over the scores on all of them
// at once: the scores (amx_score_rows) and ds . U (ds_u_on_tiles). Each of
// those reads all of u's tiles (288 KB at 16 x 12) for every tile of rows,
// 8 rows at a time before. The rest, G . x, p, ds, dx and du, still goes
// 8 rows at a time (backward_rows' steps, in the same order), and every
// sum is the same as there, so the gradients are bitwise the same.
// Backward alone, bfloat16, 2 threads, 8-row tiles against these, taking
// turns in one process (median of 15 calls): 4 x 12 at 32 x 512 x 768
// 22.5 -> 19.5 ms, 1 x 12 12.8 -> 10.9, 8 x 1 15.3 -> 13.3, so400m's full
// width (16 x 729 x 1152) 26.6 -> 19.6; 16 x 12 level (56.0 -> 59.3, 50.7
// -> 54.0, 57.6 -> 57.0 in three runs), its products bound by the tile
// unit rather than by reading u.
//
// scratch: probs and dscores, num_scores * kColumnTileRows each, and the
// scores' lanes, kColumnTileRows * the lanes of score_blocks(num_scores).
template <typename acc_t>
void backward_tile_on_amx(
    const PoolShape& s,
    int64_t b,
    const at::BFloat16* const* rows,
    int count,
    at::BFloat16* const* dx_rows,
    const acc_t* u,
    const at::BFloat16* u_bf16,
    const acc_t* g,
    const acc_t* lse,
    const acc_t* delta,
    acc_t scale,
    const acc_t* bias,
    acc_t* probs,
    acc_t* dscores,
    acc_t* lanes,
    acc_t* du,
    Bf16Products& products,
    const at::BFloat16* g_bf16,
    acc_t g_unscale) {
  const int64_t H = s.hidden;
  const int64_t num_scores = s.num_scores();
  const int64_t stride = score_blocks(num_scores) * kTileScores;
  const acc_t* g_b = g + b * s.num_queries * H;
  amx_score_rows(rows, count, u_tiles_of(u_bf16, num_scores, H), H, num_scores, lanes, stride);
  // A subtile's probs and dscores: [num_scores][R] from its first row on.
  auto subtile = [&](int first, auto body) {
    with_tile_size<kBackwardTileRows>(std::min(kBackwardTileRows, count - first), [&](auto size) {
      body(
          std::integral_constant<int, decltype(size)::value>{},
          probs + first * num_scores,
          dscores + first * num_scores);
    });
  };
  for (int first = 0; first < count; first += kBackwardTileRows) {
    subtile(first, [&](auto size, acc_t* tile_probs, acc_t* tile_dscores) {
      constexpr int R = decltype(size)::value;
      scores_by_score(lanes + first * stride, stride, R, num_scores, tile_probs);
      tile_score_gradients<R>(
          s,
          b,
          rows + first,
          u,
          static_cast<const acc_t*>(nullptr),
          u_bf16,
          static_cast<const acc_t*>(nullptr),
          g,
          lse,
          delta,
          scale,
          bias == nullptr ? nullptr : bias + first,
          tile_probs,
          tile_dscores,
          g_bf16,
          static_cast<const uint32_t*>(nullptr),
          g_unscale,
          true);
      round_and_pair_scores<R>(
          num_scores, tile_dscores, products.ds_pairs, products.ds_row_pairs + products.gathered);
      ds_pairs_by_row<R>(products, num_scores, first);
      du_rows_bf16<R>(rows + first, tile_dscores, num_scores, H, products, du);
    });
  }
  ds_u_on_tiles(products, count, num_scores, H);
  float* all_ds_u = products.ds_u;
  for (int first = 0; first < count; first += kBackwardTileRows) {
    subtile(first, [&](auto size, acc_t* tile_probs, acc_t* tile_dscores) {
      constexpr int R = decltype(size)::value;
      products.ds_u = all_ds_u + first * score_pair_stride(H);
      dx_rows_all_scores<R, false, true>(
          s, tile_probs, tile_dscores, g_b, u, products, dx_rows + first);
    });
  }
  products.ds_u = all_ds_u;
}
#endif

// [Note: the backward by columns] Where the forward scores rows by columns
// (u_columns.h: float32 and float64 rows, enough scores to fill a vector's
// lanes), the backward takes tiles of kColumnTileRows rows of one sequence
// and each of its three products as the forward takes its two: scores
// [rows, S] = X . U^T by columns (the forward's sums, bitwise), then
// dX = dS . U + P . G and dU += dS^T . X, each by add_weighted_rows_by_columns
// with a block of output sums in registers across all the tile's rows or
// scores. backward_rows, on 8-row tiles, scored them in a block of 6 rows
// and one of 2 (AVX2), loaded and stored every du sum once per 8 rows, and
// read all of u for dx once per 8 rows. G . x stays summed 8 rows at a time
// as backward_rows sums it ([Note: delta as G . x]).

// Per-thread scratch of backward_tile_by_columns.
template <typename A>
struct ColumnTileScratch {
  explicit ColumnTileScratch(const PoolShape& s)
      : probs(s.num_scores() * kColumnTileRows),
        dscores(s.num_scores() * kColumnTileRows),
        dscores_by_row(kColumnTileRows * s.num_scores()),
        dots(s.num_scores() * kBackwardTileRows),
        dx(kColumnTileRows * s.hidden),
        g_rows(s.num_queries) {}
  CacheLineBuffer<A> probs;           // [S, count]: the scores, then p
  CacheLineBuffer<A> dscores;         // [S, count]: G . x, then ds
  CacheLineBuffer<A> dscores_by_row;  // [count, S]
  CacheLineBuffer<A> dots;            // [S, 8]: G . x of 8 rows
  CacheLineBuffer<A> dx;              // [count, H]
  std::vector<const A*> g_rows;       // [Q]: one head's slice of each G_i
};

// dots[k * count + r] = G_i[D_h] . rows[r][D_h] for every score k = i * n +
// h of `count` rows, summed 8 rows at a time as backward_rows sums them.
template <typename T, typename A>
void grad_dots_of_tile(
    const PoolShape& s, const T* const* rows, int count, const A* g, A* block, A* dots) {
  const int64_t num_scores = s.num_scores();
  for (int first = 0; first < count; first += kBackwardTileRows) {
    with_tile_size<kBackwardTileRows>(std::min(kBackwardTileRows, count - first), [&](auto size) {
      constexpr int R = decltype(size)::value;
      if (s.num_heads == 1) {
        score_dot_rows_each<R>(rows + first, g, s.hidden, num_scores, block);
      } else {
        for (int64_t h = 0; h < s.num_heads; ++h) {
          head_slice_dots<R>(rows + first, g, nullptr, s, h, block);
        }
      }
      for (int64_t k = 0; k < num_scores; ++k) {
        std::copy_n(block + k * R, R, dots + k * count + first);
      }
    });
  }
}

// rows[r] = from[r * n .. r * n + n) for `count` rows, non-temporal if
// kStream (every row aligned to the vector).
template <bool kStream, typename T>
void store_rows(const T* from, int count, int64_t n, T* const* rows) {
  using Vec = Vectorized<T>;
  for (int r = 0; r < count; ++r) {
    int64_t e = 0;
    for (; e + Vec::size() <= n; e += Vec::size()) {
      store<kStream>(Vec::loadu(from + r * n + e), rows[r] + e);
    }
    std::copy(from + r * n + e, from + (r + 1) * n, rows[r] + e);
  }
}

// backward_rows for a tile of up to kColumnTileRows unmasked float32 or
// float64 rows of sequence b ([Note: the backward by columns]). u_rows:
// the S rows of u; g_b: sequence b's G [Q, H].
template <typename A>
void backward_tile_by_columns(
    const PoolShape& s,
    int64_t b,
    const A* const* rows,
    int count,
    A* const* dx_rows,
    const A* const* u_rows,
    const A* u_columns,
    const A* g_b,
    const A* lse,
    const A* delta,
    A scale,
    const A* bias,
    int64_t ahead,
    A* du,
    bool stream_dx,
    ColumnTileScratch<A>& scratch) {
  const int64_t H = s.hidden;
  const int64_t n = s.num_heads;
  const int64_t d = s.head_dim;
  const int64_t num_scores = s.num_scores();
  A* probs = scratch.probs.data();
  A* dscores = scratch.dscores.data();
  score_rows_by_columns(rows, count, u_columns, H, num_scores, probs, ahead);
  grad_dots_of_tile(s, rows, count, g_b, scratch.dots.data(), dscores);
  probabilities(count, scale, bias, lse + 2 * b * num_scores, num_scores, probs);
  score_gradients(count, num_scores, scale, delta + b * num_scores, A(1), probs, dscores);
  for (int64_t k = 0; k < num_scores; ++k) {
    for (int r = 0; r < count; ++r) {
      scratch.dscores_by_row[r * num_scores + k] = dscores[k * count + r];
    }
  }
  // dX = dS . U, then + P . G head slice by head slice.
  A* dx = scratch.dx.data();
  std::fill_n(dx, count * H, A(0));
  add_weighted_rows_by_columns(
      dscores, count, static_cast<int>(num_scores), u_rows, H, count, dx, H);
  const A** g_rows = scratch.g_rows.data();
  for (int64_t h = 0; h < n; ++h) {
    for (int64_t i = 0; i < s.num_queries; ++i) {
      g_rows[i] = g_b + i * H + h * d;
    }
    add_weighted_rows_by_columns(
        probs + h * count,
        n * count,
        static_cast<int>(s.num_queries),
        g_rows,
        d,
        count,
        dx + h * d,
        H);
  }
  if (stream_dx) {
    store_rows<true>(dx, count, H, dx_rows);
  } else {
    store_rows<false>(dx, count, H, dx_rows);
  }
  // dU += dS^T . X
  add_weighted_rows_by_columns(
      scratch.dscores_by_row.data(), num_scores, count, rows, H, num_scores, du, H);
}

// dx[row] = 0 for a row no score attends, with non-temporal stores when dx
// is streamed: a padded batch's dx can be mostly such rows, and plain
// stores would read each line before writing it ([Note: non-temporal dx]).
template <typename scalar_t>
void zero_row(scalar_t* row, int64_t n, bool stream) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    if (stream) {
      using Vec = Vectorized<scalar_t>;
      int64_t e = 0;
      for (; e + Vec::size() <= n; e += Vec::size()) {
        store<true>(Vec(scalar_t(0)), row + e);
      }
      std::fill_n(row + e, n - e, scalar_t(0));
      return;
    }
  }
  std::fill_n(row, n, scalar_t(0));
}

// x: [B, L, H] (or ragged [T, H]); grad_out, out: [B, num_scores,
// head_dim]; lse, delta: [B, num_scores]; u: [num_scores, H]. One pass over
// x writing dx; each piece of the flattened B * L (or T) rows accumulates
// its own du partial, summed afterwards in piece order.
// dots: G and out in bfloat16 where G . x takes bfloat16 products.
template <typename scalar_t>
void backward_impl(const BackwardParams& p, const GradDotsBf16& dots) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTile = kBackwardTileRows;
  static_assert(kColumnTileRows >= kTile);
  const int64_t H = p.hidden;
  const int64_t num_scores = p.num_scores();
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* u = static_cast<const acc_t*>(p.u);
  const auto* g = static_cast<const acc_t*>(p.grad_out);
  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* delta = static_cast<const acc_t*>(p.delta);
  auto* dx = static_cast<scalar_t*>(p.dx);
  auto* du_partials = static_cast<acc_t*>(p.du_partials);
  auto* norm_partials = static_cast<acc_t*>(p.norm_partials);
  const auto scale = static_cast<acc_t>(p.scale);
  const auto* bias = static_cast<const acc_t*>(p.bias);
  const int64_t rows = p.ragged() ? p.seq_len : p.batch * p.seq_len;
  const CacheLineBuffer<acc_t> u_paired_buffer = u_in_paired_order<scalar_t>(p, u);
  const acc_t* u_paired = u_paired_buffer.empty() ? nullptr : u_paired_buffer.data();
  const CacheLineBuffer<at::BFloat16> u_bf16_buffer = u_in_bf16<scalar_t>(p, u);
  const at::BFloat16* u_bf16 = u_bf16_buffer.empty() ? nullptr : u_bf16_buffer.data();
  const CacheLineBuffer<acc_t> u_columns_buffer = u_in_columns<scalar_t>(p, u);
  const acc_t* u_columns = u_columns_buffer.empty() ? nullptr : u_columns_buffer.data();
  // [Note: the backward by columns] (a layer norm keeps the 8-row tiles).
  const bool by_columns = u_columns != nullptr && num_scores > 1 && !p.normalizes();
  std::vector<const acc_t*> u_rows(by_columns ? num_scores : 0);
  for (size_t k = 0; k < u_rows.size(); ++k) {
    u_rows[k] = u + k * H;
  }
  // dx and du from bfloat16 products where the scores come from them
  // ([Note: bfloat16 products in the backward]).
  CacheLineBuffer<uint32_t> u_pairs;
#if defined(CPU_CAPABILITY_AVX512_BF16)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (u_bf16 != nullptr && num_scores > 1) {
      u_pairs = u_in_score_pairs(num_scores, H, u);
    }
  }
#endif

  // The products on AMX tiles ([Note: the backward's products on AMX tiles]),
  // on the forward's tiles ([Note: the backward's tiles on AMX]; a layer norm
  // keeps the 8-row tiles).
  const bool amx_products = kAmxScores && !u_pairs.empty();
  const bool on_amx = amx_products && !p.normalizes();
  const int tile_rows = by_columns || on_amx ? kColumnTileRows : kTile;
  const int64_t grain = parallel_grain(p.flat_cut, H);
  at::parallel_for(0, p.flat_cut.pieces, grain, [&](int64_t begin, int64_t end) {
    RowTile<scalar_t, kColumnTileRows> tile;
    CacheLineBuffer<acc_t> scratch(by_columns ? 0 : 2 * num_scores * tile_rows);
    // The scores of a tile on AMX tiles, by rows.
    CacheLineBuffer<acc_t> amx_lanes(
        on_amx ? kColumnTileRows * score_blocks(num_scores) * kTileScores : 0);
    std::optional<ColumnTileScratch<acc_t>> column_scratch;
    if (by_columns) {
      column_scratch.emplace(p);
    }
    // Each part on a cache line of its own, for the AMX tiles.
    const int64_t ds_pairs_size = whole_lines<uint32_t>(((num_scores + 1) / 2) * kTile);
    const int64_t row_pairs_size = whole_lines<uint32_t>(kDuPairs * H);
    CacheLineBuffer<uint32_t> pair_scratch(
        u_pairs.empty() ? 0 : ds_pairs_size + row_pairs_size + num_scores * kDuPairs);
    Bf16Products products;
    // The AMX products' scratch.
    CacheLineBuffer<uint32_t> ds_by_row(amx_products ? tile_rows * score_pair_rows(num_scores) : 0);
    CacheLineBuffer<float> ds_u(amx_products ? tile_rows * score_pair_stride(H) : 0);
    if (!u_pairs.empty()) {
      products = {
          u_pairs.data(),
          pair_scratch.data(),
          pair_scratch.data() + ds_pairs_size,
          pair_scratch.data() + ds_pairs_size + row_pairs_size};
      products.ds_by_row = ds_by_row.data();
      products.ds_u = ds_u.data();
    }
    scalar_t* dx_out[kColumnTileRows] = {};
    acc_t tile_bias[kColumnTileRows] = {};
    const acc_t* biases = bias == nullptr ? nullptr : tile_bias;
    int64_t tile_batch = 0;
    // With a norm, the tile's rows are normalized (y) and the kernels write
    // dy into dy_rows; each row's dx then comes from its dy (normalized_dx).
    NormalizedRows<scalar_t> normalized(p, kTile);
    // (dy stays in cache: plain stores; dx itself may stream.)
    const bool stream_kernel_dx = p.stream_dx && !p.normalizes();
    std::vector<scalar_t> dy_rows(p.normalizes() ? kTile * H : 0);
    const scalar_t* x_rows[kColumnTileRows] = {};
    scalar_t* dx_rows[kColumnTileRows] = {};
    for (int64_t piece = begin; piece < end; ++piece) {
      acc_t* du = du_partials + piece * num_scores * H;
      std::fill_n(du, num_scores * H, acc_t(0));
      acc_t* norm_grads = p.normalizes() ? norm_partials + piece * 2 * H : nullptr;
      if (norm_grads != nullptr) {
        std::fill_n(norm_grads, 2 * H, acc_t(0));
      }
      auto normalized_dx = [&] {
        for (int r = 0; r < tile.count(); ++r) {
          normalized.backward(
              tile.rows()[r],
              x_rows[r],
              dx_out[r],
              dx_rows[r],
              norm_grads,
              norm_grads + H,
              p.stream_dx);
        }
      };
      auto flush = [&] {
        const int count = tile.count();
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (by_columns) {
            backward_tile_by_columns(
                p,
                tile_batch,
                tile.rows(),
                count,
                dx_out,
                u_rows.data(),
                u_columns,
                g + tile_batch * p.num_queries * H,
                lse,
                delta,
                scale,
                biases,
                kColumnTileRows * p.x_seq_stride,
                du,
                stream_kernel_dx,
                *column_scratch);
            tile.clear();
            return;
          }
        }
#if defined(CPU_CAPABILITY_AMX_BF16)
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (on_amx) {
            backward_tile_on_amx(
                p,
                tile_batch,
                tile.rows(),
                count,
                dx_out,
                u,
                u_bf16,
                g,
                lse,
                delta,
                scale,
                biases,
                scratch.data(),
                scratch.data() + num_scores * kColumnTileRows,
                amx_lanes.data(),
                du,
                products,
                dots.g_of(p, tile_batch),
                static_cast<acc_t>(dots.unscale_of(tile_batch)));
            tile.clear();
            return;
          }
        }
#endif
        if (num_scores == 1) {
          with_tile_size<kTile>(count, [&](auto size) {
            backward_rows_one_score<decltype(size)::value>(
                p,
                tile_batch,
                tile.rows(),
                dx_out,
                u,
                u_paired,
                u_bf16,
                g,
                lse,
                delta,
                scale,
                biases,
                du,
                stream_kernel_dx);
          });
          if (p.normalizes()) {
            normalized_dx();
          }
          tile.clear();
          return;
        }
        with_tile_size<kTile>(count, [&](auto size) {
          backward_rows<decltype(size)::value>(
              p,
              tile_batch,
              tile.rows(),
              dx_out,
              u,
              u_paired,
              u_bf16,
              u_columns,
              g,
              lse,
              delta,
              scale,
              biases,
              scratch.data(),
              scratch.data() + num_scores * kTile,
              du,
              stream_kernel_dx,
              products,
              dots.g_of(p, tile_batch),
              dots.g_tiles_of(p, tile_batch),
              static_cast<acc_t>(dots.unscale_of(tile_batch)));
        });
        if (p.normalizes()) {
          normalized_dx();
        }
        tile.clear();
      };
      const RowRange range = p.flat_cut.piece(piece, rows);
      int64_t b = range.empty() ? 0 : p.sequence_of(range.begin);
      for (int64_t row = range.begin; row < range.end; ++row) {
        while (p.flat_row(b, p.rows_of(b)) <= row) {
          ++b;  // the rows of sequence b end before this one
        }
        const int64_t l = row - p.flat_row(b, 0);
        if (tile.count() > 0 && b != tile_batch) {
          flush();
        }
        if (!p.attends(b, l)) {
          if (!p.dx_zeroed) {
            zero_row(dx + row * H, H, p.stream_dx);
          }
          continue;
        }
        if (p.normalizes()) {
          x_rows[tile.count()] = x + p.row_offset(b, l);
          dx_rows[tile.count()] = dx + row * H;
          dx_out[tile.count()] = dy_rows.data() + tile.count() * H;
        } else {
          dx_out[tile.count()] = dx + row * H;
        }
        if (bias != nullptr) {
          tile_bias[tile.count()] = bias[row];
        }
        tile_batch = b;
        tile.add(normalized(x + p.row_offset(b, l)));
        if (tile.count() == tile_rows) {
          flush();
        }
      }
      if (tile.count() > 0) {
        flush();
      }
#if defined(CPU_CAPABILITY_AVX512_BF16)
      if constexpr (std::is_same_v<acc_t, float>) {
        add_gathered_to_du(products, num_scores, H, du);
      }
#endif
    }
    if (p.stream_dx) {
      store_fence();
    }
  });
  sum_parts_in_order(du_partials, p.flat_cut.pieces, num_scores * H, static_cast<acc_t*>(p.du));
  if (p.normalizes()) {
    sum_parts_in_order(norm_partials, p.flat_cut.pieces, 2 * H, static_cast<acc_t*>(p.norm_grads));
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
