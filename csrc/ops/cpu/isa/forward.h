#pragma once

// The forward of folded_attention_pool on the CPU: one pass over x with an
// online softmax per score (SPEC.md §5), tiles of rows scored and added.
// Per instruction set, like every file in isa/ (ops/cpu/README.md).

#include "ops/cpu/isa/layer_norm.h"
#include "ops/cpu/isa/u_columns.h"
#include "ops/cpu/isa/vec_helpers.h"
#include "ops/cpu/kernel_set.h"

#include <c10/util/Exception.h>

#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// scores[r] = rows[r] . v for R rows and y += sum_p w[p] * prev[p] for P
// other rows, in one pass; either count may be 0. The scores are summed as
// score_dot_rows and paired_score_dot_rows sum them ([Note: one order for
// every score]). The forward scores a tile
// from memory while it adds the tile before it, still in L1: as a pass of
// its own, that accumulation left the memory idle. kPaired: bfloat16 rows
// against v and y in paired order, n a multiple of kPairWidth. kLevel: where
// the lines `ahead` go ([Note: prefetches from memory]).
template <int R, int P, bool kPaired, typename T, typename A, CacheLevel kLevel = CacheLevel::kL1>
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
        prefetch<kLevel>(rows[r] + e, ahead);
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

#if defined(CPU_CAPABILITY_AVX512_BF16)
// score_and_accumulate_rows for bfloat16 rows read in pairs whose scores
// come from bfloat16 products ([Note: bfloat16 products]): each 32 values of
// a row are one vdpbf16ps against v (u rounded to bfloat16, natural order),
// never widened; the P rows of the tile before are widened for their
// weighted sum y (paired order) as there. Each score is summed as
// bf16_score_dot_rows_impl sums it, so the backward and the jvp recompute
// it exactly. n is a multiple of kPairWidth; kLevel as there.
template <int R, int P, CacheLevel kLevel = CacheLevel::kL1>
void score_bf16_and_accumulate_rows(
    const at::BFloat16* const* rows,
    const at::BFloat16* v,
    int64_t n,
    float* scores,
    int64_t ahead,
    const float* w,
    const at::BFloat16* const* prev,
    float* y) {
  using Reader = ChunkReader<at::BFloat16, true>;
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  static_assert(Reader::kWidth == 32, "one vdpbf16ps reads one paired chunk");
  // Local copies, so that the stores to y do not force reloads of them.
  __m512 acc[std::max(R, 1)];
  const at::BFloat16* xr[std::max(R, 1)] = {};
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    xr[r] = rows[r];
  }
  // Raw vectors, the rows widened by load_pairs itself: through Vectorized
  // and ChunkReader's Chunk, GCC stored each widened chunk of the last row
  // to the stack, dead, every iteration.
  __m512 weights[std::max(P, 1)];
  const at::BFloat16* pr[std::max(P, 1)] = {};
  for (int q = 0; q < P; ++q) {
    weights[q] = _mm512_set1_ps(w[q]);
    pr[q] = prev[q];
  }
  for (int64_t e = 0; e + Reader::kWidth <= n; e += Reader::kWidth) {
    if constexpr (R > 0) {
      const __m512bh uv = load_bf16<false>(v + e, 0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        prefetch<kLevel>(xr[r] + e, ahead);
        acc[r] = _mm512_dpbf16_ps(acc[r], load_bf16<false>(xr[r] + e, 0), uv);
      }
    }
    if constexpr (P > 0) {
      __m512 y_even = _mm512_loadu_ps(y + e);
      __m512 y_odd = _mm512_loadu_ps(y + e + W);
#pragma GCC unroll 8
      for (int q = 0; q < P; ++q) {
        const WidenedPairs xv = load_pairs(pr[q] + e);
        y_even = _mm512_fmadd_ps(weights[q], xv.even, y_even);
        y_odd = _mm512_fmadd_ps(weights[q], xv.odd, y_odd);
      }
      _mm512_storeu_ps(y + e, y_even);
      _mm512_storeu_ps(y + e + W, y_odd);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    scores[r] = reduce_add(Vec(acc[r]));
  }
}
#endif

// The forward's two passes over a tile, each on its own: the scores
// out[k * R + r] of `count` consecutive vectors of v (n apart), and the
// accumulation (axpy_rows); for bfloat16 rows in paired order,
// score_and_accumulate_rows. v_bf16: v rounded to bfloat16, when the
// scores come from bfloat16 products ([Note: bfloat16 products]), or null.
template <int R, typename T, typename A>
void score_rows(
    const T* const* rows,
    const A* v,
    const at::BFloat16* v_bf16,
    int64_t n,
    int64_t count,
    A* out,
    int64_t ahead,
    bool paired) {
  if constexpr (std::is_same_v<T, at::BFloat16> && kBFloat16Products) {
    if (v_bf16 != nullptr) {
      if (scores_on_tiles<T>(count)) {
        return tile_scores_by_score(rows, R, v_bf16, n, count, out, ahead);
      }
      return score_dot_rows_each<R>(rows, v_bf16, n, count, out, ahead);
    }
  }
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (paired) {
      for (int64_t k = 0; k < count; ++k) {
        score_and_accumulate_rows<R, 0, true, T, A>(
            rows, v + k * n, n, out + k * R, k == 0 ? ahead : 0, nullptr, nullptr, nullptr);
      }
      return;
    }
  }
  score_dot_rows_each<R>(rows, v, n, count, out, ahead);
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

// Whether the forward adds tiles of rows scored by dot products with
// SoftmaxState::add_dot_scored_rows: several scores of one head (full width
// included), from 8 on. Forward, 2 threads, one process, against add_rows:
// so400m's full width (16 x 729 x 1152, 16 scores) bfloat16 2.66 -> 2.14 ms;
// 8 x 1 at 32 x 512 x 768 bfloat16 1.29 -> 1.12, float32 1.81 -> 1.64. Not
// below 8 (4 x 1 bfloat16 0.80 -> 0.83, 2 x 1 0.52 -> 0.58) nor with several
// heads (1 x 12 bfloat16 0.83 -> 0.96): moving the scores into lanes, and
// softmax steps a vector wide, cost more than the longer tile saves.
inline bool dot_scores_in_lanes(const PoolShape& s) {
  return s.num_heads == 1 && s.num_scores() >= 8;
}

// Whether the forward takes scores from u's tiles (scores_on_tiles) into
// lanes too (add_dot_scored_rows), beside one head's (dot_scores_in_lanes):
// on AMX tiles always ([Note: scores on AMX tiles]); by vdpbf16ps, with
// several heads, for one query only. With several queries of several heads
// the tiles of kWideTileRows rows add their weighted sums faster
// (accumulate_rows_into against add_head_slices_by_columns). Bfloat16
// forward, 2 threads, a 2-core Zen 4 EPYC, 32 x 512 x 768, one process
// taking turns, over the dot products (medians of 15 paired ratios), into
// lanes / in tiles of 8 rows: 1 x 12 0.91 / 1.05, 1 x 16 0.71 / 0.87,
// 4 x 12 0.82-0.89 / 0.80-0.87, 16 x 12 0.85-0.93 / 0.80-0.87.
template <typename T>
bool tile_scores_in_lanes(const PoolShape& s) {
  return scores_on_tiles<T>(s.num_scores()) && (kAmxScores || s.num_queries == 1);
}

