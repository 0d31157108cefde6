#pragma once

// Device code of the kernels for several scores per row on tensor cores,
// for bfloat16 and float32 rows (MmaRows): the forward ([Note: the
// tensor-core forward]), the backward ([Note: the tensor-core backward])
// and the layout of their operands ([Note: tensor-core operands]). Like the other kernels they use
// only what cuda_compat.h provides, so the emulated tests run them.

#include "ops/cuda/folded_attention_pool_kernel.cuh"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace attnpool::cuda {

// [Note: the tensor-core forward]
// With several scores per row (queries x heads, or full width), the kernels
// of folded_attention_pool_kernel.cuh read x once per query and reduce each
// head's dot products across the block every four rows; the matrix-product
// path reads x twice and pays some twenty launches. Here a block takes one
// piece of one sequence and a group of up to 8 * NT queries with all their
// heads (scores s = query * n + head, local to the group), and reads each
// row of x once, as flash-attention's forward reads keys and values:
//
//   1. a tile of 32 rows goes to shared memory (cp.async, the next tile's
//      copy in flight while this one is used, where shared memory holds two
//      tiles; rows that are not attended are zeros there and never read
//      from x);
//   2. scores: each warp takes 8 rows, D[s][row] = U[s] . x[row] by mma
//      with U as A (16 scores by one k-step of columns, from fragments
//      laid out once per call: [Note: tensor-core operands]) and the rows as B
//      (ldmatrix). bfloat16 rows: mma.m16n8k16, U as two bfloat16 terms,
//      hi + lo, as in the matrix-product path (about 16 significant bits
//      of each u). float32 rows: mma.m16n8k8 on tf32 terms of both, three
//      products (MmaRows);
//   3. the online softmax of each score over the tile: 8 lanes per score,
//      4 rows each (one max and one sum over the 8 lanes), the weights
//      again as two terms;
//   4. weighted sums: for 16 columns of head h and 8 queries, out^T +=
//      x^T . P^T with x^T as A (bfloat16: ldmatrix.trans; float32: its tf32
//      terms from shared memory) and the weights of scores (query, h) as B;
//      the running sums live in shared memory in fragment order, rescaled
//      as they are loaded.
//
// Three barriers per tile (four with one tile of x). Results differ from the other kernels' in the
// last bits (the tensor cores add in their own order), so a call whose
// forward runs here runs its backward in mma_backward_kernel, which
// recomputes the scores the same way (score_rows, the same chains). The
// entry points take both only when asked ([Note: opting in to the
// tensor-core kernels] in folded_attention_pool_kernel.cu) until a GPU has
// run them and said, for float32 rows, whether 3xTF32 beats the other
// kernels' FMA; benchmarks/tensor_core_kernels.cu times them, and the
// emulated tests check them against the CPU operators.

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
// Rows of a tile: 8 per warp, the N of the scores' mma.
constexpr int kMmaTileRows = 8 * kMmaWarps;
// A score's row of weights in shared memory (bfloat16), padded so that rows
// are 16 bytes apart modulo 128.
constexpr int kMmaWeightStride = kMmaTileRows + 8;
// A score's row of a tile's scores (float): one past the tile, so that the
// lanes storing one row each of 8 scores reach 8 banks.
constexpr int kMmaScoreStride = kMmaTileRows + 1;

// Queries a block takes with NT column tiles of 8 queries, and how many
// blocks (groups) Q queries need.
ATTNPOOL_HOST_DEVICE inline int64_t mma_groups(int64_t num_queries, int64_t nt) {
  return (num_queries + 8 * nt - 1) / (8 * nt);
}

// How rows of each dtype enter the products. bfloat16 rows go to
// mma.m16n8k16 as they are, u and the weights as two bfloat16 terms
// (bf16_term). float32 rows go to mma.m16n8k8 as two tf32 terms (tf32_hi,
// tf32_lo), u and the weights likewise, and each product as hi.hi + hi.lo +
// lo.hi ("3xTF32": about 21 significant bits where tf32 alone keeps 11 and
// float32 24).
template <typename scalar_t>
struct MmaRows;

template <>
struct MmaRows<c10::BFloat16> {
  using Term = c10::BFloat16;       // of u and of the weights
  static constexpr int kStep = 16;  // columns per k-step of the scores' mma
  static constexpr int kWeightStride = kMmaWeightStride;
};

template <>
struct MmaRows<float> {
  using Term = float;  // tf32 values
  static constexpr int kStep = 8;
  // 36 floats: rows 16 bytes apart modulo 128, as bfloat16's 40.
  static constexpr int kWeightStride = kMmaTileRows + 4;
};

// Elements of x in 16 bytes: a cp.async, and the padding after each row of a
// tile in shared memory (rows 16 bytes apart modulo 128: ldmatrix's eight
// rows in different banks).
template <typename scalar_t>
constexpr int kMmaChunk = 16 / static_cast<int>(sizeof(scalar_t));

// Where each part of the dynamic shared memory starts, in bytes.
struct MmaSharedLayout {
  int64_t x_row;    // elements from one row of a tile to the next
  int64_t x_tiles;  // `buffers` tiles of x
  int64_t sums;     // weighted sums, [H / 16][NT][32 lanes][4] float
  int64_t scores;   // [16 MT][kMmaScoreStride] float
  int64_t state;    // running max, running sum, correction: [16 MT] float each
  int64_t weights;  // hi and lo terms, [2][16 MT][kWeightStride] (MmaRows::Term)
  int64_t valid;    // one int: whether any row was attended
  int64_t bytes;
};

template <typename scalar_t>
ATTNPOOL_HOST_DEVICE inline MmaSharedLayout mma_shared_layout(
    int64_t hidden, int64_t mt, int64_t nt, int64_t buffers) {
  using Rows = MmaRows<scalar_t>;
  MmaSharedLayout s;
  s.x_row = hidden + kMmaChunk<scalar_t>;
  s.x_tiles = 0;
  s.sums = s.x_tiles + buffers * kMmaTileRows * s.x_row * sizeof(scalar_t);
  s.scores = s.sums + (hidden / 16) * nt * 32 * 4 * 4;
  s.state = s.scores + 16 * mt * kMmaScoreStride * 4;
  s.weights = s.state + 3 * 16 * mt * 4;
  s.valid = s.weights + 2 * 16 * mt * Rows::kWeightStride * sizeof(typename Rows::Term);
  s.bytes = s.valid + 16;
  return s;
}

// The two bfloat16 terms of a float32 operand: hi = bfloat16(v), lo =
// bfloat16(v - hi).
ATTNPOOL_HOST_DEVICE inline c10::BFloat16 bf16_term(float value, int term) {
  const c10::BFloat16 hi(value);
  return term == 0 ? hi : c10::BFloat16(value - static_cast<float>(hi));
}

ATTNPOOL_HOST_DEVICE inline float float_of_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

ATTNPOOL_HOST_DEVICE inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// The tf32 terms of a float32 value, as bits. hi: the value rounded to tf32
// (10 bits after the leading one; to nearest, ties away from zero, as
// cvt.rna.tf32.f32 rounds, but in integer arithmetic, so that the emulated
// tests compute the device's own bits; infinities and NaN are not rounded).
// lo: v - hi with its low 13 bits cut. Cut, not rounded: |lo| then stays
// under half a tf32 step of hi, or v - hi is an exact tie, so hi + lo rounds
// back to hi and splits into hi and lo again, which the backward's delta
// needs ([Note: the tensor-core backward]; rounded, one value in 8192 would
// split differently). Values within 2^-11 of float32's largest round hi to
// infinity.
ATTNPOOL_HOST_DEVICE inline uint32_t tf32_hi(float value) {
  uint32_t bits = bits_of(value);
  if ((bits & 0x7F800000u) != 0x7F800000u) {
    bits += 0x1000u;
  }
  return bits & 0xFFFFE000u;
}

ATTNPOOL_HOST_DEVICE inline uint32_t tf32_lo(float value, uint32_t hi) {
  return bits_of(value - float_of_bits(hi)) & 0xFFFFE000u;
}

// Term `term` (0: hi, 1: lo) of a float32 value, as a float.
ATTNPOOL_HOST_DEVICE inline float tf32_term(float value, int term) {
  const uint32_t hi = tf32_hi(value);
  return float_of_bits(term == 0 ? hi : tf32_lo(value, hi));
}

