#pragma once

// Device code of the pooling with one score per row (one query and one head:
// BERT-style pooling, and the shapes where x is largest): a warp per row.
// folded_attention_pool_kernel.cuh's kernels serve every other shape.
//
// A block's warps take tiles of kOneScoreRows consecutive rows in turn; each
// lane holds its columns of the row (16-byte packs, 32-bit column indices),
// u, the weighted sum and the softmax state in registers, so a row costs one
// warp reduction and no barrier. The warps' states are merged once, at the
// end of the block's rows.
//
// A row's score is summed in one order in the forward and the backward
// (lane_dot, then warp_sum's butterfly, which gives every lane the same total),
// so that the backward's p = exp(score - lse) never exceeds 1 (the CPU's
// [Note: one order for every score]). The two kernels therefore always run
// together: the entry points choose them from the shape and x's alignment
// (takes_one_score_kernels in folded_attention_pool_kernel.cu).

#include "ops/cuda/folded_attention_pool_kernel.cuh"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace attnpool::cuda {

// Rows a warp takes between two updates of its softmax state.
constexpr int kOneScoreRows = 2;

// Warps per block; the widest row, and chunks of a lane's columns at most:
// H <= 1024 (8 chunks of 4 floats, 4 chunks of 8 16-bit values), H <= 512 in
// float64. Wider 16-bit rows spilled registers (ptxas, sm_90).
constexpr int kOneScoreWarps = 4;
constexpr int kOneScoreMaxRow = 1024;
constexpr int kOneScoreMaxChunks = 8;

template <typename scalar_t>
constexpr int one_score_max_chunks() {
  constexpr int by_row = kOneScoreMaxRow / (32 * kPackWidth<scalar_t>);
  return by_row < kOneScoreMaxChunks ? by_row : kOneScoreMaxChunks;
}

// Columns of a row that the lanes' chunks cover: CHUNKS chunks of VEC for
// each of a warp's 32 lanes (at least H).
template <int VEC, int CHUNKS>
constexpr int kLaneColumns = 32 * VEC * CHUNKS;

// Shared memory of either kernel: each warp's max, sum and flag, each warp's
// vector of H (its weighted sum, or its du partial), each warp's weight in
// the block's sum; with u_columns > 0, u there too ([Note: u in shared
// memory]).
template <typename acc_t>
ATTNPOOL_HOST_DEVICE inline int64_t one_score_shared_bytes(
    int64_t num_warps, int64_t hidden, int64_t u_columns = 0) {
  return static_cast<int64_t>(sizeof(acc_t)) * (num_warps * (4 + hidden) + u_columns);
}

// Column of element 0 of a lane's chunk j: chunks of VEC elements, the
// warp's 32 lanes side by side, so that a warp's loads of a chunk are
// consecutive 16-byte vectors.
template <int VEC>
ATTNPOOL_DEVICE inline int lane_column(int lane, int j) {
  return (lane + 32 * j) * VEC;
}

// A lane's columns of one row, as stored.
template <typename scalar_t, int VEC, int CHUNKS>
struct LaneRow {
  Pack<scalar_t, VEC> packs[CHUNKS];
};

// The lane's columns of a row, zeros past H and for a row that is not read
// (`present` false): the sums then take every element unconditionally, with
// no branch per element (a branch per element and row took most of the
// instructions of the loop over rows, ptxas sm_90). Loaded and zeroed as
// 32-bit words: zeroing 16-bit elements took a byte permute each.
template <typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_DEVICE inline void load_lane_row(
    const scalar_t* row, bool present, int hidden, int lane, LaneRow<scalar_t, VEC, CHUNKS>& out) {
  struct alignas(sizeof(Pack<scalar_t, VEC>)) Words {
    uint32_t w[sizeof(Pack<scalar_t, VEC>) / 4];
  };
  static_assert(sizeof(Words) == sizeof(Pack<scalar_t, VEC>), "a chunk is whole 32-bit words");
  // Chunk j at a constant distance from the lane's first: one address per row.
  const scalar_t* lane_row = row + lane_column<VEC>(lane, 0);
  for (int j = 0; j < CHUNKS; ++j) {
    Words words = {};
    if (present && lane_column<VEC>(lane, j) < hidden) {
      words = *reinterpret_cast<const Words*>(lane_row + lane_column<VEC>(0, j));
    }
    memcpy(&out.packs[j], &words, sizeof(Words));
  }
}

