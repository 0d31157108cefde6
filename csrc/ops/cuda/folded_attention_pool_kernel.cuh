#pragma once

// Device code of folded_attention_pool's CUDA kernels. The entry points
// (checks, allocation, launch) are in folded_attention_pool_kernel.cu; the
// kernels read the params of ops/pool_params.h, as the CPU kernels do.
//
// The code only uses what cuda_compat.h provides, so that the same source is
// also compiled for the CPU by tests/cpp/test_cuda_kernels_emulated.cpp,
// which runs every thread of a block as a host thread. That test checks the
// indexing, reductions and synchronisation on machines without a GPU.

#include "ops/cuda/cuda_compat.h"
#include "ops/pool_params.h"

#include <algorithm>
#include <cstdint>

namespace attnpool::cuda {

// Rows of x handled together between two block-wide reductions.
constexpr int kTileRows = 4;

// [Note: pieces for the blocks] A block streams its rows one tile at a
// time with block-wide reductions in between, so the GPU's bandwidth is
// reached by many blocks at once, not by long pieces (on an H200, 256-row
// pieces left BERT-base's 32 sequences on 64 blocks and the forward at a
// tenth of x.sum()'s speed). So the entry points cut each sequence into
// pieces for about kBlocksPerSm blocks per SM, each piece at least
// kMinTilesPerPiece tiles long. The choice depends on the shape and the
// device only, so repeated runs give bitwise identical results.
constexpr int64_t kBlocksPerSm = 8;
constexpr int64_t kMinTilesPerPiece = 8;

// The cut of each of `sequences` sequences of seq_len rows for a kernel with
// a block per (sequence, piece): pieces for about blocks_per_sm blocks on
// each of `sms` SMs, none under min_piece_rows rows unless the sequence is,
// none over kMaxForwardPieceRows.
inline PieceCut cut_for_blocks(
    int64_t sequences,
    int64_t seq_len,
    int64_t sms,
    int64_t blocks_per_sm,
    int64_t min_piece_rows) {
  const int64_t count = sequences < 1 ? 1 : sequences;
  const int64_t wanted = (blocks_per_sm * sms + count - 1) / count;
  const int64_t most = std::max<int64_t>(1, (seq_len + min_piece_rows - 1) / min_piece_rows);
  return PieceCut::into(seq_len, std::clamp<int64_t>(wanted, 1, most), kMaxForwardPieceRows);
}

// The CUDA block size is between 128 and 1024 threads.
constexpr int kMaxWarps = 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in a 16-byte Pack, the widest load a thread makes.
template <typename T>
constexpr int kPackWidth = 16 / static_cast<int>(sizeof(T));

// Shared-memory floats the forward and backward kernels need (the launcher
// allocates this many bytes of dynamic shared memory).
template <typename acc_t>
ATTNPOOL_HOST_DEVICE inline int64_t forward_shared_bytes(int64_t num_warps, int64_t num_heads) {
  return static_cast<int64_t>(sizeof(acc_t)) *
         ((num_warps + 2) * num_heads * kTileRows + 3 * num_heads + 1);
}

template <typename acc_t>
ATTNPOOL_HOST_DEVICE inline int64_t backward_shared_bytes(
    int64_t num_warps, int64_t num_heads, int64_t num_scores) {
  return static_cast<int64_t>(sizeof(acc_t)) *
         (2 * (num_warps + 1) * num_heads * kTileRows + num_scores);
}

// Sum over the 32 lanes of a warp; every lane gets the total.
template <typename T>
ATTNPOOL_DEVICE inline T warp_sum(T value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += attnpool_shfl_xor(value, offset);
  }
  return value;
}

// Which columns a thread owns: chunks of VEC consecutive elements, chunk
// threadIdx.x + j * blockDim.x for j < CHUNKS, so that a warp's loads of a
// row are consecutive 16-byte vectors (coalesced).
template <int VEC>
ATTNPOOL_DEVICE inline int64_t chunk_column(int j) {
  return (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(j) * blockDim.x) * VEC;
}