// The term of u or of a weight for rows of scalar_t (MmaRows).
template <typename scalar_t>
ATTNPOOL_HOST_DEVICE inline typename MmaRows<scalar_t>::Term mma_term(float value, int term) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return tf32_term(value, term);
  } else {
    return bf16_term(value, term);
  }
}

template <typename T>
ATTNPOOL_DEVICE inline T* shared_at(unsigned char* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// Rows tile .. tile + kMmaTileRows - 1 of sequence b (x: its row 0) into
// `tile_rows`: attended rows by cp.async, the others as zeros.
template <typename scalar_t>
ATTNPOOL_DEVICE inline void stage_tile(
    const ForwardParams& a,
    const scalar_t* x,
    int64_t b,
    int64_t tile,
    int64_t last,
    int64_t x_row,
    scalar_t* tile_rows) {
  constexpr int kChunk = kMmaChunk<scalar_t>;
  const int chunks_per_row = static_cast<int>(a.hidden / kChunk);
  for (int c = threadIdx.x; c < kMmaTileRows * chunks_per_row; c += kMmaThreads) {
    const int r = c / chunks_per_row;
    const int64_t col = static_cast<int64_t>(c % chunks_per_row) * kChunk;
    const int64_t l = tile + r;
    scalar_t* to = tile_rows + r * x_row + col;
    if (l < last && a.attends(b, l)) {
      attnpool_copy_async_16(to, x + l * a.x_seq_stride + col);
    } else {
      *reinterpret_cast<Pack<uint32_t, 4>*>(to) = Pack<uint32_t, 4>{{0, 0, 0, 0}};
    }
  }
}

// Tile `tile` of the piece `rows`, in shared memory once this returns (a
// block-wide call: it has barriers). With two buffers, the tile came in
// while the previous one was used (the first comes in now) and the next
// goes out here; with one, it comes in once every warp is done with the
// previous one.
template <typename scalar_t>
ATTNPOOL_DEVICE inline const scalar_t* staged_tile(
    const ForwardParams& a,
    const scalar_t* x,
    int64_t b,
    int64_t tile,
    RowRange rows,
    int64_t x_row,
    scalar_t* tiles,
    int buffers) {
  constexpr int TR = kMmaTileRows;
  const int64_t index = (tile - rows.begin) / TR;
  scalar_t* current = tiles + (index % buffers) * TR * x_row;
  if (buffers == 1) {
    attnpool_syncthreads();  // every warp is done with the previous tile
  }
  if (buffers == 1 || index == 0) {
    stage_tile(a, x, b, tile, rows.end, x_row, current);
  }
  attnpool_copy_async_wait();
  // This tile's rows are in; every warp is done with the previous tile.
  attnpool_syncthreads();
  if (buffers == 2 && tile + TR < rows.end) {
    stage_tile(a, x, b, tile + TR, rows.end, x_row, tiles + ((index + 1) % 2) * TR * x_row);
  }
  return current;
}

// Chains of additions score_rows keeps per tile of 16 scores: with few
// tiles, more independent mma in flight (a tile's hi and lo terms apart,
// and with one or two tiles even and odd k-steps apart too).
ATTNPOOL_HOST_DEVICE constexpr int mma_chains(int mt) {
  return mt <= 2 ? 4 : mt <= 4 ? 2 : 1;
}

// D's element c of score tile mt: its chains added in order.
template <int MT, int kChains>
ATTNPOOL_DEVICE inline float chain_sum(const float (&acc)[MT][kChains][4], int mt, int c) {
  float sum = acc[mt][0][c];
  for (int chain = 1; chain < kChains; ++chain) {
    sum += acc[mt][chain][c];
  }
  return sum;
}

// The scores of a warp's 8 rows of the tile against the block's 16 MT
// scores: acc[mt][chain][c] sums to D's (score 16 mt + g + 8 (c / 2), row
// 2 t + c % 2) (chain_sum). A tile's sums depend on kChains, not on the
// other tiles: the backward scores one tile of the forward's MT at a time
// (MT = 1 with the forward's kChains) and gets the forward's bits.
template <int MT, int kChains = mma_chains(MT), typename scalar_t>
ATTNPOOL_DEVICE inline void score_rows(
    const scalar_t* rows,
    int64_t x_row,
    const Pack<uint32_t, 4>* u_fragments,
    int64_t k_steps,
    int lane,
    float (&acc)[MT][kChains][4]) {
  for (int mt = 0; mt < MT; ++mt) {
    for (int chain = 0; chain < kChains; ++chain) {
      for (int c = 0; c < 4; ++c) {
        acc[mt][chain][c] = 0.0f;
      }
    }
  }
  // ldmatrix: lane 8 j + i gives row i, the 16 bytes j of two k-steps (32
  // bytes each: 16 bfloat16 or 8 float32 columns); a lane gets 32 bits of
  // row lane / 4 from each: B's fragments for both dtypes.
  const scalar_t* address = rows + (lane % 8) * x_row + kMmaChunk<scalar_t> * (lane / 8);
  constexpr int kStep = MmaRows<scalar_t>::kStep;
  // With few score tiles, loads for later k-steps go out before earlier
  // ones are used; with many, the tiles' mma already fill the time.
  constexpr int kUnroll = MT <= 4 ? 4 : 1;
  ATTNPOOL_UNROLL_BY(kUnroll)
  for (int64_t ks = 0; ks < k_steps; ks += 2) {
    uint32_t xs[4];
    attnpool_ldmatrix_x4<false>(xs, address + ks * kStep);
    ATTNPOOL_UNROLL
    for (int step = 0; step < 2; ++step) {
      const Pack<uint32_t, 4>* fragments = u_fragments + (ks + step) * 32;
      if constexpr (std::is_same_v<scalar_t, float>) {
        // The rows' tf32 terms; hi.hi + hi.lo + lo.hi.
        uint32_t hi[2];
        uint32_t lo[2];
        ATTNPOOL_UNROLL
        for (int w = 0; w < 2; ++w) {
          const float value = float_of_bits(xs[2 * step + w]);
          hi[w] = tf32_hi(value);
          lo[w] = tf32_lo(value, hi[w]);
        }
        ATTNPOOL_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          const Pack<uint32_t, 4> wh = fragments[(mt * 2) * k_steps * 32];
          const Pack<uint32_t, 4> wl = fragments[(mt * 2 + 1) * k_steps * 32];
          const uint32_t uh[4] = {wh.v[0], wh.v[1], wh.v[2], wh.v[3]};
          const uint32_t ul[4] = {wl.v[0], wl.v[1], wl.v[2], wl.v[3]};
          attnpool_mma_tf32(acc[mt][(3 * step) % kChains], uh, hi);
          attnpool_mma_tf32(acc[mt][(3 * step + 1) % kChains], uh, lo);
          attnpool_mma_tf32(acc[mt][(3 * step + 2) % kChains], ul, hi);
        }
      } else {
        const uint32_t bx[2] = {xs[2 * step], xs[2 * step + 1]};
        ATTNPOOL_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          ATTNPOOL_UNROLL
          for (int term = 0; term < 2; ++term) {
            const Pack<uint32_t, 4> w = fragments[(mt * 2 + term) * k_steps * 32];
            const uint32_t au[4] = {w.v[0], w.v[1], w.v[2], w.v[3]};
            attnpool_mma_bf16(acc[mt][(term + 2 * step) % kChains], au, bx);
          }
        }
      }
    }
  }
}

// Max and sum over the 8 lanes of an aligned group (lanes 8 k .. 8 k + 7).
ATTNPOOL_DEVICE inline float group_max8(float value) {
  for (int offset = 1; offset < 8; offset *= 2) {
    const float other = attnpool_shfl_xor(value, offset);
    value = other > value ? other : value;
  }
  return value;
}

ATTNPOOL_DEVICE inline float group_sum8(float value) {
  for (int offset = 1; offset < 8; offset *= 2) {
    value += attnpool_shfl_xor(value, offset);
  }
  return value;
}

// d += a . b on the tensor cores, for rows of scalar_t.
template <typename scalar_t>
ATTNPOOL_DEVICE inline void mma_of(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    attnpool_mma_tf32(d, a, b);
  } else {
    attnpool_mma_bf16(d, a, b);
  }
}

// k-steps of the weighted sums' mma over a tile's rows.
template <typename scalar_t>
constexpr int kMmaRowSteps = kMmaTileRows / MmaRows<scalar_t>::kStep;