// Element v of chunk j in the accumulation dtype (0 past H: load_lane_row).
// A bfloat16 is the high half of a float32: from the 32-bit word that holds
// elements v & ~1 and v | 1, one shift (even v) or one mask (odd v), where
// the conversion of an odd element took a byte permute and a shift.
template <typename acc_t, typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_DEVICE inline acc_t lane_value(const LaneRow<scalar_t, VEC, CHUNKS>& row, int j, int v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && VEC % 2 == 0) {
    uint32_t word;
    memcpy(&word, &row.packs[j].v[v & ~1], sizeof(word));
    const uint32_t bits = (v & 1) != 0 ? (word & 0xffff0000u) : (word << 16);
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
  } else {
    return static_cast<acc_t>(row.packs[j].v[v]);
  }
}

// A lane's columns of a vector of the accumulation dtype (u, grad_out, out);
// 0 past H.
template <typename acc_t, int VEC, int CHUNKS>
ATTNPOOL_DEVICE inline void load_lane_vector(
    const acc_t* vector, int hidden, int lane, acc_t (&out)[CHUNKS][VEC]) {
  for (int j = 0; j < CHUNKS; ++j) {
    const int col = lane_column<VEC>(lane, j);
    for (int v = 0; v < VEC; ++v) {
      out[j][v] = col < hidden ? vector[col + v] : acc_t(0);
    }
  }
}

// The lane's columns of `values` into vector[0, H).
template <typename acc_t, int VEC, int CHUNKS>
ATTNPOOL_DEVICE inline void store_lane_vector(
    const acc_t (&values)[CHUNKS][VEC], int hidden, int lane, acc_t* vector) {
  for (int j = 0; j < CHUNKS; ++j) {
    const int col = lane_column<VEC>(lane, j);
    if (col < hidden) {
      for (int v = 0; v < VEC; ++v) {
        vector[col + v] = values[j][v];
      }
    }
  }
}