// Whether the forward scores each tile of rows beside the previous tile's
// weighted sums ([Note: scores beside the weighted sums]): bfloat16 rows
// scored on AMX tiles whose sums go by columns, those of one head or
// several heads' whole vectors a head slice (add_head_slices_in_groups).
template <typename T>
bool scores_beside_sums(const PoolShape& s) {
#if defined(CPU_CAPABILITY_AMX_BF16)
  constexpr int64_t W = Vectorized<float>::size();
  return tile_scores_in_lanes<T>(s) && !sums_on_tiles<T>(s) &&
         (s.num_heads == 1 || (s.head_dim % W == 0 && s.head_dim / W <= 8));
#else
  (void)s;
  return false;
#endif
}

// Online-softmax state of one (piece of a) sequence for all its scores:
// [weighted sums of x[num_scores * head_dim], any row attended, running
// max[num_scores], running sum[num_scores]], one flat array so that a
// piece's state can live in the partials buffer; its size
// (PoolShape::softmax_state_size) a whole number of cache lines, so that
// the weighted sums start on one where the array does (they are C of the
// sums on AMX tiles: 32 x 1 at 32 x 512 x 768, bfloat16 forward, 3.23 ->
// 2.93 ms against sums one float off the line).
template <typename acc_t>
class SoftmaxState {
 public:
  static int64_t size(const PoolShape& shape) {
    return shape.softmax_state_size();
  }

  // paired: the weighted sums are kept in paired order (see load_pairs).
  // u_bf16: u rounded to bfloat16, if the scores come from bfloat16
  // products (u_in_bf16), or null.
  // from_memory: x does not fit the last-level cache
  // (ForwardParams::x_fits_cache): float rows are read one at a time
  // ([Note: rows one at a time]). next_tile_in_l2: where the one-score
  // tiles prefetch the next tile (next_tile_in_l2()).
  // u_columns: u stored as columns (u_in_columns), if the rows are scored
  // by columns, or null.
  SoftmaxState(
      acc_t* data,
      const PoolInputs& p,
      bool paired,
      const at::BFloat16* u_bf16 = nullptr,
      bool from_memory = false,
      bool next_tile_in_l2 = false,
      const acc_t* u_columns = nullptr)
      : data_(data),
        shape_(p),
        x_seq_stride_(p.x_seq_stride),
        paired_(paired),
        from_memory_(from_memory),
        next_tile_in_l2_(next_tile_in_l2),
        u_bf16_(u_bf16),
        u_columns_(u_columns) {}

  acc_t* max() const {
    return flag() + 1;
  }
  acc_t* sum() const {
    return flag() + 1 + shape_.num_scores();
  }
  acc_t* weighted() const {
    return data_;
  }
  bool any_valid() const {
    return *flag() != acc_t(0);
  }

  void reset() {
    std::fill_n(weighted(), shape_.num_scores() * shape_.head_dim, acc_t(0));
    *flag() = acc_t(0);
    std::fill_n(max(), shape_.num_scores(), kNegInf<acc_t>);
    std::fill_n(sum(), shape_.num_scores(), acc_t(0));
  }

  // Adds a tile of R unmasked rows of x with score vectors u (and bias[r]
  // added to each score of row r, when bias is not null), in three steps:
  // every score of the tile (score_tile, whose passes also bring in the
  // next tile), the softmax step of each score, then the weighted sums,
  // kSumsPerPass of those that read the same slice of the rows at a time
  // (with one head, by columns). All but the first pass read the tile from
  // cache. scratch: 2 * R *
  // num_scores.
  template <int R, typename scalar_t>
  void add_rows(
      const scalar_t* const* rows, const acc_t* u, acc_t scale, const acc_t* bias, acc_t* scratch) {
    const int64_t num_scores = shape_.num_scores();
    acc_t* scores = scratch;
    acc_t* weights = scratch + num_scores * R;
    *flag() = acc_t(1);
    // Float rows of one head from memory: the next tile into L2 from the
    // weighted sums, as add_dot_scored_rows does ([Note: the next tile of
    // float rows]). Forward, float32, 32 x 512 x 768, against the score
    // passes' prefetch (2 threads, a Zen 4 EPYC, paired as there): 2 x 1
    // 0.70-0.84, 3 x 1 0.81, 4 x 1 0.69-0.81, 6 x 1 0.75; at 64 x 512 x
    // 768, 2 x 1 0.72 and 3 x 1 0.79; forward+backward 0.87-0.95. With x in
    // cache it was mixed (8 x 512 x 768: 2 x 1 1.14-1.22, 4 x 1 0.89-0.96;
    // 16 x 512 x 768: 0.91 and 0.76), so there the score passes keep it.
    const bool sums_prefetch =
        std::is_same_v<scalar_t, acc_t> && shape_.num_heads == 1 && from_memory_;
    const int64_t next_tile = R * x_seq_stride_;
    score_tile<R>(rows, u, scores, weights, sums_prefetch ? 0 : next_tile);
    weigh_tile<R>(scale, bias, scores, weights);
    if (shape_.num_heads == 1) {
      // Whole rows for every score (several queries of one head, or full
      // width; here fewer than dot_scores_in_lanes takes): the sums by
      // columns, the weights row by row where the scores were. Against
      // accumulate_rows_into, forward, 2 threads, one process: bfloat16 4 x 1
      // at 32 x 512 x 768 0.72 -> 0.62 ms, 2 x 1 0.53 -> 0.48; float32 4 x 1
      // 1.44 -> 1.30.
      for (int64_t k = 0; k < num_scores; ++k) {
        for (int r = 0; r < R; ++r) {
          scores[r * num_scores + k] = weights[k * R + r];
        }
      }
      return add_weighted_rows_by_columns(
          scores,
          num_scores,
          R,
          rows,
          shape_.hidden,
          num_scores,
          weighted(),
          shape_.hidden,
          sums_prefetch ? next_tile : 0);
    }
    add_weighted_rows<R>(rows, weights);
  }

  // Scratch of add_rows_by_columns.
  static int64_t column_scratch_size(const PoolShape& s) {
    return (kColumnTileRows + 2) * column_lanes<acc_t>(s.num_scores()) +
           kColumnTileRows * s.num_queries * s.num_heads * slice_pieces(s.head_dim);
  }

  // Pieces of equal width, each 2 to 8 whole vectors, that a head slice
  // wider than 8 vectors is summed in (add_head_slices_by_columns); 1
  // where it is not that wide or where no such pieces divide it.
  static int64_t slice_pieces(int64_t d) {
    constexpr int64_t W = Vectorized<acc_t>::size();
    if (d <= 8 * W || d % W != 0) {
      return 1;
    }
    const int64_t vectors = d / W;
    for (int64_t pieces = 2; vectors / pieces >= 2; ++pieces) {
      if (vectors % pieces == 0 && vectors / pieces <= 8) {
        return pieces;
      }
    }
    return 1;
  }

