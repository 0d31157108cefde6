#pragma once

// Device code of attention_pool's CUDA kernels. The entry points (checks,
// allocation, launch) are in attention_pool_kernel.cu.
//
// The code only uses what cuda_compat.h provides, so that the same source is
// also compiled for the CPU by tests/cpp/test_cuda_kernels_emulated.cpp,
// which runs every thread of a block as a host thread. That test checks the
// indexing, reductions and synchronisation on machines without a GPU.

#include "ops/cuda/cuda_compat.h"

#include <cstdint>

namespace attnpool::cuda {

// Rows of x handled together between two block-wide reductions.
constexpr int kTileRows = 4;

// The CUDA block size is between 128 and 1024 threads.
constexpr int kMaxWarps = 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct ForwardArgs {
  const void* x;           // [B, L, H], rows contiguous
  int64_t x_batch_stride;  // in elements
  int64_t x_seq_stride;
  const bool* mask;  // [B, L] or null
  int64_t mask_batch_stride;
  int64_t mask_seq_stride;
  const void* u;   // [Q * n, H] accumulation dtype
  void* out;       // [B, Q, H] accumulation dtype
  void* lse;       // [B, Q * n] accumulation dtype
  void* partials;  // [B, Q, splits, 1 + 2n + H] accumulation dtype, when splits > 1
  int64_t batch, seq_len, hidden, num_queries, num_heads, head_dim;
  int64_t splits, rows_per_split;
  double scale;
};

struct BackwardArgs {
  const void* x;
  int64_t x_batch_stride;
  int64_t x_seq_stride;
  const bool* mask;
  int64_t mask_batch_stride;
  int64_t mask_seq_stride;
  const void* u;         // [Q * n, H]
  const void* grad_out;  // [B, Q, H] accumulation dtype
  const void* out;       // [B, Q, H] accumulation dtype, the forward's output
  const void* lse;       // [B, Q * n]
  void* dx;              // [B, L, H] contiguous, x dtype
  void* du_partials;     // [B * splits, Q * n, H] accumulation dtype
  int64_t batch, seq_len, hidden, num_queries, num_heads, head_dim;
  int64_t splits, rows_per_split;
  double scale;
};

// Copies the sizes of a call (detail::PoolDims) into ForwardArgs/BackwardArgs.
template <typename Args, typename Dims>
inline void set_shape_args(Args& a, const Dims& dims) {
  a.batch = dims.batch;
  a.seq_len = dims.seq_len;
  a.hidden = dims.hidden;
  a.num_queries = dims.num_queries;
  a.num_heads = dims.num_heads;
  a.head_dim = dims.head_dim;
}

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
    fetched.present[r] =
        l < last && (a.mask == nullptr || a.mask[b * a.mask_batch_stride + l * a.mask_seq_stride]);
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

// One (sequence b, query i, piece of the sequence) per block. Threads split
// the columns; a tile of kTileRows rows is scored with one block reduction
// per head, then folded into the online softmax (running max, sum, and the
// weighted sum of x kept in registers).
template <typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_GLOBAL void forward_kernel(ForwardArgs a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  constexpr int R = kTileRows;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int num_warps = (blockDim.x + 31) / 32;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  const int64_t d = a.head_dim;
  const int64_t block = blockIdx.x;
  const int64_t split = block % a.splits;
  const int64_t i = (block / a.splits) % a.num_queries;
  const int64_t b = block / (a.splits * a.num_queries);
  const int64_t first = split * a.rows_per_split;
  const int64_t last = first + a.rows_per_split < a.seq_len ? first + a.rows_per_split : a.seq_len;
  const auto* x = static_cast<const scalar_t*>(a.x) + b * a.x_batch_stride;
  const auto* u = static_cast<const acc_t*>(a.u) + i * n * H;
  const acc_t scale = static_cast<acc_t>(a.scale);

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
              part[r] += xs[r][j][v] * uv;
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        part[r] = warp_sum(part[r]);
        if (lane == 0) {
          partial_scores[(warp * n + h) * R + r] = part[r];
        }
      }
    }
    attnpool_syncthreads();
    for (int64_t idx = tid; idx < n * R; idx += blockDim.x) {
      acc_t total = acc_t(0);
      for (int w = 0; w < num_warps; ++w) {
        total += partial_scores[w * n * R + idx];
      }
      scores[idx] = scale * total;
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
  if (a.splits == 1) {
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
    auto* lse = static_cast<acc_t*>(a.lse) + (b * a.num_queries + i) * n;
    for (int64_t h = tid; h < n; h += blockDim.x) {
      lse[h] = valid ? run_max[h] + attnpool_log(run_sum[h]) : -attnpool_infinity<acc_t>();
    }
    return;
  }
  // Several pieces: store this one's state, merged later in piece order.
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
// kSliceColumns consecutive columns (a warp's width, so that a warp's loads
// are one contiguous run) and split its threads into slices over the pieces:
// thread t is column t % kSliceColumns of slice t / kSliceColumns.
constexpr int kSliceColumns = 32;

struct SlicePlace {
  int slices;
  int column;
  int slice;
};

ATTNPOOL_DEVICE inline SlicePlace slice_place() {
  return {
      static_cast<int>(blockDim.x) / kSliceColumns,
      static_cast<int>(threadIdx.x) % kSliceColumns,
      static_cast<int>(threadIdx.x) / kSliceColumns};
}

// Merging the pieces of each (b, i): out and lse. Column c < H is out's, H + h
// head h's lse. A CUDA block takes kSliceColumns columns of one (b, i); its
// threads form merge_threads(splits) / kSliceColumns slices, and slice t reads
// pieces t, t + slices, ... so that a long sequence cut into a thousand pieces
// is not merged one piece after another. Slices are combined in slice order:
// the launch depends on the shape only, so the result is bitwise repeatable.
constexpr int kMaxMergeSlices = 32;

ATTNPOOL_HOST_DEVICE inline int64_t merge_blocks_per_row(int64_t hidden, int64_t num_heads) {
  return (hidden + num_heads + kSliceColumns - 1) / kSliceColumns;
}

ATTNPOOL_HOST_DEVICE inline int merge_threads(int64_t splits) {
  return kSliceColumns * static_cast<int>(splits < kMaxMergeSlices ? splits : kMaxMergeSlices);
}

template <typename acc_t>
ATTNPOOL_HOST_DEVICE inline int64_t merge_shared_bytes(int64_t threads) {
  return static_cast<int64_t>(sizeof(acc_t)) * 2 * threads;
}

template <typename scalar_t>
ATTNPOOL_GLOBAL void merge_pieces_kernel(ForwardArgs a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  const auto [slices, column, slice] = slice_place();
  const int64_t per_row = merge_blocks_per_row(H, n);
  const int64_t bi = blockIdx.x / per_row;  // b * Q + i
  const int64_t c = (blockIdx.x % per_row) * kSliceColumns + column;
  const bool active = c < H + n;
  const int64_t h = !active ? 0 : c < H ? c / a.head_dim : c - H;
  const int64_t record = 1 + 2 * n + H;
  const acc_t* pieces = static_cast<const acc_t*>(a.partials) + bi * a.splits * record;
  // Two values per thread, [2][slices][kSliceColumns]; slice t's value of this
  // column at firsts[t * kSliceColumns] and seconds[t * kSliceColumns].
  ATTNPOOL_DYNAMIC_SHARED(acc_t, scratch);
  acc_t* firsts = scratch + column;
  acc_t* seconds = firsts + slices * kSliceColumns;
  const int own = slice * kSliceColumns;

  // The largest running max of head h over the pieces with a row present.
  acc_t m = -attnpool_infinity<acc_t>();
  acc_t valid = acc_t(0);
  for (int64_t s = slice; active && s < a.splits; s += slices) {
    const acc_t* piece = pieces + s * record;
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
  for (int t = 0; t < slices; ++t) {
    m = firsts[t * kSliceColumns] > m ? firsts[t * kSliceColumns] : m;
    valid = seconds[t * kSliceColumns] != acc_t(0) ? acc_t(1) : valid;
  }
  attnpool_syncthreads();

  // The pieces' sums and weighted sums, rescaled to that max.
  const bool none_finite = m == -attnpool_infinity<acc_t>();
  acc_t sum = acc_t(0);
  acc_t value = acc_t(0);
  for (int64_t s = slice; active && s < a.splits; s += slices) {
    const acc_t* piece = pieces + s * record;
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
  if (slice != 0 || !active) {
    return;
  }
  sum = acc_t(0);
  value = acc_t(0);
  for (int t = 0; t < slices; ++t) {
    sum += firsts[t * kSliceColumns];
    value += seconds[t * kSliceColumns];
  }
  const bool any = valid != acc_t(0);
  if (c < H) {
    static_cast<acc_t*>(a.out)[bi * H + c] = any ? value / sum : acc_t(0);
  } else {
    static_cast<acc_t*>(a.lse)[bi * n + h] =
        any ? m + attnpool_log(sum) : -attnpool_infinity<acc_t>();
  }
}

// delta_k = G_i[D_h] . out_i[D_h] for every score k = i * n + h of sequence b,
// into delta[K]. It is summed exactly as backward_kernel sums dp = G_i[D_h] .
// x_l[D_h] (the same columns per thread, fma order, warp and block
// reductions), so that when all the weight falls on one row, whose x then
// equals out, dp - delta is exactly 0, as in the reference.
template <int VEC, int CHUNKS, typename acc_t>
ATTNPOOL_DEVICE inline void block_deltas(
    const BackwardArgs& a, int64_t b, acc_t* partial, acc_t* delta) {
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
      part = warp_sum(part);
      if (lane == 0) {
        partial[((warp * 2 + 1) * n + h) * R] = part;
      }
    }
    attnpool_syncthreads();
    for (int64_t h = tid; h < n; h += blockDim.x) {
      acc_t total = acc_t(0);
      for (int w = 0; w < num_warps; ++w) {
        total += partial[(w * 2 + 1) * n * R + h * R];
      }
      delta[i * n + h] = total;
    }
    attnpool_syncthreads();
  }
}

// One (sequence b, piece of its rows) per block, all queries and heads.
// For each tile: p = exp(scale * x.u_k - lse), ds = scale * p * (dp - delta)
// with dp = G_i[D_h].x[D_h]; dx = sum_k p G_i[D_h] + ds u_k is written once,
// and du_k += ds x goes to this block's own du partial (no atomics).
template <typename scalar_t, int VEC, int CHUNKS>
ATTNPOOL_GLOBAL void backward_kernel(BackwardArgs a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  constexpr int R = kTileRows;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int num_warps = (blockDim.x + 31) / 32;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  const int64_t d = a.head_dim;
  const int64_t K = a.num_queries * n;
  const int64_t block = blockIdx.x;
  const int64_t split = block % a.splits;
  const int64_t b = block / a.splits;
  const int64_t first = split * a.rows_per_split;
  const int64_t last = first + a.rows_per_split < a.seq_len ? first + a.rows_per_split : a.seq_len;
  const auto* x = static_cast<const scalar_t*>(a.x) + b * a.x_batch_stride;
  const auto* u = static_cast<const acc_t*>(a.u);
  const auto* lse = static_cast<const acc_t*>(a.lse) + b * K;
  auto* dx = static_cast<scalar_t*>(a.dx) + b * a.seq_len * H;
  acc_t* du = static_cast<acc_t*>(a.du_partials) + block * K * H;
  const acc_t scale = static_cast<acc_t>(a.scale);

  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);
  acc_t* partial = shared;                         // [num_warps][2][n][R]
  acc_t* probs = partial + num_warps * 2 * n * R;  // [n][R]
  acc_t* dscores = probs + n * R;                  // [n][R]
  acc_t* delta = dscores + n * R;                  // [K]
  block_deltas<VEC, CHUNKS>(a, b, partial, delta);

  for (int64_t k = 0; k < K; ++k) {
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
                part_score[r] += xs[r][j][v] * uv;
                part_dprob[r] = attnpool_fma(xs[r][j][v], gv, part_dprob[r]);
              }
            }
          }
        }
        for (int r = 0; r < R; ++r) {
          part_score[r] = warp_sum(part_score[r]);
          part_dprob[r] = warp_sum(part_dprob[r]);
          if (lane == 0) {
            partial[((warp * 2 + 0) * n + h) * R + r] = part_score[r];
            partial[((warp * 2 + 1) * n + h) * R + r] = part_dprob[r];
          }
        }
      }
      attnpool_syncthreads();
      for (int64_t idx = tid; idx < n * R; idx += blockDim.x) {
        const int64_t h = idx / R;
        const int r = static_cast<int>(idx % R);
        acc_t score = acc_t(0);
        acc_t dprob = acc_t(0);
        for (int w = 0; w < num_warps; ++w) {
          score += partial[(w * 2 + 0) * n * R + idx];
          dprob += partial[(w * 2 + 1) * n * R + idx];
        }
        const int64_t k = i * n + h;
        const acc_t p = present[r] ? attnpool_exp(scale * score - lse[k]) : acc_t(0);
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
// kSliceColumns columns; its threads form blockDim.x / kSliceColumns
// slices, slice s summing partials s, s + slices, ... in order, then slice 0
// adds the slices in order: a fixed order for a fixed launch, so the result is
// bitwise repeatable. Needs reduce_shared_bytes of shared memory.
template <typename acc_t>
ATTNPOOL_HOST_DEVICE inline int64_t reduce_shared_bytes(int64_t threads) {
  return static_cast<int64_t>(sizeof(acc_t)) * threads;
}

template <typename acc_t>
ATTNPOOL_GLOBAL void reduce_partials_kernel(
    const acc_t* partials, acc_t* du, int64_t blocks, int64_t width) {
  const auto [slices, column, slice] = slice_place();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSliceColumns + column;
  ATTNPOOL_DYNAMIC_SHARED(acc_t, sums);  // [slices][kSliceColumns]
  acc_t total = acc_t(0);
  if (c < width) {
    for (int64_t block = slice; block < blocks; block += slices) {
      total += partials[block * width + c];
    }
  }
  sums[slice * kSliceColumns + column] = total;
  attnpool_syncthreads();
  if (slice == 0 && c < width) {
    acc_t sum = acc_t(0);
    for (int s = 0; s < slices; ++s) {
      sum += sums[s * kSliceColumns + column];
    }
    du[c] = sum;
  }
}

}  // namespace attnpool::cuda
