#pragma once

// The parameter vocabulary of the kernels (the glossary is csrc/README.md):
// plain data that the CPU kernels, the CUDA kernels and the emulated CUDA
// tests all read. Each struct builds on the one before it, as
// flash-attention's flash.h does:
//
//   PoolShape -> PoolInputs -> ForwardParams -> BackwardParams   (pooling)
//                                            -> JvpParams        (forward-mode AD)
//   FoldShape -> FoldParams -> FoldBackwardParams                (the fold)
//   SoftmaxParams                                                (the projection path's softmax)
//
// The entry points (ops/cpu/*_kernel.cpp, ops/cuda/*_kernel.cu) fill them
// from checked tensors; the kernels only compute. Nothing here depends on
// ATen, so CUDA device code includes it too.

#include <cstdint>

#if defined(__CUDACC__)
#define ATTNPOOL_PARAMS_FN __host__ __device__
#else
#define ATTNPOOL_PARAMS_FN
#endif

namespace attnpool {

// Rows [begin, end) of whatever was cut.
struct RowRange {
  int64_t begin;
  int64_t end;

  ATTNPOOL_PARAMS_FN bool empty() const {
    return end <= begin;
  }
};

// [Note: rows per piece] A piece's softmax sum adds one term in (0, 1] per
// row, and its weighted sums a multiple of each row, one after another in
// float32 for float32 and 16-bit rows. Each addition rounds at the scale of
// the sum so far, and terms of one size round alike: 2^18 rows whose terms
// were 0.7 left log(sum) 2.6e-3 off, and past 2^24 terms of 1 the sum stops
// growing (2^25 equal scores pooled to twice their mean). So the forward
// cuts no piece longer than this, whatever the batch: the pieces' states
// merge in order, one rounding per piece. Shorter pieces would round less
// but merge more often; at most 4096 rows left every benchmark shape as
// it was cut.
constexpr int64_t kMaxForwardPieceRows = 4096;

// A cut of `rows` consecutive rows into pieces of rows_per_piece rows (the
// last one may be shorter). Every cut depends on the shape only, never on the
// number of threads, so that results are bitwise the same for any count.
struct PieceCut {
  int64_t pieces;          // >= 1
  int64_t rows_per_piece;  // >= 1

  // About `wanted` pieces of `rows` rows, none empty, and none of more than
  // most_rows rows.
  static PieceCut into(int64_t rows, int64_t wanted, int64_t most_rows = INT64_MAX) {
    const int64_t want = wanted < 1 ? 1 : wanted;
    int64_t per_piece = (rows + want - 1) / want;
    per_piece = per_piece > most_rows ? most_rows : per_piece;
    per_piece = per_piece < 1 ? 1 : per_piece;
    const int64_t pieces = (rows + per_piece - 1) / per_piece;
    return {pieces < 1 ? 1 : pieces, per_piece};
  }

  // The rows of piece p; `rows` is the length of what was cut.
  ATTNPOOL_PARAMS_FN RowRange piece(int64_t p, int64_t rows) const {
    const int64_t begin = p * rows_per_piece;
    const int64_t end = begin + rows_per_piece;
    return {begin < rows ? begin : rows, end < rows ? end : rows};
  }
};

// Sizes of one pooling call as the kernels see it. A score s = i * num_heads
// + h is one (query i, head h) pair; its pooled vector is head h's slice of
// head_dim columns. Full-width pooling reaches the kernels as num_queries *
// num_heads one-head queries with head_dim = hidden (see
// ops/folded_attention_pool.cpp), so the kernels know one mode only.
struct PoolShape {
  int64_t batch;        // B
  int64_t seq_len;      // L
  int64_t hidden;       // H, elements in a row of x
  int64_t num_queries;  // Q
  int64_t num_heads;    // n
  int64_t head_dim;     // d = H / n

  ATTNPOOL_PARAMS_FN int64_t num_scores() const {
    return num_queries * num_heads;
  }

  // Values in the CPU forward's online-softmax state of one (piece of a)
  // sequence (ops/cpu/isa/forward.h's SoftmaxState): the weighted sums
  // (num_scores * head_dim), whether any row was attended, the running max
  // and sum of each score; rounded up to 16 values, so that in the
  // partials buffer each piece's weighted sums start on a cache line.
  ATTNPOOL_PARAMS_FN int64_t softmax_state_size() const {
    return (num_scores() * head_dim + 1 + 2 * num_scores() + 15) / 16 * 16;
  }
};

// Where the inputs are. x: [B, L, H] with contiguous rows (strides in
// elements); mask: [B, L] bool (true = attend) or null; u: [num_scores, H]
// contiguous, in the accumulation dtype; bias: [B, L] contiguous, in the
// accumulation dtype, or null. A row's score is scale * (x . u) + bias,
// rounded after the product and after the sum, in the forward and the
// backward alike. (A -inf bias is folded into the mask by the entry points.)
//
// A ragged batch (SPEC.md §6) has x [T, H] and seq_offsets [B + 1] (int64,
// cu_seqlens): sequence b is rows seq_offsets[b] .. seq_offsets[b + 1] - 1,
// seq_len is T, and there is no mask or bias. seq_offsets is null for a
// dense batch. The kernels reach rows through rows_of, row_offset and
// flat_row only, so they serve both.
//
// norm_weight, norm_bias: [H] in the accumulation dtype, or both null. When
// set, the kernels pool y = layer_norm(x) (mean and variance over each row,
// norm_eps added to the variance, then weight and bias) in place of x,
// rounded to x's dtype: open_clip's ln_k in the pooling pass (CPU only; see
// ops/cpu/isa/layer_norm.h).
struct PoolInputs : PoolShape {
  const void* x;
  int64_t x_batch_stride;
  int64_t x_seq_stride;
  const bool* mask;
  int64_t mask_batch_stride;
  int64_t mask_seq_stride;
  const void* u;
  double scale;
  const void* bias;
  const int64_t* seq_offsets;
  const void* norm_weight;
  const void* norm_bias;
  double norm_eps;