  // add_rows for a tile of `count` rows scored by columns, up to
  // kColumnTileRows ([Note: scores by columns]): each row's scores in the
  // lanes of vectors, as the score pass leaves them, the softmax step of
  // all of them at once (weigh_rows_by_columns). scratch:
  // column_scratch_size.
  template <typename scalar_t>
  void add_rows_by_columns(
      const scalar_t* const* rows, int count, acc_t scale, const acc_t* bias, acc_t* scratch) {
    const int64_t H = shape_.hidden;
    const int64_t num_scores = shape_.num_scores();
    const int64_t lanes = column_lanes<acc_t>(num_scores);
    acc_t* scores = scratch;  // [count, lanes], then the weights
    *flag() = acc_t(1);
    score_rows_by_columns<true>(
        rows, count, u_columns_, H, num_scores, scores, kColumnTileRows * x_seq_stride_);
    weigh_rows_by_columns(count, scale, bias, scores, scratch + kColumnTileRows * lanes);
    if (shape_.num_heads == 1) {
      return add_weighted_rows_by_columns(scores, lanes, count, rows, H, num_scores, weighted(), H);
    }
    add_head_slices_by_columns(rows, count, scores, lanes, scratch + (kColumnTileRows + 2) * lanes);
  }

  // Scratch of add_dot_scored_rows: column_scratch_size, then room for the
  // scores of kWideTileRows rows or the weights of kColumnTileRows in pairs.
  static int64_t dot_scratch_size(const PoolShape& s) {
    return column_scratch_size(s) + std::max(kWideTileRows, kColumnTileRows / 2) * s.num_scores();
  }

  // add_rows_by_columns for up to kColumnTileRows rows of one head
  // (dot_scores_in_lanes) scored by dot products, as add_rows scores them
  // (rows of 16 bits, or too few scores to score by columns), their scores
  // then moved into the lanes that weigh_rows_by_columns and the sums by
  // columns take: each weighted sum is loaded and stored once per
  // kColumnTileRows rows instead of once per kWideTileRows. bfloat16 rows
  // scored from bfloat16 products are summed from them too ([Note: weighted
  // sums from bfloat16 products]). Rows scored from u's tiles come here
  // too, with several heads where tile_scores_in_lanes says so, their
  // scores stored straight into the lanes ([Note: scores on AMX tiles]);
  // they are summed on AMX tiles, by columns ([Note: weighted sums on AMX
  // tiles]) or, one head without AMX, in pairs. scratch: dot_scratch_size.
  template <typename scalar_t>
  void add_dot_scored_rows(
      const scalar_t* const* rows,
      int count,
      const acc_t* u,
      acc_t scale,
      const acc_t* bias,
      acc_t* scratch) {
    const int64_t H = shape_.hidden;
    const int64_t num_scores = shape_.num_scores();
    const int64_t lanes = column_lanes<acc_t>(num_scores);
    acc_t* scores = scratch;  // [count, lanes], then the weights
    acc_t* block = scratch + column_scratch_size(shape_);
    *flag() = acc_t(1);
    const int64_t next_tile = kColumnTileRows * x_seq_stride_;
    // [Note: the next tile of float rows] Float rows (read as they are, 8
    // to 11 scores of one head) prefetch the next tile into L2 from the
    // weighted sums' pass, not from the score passes: a score pass loads a
    // vector for every two FMAs, and its prefetches, with a distance per
    // row, cost GCC general registers (pointers moved back from vector
    // registers inside the loop). Forward, float32, 2 threads, a 2-core
    // Zen 4 EPYC, 8 x 1 at B x 512 x 768, taking turns in one process
    // (median of 8 paired ratios), this over the score passes' prefetch:
    // B = 8 (x in cache) 0.95, 16 and 32 0.82, 64 0.75, and 10 x 1 at 32
    // 0.82; over no prefetch at all 0.73-0.84. Bfloat16 rows keep the score
    // passes' prefetch (without it: 8 x 1 at B = 32 and 64, 1.11 and 1.12).
    constexpr bool kFloatRows = std::is_same_v<scalar_t, acc_t>;
    const int64_t score_ahead = kFloatRows ? 0 : next_tile;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> && kBFloat16Products) {
      if (u_bf16_ != nullptr) {
        score_into_lanes<kWideTileRows>(rows, count, u, scores, block, score_ahead);
      } else {
        score_into_lanes<kForwardTileRows>(rows, count, u, scores, block, score_ahead);
      }
    } else {
      score_into_lanes<kForwardTileRows>(rows, count, u, scores, block, score_ahead);
    }
    weigh_rows_by_columns(count, scale, bias, scores, scratch + kColumnTileRows * lanes);
#if defined(CPU_CAPABILITY_AMX_BF16)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (u_bf16_ != nullptr && sums_on_tiles<scalar_t>(shape_)) {
        return add_head_slices_on_tiles(
            scores, lanes, count, rows, H, shape_.num_queries, shape_.num_heads, weighted());
      }
    }
#endif
    if (shape_.num_heads > 1) {
      return add_head_slices_by_columns(
          rows, count, scores, lanes, scratch + (kColumnTileRows + 2) * lanes);
    }
#if defined(CPU_CAPABILITY_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      // Rows scored on AMX tiles take the sums by columns instead ([Note:
      // weighted sums on AMX tiles]).
      if (u_bf16_ != nullptr && !kAmxScores) {
        return add_weighted_rows_in_pairs(
            scores, lanes, count, rows, H, num_scores, weighted(), H, block);
      }
    }
#endif
    add_weighted_rows_by_columns(
        scores, lanes, count, rows, H, num_scores, weighted(), H, kFloatRows ? next_tile : 0);
  }

  // Zeroes the lanes past num_scores of `count` rows of scores from u's
  // tiles: the pads' sums are zero only for finite rows.
  void zero_pad_lanes(acc_t* scores, int count) const {
    const int64_t num_scores = shape_.num_scores();
    const int64_t lanes = column_lanes<acc_t>(num_scores);
    for (int r = 0; r < count; ++r) {
      std::fill(scores + r * lanes + num_scores, scores + (r + 1) * lanes, acc_t(0));
    }
  }

  // scores[r * column_lanes + k] for every score k of `count` rows, the
  // lanes past the scores zero: kBlock rows at a time by score_rows (as
  // score_tile scores them: kForwardTileRows, or kWideTileRows from
  // bfloat16 products), whose scores[k * kBlock + r] go through `block`.
  // ahead: as score_rows takes it (0: no prefetch).
  template <int kBlock, typename scalar_t>
  void score_into_lanes(
      const scalar_t* const* rows,
      int count,
      const acc_t* u,
      acc_t* scores,
      acc_t* block,
      int64_t ahead) {
    const int64_t H = shape_.hidden;
    const int64_t num_scores = shape_.num_scores();
    const int64_t lanes = column_lanes<acc_t>(num_scores);
#if defined(CPU_CAPABILITY_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (u_bf16_ != nullptr && scores_on_tiles<scalar_t>(num_scores)) {
        score_rows_on_tiles(
            rows, count, u_tiles_of(u_bf16_, num_scores, H), H, num_scores, scores, lanes, ahead);
        return zero_pad_lanes(scores, count);
      }
    }
#endif
    for (int first = 0; first < count; first += kBlock) {
      const int size = std::min(kBlock, count - first);
      with_tile_size<kBlock>(size, [&](auto tile) {
        constexpr int R = decltype(tile)::value;
        score_rows<R>(rows + first, u, u_bf16_, H, num_scores, block, ahead, paired_);
      });
      for (int r = 0; r < size; ++r) {
        acc_t* lane = scores + (first + r) * lanes;
        for (int64_t k = 0; k < num_scores; ++k) {
          lane[k] = block[k * size + r];
        }
        std::fill(lane + num_scores, lane + lanes, acc_t(0));
      }
    }
  }