// Where a CUDA block works, from blockIdx.x: block = (b * groups + group) *
// pieces + piece, the rows of piece `piece` of sequence b (`cut` of each
// sequence). The forward has one group per query, the backward one group.
// A ragged batch has block = item * groups + group for its work items
// (ForwardParams::first_piece); the grid is sized for the most items its T
// rows can make, and a block past the last item gets no rows (it stores an
// empty state or a zero du partial, which nothing or only the sum reads).
// Also this thread's place in its warp.
struct BlockInfo {
  int64_t b;
  int64_t group;
  RowRange rows;
  int tid;
  int lane;
  int warp;
  int num_warps;
};

template <typename Params>
ATTNPOOL_DEVICE inline BlockInfo block_info(const Params& a, int64_t groups) {
  const int64_t block = blockIdx.x;
  BlockInfo info;
  if (a.ragged()) {
    const int64_t item = block / groups;
    info.group = block % groups;
    info.b = 0;
    info.rows = RowRange{0, 0};
    if (item < a.work_items()) {
      const SequencePiece work = a.work_item(item);
      info.b = work.b;
      info.rows = work.rows;
    }
  } else {
    const int64_t sequence_group = block / a.cut.pieces;
    info.b = sequence_group / groups;
    info.group = sequence_group % groups;
    info.rows = a.cut.piece(block % a.cut.pieces, a.seq_len);
  }
  info.tid = threadIdx.x;
  info.lane = info.tid % 32;
  info.warp = info.tid / 32;
  info.num_warps = (blockDim.x + 31) / 32;
  return info;
}

// The block-wide sums of R values per thread, in two steps around a barrier:
// each warp sums its lanes' parts into partial[r] (partial: this warp's
// slot), then sum_over_warps adds the warps' sums in warp order.
//
// The warp's sums halve the values at each of the first log2(R) steps of the
// butterfly (offsets 16, 8, ...): a lane keeps half of its values, the half
// its partner sends away, so R values take R - 1 + 5 - log2(R) shuffles
// instead of 5 R (R = 4: 6 instead of 20). Each value is still summed over
// the butterfly's pairs of lanes, own value first, so its total has the bits
// of warp_sum's (IEEE addition commutes): the backward's sums, made here
// too, still match the forward's.
template <int R, typename acc_t>
ATTNPOOL_DEVICE inline void store_warp_sums(const acc_t (&part)[R], acc_t* partial, int lane) {
  static_assert(R >= 1 && R <= 32 && (R & (R - 1)) == 0, "R is a power of two up to 32");
  acc_t values[R];
  for (int r = 0; r < R; ++r) {
    values[r] = part[r];
  }
  int offset = 16;
  int index = 0;  // which of the R values this lane's values[0] ends up holding
  for (int half = R / 2; half >= 1; half /= 2, offset /= 2) {
    const bool upper = (lane & offset) != 0;
    for (int k = 0; k < half; ++k) {
      const acc_t kept = upper ? values[half + k] : values[k];
      const acc_t sent = upper ? values[k] : values[half + k];
      values[k] = kept + attnpool_shfl_xor(sent, offset);
    }
    index += upper ? half : 0;
  }
  acc_t total = values[0];
  for (; offset > 0; offset /= 2) {
    total += attnpool_shfl_xor(total, offset);
  }
  // Lanes 0, 32 / R, 2 * 32 / R, ... hold values 0, 1, 2, ...
  if (lane % (32 / R) == 0) {
    partial[index] = total;
  }
}

// sum over w < num_warps of partial[w * warp_stride + index], in warp order.
template <typename acc_t>
ATTNPOOL_DEVICE inline acc_t sum_over_warps(
    const acc_t* partial, int num_warps, int64_t warp_stride, int64_t index) {
  acc_t total = acc_t(0);
  for (int w = 0; w < num_warps; ++w) {
    total += partial[w * warp_stride + index];
  }
  return total;
}

template <typename scalar_t, int VEC>
ATTNPOOL_DEVICE inline Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

template <typename scalar_t, int VEC>
ATTNPOOL_DEVICE inline void store_pack(scalar_t* p, const Pack<scalar_t, VEC>& v) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = v;
}

// Rows tile .. tile + kTileRows - 1 of sequence b as stored, this thread's
// columns; present[r] is false (and packs[r] not loaded) for rows past `last`
// or masked out.
template <typename scalar_t, int VEC, int CHUNKS>
struct FetchedTile {
  bool present[kTileRows];
  Pack<scalar_t, VEC> packs[kTileRows][CHUNKS];
};