  ATTNPOOL_PARAMS_FN bool normalizes() const {
    return norm_weight != nullptr;
  }
  ATTNPOOL_PARAMS_FN bool ragged() const {
    return seq_offsets != nullptr;
  }
  // Rows in sequence b: L, or its own length.
  ATTNPOOL_PARAMS_FN int64_t rows_of(int64_t b) const {
    return ragged() ? seq_offsets[b + 1] - seq_offsets[b] : seq_len;
  }
  ATTNPOOL_PARAMS_FN bool attends(int64_t b, int64_t l) const {
    return mask == nullptr || mask[b * mask_batch_stride + l * mask_seq_stride];
  }
  // Where row l of sequence b starts in x, in elements.
  ATTNPOOL_PARAMS_FN int64_t row_offset(int64_t b, int64_t l) const {
    return ragged() ? (seq_offsets[b] + l) * x_seq_stride : b * x_batch_stride + l * x_seq_stride;
  }
  // The index of row l of sequence b among all B * L (or T) rows, as in dx.
  ATTNPOOL_PARAMS_FN int64_t flat_row(int64_t b, int64_t l) const {
    return ragged() ? seq_offsets[b] + l : b * seq_len + l;
  }
  // The sequence that flat row `row` (< B * L, or < T) belongs to.
  ATTNPOOL_PARAMS_FN int64_t sequence_of(int64_t row) const {
    if (!ragged()) {
      return row / seq_len;
    }
    // The last b with seq_offsets[b] <= row: sequences before it end at or
    // before row, and empty ones are skipped.
    int64_t lo = 0;
    int64_t hi = batch;
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      (seq_offsets[mid] <= row ? lo : hi) = mid;
    }
    return lo;
  }
};

// The forward, in the accumulation dtype: out [B, num_scores, head_dim] (the
// op's [B, Q, H]), lse [B, num_scores, 2]: the log-sum-exp of each score's
// softmax in two parts, the running max and log(sum of exp(score - max)).
// Kept apart because max + log(sum) rounds to max when the max is huge (a
// row whose every score got attn_bias = finfo.min), and the backward's p
// would then be 1 instead of 1/sum. `cut` cuts each sequence into pieces
// that run in parallel; with more than one piece each piece's online-softmax
// state goes to `partials` and the pieces are merged in order afterwards
// (flash-decoding). The CPU keeps one state per (sequence, piece), the CUDA
// kernels one per (sequence, query, piece); each device's entry point sizes it.
//
// A ragged batch cuts each sequence into pieces of cut.rows_per_piece rows
// (cut.pieces is unused): sequence b's pieces are the work items
// first_piece[b] .. first_piece[b + 1] - 1 ([B + 1], at least one each, so
// an empty sequence still gets its zeros). Sequences of any length then make
// work items of about one size: one long sequence among short ones spreads
// over many threads instead of serialising on one.
struct SequencePiece {
  int64_t b;
  int64_t piece;  // of sequence b
  RowRange rows;  // of sequence b
};

struct ForwardParams : PoolInputs {
  PieceCut cut;
  const int64_t* first_piece;  // ragged only
  void* out;
  void* lse;
  void* partials;
  // CPU only: whether x fits the last-level cache, where the kernels read
  // float rows a tile at a time (kReadsRowByRow in ops/cpu/isa/vec_helpers.h).
  bool x_fits_cache = false;
  // CPU only: the size of L1's data cache, 0 where it is not known
  // (next_tile_in_l2 in ops/cpu/isa/forward.h).
  int64_t l1_data_bytes = 0;