// B's two registers of each term for k-step kk over a tile's rows, from
// one row of weights (`row`: a score's, its terms term_stride apart):
// bfloat16 rows 2t, 2t + 1 and 2t + 8, 2t + 9 of the k-step; tf32 rows t
// and t + 4.
template <typename scalar_t>
ATTNPOOL_DEVICE inline void load_weights(
    const typename MmaRows<scalar_t>::Term* row,
    int term_stride,
    int kk,
    int t,
    uint32_t (&bw)[2][2]) {
  using Rows = MmaRows<scalar_t>;
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(typename Rows::Term));
  ATTNPOOL_UNROLL
  for (int term = 0; term < 2; ++term) {
    const auto* w = row + term * term_stride + kk * Rows::kStep + kPerWord * t;
    bw[term][0] = *reinterpret_cast<const uint32_t*>(w);
    bw[term][1] = *reinterpret_cast<const uint32_t*>(w + Rows::kStep / 2);
  }
}

// The B fragments of head h's weighted sums: for column tile nt of queries,
// each k-step kk over the tile's rows and each term, B's two registers
// (load_weights; column: query 8 nt + g) from the weights of score (query,
// h), zeros past the block's queries; and the corrections of D's queries
// 8 nt + 2t and + 1.
template <typename scalar_t, int NT>
ATTNPOOL_DEVICE inline void load_head_weights(
    const typename MmaRows<scalar_t>::Term* weights,
    int term_stride,
    const float* correction,
    int64_t queries,
    int64_t n,
    int64_t h,
    int lane,
    uint32_t (&bw)[NT][kMmaRowSteps<scalar_t>][2][2],
    float (&corrections)[NT][2]) {
  const int g = lane / 4;
  const int t = lane % 4;
  ATTNPOOL_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t q0 = nt * 8 + 2 * t;
    corrections[nt][0] = q0 < queries ? correction[q0 * n + h] : 1.0f;
    corrections[nt][1] = q0 + 1 < queries ? correction[(q0 + 1) * n + h] : 1.0f;
    const int64_t qb = nt * 8 + g;
    ATTNPOOL_UNROLL
    for (int kk = 0; kk < kMmaRowSteps<scalar_t>; ++kk) {
      if (qb < queries) {
        load_weights<scalar_t>(
            weights + (qb * n + h) * MmaRows<scalar_t>::kWeightStride,
            term_stride,
            kk,
            t,
            bw[nt][kk]);
      } else {
        bw[nt][kk][0][0] = bw[nt][kk][0][1] = bw[nt][kk][1][0] = bw[nt][kk][1][1] = 0u;
      }
    }
  }
}

// A's fragments of x^T for 16 columns from `columns` (a tile's row 0, the
// tile's first column) over the tile's rows, one register set per k-step:
// bfloat16 by ldmatrix.trans (lane 8 j + i gives row i + 8 (j / 2) of the
// k-step, column 8 (j % 2)), exact in one term; float32 as tf32 hi and lo
// terms of (row t, column g), (t, g + 8), (t + 4, g), (t + 4, g + 8).
template <typename scalar_t>
ATTNPOOL_DEVICE inline void load_columns(
    const scalar_t* columns,
    int64_t x_row,
    int lane,
    uint32_t (&xa)[kMmaRowSteps<scalar_t>][std::is_same_v<scalar_t, float> ? 2 : 1][4]) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int g = lane / 4;
    const int t = lane % 4;
    ATTNPOOL_UNROLL
    for (int kk = 0; kk < kMmaRowSteps<scalar_t>; ++kk) {
      ATTNPOOL_UNROLL
      for (int r = 0; r < 4; ++r) {
        const float value = columns[(8 * kk + t + 4 * (r / 2)) * x_row + g + 8 * (r % 2)];
        xa[kk][0][r] = tf32_hi(value);
        xa[kk][1][r] = tf32_lo(value, xa[kk][0][r]);
      }
    }
  } else {
    const scalar_t* address =
        columns + ((lane % 8) + 8 * (lane / 16)) * x_row + 8 * ((lane / 8) % 2);
    ATTNPOOL_UNROLL
    for (int kk = 0; kk < kMmaRowSteps<scalar_t>; ++kk) {
      attnpool_ldmatrix_x4<true>(xa[kk][0], address + 16 * kk * x_row);
    }
  }
}

// acc += x^T . P^T over one k-step: bfloat16, x . (P hi + P lo); float32,
// x hi . P hi + x hi . P lo + x lo . P hi.
template <typename scalar_t>
ATTNPOOL_DEVICE inline void add_products(
    float (&acc)[4],
    const uint32_t (&xa)[std::is_same_v<scalar_t, float> ? 2 : 1][4],
    const uint32_t (&bw)[2][2]) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    mma_of<scalar_t>(acc, xa[0], bw[0]);
    mma_of<scalar_t>(acc, xa[0], bw[1]);
    mma_of<scalar_t>(acc, xa[1], bw[0]);
  } else {
    mma_of<scalar_t>(acc, xa[0], bw[0]);
    mma_of<scalar_t>(acc, xa[0], bw[1]);
  }
}

// Where this block stores the state of query i for merge_pieces_kernel: the
// slot of forward_kernel's block of (b, i, this piece), whose grid has one
// group per query where this one has `groups`.
ATTNPOOL_DEVICE inline float* piece_state(
    const ForwardParams& a, int64_t b, int64_t i, int64_t groups) {
  const int64_t block = blockIdx.x;
  const int64_t slot = a.ragged() ? (block / groups) * a.num_queries + i
                                  : (b * a.num_queries + i) * a.cut.pieces + block % a.cut.pieces;
  return static_cast<float*>(a.partials) + slot * (1 + 2 * a.num_heads + a.hidden);
}