#if defined(CPU_CAPABILITY_AMX_BF16)
  // add_dot_scored_rows for a tile of bfloat16 rows where
  // scores_beside_sums: the tile scored while the previous tile's weighted
  // sums are added (its rows `previous`, its weights in previous_scratch,
  // where the call before left them), then weighed, its weights left in
  // scratch ([Note: scores beside the weighted sums]). add_sums_behind adds
  // the last tile's sums. scratch, previous_scratch: dot_scratch_size each.
  void add_dot_scored_rows_beside(
      const at::BFloat16* const* rows,
      int count,
      acc_t scale,
      const acc_t* bias,
      acc_t* scratch,
      const at::BFloat16* const* previous,
      int previous_count,
      acc_t* previous_scratch,
      TileScoresInSteps& scores_in_steps) {
    const int64_t H = shape_.hidden;
    const int64_t num_scores = shape_.num_scores();
    const int64_t lanes = column_lanes<acc_t>(num_scores);
    *flag() = acc_t(1);
    scores_in_steps.start(
        rows, count, u_tiles_of(u_bf16_, num_scores, H), H, num_scores, scratch, lanes);
    if (previous_count > 0) {
      add_sums_behind(previous, previous_count, previous_scratch, scores_in_steps);
    }
    scores_in_steps.finish();
    zero_pad_lanes(scratch, count);
    weigh_rows_by_columns(count, scale, bias, scratch, scratch + kColumnTileRows * lanes);
  }

  // The weighted sums of a tile that add_dot_scored_rows_beside weighed,
  // its weights in scratch, as add_dot_scored_rows adds them by columns;
  // beside: as add_block_by_columns takes it.
  template <typename Beside = NothingBeside>
  void add_sums_behind(
      const at::BFloat16* const* rows, int count, acc_t* scratch, Beside&& beside = {}) {
    const int64_t H = shape_.hidden;
    const int64_t num_scores = shape_.num_scores();
    const int64_t lanes = column_lanes<acc_t>(num_scores);
    if (shape_.num_heads > 1) {
      return add_head_slices_by_columns(
          rows, count, scratch, lanes, scratch + (kColumnTileRows + 2) * lanes, beside);
    }
    add_weighted_rows_by_columns(
        scratch, lanes, count, rows, H, num_scores, weighted(), H, 0, beside);
  }
#endif

  // The weighted sums of add_rows_by_columns with several heads: several
  // head slices' or queries' sums a pass where a slice is up to 8 vectors
  // (add_head_slices_in_groups), or wider slices in pieces of up to 8
  // (slice_pieces); otherwise head h's queries add head h's slice of the
  // rows, their weights (lanes i * n + h of each row) gathered first.
  // head_weights: kColumnTileRows * num_queries * num_heads *
  // slice_pieces(d) of scratch. beside: as add_head_slices_in_groups takes
  // it (whose passes then bring in no next tile).
  template <typename scalar_t, typename Beside = NothingBeside>
  void add_head_slices_by_columns(
      const scalar_t* const* rows,
      int count,
      const acc_t* weights,
      int64_t lanes,
      acc_t* head_weights,
      Beside&& beside = {}) {
    const int64_t H = shape_.hidden;
    const int64_t n = shape_.num_heads;
    const int64_t d = shape_.head_dim;
    const int64_t num_queries = shape_.num_queries;
    // Rows scored on AMX tiles are read there in place, with no prefetch
    // ahead: with 2 queries or more, the sums' passes bring the next tile
    // into L2 (to L1, or with one query, they cost time). Bfloat16 forward,
    // 2 threads, a 2-core Xeon with AMX, with / without (median of paired
    // ratios): 4 x 12 0.92, 2 x 12 0.93; 1 x 12 and 1 x 16 1.01-1.02 (to
    // L2), 1 x 12 1.08 (to L1 against L2).
    const bool tile_scored =
        std::is_same_v<scalar_t, at::BFloat16> && kAmxScores && u_bf16_ != nullptr;
    constexpr bool kBeside = !std::is_same_v<std::decay_t<Beside>, NothingBeside>;
    const int64_t ahead =
        tile_scored && num_queries > 1 && !kBeside ? kColumnTileRows * x_seq_stride_ : 0;
    if (add_head_slices_in_groups(
            weights, lanes, count, rows, num_queries, n, d, weighted(), ahead, beside)) {
      return;
    }
    // Bfloat16 rows: a slice wider than 8 vectors as `pieces` slices of
    // one weight each, their weights repeated (lane (i * n + h) * pieces +
    // j for piece j of head h). Forward, 2 threads, 16 x 512 x H, a 2-core
    // Xeon with AMX, one process per build taking turns, against head h's
    // queries over its whole slice below: 1 x 2 at 768 (384 columns) 0.67
    // -> 0.57 ms, 1 x 4 at 1024 (256) 0.90 -> 0.71, 1 x 4 at 1152 (288)
    // 0.83 -> 0.69, 4 x 2 at 768 0.87 -> 0.73. Float32 rows were level to
    // 1.1x slower (4 x 4 at 768), and pieces in part of a vector 1.1x
    // (bfloat16) and 1.26x (float32) slower at 4 x 8 at 1152 (144 columns
    // in two pieces of 72).
    const int64_t pieces = std::is_same_v<scalar_t, at::BFloat16> ? slice_pieces(d) : 1;
    if (pieces > 1) {
      const int64_t piece_lanes = num_queries * n * pieces;
      for (int r = 0; r < count; ++r) {
        for (int64_t k = 0; k < num_queries * n; ++k) {
          std::fill_n(head_weights + r * piece_lanes + k * pieces, pieces, weights[r * lanes + k]);
        }
      }
      add_head_slices_in_groups(
          head_weights,
          piece_lanes,
          count,
          rows,
          num_queries,
          n * pieces,
          d / pieces,
          weighted(),
          ahead,
          beside);
      return;
    }
    const scalar_t* slices[kColumnTileRows];
    for (int64_t h = 0; h < n; ++h) {
      for (int r = 0; r < count; ++r) {
        slices[r] = rows[r] + h * d;
        for (int64_t i = 0; i < num_queries; ++i) {
          head_weights[r * num_queries + i] = weights[r * lanes + i * n + h];
        }
      }
      add_weighted_rows_by_columns(
          head_weights, num_queries, count, slices, d, num_queries, weighted() + h * d, H);
    }
  }

  // scores[score * R + r] for every score of R rows, R up to
  // kWideTileRows: blocks of kForwardTileRows rows, whose register-blocked
  // sums (score_dot_rows_each) would spill at more rows, each prefetching its
  // rows `ahead` elements on (the next tile; none if 0). block: num_scores *
  // kForwardTileRows of scratch.
  template <int R, typename scalar_t>
  void score_tile(
      const scalar_t* const* rows, const acc_t* u, acc_t* scores, acc_t* block, int64_t ahead) {
    const int64_t H = shape_.hidden;
    const int64_t num_scores = shape_.num_scores();
    if constexpr (R <= kForwardTileRows) {
      score_rows<R>(rows, u, u_bf16_, H, num_scores, scores, ahead, paired_);
    } else if (u_bf16_ != nullptr) {
      score_rows<R>(rows, u, u_bf16_, H, num_scores, scores, ahead, paired_);
    } else {
      static_assert(R % kForwardTileRows == 0);
      constexpr int B = kForwardTileRows;
      for (int first = 0; first < R; first += B) {
        score_rows<B>(rows + first, u, u_bf16_, H, num_scores, block, ahead, paired_);
        for (int64_t score = 0; score < num_scores; ++score) {
          std::copy_n(block + score * B, B, scores + score * R + first);
        }
      }
    }
  }

  // add_rows for one query and one head, a tile behind: scores this tile's
  // R rows while adding the previous tile's P rows (prev, with the weights
  // the previous call returned) to the weighted sum. This tile's weights
  // come back in `weights`; the last tile goes in with add_previous_rows.
  template <int R, int P, typename scalar_t>
  void add_rows_pipelined(
      const scalar_t* const* rows,
      const acc_t* u,
      acc_t scale,
      const acc_t* bias,
      const scalar_t* const* prev,
      const acc_t* prev_weights,
      acc_t* weights) {
    *flag() = acc_t(1);
    acc_t scores[R];
    if constexpr (kForwardReadsRowByRow<scalar_t, acc_t>) {
      if (from_memory_) {
        score_and_accumulate_row_by_row<R, P>(rows, u, scores, prev_weights, prev);
        return weigh_rows<R>(0, scale, bias, scores, weights, weighted(), shape_.hidden);
      }
    }
    if (next_tile_in_l2_) {
      score_and_accumulate_tile<R, P, CacheLevel::kL2>(rows, u, scores, prev_weights, prev);
    } else {
      score_and_accumulate_tile<R, P, CacheLevel::kL1>(rows, u, scores, prev_weights, prev);
    }
    weigh_rows<R>(0, scale, bias, scores, weights, weighted(), shape_.hidden);
  }

  // add_rows_pipelined's pass over a tile read as a tile, the next tile's
  // lines prefetched into kLevel.
  template <int R, int P, CacheLevel kLevel, typename scalar_t>
  void score_and_accumulate_tile(
      const scalar_t* const* rows,
      const acc_t* u,
      acc_t* scores,
      const acc_t* prev_weights,
      const scalar_t* const* prev) {
    const int64_t H = shape_.hidden;
    const int64_t ahead = R * x_seq_stride_;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512_BF16)
      if (paired_ && u_bf16_ != nullptr) {
        return score_bf16_and_accumulate_rows<R, P, kLevel>(
            rows, u_bf16_, H, scores, ahead, prev_weights, prev, weighted());
      }
