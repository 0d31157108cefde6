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
  const void* lse;       // [B, Q * n]
  const void* delta;     // [B, Q * n]
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
ATTNPOOL_HOST_DEVICE inline int64_t backward_shared_bytes(int64_t num_warps, int64_t num_heads) {
  return static_cast<int64_t>(sizeof(acc_t)) * (2 * (num_warps + 1) * num_heads * kTileRows);
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

// Rows tile .. tile + kTileRows - 1 of sequence b, this thread's columns, in
// the accumulation dtype; present[r] is false (and the row zeros) for rows
// past `last` or masked out.
template <typename scalar_t, int VEC, int CHUNKS, typename Args>
ATTNPOOL_DEVICE inline void load_tile(
    const Args& a,
    const scalar_t* x,
    int64_t b,
    int64_t tile,
    int64_t last,
    bool (&present)[kTileRows],
    attnpool_opmath_t<scalar_t> (&xs)[kTileRows][CHUNKS][VEC]) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  for (int r = 0; r < kTileRows; ++r) {
    const int64_t l = tile + r;
    present[r] =
        l < last && (a.mask == nullptr || a.mask[b * a.mask_batch_stride + l * a.mask_seq_stride]);
    for (int j = 0; j < CHUNKS; ++j) {
      const int64_t col = chunk_column<VEC>(j);
      if (present[r] && col < a.hidden) {
        const auto pack = load_pack<scalar_t, VEC>(x + l * a.x_seq_stride + col);
        for (int v = 0; v < VEC; ++v) {
          xs[r][j][v] = static_cast<acc_t>(pack.v[v]);
        }
      } else {
        for (int v = 0; v < VEC; ++v) {
          xs[r][j][v] = acc_t(0);
        }
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

  for (int64_t tile = first; tile < last; tile += R) {
    bool present[R];
    acc_t xs[R][CHUNKS][VEC];
    load_tile<scalar_t, VEC, CHUNKS>(a, x, b, tile, last, present, xs);
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

// Merges the pieces of each (b, i) in piece order: out and lse. One block per
// (b, i); threads split the columns.
template <typename scalar_t>
ATTNPOOL_GLOBAL void merge_pieces_kernel(ForwardArgs a) {
  using acc_t = attnpool_opmath_t<scalar_t>;
  const int64_t H = a.hidden;
  const int64_t n = a.num_heads;
  const int64_t d = a.head_dim;
  const int64_t bi = blockIdx.x;  // b * Q + i
  const int64_t record = 1 + 2 * n + H;
  const acc_t* pieces = static_cast<const acc_t*>(a.partials) + bi * a.splits * record;
  auto* out = static_cast<acc_t*>(a.out) + bi * H;
  auto* lse = static_cast<acc_t*>(a.lse) + bi * n;
  bool valid = false;
  for (int64_t s = 0; s < a.splits; ++s) {
    valid = valid || pieces[s * record] != acc_t(0);
  }
  // Each thread merges the heads of its own columns (and thread h the lse of
  // head h); every thread reads the pieces in the same order.
  for (int64_t c = threadIdx.x; c < H + n; c += blockDim.x) {
    const int64_t h = c < H ? c / d : c - H;
    acc_t m = -attnpool_infinity<acc_t>();
    for (int64_t s = 0; s < a.splits; ++s) {
      const acc_t* piece = pieces + s * record;
      if (piece[0] != acc_t(0) && piece[1 + h] > m) {
        m = piece[1 + h];
      }
    }
    const bool none_finite = m == -attnpool_infinity<acc_t>();
    acc_t sum = acc_t(0);
    acc_t value = acc_t(0);
    for (int64_t s = 0; s < a.splits; ++s) {
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
    if (c < H) {
      out[c] = valid ? value / sum : acc_t(0);
    } else {
      lse[h] = valid ? m + attnpool_log(sum) : -attnpool_infinity<acc_t>();
    }
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
  const auto* delta = static_cast<const acc_t*>(a.delta) + b * K;
  auto* dx = static_cast<scalar_t*>(a.dx) + b * a.seq_len * H;
  acc_t* du = static_cast<acc_t*>(a.du_partials) + block * K * H;
  const acc_t scale = static_cast<acc_t>(a.scale);

  ATTNPOOL_DYNAMIC_SHARED(acc_t, shared);
  acc_t* partial = shared;                         // [num_warps][2][n][R]
  acc_t* probs = partial + num_warps * 2 * n * R;  // [n][R]
  acc_t* dscores = probs + n * R;                  // [n][R]

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
    load_tile<scalar_t, VEC, CHUNKS>(a, x, b, tile, last, present, xs);
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
                part_dprob[r] += xs[r][j][v] * gv;
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

// du[c] = sum over blocks of du_partials[block][c], in block order.
template <typename acc_t>
ATTNPOOL_GLOBAL void reduce_partials_kernel(
    const acc_t* partials, acc_t* du, int64_t blocks, int64_t width) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= width) {
    return;
  }
  acc_t total = acc_t(0);
  for (int64_t block = 0; block < blocks; ++block) {
    total += partials[block * width + c];
  }
  du[c] = total;
}

// delta[b, i*n + h] = grad_out[b, i, D_h] . out[b, i, D_h]
template <typename acc_t>
ATTNPOOL_GLOBAL void delta_kernel(
    const acc_t* grad_out,
    const acc_t* out,
    acc_t* delta,
    int64_t count,
    int64_t hidden,
    int64_t num_heads) {
  const int64_t k =
      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (b * Q + i) * n + h
  if (k >= count) {
    return;
  }
  const int64_t head_dim = hidden / num_heads;
  const int64_t row = k / num_heads;
  const int64_t offset = row * hidden + (k % num_heads) * head_dim;
  acc_t total = acc_t(0);
  for (int64_t e = 0; e < head_dim; ++e) {
    total += grad_out[offset + e] * out[offset + e];
  }
  delta[k] = total;
}

}  // namespace attnpool::cuda