// One (sequence b, piece, group of 8 NT queries) per block of kMmaThreads
// threads, rows of scalar_t (bfloat16 or float32: MmaRows); u_fragments
// from mma_operand_kernel (mma_u_operand); `buffers` tiles of x in shared
// memory (2: the next tile's copy in flight). Writes out and lse, or with
// several pieces (or a ragged batch) the states merge_pieces_kernel merges,
// at the slots of forward_kernel's blocks (one per query).
template <typename scalar_t, int MT, int NT>
ATTNPOOL_GLOBAL void mma_forward_kernel(ForwardParams a, const uint32_t* u_fragments, int buffers) {
  using Rows = MmaRows<scalar_t>;
  using Term = typename Rows::Term;
  constexpr int TR = kMmaTileRows;
  const int64_t Q = a.num_queries;
  const int64_t n = a.num_heads;
  const int64_t d = a.head_dim;
  const int64_t H = a.hidden;
  const int64_t groups = mma_groups(Q, NT);
  const BlockInfo info = block_info(a, groups);
  const auto [b, group, rows, tid, lane, warp, num_warps] = info;
  (void)num_warps;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t first = rows.begin;
  const int64_t last = rows.end;
  const int64_t first_query = group * 8 * NT;
  const int64_t queries = Q - first_query < 8 * NT ? Q - first_query : 8 * NT;
  const int64_t num_scores = queries * n;  // this block's; local s = query * n + head
  const int64_t k_steps = H / Rows::kStep;
  const int64_t col_tiles = H / 16;
  const auto* x = static_cast<const scalar_t*>(a.x) + a.row_offset(b, 0);
  const float scale = static_cast<float>(a.scale);
  const auto* bias =
      a.bias == nullptr ? nullptr : static_cast<const float*>(a.bias) + b * a.seq_len;
  const auto* fragments = reinterpret_cast<const Pack<uint32_t, 4>*>(u_fragments) +
                          group * 2 * MT * k_steps * 32 + lane;

  const MmaSharedLayout layout = mma_shared_layout<scalar_t>(H, MT, NT, buffers);
  ATTNPOOL_DYNAMIC_SHARED(unsigned char, shared);
  scalar_t* tiles = shared_at<scalar_t>(shared, layout.x_tiles);  // `buffers` of TR rows
  float* sums = shared_at<float>(shared, layout.sums);
  float* scores = shared_at<float>(shared, layout.scores);
  float* run_max = shared_at<float>(shared, layout.state);
  float* run_sum = run_max + 16 * MT;
  float* correction = run_sum + 16 * MT;
  // weights + term * kWeightTerm: the term's [16 MT][kWeightStride].
  Term* weights = shared_at<Term>(shared, layout.weights);
  constexpr int kWeightTerm = 16 * MT * Rows::kWeightStride;
  int* any_valid = shared_at<int>(shared, layout.valid);

  for (int s = tid; s < 16 * MT; s += kMmaThreads) {
    run_max[s] = -attnpool_infinity<float>();
    run_sum[s] = 0.0f;
    correction[s] = 1.0f;
  }
  for (int64_t i = tid; i < col_tiles * NT * 32 * 4; i += kMmaThreads) {
    sums[i] = 0.0f;
  }
  if (tid == 0) {
    any_valid[0] = 0;
  }
  for (int64_t tile = first; tile < last; tile += TR) {
    const scalar_t* tile_rows = staged_tile(a, x, b, tile, rows, layout.x_row, tiles, buffers);

    float acc[MT][mma_chains(MT)][4];
    score_rows<MT>(
        tile_rows + warp * 8 * layout.x_row, layout.x_row, fragments, k_steps, lane, acc);
    for (int mt = 0; mt < MT; ++mt) {
      for (int c = 0; c < 4; ++c) {
        const int s = 16 * mt + g + 8 * (c / 2);
        const int r = warp * 8 + 2 * t + c % 2;
        const int64_t l = tile + r;
        const bool present = l < last && a.attends(b, l);
        scores[s * kMmaScoreStride + r] = present
                                              ? biased_score(scale, chain_sum(acc, mt, c), bias, l)
                                              : -attnpool_infinity<float>();
        if (present && mt == 0 && g == 0) {
          any_valid[0] = 1;
        }
      }
    }
    attnpool_syncthreads();

    // The online softmax: 8 lanes per score, 4 rows each. Every thread takes
    // part in every round (the shuffles are warp-wide); a round's scores
    // past the last are not stored.
    for (int64_t round = 0; round < num_scores * 8; round += kMmaThreads) {
      const int64_t s_raw = (round + tid) / 8;
      const bool active = s_raw < num_scores;
      const int64_t s = active ? s_raw : 0;
      const int r0 = 4 * (tid % 8);
      float v[4];
      float tile_max = -attnpool_infinity<float>();
      for (int r = 0; r < 4; ++r) {
        v[r] = scores[s * kMmaScoreStride + r0 + r];
        tile_max = v[r] > tile_max ? v[r] : tile_max;
      }
      const float old_max = active ? run_max[s] : -attnpool_infinity<float>();
      tile_max = group_max8(tile_max);
      float c = 1.0f;
      float new_max = old_max;
      if (tile_max > old_max) {
        c = attnpool_exp(old_max - tile_max);
        new_max = tile_max;
      }
      float total = 0.0f;
      for (int r = 0; r < 4; ++r) {
        const float w = v[r] == -attnpool_infinity<float>() ? 0.0f : attnpool_exp(v[r] - new_max);
        total += w;
        if (active) {
          weights[s * Rows::kWeightStride + r0 + r] = mma_term<scalar_t>(w, 0);
          weights[kWeightTerm + s * Rows::kWeightStride + r0 + r] = mma_term<scalar_t>(w, 1);
        }
      }
      total = group_sum8(total);
      // The 8 lanes have read run_max[s]; the warp's reads come before the
      // write below.
      attnpool_syncwarp();
      if (active && tid % 8 == 0) {
        run_sum[s] = run_sum[s] * c + total;
        run_max[s] = new_max;
        correction[s] = c;
      }
    }
    attnpool_syncthreads();

    // Weighted sums: 16 columns (of head h) by 8 queries per mma. The
    // weights (B) and corrections depend on the head only: loaded again
    // when it changes (never at full width).
    int64_t loaded_head = -1;
    uint32_t bw[NT][kMmaRowSteps<scalar_t>][2][2];  // [nt][k-step][term][register]
    float corrections[NT][2];                       // of queries nt * 8 + 2t and + 1
    // (Unrolled twice: two column tiles' chains of mma in flight.)
    ATTNPOOL_UNROLL_BY(2)
    for (int64_t cm = warp; cm < col_tiles; cm += kMmaWarps) {
      const int64_t h = cm * 16 / d;
      if (h != loaded_head) {
        loaded_head = h;
        load_head_weights<scalar_t, NT>(
            weights, kWeightTerm, correction, queries, n, h, lane, bw, corrections);
      }
      uint32_t xa[kMmaRowSteps<scalar_t>][std::is_same_v<scalar_t, float> ? 2 : 1][4];
      load_columns<scalar_t>(tile_rows + cm * 16, layout.x_row, lane, xa);
      ATTNPOOL_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        auto* slot = reinterpret_cast<Pack<float, 4>*>(sums) + (cm * NT + nt) * 32 + lane;
        const Pack<float, 4> part = *slot;
        float acc4[4] = {
            part.v[0] * corrections[nt][0],
            part.v[1] * corrections[nt][1],
            part.v[2] * corrections[nt][0],
            part.v[3] * corrections[nt][1]};
        ATTNPOOL_UNROLL
        for (int kk = 0; kk < kMmaRowSteps<scalar_t>; ++kk) {
          add_products<scalar_t>(acc4, xa[kk], bw[nt][kk]);
        }
        *slot = Pack<float, 4>{{acc4[0], acc4[1], acc4[2], acc4[3]}};
      }
    }
  }
  attnpool_syncthreads();

  const bool valid = any_valid[0] != 0;
  const bool direct = !a.ragged() && a.cut.pieces == 1;
  for (int64_t s = tid; s < num_scores; s += kMmaThreads) {
    const int64_t i = first_query + s / n;
    const int64_t h = s % n;
    if (direct) {
      auto* lse = static_cast<float*>(a.lse) + 2 * ((b * Q + i) * n + h);
      lse[0] = valid ? run_max[s] : -attnpool_infinity<float>();
      lse[1] = valid ? attnpool_log(run_sum[s]) : 0.0f;
    } else {
      float* state = piece_state(a, b, i, groups);
      state[1 + h] = run_max[s];
      state[1 + n + h] = run_sum[s];
      if (h == 0) {
        state[0] = valid ? 1.0f : 0.0f;
      }
    }
  }
  for (int64_t cm = warp; cm < col_tiles; cm += kMmaWarps) {
    for (int nt = 0; nt < NT; ++nt) {
      const Pack<float, 4> part =
          reinterpret_cast<const Pack<float, 4>*>(sums)[(cm * NT + nt) * 32 + lane];
      for (int c = 0; c < 4; ++c) {
        const int64_t col = cm * 16 + g + 8 * (c / 2);
        const int64_t q = nt * 8 + 2 * t + c % 2;
        if (q >= queries) {
          continue;
        }
        const int64_t i = first_query + q;
        const int64_t h = col / d;
        if (direct) {
          auto* out = static_cast<float*>(a.out) + ((b * Q + i) * n + h) * d;
          out[col - h * d] = valid ? part.v[c] / run_sum[q * n + h] : 0.0f;
        } else {
          piece_state(a, b, i, groups)[1 + 2 * n + col] = part.v[c];
        }
      }
    }
  }
}

// [Note: the tensor-core backward]
// The scores are recomputed in the forward's score blocks (16 scores each:
// tile mt of group gi is block j = gi * MT + mt, mma_score_of), each summed
// as the forward summed it (score_rows with the forward's chains), so
// p = exp(score - lse) <= 1. Per tile of 32 rows, as in the forward:
//
//   1. for each score block j the block takes, the scores and dp = G_s . x
//      (G_s: grad_out's slice of score s, zeros elsewhere) by score_rows;
//   2. p and ds = scale p (dp - delta) per (score, row) in the products'
//      registers, stored as two terms each (MmaRows): by rows for dx (p and
//      ds of the block's j-th score block at columns 32 j and 32 j + 16),
//      by scores for du;
//   3. dx = [p | ds] . [G; u] per 16 rows and 8 columns, K = 32 per score
//      block (hi.hi + hi.lo + lo.hi; A by ldmatrix, which gives bfloat16
//      and tf32 A fragments alike), written once in x's dtype;
//   4. du += x^T . ds^T as the forward's weighted sums, in shared memory,
//      stored at the end as this block's du partial (reduce_partials_kernel
//      sums them in order).
//
// dx needs every score of a row, and du a float per score and column in
// shared memory: with one score block (up to 16 scores) a launch does both;
// with more, one launch takes dx (a block per piece, every score block) and
// another du (a block per piece and score block), each reading x once more.
//
// delta = G_s . out_s comes first from the same products as dp, with the
// rows of out in place of x (bfloat16: out's hi and lo terms as two rows;
// float32: out itself, split into tf32 terms as x is): where one row holds
// all the weight, out is that row (float32: its two tf32 terms summed,
// whose terms are the row's), and dp - delta is exactly 0 there, as in the
// reference (no gradient reaches u).