#endif
      if (paired_) {
        return score_and_accumulate_rows<R, P, true, scalar_t, acc_t, kLevel>(
            rows, u, H, scores, ahead, prev_weights, prev, weighted());
      }
    }
    score_and_accumulate_rows<R, P, false, scalar_t, acc_t, kLevel>(
        rows, u, H, scores, ahead, prev_weights, prev, weighted());
  }

  // score_and_accumulate_rows for rows read one at a time
  // (kForwardReadsRowByRow):
  // row r of this tile is scored while row r of the previous one is added,
  // each row prefetched kRowByRowAhead rows ahead, into L2 ([Note:
  // prefetches from memory]). Loads from all R rows of a tile at once (R
  // streams) read memory at about 0.6x the speed of one stream on a 2-core
  // EPYC (float32 1x1 forward 1.4-1.7 -> 1.05-1.25 ms at 32x512x768). Each
  // score and each weighted sum is summed in the same order as the tile
  // would sum it.
  template <int R, int P, typename scalar_t>
  void score_and_accumulate_row_by_row(
      const scalar_t* const* rows,
      const acc_t* u,
      acc_t* scores,
      const acc_t* prev_weights,
      const scalar_t* const* prev) {
    const int64_t H = shape_.hidden;
    const int64_t ahead = kRowByRowAhead * x_seq_stride_;
    constexpr int kBoth = std::min(R, P);
    constexpr CacheLevel kL2 = CacheLevel::kL2;
    for (int r = 0; r < kBoth; ++r) {
      score_and_accumulate_rows<1, 1, false, scalar_t, acc_t, kL2>(
          rows + r, u, H, scores + r, ahead, prev_weights + r, prev + r, weighted());
    }
    for (int r = kBoth; r < R; ++r) {
      score_and_accumulate_rows<1, 0, false, scalar_t, acc_t, kL2>(
          rows + r, u, H, scores + r, ahead, nullptr, nullptr, nullptr);
    }
    for (int r = kBoth; r < P; ++r) {
      score_and_accumulate_rows<0, 1, false, scalar_t, acc_t>(
          nullptr, nullptr, H, nullptr, 0, prev_weights + r, prev + r, weighted());
    }
  }

  template <int P, typename scalar_t>
  void add_previous_rows(const scalar_t* const* prev, const acc_t* prev_weights) {
    accumulate_rows<P>(prev_weights, prev, weighted(), shape_.hidden, paired_);
  }

  // Folds another piece's state into this one. Pieces are merged in a fixed
  // order by the caller, so the result does not depend on the thread count.
  void merge(const SoftmaxState& other) {
    const int64_t H = shape_.hidden;
    const int64_t n = shape_.num_heads;
    const int64_t d = shape_.head_dim;
    if (!other.any_valid()) {
      return;
    }
    *flag() = acc_t(1);
    for (int64_t i = 0; i < shape_.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t score = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        const acc_t* other_acc = other.weighted() + i * H + h * d;
        const acc_t m = std::max(max()[score], other.max()[score]);
        // Both maxima -inf: every score so far is -inf and weighs 0 (sums are
        // 0); keep the zero-weighted accumulations, as a softmax would.
        const bool none_finite = m == kNegInf<acc_t>;
        const acc_t mine = none_finite ? acc_t(1) : exp_of(max()[score] - m);
        const acc_t theirs = none_finite ? acc_t(1) : exp_of(other.max()[score] - m);
        sum()[score] = sum()[score] * mine + other.sum()[score] * theirs;
        scale_in_place(mine, acc, d);
        const acc_t* other_rows[1] = {other_acc};
        axpy_rows<1>(&theirs, other_rows, acc, d);
        max()[score] = m;
      }
    }
  }

  // out[i, D_h] = weighted / sum and the log-sum-exp as its two parts,
  // lse[2 s] = max and lse[2 s + 1] = log(sum) (see pool_params.h); a
  // sequence with no unmasked position gives zeros and (-inf, 0).
  void finish(acc_t* out, acc_t* lse) {
    const int64_t H = shape_.hidden;
    const int64_t n = shape_.num_heads;
    const int64_t d = shape_.head_dim;
    for (int64_t i = 0; i < shape_.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t score = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        if (any_valid()) {
          scale_in_place(acc_t(1) / sum()[score], acc, d);
          lse[2 * score] = max()[score];
          lse[2 * score + 1] = std::log(sum()[score]);
        } else {
          std::fill_n(acc, d, acc_t(0));
          lse[2 * score] = kNegInf<acc_t>;
          lse[2 * score + 1] = acc_t(0);
        }
        if constexpr (std::is_same_v<acc_t, float>) {
          if (paired_) {
            to_natural_order(acc, out + i * H + h * d, d);
            continue;
          }
        }
        std::copy_n(acc, d, out + i * H + h * d);
      }
    }
  }

 private:
  // Adds R rows weighted for every score (weights[score * R + r]) to the
  // scores' weighted sums: score (i, h) adds the slice of head h. A wide
  // slice goes kColumnBlock columns at a time through all its sums, so that
  // those columns of the rows stay in L1 from one group of sums to the next
  // (at 16 full-width sums, the rows and the sums together overflow L1).
  template <int R, typename scalar_t>
  void add_weighted_rows(const scalar_t* const* rows, const acc_t* weights) {
    const int64_t n = shape_.num_heads;
    const int64_t d = shape_.head_dim;
    const int64_t num_queries = shape_.num_queries;
    for (int64_t h = 0; h < n; ++h) {
      for (int64_t column = 0; column < d; column += kColumnBlock) {
        const int64_t width = std::min(kColumnBlock, d - column);
        const scalar_t* segments[R];
        offset_rows<R>(rows, h * d + column, segments);
        for (int64_t i = 0; i < num_queries; i += kSumsPerPass) {
          const int count = static_cast<int>(std::min<int64_t>(kSumsPerPass, num_queries - i));
          acc_t group_weights[kSumsPerPass * R];
          acc_t* sums[kSumsPerPass];
          for (int g = 0; g < count; ++g) {
            const int64_t score = (i + g) * n + h;
            std::copy_n(weights + score * R, R, group_weights + g * R);
            sums[g] = weighted() + score * d + column;
          }
          with_tile_size<kSumsPerPass>(count, [&](auto size) {
            accumulate_rows_into<R, decltype(size)::value>(
                group_weights, segments, sums, width, paired_);
          });
        }
      }
    }
  }

  // weigh_rows for every score of a tile, the exponentials of all of them
  // in one vector pass: at 12-16 scores per row, one std::exp at a time
  // took as long as the scores themselves (bfloat16, 16 x 12).
  template <int R>
  void weigh_tile(acc_t scale, const acc_t* bias, acc_t* scores, acc_t* weights) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (R == 8 && std::is_same_v<acc_t, float>) {
      return weigh_tile_in_pairs(scale, bias, scores, weights);
    }