template <typename scalar_t, int VEC, int CHUNKS, typename Args>
ATTNPOOL_DEVICE inline void fetch_tile(
    const Args& a,
    const scalar_t* x,
    int64_t b,
    int64_t tile,
    int64_t last,
    FetchedTile<scalar_t, VEC, CHUNKS>& fetched) {
  for (int r = 0; r < kTileRows; ++r) {
    const int64_t l = tile + r;
    fetched.present[r] = l < last && a.attends(b, l);
    for (int j = 0; j < CHUNKS; ++j) {
      const int64_t col = chunk_column<VEC>(j);
      if (fetched.present[r] && col < a.hidden) {
        fetched.packs[r][j] = load_pack<scalar_t, VEC>(x + l * a.x_seq_stride + col);
      }
    }
  }
}

// A fetched tile in the accumulation dtype, zeros for rows not present and
// columns past H.
template <typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_DEVICE inline void widen_tile(
    const FetchedTile<scalar_t, VEC, CHUNKS>& fetched,
    int64_t hidden,
    bool (&present)[kTileRows],
    attnpool_opmath_t<scalar_t> (&xs)[kTileRows][CHUNKS][VEC]) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  for (int r = 0; r < kTileRows; ++r) {
    present[r] = fetched.present[r];
    for (int j = 0; j < CHUNKS; ++j) {
      const bool loaded = present[r] && chunk_column<VEC>(j) < hidden;
      for (int v = 0; v < VEC; ++v) {
        xs[r][j][v] = loaded ? static_cast<acc_t>(fetched.packs[r][j].v[v]) : acc_t(0);
      }
    }
  }
}

// Row l's score as the forward and the backward both make it: scale * sum
// rounded on its own (never fused into an FMA), then the bias of row l added
// when there is one (bias points at sequence b's [L] biases, or is null).
template <typename acc_t>
ATTNPOOL_DEVICE inline acc_t biased_score(acc_t scale, acc_t sum, const acc_t* bias, int64_t l) {
  const acc_t scaled = attnpool_mul_rn(scale, sum);
  return bias == nullptr ? scaled : scaled + bias[l];
}