// The score (query * n + head) of row m of score block j, in the forward's
// groups of 8 nt queries with mt tiles of 16 scores each; -1 past the
// group's scores.
ATTNPOOL_HOST_DEVICE inline int64_t mma_score_of(
    int64_t j, int64_t m, int mt, int nt, int64_t num_queries, int64_t num_heads) {
  const int64_t per_group = 8 * nt * num_heads;
  const int64_t first = (j / mt) * per_group;
  const int64_t s = first + 16 * (j % mt) + m;
  return s < first + per_group && s < num_queries * num_heads ? s : -1;
}

// Words of an operand's score block of 16 rows and H columns ([Note:
// tensor-core operands]): a bfloat16 pair or a tf32 value a word, two terms.
ATTNPOOL_HOST_DEVICE inline int64_t mma_block_words(int64_t hidden, bool tf32) {
  return (tf32 ? 32 : 16) * hidden;
}

// What a launch of mma_backward_kernel computes.
enum class MmaBackwardPart { kBoth, kDx, kDu };

// A launch of mma_backward_kernel: the forward's score tiles and column
// tiles of queries (mma_forward_shape), tiles of x in shared memory (2: the
// next tile's copy in flight) and the part.
struct MmaBackwardShape {
  int mt;
  int nt;
  int buffers;
  MmaBackwardPart part;
};

struct MmaBackwardLayout {
  int64_t x_row;
  int64_t x_tiles;     // `buffers` tiles of x
  int64_t sums;        // du, [H / 16][2][32 lanes][4] float
  int64_t scratch;     // [16][kMmaScoreStride] float
  int64_t lse;         // [16 blocks][2] float
  int64_t delta;       // [16 blocks] float
  int64_t dx_stride;   // terms in a row of dx's A operand
  int64_t dx_operand;  // [2 terms][kMmaTileRows][dx_stride] (MmaRows::Term)
  int64_t ds_weights;  // [2 terms][16][kWeightStride] (MmaRows::Term)
  int64_t bytes;
};

// blocks: the score blocks each block of the launch takes.
template <typename scalar_t>
ATTNPOOL_HOST_DEVICE inline MmaBackwardLayout mma_backward_layout(
    int64_t hidden, int64_t buffers, int64_t blocks, MmaBackwardPart part) {
  using Rows = MmaRows<scalar_t>;
  constexpr int64_t kTermBytes = sizeof(typename Rows::Term);
  const bool dx = part != MmaBackwardPart::kDu;
  const bool du = part != MmaBackwardPart::kDx;
  MmaBackwardLayout s;
  s.x_row = hidden + kMmaChunk<scalar_t>;
  s.x_tiles = 0;
  s.sums = buffers * kMmaTileRows * s.x_row * sizeof(scalar_t);
  s.scratch = s.sums + (du ? (hidden / 16) * 2 * 32 * 4 * 4 : 0);
  s.lse = s.scratch + 16 * kMmaScoreStride * 4;
  s.delta = s.lse + 16 * blocks * 2 * 4;
  // Rows 16 bytes apart modulo 128 (or 80): ldmatrix's rows in different banks.
  s.dx_stride = 32 * blocks + 16 / kTermBytes;
  s.dx_operand = s.delta + 16 * blocks * 4;
  s.ds_weights = s.dx_operand + (dx ? 2 * kMmaTileRows * s.dx_stride * kTermBytes : 0);
  s.bytes = s.ds_weights + (du ? 2 * 16 * Rows::kWeightStride * kTermBytes : 0);
  return s;
}

ATTNPOOL_HOST_DEVICE inline uint32_t bf16_pair_bits(float first, float second) {
  return static_cast<uint32_t>(c10::BFloat16(first).x) |
         (static_cast<uint32_t>(c10::BFloat16(second).x) << 16);
}

// Two values of dx, columns col and col + 1 of a row, in x's dtype.
template <typename scalar_t>
ATTNPOOL_DEVICE inline void store_pair(scalar_t* to, float first, float second) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *reinterpret_cast<Pack<float, 2>*>(to) = Pack<float, 2>{{first, second}};
  } else {
    *reinterpret_cast<uint32_t*>(to) = bf16_pair_bits(first, second);
  }
}

// The value the delta prologue stages for out: bfloat16 rows hold out as
// two terms (rows 0..15 hi, 16..31 lo); float32 rows hold out itself in
// rows 0..15 (score_rows splits it into tf32 terms as it splits x) and
// zeros in rows 16..31.
template <typename scalar_t>
ATTNPOOL_DEVICE inline scalar_t out_row_value(float value, int term) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return term == 0 ? value : 0.0f;
  } else {
    return bf16_term(value, term);
  }
}

// k-steps of dx's products per score block (K = 32: p, then ds):
// bfloat16 two of 16, float32 four of 8.
template <typename scalar_t>
constexpr int kDxSteps = kMmaTileRows / MmaRows<scalar_t>::kStep;

// dx's A operand for 16 rows and one score block, [p | ds] as hi and lo
// terms: a[k-step][term] by ldmatrix from `row` (this lane's address in
// the rows, at the block's first column: lane 8 j + i gives row i + 8 (j %
// 2) and the 16 bytes j / 2 of a k-step), which gives bfloat16 and tf32 A
// fragments alike.
template <typename scalar_t>
ATTNPOOL_DEVICE inline void load_dx_rows(
    const typename MmaRows<scalar_t>::Term* row,
    int64_t term_stride,
    uint32_t (&a)[kDxSteps<scalar_t>][2][4]) {
  ATTNPOOL_UNROLL
  for (int step = 0; step < kDxSteps<scalar_t>; ++step) {
    ATTNPOOL_UNROLL
    for (int term = 0; term < 2; ++term) {
      attnpool_ldmatrix_x4<false>(
          a[step][term], row + term * term_stride + step * MmaRows<scalar_t>::kStep);
    }
  }
}

// dx's B operand for 8 columns and one score block, G's columns against p,
// then u's against ds: b[k-step][term], from this lane's first word of the
// column group in G's and u's columns ([Note: tensor-core operands]).
template <typename scalar_t>
ATTNPOOL_DEVICE inline void load_dx_columns(
    const uint32_t* g_words,
    const uint32_t* u_words,
    int64_t term_words,
    uint32_t (&b)[kDxSteps<scalar_t>][2][2]) {
  constexpr int kHalf = kDxSteps<scalar_t> / 2;
  ATTNPOOL_UNROLL
  for (int step = 0; step < kDxSteps<scalar_t>; ++step) {
    const uint32_t* words = (step < kHalf ? g_words : u_words) + (step % kHalf) * 64;
    ATTNPOOL_UNROLL
    for (int term = 0; term < 2; ++term) {
      b[step][term][0] = words[term * term_words];
      b[step][term][1] = words[term * term_words + 1];
    }
  }
}

// acc += [p | ds] . [G; u] for one score block: hi.hi + hi.lo + lo.hi per
// k-step.
template <typename scalar_t>
ATTNPOOL_DEVICE inline void add_dx_products(
    float (&acc)[4],
    const uint32_t (&a)[kDxSteps<scalar_t>][2][4],
    const uint32_t (&b)[kDxSteps<scalar_t>][2][2]) {
  ATTNPOOL_UNROLL
  for (int step = 0; step < kDxSteps<scalar_t>; ++step) {
    mma_of<scalar_t>(acc, a[step][0], b[step][0]);
    mma_of<scalar_t>(acc, a[step][0], b[step][1]);
    mma_of<scalar_t>(acc, a[step][1], b[step][0]);
  }
}