#endif
    weigh_scores(0, R, scale, bias, scores, weights);
  }

  // Chains that weigh_rows_by_columns finds a tile's maxima in: one chain of
  // compares and blends through all the tile's rows held the instruction
  // window as a long exponential does ([Note: the softmax's exponential]).
  // Bfloat16 forward, a 2-core Xeon with AMX, four chains against one
  // (median of paired ratios): 16 x 12 0.93-1.00 over four runs, 4 x 12
  // 0.93-0.98 over three (1 and 2 threads); float32 16 x 12 and so400m's
  // full width 0.99-1.00 in the least noisy run, no change that the noise
  // lets us see.
  static constexpr int kMaxChains = 4;

  // weigh_scores for `count` rows whose scores are in the lanes of vectors,
  // scores[r * column_lanes + k]: a vector of scores at a time, in place.
  // Every step is weigh_scores', in its order (the rescaling's exp a
  // vector's, not std::exp). running: 2 * column_lanes of scratch.
  // Each row's steps are few and short: a max instruction (running_max)
  // and one shift per tile for the -inf scores instead of at::vec's blends,
  // each four instructions in a chain, and no check for overflow in the
  // exponential. Same weights, bit for bit. Forward, a 2-core Xeon with
  // AMX, new / old (median of paired ratios): bfloat16, 1 thread, 16 x 12
  // 0.83, 4 x 12 0.86, 1 x 16 0.91, 1 x 12 0.92; 2 threads, 16 x 12 0.83, 8
  // x 1 0.93, so400m's full width 0.98; float32, 2 threads, 16 x 12 0.93,
  // 1 x 16 0.94, 4 x 12 and 1 x 12 0.96, 8 x 1 and so400m 0.98. Its share
  // of the bfloat16 16 x 12 forward (profile, 1 thread): 24% -> 11%.
  void weigh_rows_by_columns(
      int count, acc_t scale, const acc_t* bias, acc_t* scores, acc_t* running) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    const int64_t num_scores = shape_.num_scores();
    const int64_t lanes = column_lanes<acc_t>(num_scores);
    const int64_t d = shape_.head_dim;
    // The running maxima and sums padded to whole vectors (pads: 0).
    acc_t* max_lanes = running;
    acc_t* sum_lanes = running + lanes;
    std::fill_n(running, 2 * lanes, acc_t(0));
    std::copy_n(max(), num_scores, max_lanes);
    std::copy_n(sum(), num_scores, sum_lanes);
    const Vec neg_inf(kNegInf<acc_t>);
    const Vec scales(scale);
    for (int64_t first = 0; first < lanes; first += W) {
      // The tile's max in kMaxChains chains, rows taking turns, then
      // combined: max is exact, so the result is the one chain's.
      Vec maxima[kMaxChains];
      std::fill_n(maxima, kMaxChains, neg_inf);
      for (int r = 0; r < count; ++r) {
        acc_t* row = scores + r * lanes + first;
        Vec score = Vec::loadu(row) * scales;
        if (bias != nullptr) {
          score = score + Vec(bias[r]);
        }
        score.store(row);
        Vec& m = maxima[r % kMaxChains];
        m = running_max(m, score);
      }
      Vec tile_max = maxima[0];
      for (int i = 1; i < kMaxChains; ++i) {
        tile_max = running_max(tile_max, maxima[i]);
      }
      const Vec old_max = Vec::loadu(max_lanes + first);
      const Vec grows = tile_max > old_max;
      const Vec new_max = Vec::blendv(old_max, tile_max, grows);
      // exp(-inf) = 0 also covers the first valid rows.
      const Vec correction = Vec::blendv(Vec(acc_t(1)), exp_of<false>(old_max - new_max), grows);
      // What the weights' exponents subtract: the max, or 0 where it is
      // still -inf (every score -inf so far), so that a -inf score weighs 0
      // (-inf - 0) instead of NaN (-inf - -inf), without a blend per row.
      const Vec shift = Vec::blendv(new_max, Vec(acc_t(0)), new_max == neg_inf);
      acc_t corrections[W];
      correction.store(corrections);
      for (int64_t k = first; k < std::min(first + W, num_scores); ++k) {
        if (corrections[k - first] != acc_t(1)) {
          scale_in_place(corrections[k - first], weighted() + k * d, d);
        }
      }
      Vec sums = Vec::loadu(sum_lanes + first) * correction;
      for (int r = 0; r < count; ++r) {
        acc_t* row = scores + r * lanes + first;
        const Vec score = Vec::loadu(row);
        const Vec weight = exp_of<false>(score - shift);
        weight.store(row);
        sums = sums + weight;
      }
      sums.store(sum_lanes + first);
      new_max.store(max_lanes + first);
    }
    std::copy_n(max_lanes, num_scores, max());
    std::copy_n(sum_lanes, num_scores, sum());
  }

  // weigh_tile of R rows from score `first` on, one score at a time.
  void weigh_scores(
      int64_t first, int R, acc_t scale, const acc_t* bias, acc_t* scores, acc_t* weights) {
    const int64_t num_scores = shape_.num_scores();
    const int64_t d = shape_.head_dim;
    for (int64_t score = first; score < num_scores; ++score) {
      acc_t* tile = scores + score * R;
      const acc_t max = move_max(score, R, scale, bias, tile, weighted() + score * d, d);
      for (int r = 0; r < R; ++r) {
        // exp(-inf) = 0: a -inf score weighs 0 even while max is still -inf.
        weights[score * R + r] = tile[r] == kNegInf<acc_t> ? kNegInf<acc_t> : tile[r] - max;
      }
    }
    at::vec::map(
        [](Vectorized<acc_t> v) { return exp_of(v); },
        weights + first * R,
        weights + first * R,
        (num_scores - first) * R);
    for (int64_t score = first; score < num_scores; ++score) {
      for (int r = 0; r < R; ++r) {
        sum()[score] += weights[score * R + r];
      }
    }
  }