// One (sequence b, query i, piece of the sequence) per block. Threads split
// the columns; a tile of kTileRows rows is scored with one block reduction
// per head, then folded into the online softmax (running max, sum, and the
// weighted sum of x kept in registers).
template <typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_GLOBAL void forward_kernel(ForwardParams a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  constexpr int R = kTileRows;
  const BlockInfo info = block_info(a, a.num_queries);
  const auto [b, i, rows, tid, lane, warp, num_warps] = info;
  const int64_t first = rows.begin;
  const int64_t last = rows.end;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  const int64_t d = a.head_dim;
  const int64_t block = blockIdx.x;
  const auto* x = static_cast<const scalar_t*>(a.x) + a.row_offset(b, 0);
  const auto* u = static_cast<const acc_t*>(a.u) + i * n * H;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const auto* bias =
      a.bias == nullptr ? nullptr : static_cast<const acc_t*>(a.bias) + b * a.seq_len;

  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);
  acc_t* partial_scores = shared;                      // [num_warps][n][R]
  acc_t* scores = partial_scores + num_warps * n * R;  // [n][R]
  acc_t* weights = scores + n * R;                     // [n][R]
  acc_t* correction = weights + n * R;                 // [n]
  acc_t* run_max = correction + n;                     // [n]
  acc_t* run_sum = run_max + n;                        // [n]
  acc_t* any_valid = run_sum + n;                      // [1]
  for (int64_t h = tid; h < n; h += blockDim.x) {
    run_max[h] = -attnpool_infinity<acc_t>();
    run_sum[h] = acc_t(0);
  }
  if (tid == 0) {
    any_valid[0] = acc_t(0);
  }

  acc_t acc[CHUNKS][VEC];
  for (int j = 0; j < CHUNKS; ++j) {
    for (int v = 0; v < VEC; ++v) {
      acc[j][v] = acc_t(0);
    }
  }
  attnpool_syncthreads();

  FetchedTile<scalar_t, VEC, CHUNKS> fetched;
  if (first < last) {
    fetch_tile<scalar_t, VEC, CHUNKS>(a, x, b, first, last, fetched);
  }
  for (int64_t tile = first; tile < last; tile += R) {
    bool present[R];
    acc_t xs[R][CHUNKS][VEC];
    widen_tile<scalar_t, VEC, CHUNKS>(fetched, H, present, xs);
    // The next tile's loads are issued here, so that they are in flight
    // during this tile's reductions and barriers (the block's rows are read
    // one tile after another, and a tile alone keeps too few bytes in flight).
    if (tile + R < last) {
      fetch_tile<scalar_t, VEC, CHUNKS>(a, x, b, tile + R, last, fetched);
    }
    for (int64_t h = 0; h < n; ++h) {
      acc_t part[R];
      for (int r = 0; r < R; ++r) {
        part[r] = acc_t(0);
      }
      for (int j = 0; j < CHUNKS; ++j) {
        const int64_t col = chunk_column<VEC>(j);
        if (col < H) {
          for (int v = 0; v < VEC; ++v) {
            const acc_t uv = u[h * H + col + v];
            for (int r = 0; r < R; ++r) {
              part[r] = attnpool_fma(xs[r][j][v], uv, part[r]);
            }
          }
        }
      }
      store_warp_sums(part, partial_scores + (warp * n + h) * R, lane);
    }
    attnpool_syncthreads();
    for (int64_t idx = tid; idx < n * R; idx += blockDim.x) {
      const int r = static_cast<int>(idx % R);
      const acc_t sum = sum_over_warps(partial_scores, num_warps, n * R, idx);
      // (Rows not present are never weighed; their bias may lie past L.)
      scores[idx] = biased_score(scale, sum, present[r] ? bias : nullptr, tile + r);
    }
    attnpool_syncthreads();
    // One thread per head updates that head's running max and sum, exactly
    // as the CPU kernel does for a block of rows.
    for (int64_t h = tid; h < n; h += blockDim.x) {
      acc_t block_max = -attnpool_infinity<acc_t>();
      for (int r = 0; r < R; ++r) {
        const acc_t s = scores[h * R + r];
        block_max = present[r] && s > block_max ? s : block_max;
      }
      acc_t c = acc_t(1);
      if (block_max > run_max[h]) {
        c = attnpool_exp(run_max[h] - block_max);
        run_sum[h] *= c;
        run_max[h] = block_max;
      }
      correction[h] = c;
      for (int r = 0; r < R; ++r) {
        const acc_t s = scores[h * R + r];
        const acc_t w = !present[r] || s == -attnpool_infinity<acc_t>()
                            ? acc_t(0)
                            : attnpool_exp(s - run_max[h]);
        weights[h * R + r] = w;
        run_sum[h] += w;
      }
    }
    if (tid == 0) {
      for (int r = 0; r < R; ++r) {
        if (present[r]) {
          any_valid[0] = acc_t(1);
        }
      }
    }
    attnpool_syncthreads();
    for (int j = 0; j < CHUNKS; ++j) {
      const int64_t col = chunk_column<VEC>(j);
      if (col < H) {
        for (int v = 0; v < VEC; ++v) {
          const int64_t h = (col + v) / d;
          acc_t value = acc[j][v] * correction[h];
          for (int r = 0; r < R; ++r) {
            value += weights[h * R + r] * xs[r][j][v];
          }
          acc[j][v] = value;
        }
      }
    }
  }
  attnpool_syncthreads();

  const bool valid = any_valid[0] != acc_t(0);
  if (!a.ragged() && a.cut.pieces == 1) {
    auto* out = static_cast<acc_t*>(a.out) + (b * a.num_queries + i) * H;
    for (int j = 0; j < CHUNKS; ++j) {
      const int64_t col = chunk_column<VEC>(j);
      if (col < H) {
        for (int v = 0; v < VEC; ++v) {
          const int64_t h = (col + v) / d;
          out[col + v] = valid ? acc[j][v] / run_sum[h] : acc_t(0);
        }
      }
    }
    auto* lse = static_cast<acc_t*>(a.lse) + 2 * (b * a.num_queries + i) * n;
    for (int64_t h = tid; h < n; h += blockDim.x) {
      lse[2 * h] = valid ? run_max[h] : -attnpool_infinity<acc_t>();
      lse[2 * h + 1] = valid ? attnpool_log(run_sum[h]) : acc_t(0);
    }
    return;
  }
  // Several pieces (or a ragged batch): store this one's state, merged later
  // in piece order (merge_pieces_kernel finds it at merge_slots).
  const int64_t record = 1 + 2 * n + H;
  acc_t* state = static_cast<acc_t*>(a.partials) + block * record;
  if (tid == 0) {
    state[0] = valid ? acc_t(1) : acc_t(0);
  }
  for (int64_t h = tid; h < n; h += blockDim.x) {
    state[1 + h] = run_max[h];
    state[1 + n + h] = run_sum[h];
  }
  for (int j = 0; j < CHUNKS; ++j) {
    const int64_t col = chunk_column<VEC>(j);
    if (col < H) {
      for (int v = 0; v < VEC; ++v) {
        state[1 + 2 * n + col + v] = acc[j][v];
      }
    }
  }
}