// One (sequence b, piece) per block of kMmaThreads threads, or with the du
// part one (sequence b, piece, score block). kChains: the forward's
// (mma_chains of its MT). u_fragments as the forward's; u_columns,
// grad_fragments and grad_columns laid out by mma_operand_kernel
// (mma_u_operand, mma_grad_operand) in the same score blocks.
template <typename scalar_t, int kChains>
ATTNPOOL_GLOBAL void mma_backward_kernel(
    BackwardParams a,
    const uint32_t* u_fragments,
    const uint32_t* u_columns,
    const uint32_t* grad_fragments,
    const uint32_t* grad_columns,
    MmaBackwardShape shape) {
  using Rows = MmaRows<scalar_t>;
  using Term = typename Rows::Term;
  constexpr bool kTf32 = std::is_same_v<scalar_t, float>;
  constexpr int TR = kMmaTileRows;
  const int64_t Q = a.num_queries;
  const int64_t n = a.num_heads;
  const int64_t d = a.head_dim;
  const int64_t H = a.hidden;
  const int64_t num_scores = Q * n;
  const int64_t score_blocks = mma_groups(Q, shape.nt) * shape.mt;
  const bool with_dx = shape.part != MmaBackwardPart::kDu;
  const bool with_du = shape.part != MmaBackwardPart::kDx;
  const int64_t groups = with_dx ? 1 : score_blocks;
  const BlockInfo info = block_info(a, groups);
  const auto [b, group, rows, tid, lane, warp, num_warps] = info;
  (void)num_warps;
  // This block's score blocks: first_block .. first_block + blocks - 1.
  const int64_t first_block = with_dx ? 0 : group;
  const int64_t blocks = with_dx ? score_blocks : 1;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t first = rows.begin;
  const int64_t last = rows.end;
  const int64_t k_steps = H / Rows::kStep;
  const int64_t col_tiles = H / 16;
  const int64_t column_groups = H / 8;
  const int64_t fragment_block = 2 * k_steps * 32;         // Pack<uint32_t, 4> per score block
  const int64_t column_block = mma_block_words(H, kTf32);  // words per score block
  const int64_t group_words = column_block / (2 * column_groups);  // per column group and term
  const auto* x = static_cast<const scalar_t*>(a.x) + a.row_offset(b, 0);
  auto* dx = static_cast<scalar_t*>(a.dx) + a.flat_row(b, 0) * H;
  const auto* out = static_cast<const float*>(a.out) + b * Q * H;
  // The du partial of this (sequence, piece): the same slot for every score
  // block (none in dx's launch).
  const int64_t slot =
      a.ragged() ? blockIdx.x / groups : b * a.cut.pieces + blockIdx.x % a.cut.pieces;
  float* du = with_du ? static_cast<float*>(a.du_partials) + slot * num_scores * H : nullptr;
  const float scale = static_cast<float>(a.scale);
  const auto* bias =
      a.bias == nullptr ? nullptr : static_cast<const float*>(a.bias) + b * a.seq_len;
  const auto* u_blocks = reinterpret_cast<const Pack<uint32_t, 4>*>(u_fragments) + lane;
  const auto* grad_blocks = reinterpret_cast<const Pack<uint32_t, 4>*>(grad_fragments) +
                            b * score_blocks * fragment_block + lane;
  const uint32_t* grad_cols = grad_columns + b * score_blocks * column_block;
  const auto score_of = [&](int64_t j, int64_t m) {
    return mma_score_of(j, m, shape.mt, shape.nt, Q, n);
  };
  // Score blocks past a group's scores (MT rounded up) hold zeros only and
  // are skipped, block-wide (in du's launch, the whole block).
  const auto empty_block = [&](int64_t j) { return score_of(j, 0) < 0; };
  if (!with_dx && empty_block(first_block)) {
    return;
  }

  const MmaBackwardLayout layout =
      mma_backward_layout<scalar_t>(H, shape.buffers, blocks, shape.part);
  ATTNPOOL_DYNAMIC_SHARED(unsigned char, shared);
  scalar_t* tiles = shared_at<scalar_t>(shared, layout.x_tiles);
  float* sums = shared_at<float>(shared, layout.sums);
  float* scratch = shared_at<float>(shared, layout.scratch);
  float* lse = shared_at<float>(shared, layout.lse);
  float* delta = shared_at<float>(shared, layout.delta);
  Term* dx_operand = shared_at<Term>(shared, layout.dx_operand);
  Term* ds_weights = shared_at<Term>(shared, layout.ds_weights);
  const int64_t dx_term = TR * layout.dx_stride;
  constexpr int kWeightTerm = 16 * Rows::kWeightStride;

  if (with_du) {
    for (int64_t i = tid; i < col_tiles * 2 * 32 * 4; i += kMmaThreads) {
      sums[i] = 0.0f;
    }
  }
  // delta of each score block: rows 0..15 of the first tile hold score s's
  // out (its slice, zeros elsewhere), as out_row_value stages it.
  for (int64_t jj = 0; jj < blocks; ++jj) {
    const int64_t j = first_block + jj;
    if (empty_block(j)) {
      continue;
    }
    for (int64_t i = tid; i < TR * H; i += kMmaThreads) {
      const int r = static_cast<int>(i / H);
      const int64_t col = i % H;
      const int64_t s = score_of(j, r % 16);
      float value = 0.0f;
      if (s >= 0 && col / d == s % n) {
        value = out[(s / n) * H + col];
      }
      tiles[r * layout.x_row + col] = out_row_value<scalar_t>(value, r / 16);
    }
    attnpool_syncthreads();
    float acc[1][kChains][4];
    score_rows<1, kChains>(
        tiles + warp * 8 * layout.x_row,
        layout.x_row,
        grad_blocks + j * fragment_block,
        k_steps,
        lane,
        acc);
    for (int c = 0; c < 4; ++c) {
      scratch[(g + 8 * (c / 2)) * kMmaScoreStride + warp * 8 + 2 * t + c % 2] =
          chain_sum(acc, 0, c);
    }
    attnpool_syncthreads();
    if (tid < 16) {
      const int64_t s = score_of(j, tid);
      const int64_t k = 16 * jj + tid;
      delta[k] = scratch[tid * kMmaScoreStride + tid] + scratch[tid * kMmaScoreStride + 16 + tid];
      lse[2 * k] = 0.0f;
      lse[2 * k + 1] = 0.0f;
      if (s >= 0) {
        const auto* saved = static_cast<const float*>(a.lse) + 2 * (b * num_scores + s);
        lse[2 * k] = saved[0];
        lse[2 * k + 1] = saved[1];
      }
    }
    attnpool_syncthreads();  // the tile and scratch are used again
  }
  for (int64_t tile = first; tile < last; tile += TR) {
    const scalar_t* tile_rows =
        staged_tile(a, x, b, tile, rows, layout.x_row, tiles, shape.buffers);

    for (int64_t jj = 0; jj < blocks; ++jj) {
      const int64_t j = first_block + jj;
      if (empty_block(j)) {
        continue;
      }
      float sacc[1][kChains][4];
      float gacc[1][kChains][4];
      score_rows<1, kChains>(
          tile_rows + warp * 8 * layout.x_row,
          layout.x_row,
          u_blocks + j * fragment_block,
          k_steps,
          lane,
          sacc);
      score_rows<1, kChains>(
          tile_rows + warp * 8 * layout.x_row,
          layout.x_row,
          grad_blocks + j * fragment_block,
          k_steps,
          lane,
          gacc);
      for (int c = 0; c < 4; ++c) {
        const int m = g + 8 * (c / 2);
        const int r = warp * 8 + 2 * t + c % 2;
        const int64_t k = 16 * jj + m;
        const int64_t l = tile + r;
        const bool present = score_of(j, m) >= 0 && l < last && a.attends(b, l);
        float p = 0.0f;
        float ds = 0.0f;
        if (present) {
          const float score = biased_score(scale, chain_sum(sacc, 0, c), bias, l);
          p = attnpool_exp((score - lse[2 * k]) - lse[2 * k + 1]);
          ds = scale * p * (chain_sum(gacc, 0, c) - delta[k]);
        }
        for (int term = 0; term < 2; ++term) {
          if (with_dx) {
            Term* row = dx_operand + term * dx_term + r * layout.dx_stride + 32 * jj;
            row[m] = mma_term<scalar_t>(p, term);
            row[16 + m] = mma_term<scalar_t>(ds, term);
          }
          if (with_du) {
            ds_weights[term * kWeightTerm + m * Rows::kWeightStride + r] =
                mma_term<scalar_t>(ds, term);
          }
        }
      }
    }
    attnpool_syncthreads();

    // dx: 16 columns (two groups of 8) by rows 16 mr.. per warp; for each
    // score block, its weights against G, then its ds against u.
    if (with_dx) {
      // ldmatrix: lane 8 j + i gives row i + 8 (j % 2) and the 16 bytes
      // j / 2 of a k-step.
      const Term* lane_row = dx_operand + (lane % 8 + 8 * ((lane / 8) % 2)) * layout.dx_stride +
                             (16 / static_cast<int>(sizeof(Term))) * (lane / 16);
      for (int64_t cm = warp; cm < col_tiles; cm += kMmaWarps) {
        float acc[2][2][4] = {};  // [mr][half]
        for (int64_t jj = 0; jj < blocks; ++jj) {
          const int64_t j = first_block + jj;
          if (empty_block(j)) {
            continue;
          }
          // A for both row halves, then B for each column group: each
          // loaded once per score block.
          uint32_t rows_operand[2][kDxSteps<scalar_t>][2][4];
          for (int mr = 0; mr < 2; ++mr) {
            load_dx_rows<scalar_t>(
                lane_row + 16 * mr * layout.dx_stride + 32 * jj, dx_term, rows_operand[mr]);
          }
          for (int half = 0; half < 2; ++half) {
            const int64_t words = j * column_block + (2 * cm + half) * group_words + 2 * lane;
            uint32_t columns_operand[kDxSteps<scalar_t>][2][2];
            load_dx_columns<scalar_t>(
                grad_cols + words, u_columns + words, column_groups * group_words, columns_operand);
            for (int mr = 0; mr < 2; ++mr) {
              add_dx_products<scalar_t>(acc[mr][half], rows_operand[mr], columns_operand);
            }
          }
        }
        for (int mr = 0; mr < 2; ++mr) {
          for (int half = 0; half < 2; ++half) {
            const int64_t col = cm * 16 + half * 8 + 2 * t;
            for (int h8 = 0; h8 < 2; ++h8) {
              const int64_t l = tile + 16 * mr + g + 8 * h8;
              if (l < last) {
                // Rows not attended get zeros, not 0 . G (NaN where G is not finite).
                const bool attended = a.attends(b, l);
                const float (&sum)[4] = acc[mr][half];
                store_pair<scalar_t>(
                    dx + l * H + col,
                    attended ? sum[2 * h8] : 0.0f,
                    attended ? sum[2 * h8 + 1] : 0.0f);
              }
            }
          }
        }
      }
    }

    // du += x^T . ds^T: 16 columns by 8 scores per mma (unrolled as the
    // forward's weighted sums).
    if (with_du) {
      ATTNPOOL_UNROLL_BY(2)
      for (int64_t cm = warp; cm < col_tiles; cm += kMmaWarps) {
        uint32_t xa[kMmaRowSteps<scalar_t>][kTf32 ? 2 : 1][4];
        load_columns<scalar_t>(tile_rows + cm * 16, layout.x_row, lane, xa);
        for (int nt = 0; nt < 2; ++nt) {
          auto* slot_sums = reinterpret_cast<Pack<float, 4>*>(sums) + (cm * 2 + nt) * 32 + lane;
          const Pack<float, 4> part = *slot_sums;
          float acc4[4] = {part.v[0], part.v[1], part.v[2], part.v[3]};
          for (int kk = 0; kk < kMmaRowSteps<scalar_t>; ++kk) {
            // B: ds of scores nt * 8 + g (as the forward's weights of queries).
            uint32_t bw[2][2];
            load_weights<scalar_t>(
                ds_weights + (nt * 8 + g) * Rows::kWeightStride, kWeightTerm, kk, t, bw);
            add_products<scalar_t>(acc4, xa[kk], bw);
          }
          *slot_sums = Pack<float, 4>{{acc4[0], acc4[1], acc4[2], acc4[3]}};
        }
      }
    }
  }
  attnpool_syncthreads();

  if (with_du) {
    for (int64_t cm = warp; cm < col_tiles; cm += kMmaWarps) {
      for (int nt = 0; nt < 2; ++nt) {
        const Pack<float, 4> part =
            reinterpret_cast<const Pack<float, 4>*>(sums)[(cm * 2 + nt) * 32 + lane];
        for (int c = 0; c < 4; ++c) {
          const int64_t s = score_of(first_block, nt * 8 + 2 * t + c % 2);
          if (s >= 0) {
            du[s * H + cm * 16 + g + 8 * (c / 2)] = part.v[c];
          }
        }
      }
    }
  }
}