  ATTNPOOL_PARAMS_FN int64_t pieces_of(int64_t b) const {
    return ragged() ? first_piece[b + 1] - first_piece[b] : cut.pieces;
  }
  // Work items: one per piece of every sequence.
  ATTNPOOL_PARAMS_FN int64_t work_items() const {
    return ragged() ? first_piece[batch] : batch * cut.pieces;
  }
  ATTNPOOL_PARAMS_FN int64_t item_of(int64_t b, int64_t piece) const {
    return ragged() ? first_piece[b] + piece : b * cut.pieces + piece;
  }
  ATTNPOOL_PARAMS_FN SequencePiece work_item(int64_t item) const {
    int64_t b = 0;
    if (!ragged()) {
      b = item / cut.pieces;
    } else {
      // The last b with first_piece[b] <= item (every sequence has a piece).
      int64_t hi = batch;
      while (hi - b > 1) {
        const int64_t mid = b + (hi - b) / 2;
        (first_piece[mid] <= item ? b : hi) = mid;
      }
    }
    const int64_t piece = item - item_of(b, 0);
    return {b, piece, cut.piece(piece, rows_of(b))};
  }
};

// The backward reads grad_out [B, num_scores, head_dim] and the forward's out
// and lse (accumulation dtype) and writes dx ([B, L, H] contiguous, x's dtype)
// and du [num_scores, H]. Each piece of rows adds into its own du partial
// [pieces, num_scores, H], summed in piece order: no atomics, bitwise
// repeatable. The CUDA kernels use the inherited `cut` (pieces of each
// sequence); the CPU kernels cut all B * L rows at once (`flat_cut`), so that
// many short sequences do not make many partials.
struct BackwardParams : ForwardParams {
  const void* grad_out;
  void* dx;
  void* du_partials;
  void* du;
  // CPU only: delta [B, num_scores] workspace, the flat cut, whether dx
  // is written with non-temporal stores (dx whose rows are 64-byte aligned
  // and whose pages are already backed), and whether dx starts as zeros
  // (then rows that are not attended are not written).
  void* delta;
  PieceCut flat_cut;
  bool stream_dx;
  bool dx_zeroed;
  // With a norm (PoolInputs::normalizes): the gradients of its weight and
  // bias [2, H], and their partials [flat_cut.pieces, 2, H], summed in piece
  // order like du's.
  void* norm_partials;
  void* norm_grads;
};

// The forward-mode derivative (jvp) reads the forward's out and lse
// (accumulation dtype, through the inherited pointers) and the tangents:
// x_tangent laid out as x (same strides), u_tangent [num_scores, H] and
// bias_tangent [B, L], both contiguous in the accumulation dtype; each may be
// null. It writes the output's tangent [B, num_scores, head_dim]
// (accumulation dtype). Work items and `partials` are the forward's, a
// piece's partial being its weighted sums of x and of x_tangent and its
// weight totals ([num_scores * (2 * head_dim + 1)]), added in piece order.
struct JvpParams : ForwardParams {
  const void* x_tangent;
  const void* u_tangent;
  const void* bias_tangent;
  void* tangent;
};

// Sizes of the fold u[i, h] = w_k[D_h].T @ (w_q @ query[i] + q_bias)[D_h]
// (SPEC.md §5); D_h is head h's proj_dim / num_heads rows of w_q and w_k.
// Each head's rows are cut into head_cut.pieces pieces; one task per (head,
// piece), task = h * head_cut.pieces + piece.
struct FoldShape {
  int64_t num_queries;  // Q
  int64_t query_dim;    // Hq: width of a query and of w_q's rows
  int64_t proj_dim;     // E: rows of w_q and w_k
  int64_t x_dim;        // Hx: width of w_k's rows and of u
  int64_t num_heads;    // n
  PieceCut head_cut;    // of the E / n rows of each head

  int64_t tasks() const {
    return num_heads * head_cut.pieces;
  }
};

// How w_q and w_k are stored: in the accumulation dtype, or both as 16-bit
// floats that the fold widens as it reads them (exactly: the same u).
enum class FoldWeights : int8_t { kAcc, kBFloat16, kHalf };

// Contiguous, in the accumulation dtype but for the weights (`weights`):
// query [Q, Hq], w_q [E, Hq], w_k [E, Hx], q_bias [E] or null. Writes
// projected = w_q @ query + q_bias [Q, E] and u [Q * n, Hx]; partials
// [head_cut.pieces, Q * n, Hx] when a head has more than one piece.
struct FoldParams : FoldShape {
  FoldWeights weights;
  const void* query;
  const void* w_q;
  const void* w_k;
  const void* q_bias;
  void* projected;
  void* u;
  void* partials;
};

// The fold's backward from grad_u [Q * n, Hx], reading projected as the
// forward wrote it: grad_query [Q, Hq], grad_w_q [E, Hq], grad_w_k [E, Hx],
// grad_q_bias [E]; partials [tasks, Q, Hq] of grad_query when there is more
// than one task.
struct FoldBackwardParams : FoldParams {
  const void* grad_u;
  void* grad_query;
  void* grad_w_q;
  void* grad_w_k;
  void* grad_q_bias;
};

// The softmax of rows of scores (the projection path's,
// ops/softmax_without_subnormals.cpp): `rows` rows of `width` contiguous
// scores in, their weights out, in the accumulation dtype.
struct SoftmaxParams {
  const void* scores;
  void* weights;
  int64_t rows;
  int64_t width;
};

}  // namespace attnpool