// The merge of pieces and the reduction of du's partials give each CUDA block
// kStripeColumns consecutive columns (a warp's width, so that a warp's loads
// are one contiguous run) and split its threads into stripes over the pieces:
// thread t is column t % kStripeColumns of stripe t / kStripeColumns.
constexpr int kStripeColumns = 32;

struct StripePlace {
  int stripes;
  int column;
  int stripe;
};

ATTNPOOL_DEVICE inline StripePlace stripe_place() {
  return {
      static_cast<int>(blockDim.x) / kStripeColumns,
      static_cast<int>(threadIdx.x) % kStripeColumns,
      static_cast<int>(threadIdx.x) / kStripeColumns};
}

// Merging the pieces of each (b, i): out and lse. Column c < H is out's, H + h
// head h's two parts of the log-sum-exp. A CUDA block takes kStripeColumns columns of one (b, i);
// its threads form merge_threads(pieces) / kStripeColumns stripes, and stripe t reads pieces t, t +
// stripes, ... so that a long sequence cut into a thousand pieces is not merged one piece after
// another. Stripes are combined in stripe order: the launch depends on the shape only, so the
// result is bitwise repeatable.
constexpr int kMaxMergeStripes = 32;

ATTNPOOL_HOST_DEVICE inline int64_t merge_blocks_per_row(int64_t hidden, int64_t num_heads) {
  return (hidden + num_heads + kStripeColumns - 1) / kStripeColumns;
}

ATTNPOOL_HOST_DEVICE inline int merge_threads(int64_t pieces) {
  return kStripeColumns * static_cast<int>(pieces < kMaxMergeStripes ? pieces : kMaxMergeStripes);
}

template <typename acc_t>
ATTNPOOL_HOST_DEVICE inline int64_t merge_shared_bytes(int64_t threads) {
  return static_cast<int64_t>(sizeof(acc_t)) * 2 * threads;
}

// Where the forward blocks of (sequence b, query i) stored their states: the
// first slot of partials, the distance between two pieces in slots, and how
// many pieces (the block index is the slot, see block_info).
struct MergeSlots {
  int64_t first;
  int64_t stride;
  int64_t pieces;
};

ATTNPOOL_DEVICE inline MergeSlots merge_slots(const ForwardParams& a, int64_t b, int64_t i) {
  if (a.ragged()) {
    return {a.item_of(b, 0) * a.num_queries + i, a.num_queries, a.pieces_of(b)};
  }
  return {(b * a.num_queries + i) * a.cut.pieces, 1, a.cut.pieces};
}