// Score tiles a block needs for 8 NT queries (or Q, if fewer) of n heads,
// rounded up to a count that is instantiated (with_mma_score_tiles); 0 if
// there are too many.
inline int mma_score_tiles(int64_t num_queries, int64_t num_heads, int nt) {
  const int64_t queries = num_queries < 8 * nt ? num_queries : 8 * nt;
  const int64_t tiles = (queries * num_heads + 15) / 16;
  for (int mt : {1, 2, 4, 8, 12, 16}) {
    if (tiles <= mt) {
      return mt;
    }
  }
  return 0;
}

// Calls f(std::integral_constant MT) for mt from mma_score_tiles.
template <typename F>
void with_mma_score_tiles(int mt, F&& f) {
  switch (mt) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 12:
      f(std::integral_constant<int, 12>{});
      break;
    default:
      f(std::integral_constant<int, 16>{});
      break;
  }
}

// [Note: tensor-core operands] u and grad_out enter the products as
// fragments laid out once per call by mma_operand_kernel, so that each lane
// loads its part of a 16 x 16 (A) or 16 x 8 (B) operand with one 16-byte or
// 8-byte load: score blocks of 16 rows (scores) by H columns, each float32
// value as two bfloat16 terms (bf16_term). A block takes 16 H words:
//   A fragments (the scores' U and G): [term][k-step][lane][4], lane 4 g + t
//     holding (row g, columns 2t and 2t + 1 of the k-step), (g + 8, ..),
//     (g, 2t + 8 and 2t + 9), (g + 8, ..);
//   B columns (dx's u and G): [term][H / 8][lane][2], lane 4 g + t holding
//     (rows 2t and 2t + 1, column g of the 8) and (2t + 8 and 2t + 9, g).
// The score blocks are the forward's: for each group of 8 nt queries, its
// score tiles (16 scores each, query * n + head; zeros past the group's),
// mma_score_of. u takes them once; grad_out once per sequence, score s's
// row holding its head's slice of the output's gradient and zeros
// elsewhere.
struct MmaOperand {
  const float* values;  // u [Q * n, H], or grad_out [B, Q, H]
  int64_t num_queries;
  int64_t num_heads;
  int64_t hidden;
  int64_t sequences;  // 1 (u) or B (grad_out)
  int score_tiles;    // per group: the forward's MT
  int nt;             // column tiles of 8 queries per group: the forward's NT
  bool of_grad;
  bool columns;  // B columns instead of A fragments
  bool tf32;     // tf32 layouts (float32 rows)

  ATTNPOOL_HOST_DEVICE int64_t blocks_per_sequence() const {
    return mma_groups(num_queries, nt) * score_tiles;
  }

  ATTNPOOL_HOST_DEVICE int64_t words() const {
    return sequences * blocks_per_sequence() * mma_block_words(hidden, tf32);
  }

  // Row m, column k of block `block`.
  ATTNPOOL_HOST_DEVICE float value(int64_t block, int64_t m, int64_t k) const {
    const int64_t per_sequence = blocks_per_sequence();
    const int64_t s =
        mma_score_of(block % per_sequence, m, score_tiles, nt, num_queries, num_heads);
    if (s < 0) {
      return 0.0f;
    }
    if (!of_grad) {
      return values[s * hidden + k];
    }
    const int64_t b = block / per_sequence;
    const bool own = k / (hidden / num_heads) == s % num_heads;
    return own ? values[(b * num_queries + s / num_heads) * hidden + k] : 0.0f;
  }

  // Word i of the layout.
  ATTNPOOL_HOST_DEVICE uint32_t word(int64_t i) const {
    if (tf32) {
      return tf32_word(i);
    }
    const int64_t block = i / mma_block_words(hidden, false);
    const int64_t r = i % mma_block_words(hidden, false);
    int64_t m0, m1, k0, k1;
    int term;
    if (columns) {
      const int word = static_cast<int>(r % 2);
      const int lane = static_cast<int>((r / 2) % 32);
      const int64_t column = (r / 64) % (hidden / 8) * 8 + lane / 4;
      term = static_cast<int>(r / (64 * (hidden / 8)));
      m0 = 2 * (lane % 4) + 8 * word;
      m1 = m0 + 1;
      k0 = column;
      k1 = column;
    } else {
      const int word = static_cast<int>(r % 4);
      const int lane = static_cast<int>((r / 4) % 32);
      const int64_t k_step = (r / 128) % (hidden / 16);
      term = static_cast<int>(r / (128 * (hidden / 16)));
      m0 = lane / 4 + 8 * (word % 2);
      m1 = m0;
      k0 = 16 * k_step + 2 * (lane % 4) + 8 * (word / 2);
      k1 = k0 + 1;
    }
    return static_cast<uint32_t>(bf16_term(value(block, m0, k0), term).x) |
           (static_cast<uint32_t>(bf16_term(value(block, m1, k1), term).x) << 16);
  }