#if defined(CPU_CAPABILITY_AVX512)
  // weigh_tile for 8 rows in float32, two scores per vector (the 8 rows of
  // score s, then those of s + 1): tile maxima and sums by in-register
  // shuffles, the running maxima moved without a branch per row. One score
  // at a time, compares and branches took a quarter of the bfloat16 16x12
  // forward. A row's weights are summed in another order than there, but
  // in one order for any thread count.
  void weigh_tile_in_pairs(float scale, const float* bias, float* scores, float* weights) {
    const int64_t num_scores = shape_.num_scores();
    const int64_t d = shape_.head_dim;
    const __m512 scales = _mm512_set1_ps(scale);
    const __m512 biases =
        bias == nullptr ? _mm512_setzero_ps() : _mm512_broadcast_f32x8(_mm256_loadu_ps(bias));
    const __m512 neg_inf = _mm512_set1_ps(kNegInf<float>);
    int64_t score = 0;
    for (; score + 2 <= num_scores; score += 2) {
      __m512 tile = _mm512_mul_ps(_mm512_loadu_ps(scores + score * 8), scales);
      if (bias != nullptr) {
        tile = _mm512_add_ps(tile, biases);
      }
      const __m512 old_max =
          _mm512_insertf32x8(_mm512_set1_ps(max()[score]), _mm256_set1_ps(max()[score + 1]), 1);
      const __m512 new_max = _mm512_max_ps(
          within_eights(tile, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }), old_max);
      // exp(-inf) = 0 also covers the first valid rows.
      const __m512 correction = _mm512_mask_blend_ps(
          _mm512_cmp_ps_mask(new_max, old_max, _CMP_GT_OQ),
          _mm512_set1_ps(1.0f),
          exp_lanes<false>(_mm512_sub_ps(old_max, new_max)));
      // A -inf score weighs 0 even while the running max is still -inf.
      const __m512 weight = exp_lanes<false>(_mm512_mask_sub_ps(
          neg_inf, _mm512_cmp_ps_mask(tile, neg_inf, _CMP_NEQ_UQ), tile, new_max));
      _mm512_storeu_ps(weights + score * 8, weight);
      const __m512 weight_sums =
          within_eights(weight, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
      for (int k = 0; k < 2; ++k) {
        const float c = lane_of_eight(correction, k);
        if (c != 1.0f) {
          sum()[score + k] *= c;
          scale_in_place(c, weighted() + (score + k) * d, d);
        }
        sum()[score + k] += lane_of_eight(weight_sums, k);
        max()[score + k] = lane_of_eight(new_max, k);
      }
    }
    weigh_scores(score, 8, scale, bias, scores, weights);
  }

  // op over each group of eight lanes, in every lane of the group.
  template <typename Op>
  static __m512 within_eights(__m512 v, Op op) {
    v = op(v, _mm512_permute_ps(v, 0xB1));           // neighbours
    v = op(v, _mm512_permute_ps(v, 0x4E));           // pairs within 128 bits
    return op(v, _mm512_shuffle_f32x4(v, v, 0xB1));  // 128-bit halves of 256
  }

  static float lane_of_eight(__m512 v, int group) {
    return group == 0 ? _mm512_cvtss_f32(v) : _mm256_cvtss_f32(_mm512_extractf32x8_ps(v, 1));
  }
#endif

  // Scales score `score` of R rows (and adds the bias) and moves its running
  // max to cover them, rescaling its sum and its weighted sum acc (d wide).
  // Returns the new max.
  acc_t move_max(
      int64_t score, int R, acc_t scale, const acc_t* bias, acc_t* scores, acc_t* acc, int64_t d) {
    acc_t tile_max = kNegInf<acc_t>;
    for (int r = 0; r < R; ++r) {
      scores[r] *= scale;
      if (bias != nullptr) {
        scores[r] += bias[r];
      }
      tile_max = scores[r] > tile_max ? scores[r] : tile_max;
    }
    if (tile_max > max()[score]) {
      // exp(-inf) = 0 also covers the first valid rows.
      const acc_t correction = exp_of(max()[score] - tile_max);
      sum()[score] *= correction;
      scale_in_place(correction, acc, d);
      max()[score] = tile_max;
    }
    return max()[score];
  }

  // Scales score `score` of R rows (and adds the bias), moves its running
  // max (rescaling its sum and its weighted sum acc, d wide) and sets
  // weights[r] = exp(score - max), the R exponentials in one vector: one
  // std::exp per row was an eighth of the bfloat16 one-score forward.
  template <int R>
  void weigh_rows(
      int64_t score,
      acc_t scale,
      const acc_t* bias,
      acc_t* scores,
      acc_t* weights,
      acc_t* acc,
      int64_t d) {
    const acc_t max = move_max(score, R, scale, bias, scores, acc, d);
    for (int r = 0; r < R; ++r) {
      // exp(-inf) = 0: a -inf score weighs 0 even while max is still -inf.
      weights[r] = scores[r] == kNegInf<acc_t> ? kNegInf<acc_t> : scores[r] - max;
    }
    at::vec::map([](Vectorized<acc_t> v) { return exp_of(v); }, weights, weights, R);
    for (int r = 0; r < R; ++r) {
      sum()[score] += weights[r];
    }
  }

  acc_t* flag() const {
    return data_ + shape_.num_scores() * shape_.head_dim;
  }

  acc_t* data_;
  PoolShape shape_;
  int64_t x_seq_stride_;
  bool paired_;
  bool from_memory_;
  bool next_tile_in_l2_;
  const at::BFloat16* u_bf16_;
  const acc_t* u_columns_;
};

// Whether the one-score forward's tiles prefetch the next tile into L2, not
// L1 ([Note: prefetches from memory]): x comes from memory, or L1 cannot
// hold that tile beside the one being scored, the previous one being added,
// the weighted sum and u.
template <typename scalar_t>
bool next_tile_in_l2(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto tiles = static_cast<int64_t>(3 * kForwardTileRows * sizeof(scalar_t)) * p.hidden;
  const auto vectors = static_cast<int64_t>(2 * sizeof(acc_t)) * p.hidden;
  return !p.x_fits_cache || (p.l1_data_bytes > 0 && tiles + vectors > p.l1_data_bytes);
}