template <typename scalar_t>
ATTNPOOL_GLOBAL void merge_pieces_kernel(ForwardParams a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  const auto [stripes, column, stripe] = stripe_place();
  const int64_t per_row = merge_blocks_per_row(H, n);
  const int64_t bi = blockIdx.x / per_row;  // b * Q + i
  const int64_t c = (blockIdx.x % per_row) * kStripeColumns + column;
  const bool active = c < H + n;
  const int64_t h = !active ? 0 : c < H ? c / a.head_dim : c - H;
  const int64_t record = 1 + 2 * n + H;
  const MergeSlots slots = merge_slots(a, bi / a.num_queries, bi % a.num_queries);
  const acc_t* pieces = static_cast<const acc_t*>(a.partials) + slots.first * record;
  const int64_t piece_stride = slots.stride * record;
  // Two values per thread, [2][stripes][kStripeColumns]; stripe t's value of this
  // column at firsts[t * kStripeColumns] and seconds[t * kStripeColumns].
  ATTNPOOL_DYNAMIC_SHARED(acc_t, scratch);
  acc_t* firsts = scratch + column;
  acc_t* seconds = firsts + stripes * kStripeColumns;
  const int own = stripe * kStripeColumns;

  // The largest running max of head h over the pieces with a row present.
  acc_t m = -attnpool_infinity<acc_t>();
  acc_t valid = acc_t(0);
  for (int64_t s = stripe; active && s < slots.pieces; s += stripes) {
    const acc_t* piece = pieces + s * piece_stride;
    if (piece[0] != acc_t(0)) {
      valid = acc_t(1);
      m = piece[1 + h] > m ? piece[1 + h] : m;
    }
  }
  firsts[own] = m;
  seconds[own] = valid;
  attnpool_syncthreads();
  m = -attnpool_infinity<acc_t>();
  valid = acc_t(0);
  for (int t = 0; t < stripes; ++t) {
    m = firsts[t * kStripeColumns] > m ? firsts[t * kStripeColumns] : m;
    valid = seconds[t * kStripeColumns] != acc_t(0) ? acc_t(1) : valid;
  }
  attnpool_syncthreads();

  // The pieces' sums and weighted sums, rescaled to that max.
  const bool none_finite = m == -attnpool_infinity<acc_t>();
  acc_t sum = acc_t(0);
  acc_t value = acc_t(0);
  for (int64_t s = stripe; active && s < slots.pieces; s += stripes) {
    const acc_t* piece = pieces + s * piece_stride;
    if (piece[0] == acc_t(0)) {
      continue;
    }
    const acc_t weight = none_finite ? acc_t(1) : attnpool_exp(piece[1 + h] - m);
    sum += weight * piece[1 + n + h];
    if (c < H) {
      value += weight * piece[1 + 2 * n + c];
    }
  }
  firsts[own] = sum;
  seconds[own] = value;
  attnpool_syncthreads();
  if (stripe != 0 || !active) {
    return;
  }
  sum = acc_t(0);
  value = acc_t(0);
  for (int t = 0; t < stripes; ++t) {
    sum += firsts[t * kStripeColumns];
    value += seconds[t * kStripeColumns];
  }
  const bool any = valid != acc_t(0);
  if (c < H) {
    static_cast<acc_t*>(a.out)[bi * H + c] = any ? value / sum : acc_t(0);
  } else {
    acc_t* lse = static_cast<acc_t*>(a.lse) + 2 * (bi * n + h);
    lse[0] = any ? m : -attnpool_infinity<acc_t>();
    lse[1] = any ? attnpool_log(sum) : acc_t(0);
  }
}

// delta_k = G_i[D_h] . out_i[D_h] for every score k = i * n + h of sequence b,
// into delta[num_scores]. It is summed exactly as backward_kernel sums dp = G_i[D_h] .
// x_l[D_h] (the same columns per thread, fma order, warp and block
// reductions), so that when all the weight falls on one row, whose x then
// equals out, dp - delta is exactly 0, as in the reference.
template <int VEC, int CHUNKS, typename acc_t>
ATTNPOOL_DEVICE inline void block_deltas(
    const BackwardParams& a, int64_t b, acc_t* partial, acc_t* delta) {
  constexpr int R = kTileRows;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int num_warps = (blockDim.x + 31) / 32;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  for (int64_t i = 0; i < a.num_queries; ++i) {
    const acc_t* g = static_cast<const acc_t*>(a.grad_out) + (b * a.num_queries + i) * H;
    const acc_t* o = static_cast<const acc_t*>(a.out) + (b * a.num_queries + i) * H;
    for (int64_t h = 0; h < n; ++h) {
      acc_t part = acc_t(0);
      for (int j = 0; j < CHUNKS; ++j) {
        const int64_t col = chunk_column<VEC>(j);
        if (col < H) {
          for (int v = 0; v < VEC; ++v) {
            const acc_t gv = (col + v) / a.head_dim == h ? g[col + v] : acc_t(0);
            part = attnpool_fma(o[col + v], gv, part);
          }
        }
      }
      acc_t parts[1] = {part};
      store_warp_sums(parts, partial + ((warp * 2 + 1) * n + h) * R, lane);
    }
    attnpool_syncthreads();
    for (int64_t h = tid; h < n; h += blockDim.x) {
      delta[i * n + h] = sum_over_warps(partial + n * R, num_warps, 2 * n * R, h * R);
    }
    attnpool_syncthreads();
  }
}