  // Word i of the tf32 layouts (float32 rows), 32 H words a block:
  //   A fragments: [term][k-step of 8][lane][4], lane 4 g + t holding (row
  //     g, column t), (g + 8, t), (g, t + 4), (g + 8, t + 4) of the k-step;
  //   B columns: [term][H / 8][k-step of 8 rows][lane][2], lane 4 g + t
  //     holding (row t, column g of the 8) and (t + 4, g) of the k-step.
  ATTNPOOL_HOST_DEVICE uint32_t tf32_word(int64_t i) const {
    const int64_t block = i / mma_block_words(hidden, true);
    const int64_t r = i % mma_block_words(hidden, true);
    int64_t m, k;
    int term;
    if (columns) {
      const int word = static_cast<int>(r % 2);
      const int lane = static_cast<int>((r / 2) % 32);
      const int64_t k_step = (r / 64) % 2;
      term = static_cast<int>(r / (128 * (hidden / 8)));
      m = 8 * k_step + lane % 4 + 4 * word;
      k = (r / 128) % (hidden / 8) * 8 + lane / 4;
    } else {
      const int word = static_cast<int>(r % 4);
      const int lane = static_cast<int>((r / 4) % 32);
      const int64_t k_step = (r / 128) % (hidden / 8);
      term = static_cast<int>(r / (128 * (hidden / 8)));
      m = lane / 4 + 8 * (word % 2);
      k = 8 * k_step + lane % 4 + 4 * (word / 2);
    }
    return bits_of(tf32_term(value(block, m, k), term));
  }
};

// Threads per block of mma_operand_kernel, a word each.
constexpr int kMmaOperandThreads = 256;

ATTNPOOL_HOST_DEVICE inline int64_t mma_operand_blocks(const MmaOperand& op) {
  return (op.words() + kMmaOperandThreads - 1) / kMmaOperandThreads;
}

// Word i of op's layout (an MmaOperand) per thread.
template <typename Operand>
ATTNPOOL_GLOBAL void mma_operand_kernel(Operand op, uint32_t* words) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kMmaOperandThreads + threadIdx.x;
  if (i < op.words()) {
    words[i] = op.word(i);
  }
}

// u [Q * n, H] in the forward's score blocks: A fragments (the scores), or
// B columns (dx); tf32 ones for float32 rows.
inline MmaOperand mma_u_operand(
    const float* u,
    int64_t num_queries,
    int64_t num_heads,
    int64_t hidden,
    int score_tiles,
    int nt,
    bool columns,
    bool tf32) {
  return {u, num_queries, num_heads, hidden, 1, score_tiles, nt, false, columns, tf32};
}

// grad_out [B, Q, H] in the forward's score blocks, for each sequence: A
// fragments (dp), or B columns (dx); tf32 ones for float32 rows.
inline MmaOperand mma_grad_operand(
    const float* grad_out,
    int64_t batch,
    int64_t num_queries,
    int64_t num_heads,
    int64_t hidden,
    int score_tiles,
    int nt,
    bool columns,
    bool tf32) {
  return {grad_out, num_queries, num_heads, hidden, batch, score_tiles, nt, true, columns, tf32};
}

// The cut of each of `sequences` sequences (or groups of queries of one)
// for the tensor-core kernels, which run one block of 4 warps per SM
// (shared memory is their limit): pieces for about two waves of `sms` SMs,
// none under two tiles, of whole tiles. The forward and the backward's
// launches cut for different numbers of blocks; with whole tiles a row
// still takes the same place in its tile, and so the same column of the
// scores' mma, in each.
inline PieceCut mma_cut(int64_t sequences, int64_t seq_len, int64_t sms) {
  const PieceCut cut = cut_for_blocks(sequences, seq_len, sms, 2, 2 * kMmaTileRows);
  const int64_t per_piece = (cut.rows_per_piece + kMmaTileRows - 1) / kMmaTileRows * kMmaTileRows;
  return {std::max<int64_t>(1, (seq_len + per_piece - 1) / per_piece), per_piece};
}

// Whether mma_forward_kernel takes this call of scalar_t rows (checked by
// the caller) with nt column tiles of queries, and with how many tiles of x
// in shared memory: 2, 1, or 0 if it does not. It takes whole k-steps and
// pairs of them, heads of whole column tiles, rows of 16-byte chunks, and
// shared memory within `most_shared` bytes.
template <typename scalar_t>
inline int mma_forward_buffers(const PoolInputs& a, int nt, int64_t most_shared) {
  const int mt = mma_score_tiles(a.num_queries, a.num_heads, nt);
  if (a.num_queries * a.num_heads <= 1 || a.hidden < 32 || a.hidden % 32 != 0 ||
      a.head_dim % 16 != 0 || a.x_seq_stride % kMmaChunk<scalar_t> != 0 || a.normalizes() ||
      mt == 0) {
    return 0;
  }
  for (int buffers : {2, 1}) {
    if (mma_shared_layout<scalar_t>(a.hidden, mt, nt, buffers).bytes <= most_shared) {
      return buffers;
    }
  }
  return 0;
}

// The forward's column tiles of queries (nt: 16 queries a group where Q > 8
// and shared memory allows, else 8), score tiles (mt) and tiles of x in
// shared memory for this call (two where they fit, whatever nt); mt == 0 if
// mma_forward_kernel does not take it.
struct MmaForwardShape {
  int mt = 0;
  int nt = 0;
  int buffers = 0;
};

template <typename scalar_t>
inline MmaForwardShape mma_forward_shape(const PoolInputs& a, int64_t most_shared) {
  // Two tiles of x (the next one's copy in flight) before 16 queries a group.
  for (int buffers : {2, 1}) {
    for (int nt = a.num_queries > 8 ? 2 : 1; nt >= 1; --nt) {
      if (mma_forward_buffers<scalar_t>(a, nt, most_shared) >= buffers) {
        return {mma_score_tiles(a.num_queries, a.num_heads, nt), nt, buffers};
      }
    }
  }
  return {};
}

// The score blocks of a call whose forward has this shape.
inline int64_t mma_score_blocks(const PoolInputs& a, const MmaForwardShape& forward) {
  return mma_groups(a.num_queries, forward.nt) * forward.mt;
}

// The shared memory of the backward's launches ([Note: the tensor-core
// backward]): both parts in one with one score block, else the larger of dx's
// and du's.
template <typename scalar_t>
inline int64_t mma_backward_shared_bytes(int64_t hidden, int buffers, int64_t score_blocks) {
  if (score_blocks == 1) {
    return mma_backward_layout<scalar_t>(hidden, buffers, 1, MmaBackwardPart::kBoth).bytes;
  }
  return std::max(
      mma_backward_layout<scalar_t>(hidden, buffers, score_blocks, MmaBackwardPart::kDx).bytes,
      mma_backward_layout<scalar_t>(hidden, buffers, 1, MmaBackwardPart::kDu).bytes);
}

// Whether mma_backward_kernel takes this call (then mma_forward_kernel made
// its forward, in mma_forward_shape's score blocks), and with how many
// tiles of x in shared memory: 2, 1, or 0 if it does not.
template <typename scalar_t>
inline int mma_backward_buffers(const PoolInputs& a, int64_t most_shared) {
  const MmaForwardShape forward = mma_forward_shape<scalar_t>(a, most_shared);
  if (forward.mt == 0) {
    return 0;
  }
  for (int buffers : {2, 1}) {
    if (mma_backward_shared_bytes<scalar_t>(a.hidden, buffers, mma_score_blocks(a, forward)) <=
        most_shared) {
      return buffers;
    }
  }
  return 0;
}

// Calls f(std::integral_constant kChains) with the chains of the forward's mt.
template <typename F>
void with_mma_chains(int mt, F&& f) {
  switch (mma_chains(mt)) {
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    default:
      f(std::integral_constant<int, 1>{});
      break;
  }
}

}  // namespace attnpool::cuda