// parts[r] = the sum of element(r, j, v) * w(j, v) over a lane's columns
// for R rows, in the one order that the forward and the backward share
// (warp_sum then adds the lanes' parts): each chunk in its own chain of
// multiply-adds, then the chunks in order. CHUNKS short chains instead of
// one long one: the latency of a chain is paid once per row. w is read
// once per column for all R rows.
template <typename acc_t, int VEC, int CHUNKS, int R, typename Element, typename W>
ATTNPOOL_DEVICE inline void lane_dots_of(const Element& element, const W& w, acc_t (&parts)[R]) {
  acc_t chunk_parts[R][CHUNKS];
  for (int j = 0; j < CHUNKS; ++j) {
    for (int r = 0; r < R; ++r) {
      chunk_parts[r][j] = acc_t(0);
    }
    for (int v = 0; v < VEC; ++v) {
      const acc_t wv = w(j, v);
      for (int r = 0; r < R; ++r) {
        chunk_parts[r][j] = attnpool_fma(element(r, j, v), wv, chunk_parts[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    parts[r] = chunk_parts[r][0];
    for (int j = 1; j < CHUNKS; ++j) {
      parts[r] += chunk_parts[r][j];
    }
  }
}

// The same sum for one row, w a lane's columns in registers.
template <typename acc_t, int VEC, int CHUNKS, typename Element>
ATTNPOOL_DEVICE inline acc_t lane_dot_of(const Element& element, const acc_t (&w)[CHUNKS][VEC]) {
  acc_t part[1];
  lane_dots_of<acc_t, VEC, CHUNKS>(
      [&](int /*r*/, int j, int v) { return element(j, v); },
      [&](int j, int v) { return w[j][v]; },
      part);
  return part[0];
}

// [Note: u in shared memory] The one-score forward holds a lane's columns of
// u in registers (VEC * CHUNKS of them: 32 for bfloat16 rows of 1024), or,
// with kUShared, reads them from the block's copy of u in shared memory,
// which leaves those registers to rows in flight: in bfloat16 a warp's two
// rows in flight are 4 KB against float32's 8 KB, and the H200 read bfloat16
// x at 0.25 of x.sum()'s speed against 0.72-0.84 for float32, at the same
// 2 blocks per SM (registers were the limit). Each row's sums are the same
// either way, bitwise: u is read once per column for all R rows of a tile.
// benchmarks/one_score_kernels.cu times both.
template <typename acc_t, int VEC, int CHUNKS, bool kShared>
struct LaneU;

template <typename acc_t, int VEC, int CHUNKS>
struct LaneU<acc_t, VEC, CHUNKS, false> {
  acc_t values[CHUNKS][VEC];

  ATTNPOOL_DEVICE LaneU(const acc_t* u, int hidden, int lane, acc_t* /*shared*/, int /*tid*/) {
    load_lane_vector(u, hidden, lane, values);
  }
  ATTNPOOL_DEVICE acc_t operator()(int j, int v) const {
    return values[j][v];
  }
};

template <typename acc_t, int VEC, int CHUNKS>
struct LaneU<acc_t, VEC, CHUNKS, true> {
  const acc_t* lane_u;  // the lane's first column of the block's copy

  // Every thread of the block takes part (a barrier): `shared` gets u and
  // zeros up to kLaneColumns.
  ATTNPOOL_DEVICE LaneU(const acc_t* u, int hidden, int lane, acc_t* shared, int tid) {
    for (int c = tid; c < kLaneColumns<VEC, CHUNKS>; c += blockDim.x) {
      shared[c] = c < hidden ? u[c] : acc_t(0);
    }
    attnpool_syncthreads();
    lane_u = shared + lane_column<VEC>(lane, 0);
  }
  ATTNPOOL_DEVICE acc_t operator()(int j, int v) const {
    return lane_u[lane_column<VEC>(0, j) + v];
  }
};

// parts[r] = this lane's part of rows[r] . u for the R rows of a tile, each
// summed as lane_dot sums it (lane_dots_of); u is read once per column.
template <typename acc_t, typename scalar_t, int VEC, int CHUNKS, int R, typename U>
ATTNPOOL_DEVICE inline void lane_dots(
    const LaneRow<scalar_t, VEC, CHUNKS> (&rows)[R], const U& u, acc_t (&parts)[R]) {
  lane_dots_of<acc_t, VEC, CHUNKS>(
      [&](int r, int j, int v) { return lane_value<acc_t>(rows[r], j, v); }, u, parts);
}

// This lane's part of row . w.
template <typename acc_t, typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_DEVICE inline acc_t lane_dot(
    const LaneRow<scalar_t, VEC, CHUNKS>& row, const acc_t (&w)[CHUNKS][VEC]) {
  return lane_dot_of([&](int j, int v) { return lane_value<acc_t>(row, j, v); }, w);
}

// The same sum for two vectors of the accumulation dtype (delta = G . out,
// summed as dp = G . x is).
template <typename acc_t, int VEC, int CHUNKS>
ATTNPOOL_DEVICE inline acc_t lane_dot(
    const acc_t (&a)[CHUNKS][VEC], const acc_t (&w)[CHUNKS][VEC]) {
  return lane_dot_of([&](int j, int v) { return a[j][v]; }, w);
}

// A tile of a warp: rows tile .. tile + R - 1 of sequence b, present[r]
// false (and the row zeros, not loaded) past `end` or where masked.
template <typename scalar_t, int VEC, int CHUNKS, int R>
struct WarpTile {
  bool present[R];
  LaneRow<scalar_t, VEC, CHUNKS> rows[R];
};

template <typename scalar_t, int VEC, int CHUNKS, int R, typename Params>
ATTNPOOL_DEVICE inline void load_warp_tile(
    const Params& a,
    const scalar_t* x,
    int64_t b,
    int64_t tile,
    int64_t end,
    int lane,
    WarpTile<scalar_t, VEC, CHUNKS, R>& out) {
  const int hidden = static_cast<int>(a.hidden);
  for (int r = 0; r < R; ++r) {
    const int64_t l = tile + r;
    out.present[r] = l < end && a.attends(b, l);
    load_lane_row(x + l * a.x_seq_stride, out.present[r], hidden, lane, out.rows[r]);
  }
}

// The softmax state of a warp (or, merged, of a block): running max, sum of
// exp(score - max), whether any row was present, and (in registers) the
// weighted sum of the rows.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;
  bool any;
};

// The block's state from its warps' (maxes, sums, flags: one each per warp),
// the same in every thread: the warps' states in warp order, as
// merge_pieces_kernel merges pieces. weights[w] (shared) gets warp w's
// factor, from the threads tid < num_warps.
template <typename acc_t>
ATTNPOOL_DEVICE inline SoftmaxState<acc_t> merge_warp_states(
    const acc_t* maxes,
    const acc_t* sums,
    const acc_t* flags,
    int num_warps,
    int tid,
    acc_t* weights) {
  SoftmaxState<acc_t> block{-attnpool_infinity<acc_t>(), acc_t(0), false};
  for (int w = 0; w < num_warps; ++w) {
    if (flags[w] != acc_t(0)) {
      block.any = true;
      block.max = maxes[w] > block.max ? maxes[w] : block.max;
    }
  }
  const bool none_finite = block.max == -attnpool_infinity<acc_t>();
  for (int w = 0; w < num_warps; ++w) {
    const acc_t weight = flags[w] == acc_t(0) ? acc_t(0)
                         : none_finite        ? acc_t(1)
                                              : attnpool_exp(maxes[w] - block.max);
    block.sum += weight * sums[w];
    if (tid == w) {
      weights[w] = weight;
    }
  }
  return block;
}

// One (sequence b, piece of its rows) per block, with ForwardParams' block
// numbering for one query (block_info): out and lse directly when the
// sequence is one piece, else the piece's state in `partials`, merged by
// merge_pieces_kernel.
template <typename scalar_t, int VEC, int CHUNKS, int R = kOneScoreRows, bool kUShared = false>
ATTNPOOL_GLOBAL void one_score_forward_kernel(ForwardParams a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  const BlockInfo info = block_info(a, 1);
  const auto [b, group, rows, tid, lane, warp, num_warps] = info;
  const int H = static_cast<int>(a.hidden);
  const auto* x = static_cast<const scalar_t*>(a.x) + a.row_offset(b, 0);
  const acc_t scale = static_cast<acc_t>(a.scale);
  const auto* bias =
      a.bias == nullptr ? nullptr : static_cast<const acc_t*>(a.bias) + b * a.seq_len;

  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);
  // u after the warps' states and vectors (one_score_shared_bytes).
  const LaneU<acc_t, VEC, CHUNKS, kUShared> u(
      static_cast<const acc_t*>(a.u), H, lane, shared + num_warps * (4 + H), tid);
  acc_t acc[CHUNKS][VEC];
  for (int j = 0; j < CHUNKS; ++j) {
    for (int v = 0; v < VEC; ++v) {
      acc[j][v] = acc_t(0);
    }
  }
  SoftmaxState<acc_t> state{-attnpool_infinity<acc_t>(), acc_t(0), false};

  // Tiles of R rows, dealt to the warps in turn; the next tile's loads are
  // issued before this one is reduced.
  const int64_t stride = static_cast<int64_t>(num_warps) * R;
  WarpTile<scalar_t, VEC, CHUNKS, R> next;
  int64_t tile = rows.begin + static_cast<int64_t>(warp) * R;
  if (tile < rows.end) {
    load_warp_tile(a, x, b, tile, rows.end, lane, next);
  }
  for (; tile < rows.end; tile += stride) {
    const WarpTile<scalar_t, VEC, CHUNKS, R> current = next;
    if (tile + stride < rows.end) {
      load_warp_tile(a, x, b, tile + stride, rows.end, lane, next);
    }
    // Every row's sum, absent ones (zeros) too, so that the R butterflies
    // overlap; whether a row is present is the same for the whole warp.
    acc_t scores[R];
    acc_t parts[R];
    lane_dots(current.rows, u, parts);
    acc_t tile_max = -attnpool_infinity<acc_t>();
    for (int r = 0; r < R; ++r) {
      const acc_t sum = warp_sum(parts[r]);
      scores[r] = current.present[r] ? biased_score(scale, sum, bias, tile + r)
                                     : -attnpool_infinity<acc_t>();
      tile_max = scores[r] > tile_max ? scores[r] : tile_max;
      state.any = state.any || current.present[r];
    }
    // The update of a block of rows of the CPU kernels; the sums are
    // rescaled only when the max grows.
    if (tile_max > state.max) {
      const acc_t correction = attnpool_exp(state.max - tile_max);
      state.sum *= correction;
      state.max = tile_max;
      for (int j = 0; j < CHUNKS; ++j) {
        for (int v = 0; v < VEC; ++v) {
          acc[j][v] *= correction;
        }
      }
    }
    acc_t weights[R];
    for (int r = 0; r < R; ++r) {
      weights[r] =
          scores[r] == -attnpool_infinity<acc_t>() ? acc_t(0) : attnpool_exp(scores[r] - state.max);
      state.sum += weights[r];
    }
    // An absent row adds weight 0 times zeros.
    for (int j = 0; j < CHUNKS; ++j) {
      for (int v = 0; v < VEC; ++v) {
        for (int r = 0; r < R; ++r) {
          acc[j][v] = attnpool_fma(weights[r], lane_value<acc_t>(current.rows[r], j, v), acc[j][v]);
        }
      }
    }
  }

  // The block's state: the warps' states merged in warp order.
  acc_t* maxes = shared;               // [num_warps], then each warp's weight
  acc_t* sums = maxes + num_warps;     // [num_warps]
  acc_t* flags = sums + num_warps;     // [num_warps]
  acc_t* vectors = flags + num_warps;  // [num_warps][H]
  if (lane == 0) {
    maxes[warp] = state.max;
    sums[warp] = state.sum;
    flags[warp] = state.any ? acc_t(1) : acc_t(0);
  }
  store_lane_vector(acc, H, lane, vectors + warp * H);
  attnpool_syncthreads();
  acc_t* weights = vectors + num_warps * H;  // [num_warps]
  const SoftmaxState<acc_t> block = merge_warp_states(maxes, sums, flags, num_warps, tid, weights);
  attnpool_syncthreads();

  const int warps = num_warps;  // (a lambda cannot capture a structured binding in C++17)
  const auto merged = [&](int c) {
    acc_t value = acc_t(0);
    for (int w = 0; w < warps; ++w) {
      value += weights[w] * vectors[w * H + c];
    }
    return value;
  };
  if (!a.ragged() && a.cut.pieces == 1) {
    auto* out = static_cast<acc_t*>(a.out) + b * H;
    for (int c = tid; c < H; c += blockDim.x) {
      out[c] = block.any ? merged(c) / block.sum : acc_t(0);
    }
    if (tid == 0) {
      auto* lse = static_cast<acc_t*>(a.lse) + 2 * b;
      lse[0] = block.any ? block.max : -attnpool_infinity<acc_t>();
      lse[1] = block.any ? attnpool_log(block.sum) : acc_t(0);
    }
    return;
  }
  // The piece's state, in merge_pieces_kernel's record for one head.
  acc_t* record = static_cast<acc_t*>(a.partials) + static_cast<int64_t>(blockIdx.x) * (3 + H);
  if (tid == 0) {
    record[0] = block.any ? acc_t(1) : acc_t(0);
    record[1] = block.max;
    record[2] = block.sum;
  }
  for (int c = tid; c < H; c += blockDim.x) {
    record[3 + c] = merged(c);
  }
}

// One (sequence b, piece of its rows) per block: for each row, p = exp(score
// - lse) and ds = scale * p * (dp - delta) with dp = G . x and delta = G . out;
// dx = p G + ds u is written once, and du += ds x stays in the lane's
// registers until the warps' parts are added, in warp order, into this
// block's du partial (summed over blocks by reduce_partials_kernel).
template <typename scalar_t, int VEC, int CHUNKS, int R = kOneScoreRows>
ATTNPOOL_GLOBAL void one_score_backward_kernel(BackwardParams a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  const BlockInfo info = block_info(a, 1);
  const auto [b, group, rows, tid, lane, warp, num_warps] = info;
  const int H = static_cast<int>(a.hidden);
  const auto* x = static_cast<const scalar_t*>(a.x) + a.row_offset(b, 0);
  auto* dx = static_cast<scalar_t*>(a.dx) + a.flat_row(b, 0) * H;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const auto* bias =
      a.bias == nullptr ? nullptr : static_cast<const acc_t*>(a.bias) + b * a.seq_len;
  const auto* lse = static_cast<const acc_t*>(a.lse) + 2 * b;
  const acc_t lse_max = lse[0];
  const acc_t lse_log_sum = lse[1];

  acc_t u[CHUNKS][VEC];
  acc_t g[CHUNKS][VEC];
  acc_t du[CHUNKS][VEC];
  load_lane_vector(static_cast<const acc_t*>(a.u), H, lane, u);
  load_lane_vector(static_cast<const acc_t*>(a.grad_out) + b * H, H, lane, g);
  {
    acc_t out[CHUNKS][VEC];
    load_lane_vector(static_cast<const acc_t*>(a.out) + b * H, H, lane, out);
    for (int j = 0; j < CHUNKS; ++j) {
      for (int v = 0; v < VEC; ++v) {
        du[j][v] = out[j][v];
      }
    }
  }
  // delta = G . out, summed as every dp = G . x: when one row holds all the
  // weight (x = out), dp - delta is exactly 0, as in the reference.
  const acc_t delta = warp_sum(lane_dot(du, g));
  for (int j = 0; j < CHUNKS; ++j) {
    for (int v = 0; v < VEC; ++v) {
      du[j][v] = acc_t(0);
    }
  }

  // Tiles of R rows, dealt to the warps in turn. For 16-bit rows up to H =
  // 1024 (a tile of at most 32 registers a lane) the next tile's loads are
  // issued before this one is reduced; u, G and du already take three rows'
  // worth of registers. (Not for float32: ahead, its rows up to H = 512 took
  // 159 registers instead of 126, over the 128 that four blocks of 128
  // threads per SM allow, ptxas sm_90; to be timed.)
  constexpr bool kLoadsAhead =
      sizeof(scalar_t) == 2 && R * CHUNKS * sizeof(Pack<scalar_t, VEC>) <= 128;
  using Tile = WarpTile<scalar_t, VEC, CHUNKS, R>;
  const int64_t stride = static_cast<int64_t>(num_warps) * R;
  Tile next;
  int64_t tile = rows.begin + static_cast<int64_t>(warp) * R;
  if constexpr (kLoadsAhead) {
    if (tile < rows.end) {
      load_warp_tile(a, x, b, tile, rows.end, lane, next);
    }
  }
  for (; tile < rows.end; tile += stride) {
    Tile current;
    if constexpr (kLoadsAhead) {
      current = next;
      if (tile + stride < rows.end) {
        load_warp_tile(a, x, b, tile + stride, rows.end, lane, next);
      }
    } else {
      load_warp_tile(a, x, b, tile, rows.end, lane, current);
    }
    ATTNPOOL_UNROLL
    for (int r = 0; r < R; ++r) {
      const int64_t l = tile + r;
      if (l >= rows.end) {  // (not a loop condition: the loop stays unrolled)
        continue;
      }
      // An absent row (zeros) gets p = ds = 0: it adds nothing to du, and
      // its dx row is written as zeros.
      const bool present = current.present[r];  // the same for the whole warp
      const acc_t sum = warp_sum(lane_dot(current.rows[r], u));
      const acc_t dprob = warp_sum(lane_dot(current.rows[r], g));
      const acc_t prob =
          present ? attnpool_exp((biased_score(scale, sum, bias, l) - lse_max) - lse_log_sum)
                  : acc_t(0);
      const acc_t dscore = present ? scale * prob * (dprob - delta) : acc_t(0);
      for (int j = 0; j < CHUNKS; ++j) {
        const int col = lane_column<VEC>(lane, j);
        Pack<scalar_t, VEC> pack;
        for (int v = 0; v < VEC; ++v) {
          const acc_t value = attnpool_fma(prob, g[j][v], dscore * u[j][v]);
          pack.v[v] = static_cast<scalar_t>(present ? value : acc_t(0));
          du[j][v] = attnpool_fma(dscore, lane_value<acc_t>(current.rows[r], j, v), du[j][v]);
        }
        if (col < H) {
          store_pack<scalar_t, VEC>(dx + l * H + col, pack);
        }
      }
    }
  }

  // This block's du partial: the warps' parts added in warp order.
  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);
  acc_t* vectors = shared + 3 * num_warps;  // [num_warps][H], as in the forward
  store_lane_vector(du, H, lane, vectors + warp * H);
  attnpool_syncthreads();
  acc_t* partial = static_cast<acc_t*>(a.du_partials) + static_cast<int64_t>(blockIdx.x) * H;
  for (int c = tid; c < H; c += blockDim.x) {
    acc_t total = acc_t(0);
    for (int w = 0; w < num_warps; ++w) {
      total += vectors[w * H + c];
    }
    partial[c] = total;
  }
}

}  // namespace attnpool::cuda