// One (sequence b, piece of its rows) per block, all queries and heads.
// For each tile: p = exp(scale * x.u_k - lse), ds = scale * p * (dp - delta)
// with dp = G_i[D_h].x[D_h]; dx = sum_k p G_i[D_h] + ds u_k is written once,
// and du_k += ds x goes to this block's own du partial (no atomics).
template <typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_GLOBAL void backward_kernel(BackwardParams a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  constexpr int R = kTileRows;
  const BlockInfo info = block_info(a, 1);
  const auto [b, group, rows, tid, lane, warp, num_warps] = info;
  const int64_t first = rows.begin;
  const int64_t last = rows.end;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  const int64_t d = a.head_dim;
  const int64_t num_scores = a.num_scores();
  const int64_t block = blockIdx.x;
  const auto* x = static_cast<const scalar_t*>(a.x) + a.row_offset(b, 0);
  const auto* u = static_cast<const acc_t*>(a.u);
  const auto* lse = static_cast<const acc_t*>(a.lse) + 2 * b * num_scores;
  auto* dx = static_cast<scalar_t*>(a.dx) + a.flat_row(b, 0) * H;
  acc_t* du = static_cast<acc_t*>(a.du_partials) + block * num_scores * H;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const auto* bias =
      a.bias == nullptr ? nullptr : static_cast<const acc_t*>(a.bias) + b * a.seq_len;

  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);
  acc_t* partial = shared;                         // [num_warps][2][n][R]
  acc_t* probs = partial + num_warps * 2 * n * R;  // [n][R]
  acc_t* dscores = probs + n * R;                  // [n][R]
  acc_t* delta = dscores + n * R;                  // [num_scores]
  block_deltas<VEC, CHUNKS>(a, b, partial, delta);

  for (int64_t k = 0; k < num_scores; ++k) {
    for (int j = 0; j < CHUNKS; ++j) {
      const int64_t col = chunk_column<VEC>(j);
      if (col < H) {
        for (int v = 0; v < VEC; ++v) {
          du[k * H + col + v] = acc_t(0);
        }
      }
    }
  }

  for (int64_t tile = first; tile < last; tile += R) {
    bool present[R];
    acc_t xs[R][CHUNKS][VEC];
    acc_t dxs[R][CHUNKS][VEC];
    FetchedTile<scalar_t, VEC, CHUNKS> fetched;
    fetch_tile<scalar_t, VEC, CHUNKS>(a, x, b, tile, last, fetched);
    widen_tile<scalar_t, VEC, CHUNKS>(fetched, H, present, xs);
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < CHUNKS; ++j) {
        for (int v = 0; v < VEC; ++v) {
          dxs[r][j][v] = acc_t(0);
        }
      }
    }
    for (int64_t i = 0; i < a.num_queries; ++i) {
      const acc_t* g = static_cast<const acc_t*>(a.grad_out) + (b * a.num_queries + i) * H;
      for (int64_t h = 0; h < n; ++h) {
        const acc_t* uk = u + (i * n + h) * H;
        acc_t part_score[R];
        acc_t part_dprob[R];
        for (int r = 0; r < R; ++r) {
          part_score[r] = acc_t(0);
          part_dprob[r] = acc_t(0);
        }
        for (int j = 0; j < CHUNKS; ++j) {
          const int64_t col = chunk_column<VEC>(j);
          if (col < H) {
            for (int v = 0; v < VEC; ++v) {
              const acc_t uv = uk[col + v];
              const acc_t gv = (col + v) / d == h ? g[col + v] : acc_t(0);
              for (int r = 0; r < R; ++r) {
                part_score[r] = attnpool_fma(xs[r][j][v], uv, part_score[r]);
                part_dprob[r] = attnpool_fma(xs[r][j][v], gv, part_dprob[r]);
              }
            }
          }
        }
        store_warp_sums(part_score, partial + ((warp * 2 + 0) * n + h) * R, lane);
        store_warp_sums(part_dprob, partial + ((warp * 2 + 1) * n + h) * R, lane);
      }
      attnpool_syncthreads();
      for (int64_t idx = tid; idx < n * R; idx += blockDim.x) {
        const int64_t h = idx / R;
        const int r = static_cast<int>(idx % R);
        const acc_t score = sum_over_warps(partial, num_warps, 2 * n * R, idx);
        const acc_t dprob = sum_over_warps(partial + n * R, num_warps, 2 * n * R, idx);
        const int64_t k = i * n + h;
        // The forward summed this score in the same order (same columns per
        // thread, same reductions) and rounded it the same way
        // (biased_score); so p <= 1 however large the scores (the CPU's
        // [Note: one order for every score]).
        const acc_t p =
            present[r]
                ? attnpool_exp(
                      (biased_score(scale, score, bias, tile + r) - lse[2 * k]) - lse[2 * k + 1])
                : acc_t(0);
        probs[idx] = p;
        dscores[idx] = scale * p * (dprob - delta[k]);
      }
      attnpool_syncthreads();
      for (int j = 0; j < CHUNKS; ++j) {
        const int64_t col = chunk_column<VEC>(j);
        if (col < H) {
          for (int v = 0; v < VEC; ++v) {
            const int64_t own_head = (col + v) / d;
            const acc_t gv = g[col + v];
            for (int r = 0; r < R; ++r) {
              dxs[r][j][v] += probs[own_head * R + r] * gv;
            }
            for (int64_t h = 0; h < n; ++h) {
              const acc_t uv = u[(i * n + h) * H + col + v];
              acc_t du_step = acc_t(0);
              for (int r = 0; r < R; ++r) {
                dxs[r][j][v] += dscores[h * R + r] * uv;
                du_step += dscores[h * R + r] * xs[r][j][v];
              }
              du[(i * n + h) * H + col + v] += du_step;
            }
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t l = tile + r;
      if (l >= last) {
        break;
      }
      for (int j = 0; j < CHUNKS; ++j) {
        const int64_t col = chunk_column<VEC>(j);
        if (col < H) {
          Pack<scalar_t, VEC> pack;
          for (int v = 0; v < VEC; ++v) {
            pack.v[v] = static_cast<scalar_t>(present[r] ? dxs[r][j][v] : acc_t(0));
          }
          store_pack<scalar_t, VEC>(dx + l * H + col, pack);
        }
      }
    }
  }
}

// du[c] = sum over blocks of du_partials[block][c]. Each CUDA block sums
// kStripeColumns columns; its threads form blockDim.x / kStripeColumns
// stripes, stripe s summing partials s, s + stripes, ... in order, then stripe 0
// adds the stripes in order: a fixed order for a fixed launch, so the result is
// bitwise repeatable. Needs reduce_shared_bytes of shared memory.
template <typename acc_t>
ATTNPOOL_HOST_DEVICE inline int64_t reduce_shared_bytes(int64_t threads) {
  return static_cast<int64_t>(sizeof(acc_t)) * threads;
}

template <typename acc_t>
ATTNPOOL_GLOBAL void reduce_partials_kernel(
    const acc_t* partials, acc_t* du, int64_t blocks, int64_t width) {
  const auto [stripes, column, stripe] = stripe_place();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kStripeColumns + column;
  ATTNPOOL_DYNAMIC_SHARED(acc_t, sums);  // [stripes][kStripeColumns]
  acc_t total = acc_t(0);
  if (c < width) {
    for (int64_t block = stripe; block < blocks; block += stripes) {
      total += partials[block * width + c];
    }
  }
  sums[stripe * kStripeColumns + column] = total;
  attnpool_syncthreads();
  if (stripe == 0 && c < width) {
    acc_t sum = acc_t(0);
    for (int s = 0; s < stripes; ++s) {
      sum += sums[s * kStripeColumns + column];
    }
    du[c] = sum;
  }
}

}  // namespace attnpool::cuda