// x: [B, L, H] (or ragged [T, H]) rows contiguous; u: [num_scores, H]; out:
// [B, num_scores, head_dim] and lse: [B, num_scores, 2], both in the
// accumulation dtype. One pass over x. Work item = (sequence b, piece of its
// rows); when any sequence has several pieces, each piece's state goes to
// `partials` and the pieces are merged in order afterwards (flash-decoding
// on the CPU).
template <typename scalar_t>
void forward_impl(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_scores = p.num_scores();
  const int64_t state_size = SoftmaxState<acc_t>::size(p);
  const int64_t out_size = num_scores * p.head_dim;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* u = static_cast<const acc_t*>(p.u);
  auto* out = static_cast<acc_t*>(p.out);
  auto* lse = static_cast<acc_t*>(p.lse);
  auto* partials = static_cast<acc_t*>(p.partials);
  const auto scale = static_cast<acc_t>(p.scale);
  const auto* bias = static_cast<const acc_t*>(p.bias);
  const int64_t items = p.work_items();
  const bool in_pieces = items > p.batch;
  const bool pipelined = num_scores == 1;
  const bool paired = reads_pairs<scalar_t>(p);
  // Rounded from u in its natural order, which vdpbf16ps reads x in.
  const CacheLineBuffer<at::BFloat16> u_bf16 = u_in_bf16<scalar_t>(p, u);
  const CacheLineBuffer<acc_t> u_columns = u_in_columns<scalar_t>(p, u);
  const bool by_columns = !u_columns.empty();
  const bool next_in_l2 = next_tile_in_l2<scalar_t>(p);
  const bool dot_scored = !by_columns && (dot_scores_in_lanes(p) ||
                                          (!u_bf16.empty() && tile_scores_in_lanes<scalar_t>(p)));
  const bool scores_beside = dot_scored && !u_bf16.empty() && scores_beside_sums<scalar_t>(p);
  const CacheLineBuffer<acc_t> u_paired = u_in_paired_order<scalar_t>(p, u);
  if (paired) {
    u = u_paired.data();
  }

  parallel_over_items(p, [&](int64_t begin, int64_t end) {
    // Tiles of kForwardTileRows rows with one score per row, kWideTileRows
    // with several, kColumnTileRows scored by columns or into lanes
    // (dot_scored).
    constexpr int kMaxRows = std::max(kWideTileRows, kColumnTileRows);
    const int tile_rows = pipelined                  ? kForwardTileRows
                          : by_columns || dot_scored ? kColumnTileRows
                                                     : kWideTileRows;
    RowTile<scalar_t, kMaxRows> tile;
    // With one score per row, each tile is added to the weighted sum while
    // the next one is scored (SoftmaxState::add_rows_pipelined).
    RowTile<scalar_t, kMaxRows> previous;
    acc_t previous_weights[kForwardTileRows] = {};
    acc_t tile_bias[kMaxRows] = {};
    const acc_t* biases = bias == nullptr ? nullptr : tile_bias;
    CacheLineBuffer<acc_t> local(in_pieces ? 0 : state_size);
    // Scored beside the sums, each tile's scores and weights stay until the
    // next tile's call: two halves, taking turns.
    const int64_t dot_scratch = SoftmaxState<acc_t>::dot_scratch_size(p);
    CacheLineBuffer<acc_t> scratch(
        pipelined    ? 0
        : by_columns ? SoftmaxState<acc_t>::column_scratch_size(p)
        : dot_scored ? (scores_beside ? 2 : 1) * dot_scratch
                     : 2 * num_scores * tile_rows);
    [[maybe_unused]] int half = 0;  // the half of this tile scored beside the sums (AMX)
    // With a norm, the tiles hold normalized rows: room for this tile and,
    // pipelined or scored beside the sums, the previous one (a wide tile is
    // added whole before the next begins). No more, so that they stay in L1.
    NormalizedRows<scalar_t> normalized(
        p, scores_beside ? 2 * tile_rows : std::max(tile_rows, 2 * kForwardTileRows));
#if defined(CPU_CAPABILITY_AMX_BF16)
    TileScoresInSteps scores_in_steps;
#endif
    for (int64_t item = begin; item < end; ++item) {
      const auto [b, piece, rows] = p.work_item(item);
      SoftmaxState<acc_t> state(
          in_pieces ? partials + item * state_size : local.data(),
          p,
          paired,
          u_bf16.empty() ? nullptr : u_bf16.data(),
          !p.x_fits_cache,
          next_in_l2,
          by_columns ? u_columns.data() : nullptr);
      state.reset();
      auto flush = [&] {
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (by_columns) {
            state.add_rows_by_columns(tile.rows(), tile.count(), scale, biases, scratch.data());
            tile.clear();
            return;
          }
        }
#if defined(CPU_CAPABILITY_AMX_BF16)
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (scores_beside) {
            state.add_dot_scored_rows_beside(
                tile.rows(),
                tile.count(),
                scale,
                biases,
                scratch.data() + half * dot_scratch,
                previous.rows(),
                previous.count(),
                scratch.data() + (1 - half) * dot_scratch,
                scores_in_steps);
            previous = tile;
            half = 1 - half;
            tile.clear();
            return;
          }
        }
#endif
        if (dot_scored) {
          state.add_dot_scored_rows(tile.rows(), tile.count(), u, scale, biases, scratch.data());
          tile.clear();
          return;
        }
        if (!pipelined) {
          if (tile.count() == kWideTileRows) {
            state.template add_rows<kWideTileRows>(tile.rows(), u, scale, biases, scratch.data());
          } else {
            // A piece's last tile, short: in tiles of kForwardTileRows.
            for (int first = 0; first < tile.count(); first += kForwardTileRows) {
              const int count = std::min(kForwardTileRows, tile.count() - first);
              with_tile_size<kForwardTileRows>(count, [&](auto size) {
                state.template add_rows<decltype(size)::value>(
                    tile.rows() + first,
                    u,
                    scale,
                    biases == nullptr ? nullptr : biases + first,
                    scratch.data());
              });
            }
          }
          tile.clear();
          return;
        }
        // Only a piece's last tile can be short, so the previous one is full.
        TORCH_INTERNAL_ASSERT_DEBUG_ONLY(
            previous.count() == 0 || previous.count() == kForwardTileRows);
        acc_t weights[kForwardTileRows];
        with_tile_size<kForwardTileRows>(tile.count(), [&](auto size) {
          constexpr int R = decltype(size)::value;
          if (previous.count() == 0) {
            state.template add_rows_pipelined<R, 0>(
                tile.rows(), u, scale, biases, previous.rows(), previous_weights, weights);
          } else {
            state.template add_rows_pipelined<R, kForwardTileRows>(
                tile.rows(), u, scale, biases, previous.rows(), previous_weights, weights);
          }
        });
        previous = tile;
        std::copy_n(weights, tile.count(), previous_weights);
        tile.clear();
      };
      for (int64_t l = rows.begin; l < rows.end; ++l) {
        if (p.attends(b, l)) {
          if (bias != nullptr) {
            tile_bias[tile.count()] = bias[b * p.seq_len + l];
          }
          tile.add(normalized(x + p.row_offset(b, l)));
          if (tile.count() == tile_rows) {
            flush();
          }
        }
      }
      if (tile.count() > 0) {
        flush();
      }
#if defined(CPU_CAPABILITY_AMX_BF16)
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (scores_beside && previous.count() > 0) {
          state.add_sums_behind(
              previous.rows(), previous.count(), scratch.data() + (1 - half) * dot_scratch);
          previous.clear();
        }
      }
#endif
      if (previous.count() > 0) {
        with_tile_size<kForwardTileRows>(previous.count(), [&](auto size) {
          state.template add_previous_rows<decltype(size)::value>(
              previous.rows(), previous_weights);
        });
        previous.clear();
      }
      if (!in_pieces) {
        state.finish(out + b * out_size, lse + 2 * b * num_scores);
      }
    }
  });
  if (!in_pieces) {
    return;
  }
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    CacheLineBuffer<acc_t> merged(state_size);
    for (int64_t b = begin; b < end; ++b) {
      SoftmaxState<acc_t> state(merged.data(), p, paired);
      state.reset();
      for (int64_t piece = 0; piece < p.pieces_of(b); ++piece) {
        state.merge(SoftmaxState<acc_t>(partials + p.item_of(b, piece) * state_size, p, paired));
      }
      state.finish(out + b * out_size, lse + 2 * b * num_scores);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
