// CUDA entry points of folded_attention_pool's forward and backward: check,
// allocate, choose the launch shape, launch (folded_attention_pool_kernel.cuh).
// fold_query runs as matrix products on the GPU (ops/fold_query.cpp).

#include "ops/checks.h"
#include "ops/cuda/device_attribute.h"
#include "ops/cuda/folded_attention_pool_kernel.cuh"
#include "ops/cuda/one_score_kernel.cuh"
#include "ops/cuda/tensor_core_kernel.cuh"
#include "ops/fold_query.h"
#include "ops/folded_attention_pool.h"
#include "ops/pool_by_matmul.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace attnpool::cuda {
namespace {

// Columns per thread are chunks of VEC elements; 16-byte vectors when the
// rows allow it (H a multiple of VEC and 16-byte aligned rows), else scalars.
// rows: x as the kernels read it, [B, L, H] or ragged [T, H].
template <typename scalar_t>
int vector_width(const at::Tensor& rows) {
  constexpr int kWide = kPackWidth<scalar_t>;
  const int64_t H = rows.size(-1);
  bool aligned = reinterpret_cast<uintptr_t>(rows.const_data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < rows.dim(); ++dim) {
    aligned = aligned && (rows.size(dim) <= 1 || rows.stride(dim) % kWide == 0);
  }
  return H % kWide == 0 && aligned ? kWide : 1;
}

struct LaunchShape {
  int threads;
  int chunks;  // chunks of VEC columns per thread: 1, 2 or 4
};

// The fewest threads (128 to 1024) that cover the row with at most two
// chunks each, or four at 1024 threads.
LaunchShape launch_shape(int64_t hidden, int vec) {
  const int64_t chunks = std::max<int64_t>(1, at::ceil_div<int64_t>(hidden, vec));
  int threads = 128;
  while (threads < 1024 && at::ceil_div<int64_t>(chunks, threads) > 2) {
    threads *= 2;
  }
  const int64_t per_thread = at::ceil_div<int64_t>(chunks, threads);
  TORCH_CHECK_VALUE(
      per_thread <= 4,
      "folded_attention_pool: the CUDA kernels support H up to ",
      4 * 1024 * vec,
      " for this dtype and layout, got H = ",
      hidden);
  return {threads, per_thread <= 1 ? 1 : per_thread <= 2 ? 2 : 4};
}

template <typename acc_t>
void set_shared_limit(const void* kernel, int64_t bytes) {
  TORCH_CHECK_VALUE(
      bytes <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin),
      "folded_attention_pool: too many heads for the CUDA kernels (",
      bytes,
      " bytes of shared memory needed)");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Calls f with the compile-time vector width and chunk count.
template <typename scalar_t, typename F>
void with_layout(int vec, int chunks, F&& f) {
  constexpr int kWide = kPackWidth<scalar_t>;
  auto by_chunks = [&](auto vec_constant) {
    switch (chunks) {
      case 1:
        return f(vec_constant, std::integral_constant<int, 1>{});
      case 2:
        return f(vec_constant, std::integral_constant<int, 2>{});
      default:
        return f(vec_constant, std::integral_constant<int, 4>{});
    }
  };
  if (vec == kWide) {
    by_chunks(std::integral_constant<int, kWide>{});
  } else {
    by_chunks(std::integral_constant<int, 1>{});
  }
}

// Whether a call takes the kernels of one_score_kernel.cuh (a warp per row):
// one score per row (one query, one head), rows in 16-byte packs, and a row
// that a warp's registers hold. Decided from the shape and x's alignment,
// which the backward sees as the forward did (it gets the same x), so that
// both sum each score in the same order.
template <typename scalar_t>
bool takes_one_score_kernels(int64_t num_scores, int64_t hidden, int vec) {
  constexpr int kWide = kPackWidth<scalar_t>;
  return num_scores == 1 && vec == kWide && hidden <= 32 * kWide * one_score_max_chunks<scalar_t>();
}

// Calls f with the compile-time chunks of 16 bytes per lane that cover the
// row in the one-score kernels: 1, 2, 4 or (float32, float64) 8.
template <typename scalar_t, typename F>
void with_lane_chunks(int64_t hidden, F&& f) {
  constexpr int kWide = kPackWidth<scalar_t>;
  const int64_t chunks = at::ceil_div<int64_t>(hidden, 32 * kWide);
  if (chunks <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (chunks <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (chunks <= 4 || one_score_max_chunks<scalar_t>() <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, one_score_max_chunks<scalar_t>()>{});
  }
}

// The cut of each sequence for a kernel with one block per (sequence, piece)
// ([Note: pieces for the blocks]).
PieceCut cut_sequences(int64_t sequences, int64_t seq_len) {
  return cut_for_blocks(
      sequences,
      seq_len,
      device_attribute(cudaDevAttrMultiProcessorCount),
      kBlocksPerSm,
      kMinTilesPerPiece * kTileRows);
}

// A ragged batch (ForwardParams::first_piece): pieces of one size for every
// sequence, about 8 blocks per SM over all T rows when each piece runs
// `groups` blocks (one per query in the forward), none shorter than
// kMinTilesPerPiece tiles, and a multiple of `rows_multiple` rows. The piece
// table is made on the device and the grid sized for the most pieces the
// rows can make (at most one short piece per sequence besides the full
// ones): no host synchronisation.
struct RaggedCut {
  PieceCut cut;
  at::Tensor first_piece;
  int64_t most_items;
};

RaggedCut cut_ragged(const detail::PreparedPool& pool, int64_t groups, int64_t rows_multiple = 1) {
  const PoolInputs& p = pool.params;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t wanted = std::max<int64_t>(1, at::ceil_div(8 * sms, std::max<int64_t>(groups, 1)));
  const int64_t rows = std::min(
      kMaxForwardPieceRows,
      std::max(
          kMinTilesPerPiece * kTileRows, at::ceil_div(std::max<int64_t>(p.seq_len, 1), wanted)));
  const int64_t per_piece = at::ceil_div(rows, rows_multiple) * rows_multiple;
  RaggedCut ragged;
  ragged.cut = {at::ceil_div(p.seq_len, per_piece) + 1, per_piece};
  ragged.first_piece = detail::ragged_first_piece(pool.offsets, per_piece);
  ragged.most_items = p.batch + at::ceil_div(p.seq_len, per_piece);
  return ragged;
}

// Whether a call runs as matrix products (ops/pool_by_matmul.h) rather than
// the kernels: a dense batch (a ragged one would need its longest length on
// the host) with several scores and enough work per call. The kernels read
// x once per query (full width arrives as num_queries * num_heads one-head
// queries) and reduce every score per tile; the products read x a fixed few
// times but take about 20 launches, 0.3-0.5 ms of host time per forward on
// the H200 machine. In its run (benchmarks/gpu-h200.txt) the kernels' time
// grew as elements * (5 * queries + scores), and the products won where
// that passed 768 M, except under 4 M elements: x then stays in L2 and the
// kernels are short (CoCa's 8 x 256 x 768 with 256 x 8 scores).
bool takes_matmul_path(const PoolInputs& p) {
  if (p.ragged() || p.num_scores() <= 1) {
    return false;
  }
  const int64_t elements = p.batch * p.seq_len * p.hidden;
  const int64_t work = elements * (5 * p.num_queries + p.num_scores());
  return elements >= (int64_t{4} << 20) && work >= (int64_t{768} << 20);
}

// du = the sum of du_partials' first `blocks` rows [num_scores * H], in
// order (reduce_partials_kernel).
template <typename acc_t>
void sum_du_partials(
    const at::Tensor& du_partials, int64_t blocks, at::Tensor& du, cudaStream_t stream) {
  const int64_t width = du.numel();
  constexpr int kReduceThreads = 256;
  reduce_partials_kernel<acc_t>
      <<<at::ceil_div(width, int64_t{kStripeColumns}),
         kReduceThreads,
         reduce_shared_bytes<acc_t>(kReduceThreads),
         stream>>>(
          du_partials.const_data_ptr<acc_t>(), du.mutable_data_ptr<acc_t>(), blocks, width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [Note: opting in to the tensor-core kernels] ATTNPOOL_CUDA_TENSOR_CORES=1
// sends bfloat16 and float32 calls of several scores per row to the kernels
// of tensor_core_kernel.cuh, forward and backward (the backward recomputes
// the forward's scores with the same products, so both must take them;
// float32 rows as 3xTF32, MmaRows). They are checked in emulation only
// until a GPU has run them (scripts/gpu_check.sh runs the CUDA tests and
// the benchmark a second time with it set); then they become the default
// for the calls where they win. The variable is read once per process; the
// rest is decided from the shape, dtype and x's alignment, which the
// backward sees as the forward did.
int64_t most_shared_per_block() {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

bool tensor_cores_requested() {
  // Read once: a forward and its backward must agree.
  static const bool requested = [] {
    const char* value = std::getenv("ATTNPOOL_CUDA_TENSOR_CORES");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return requested;
}

template <typename scalar_t>
bool takes_tensor_core_kernels(const PoolInputs& p, const at::Tensor& rows_of_x) {
  if (!tensor_cores_requested() || vector_width<scalar_t>(rows_of_x) != kPackWidth<scalar_t> ||
      p.num_scores() < 2 || device_attribute(cudaDevAttrComputeCapabilityMajor) < 8) {
    return false;
  }
  const int64_t most_shared = most_shared_per_block();
  const MmaForwardShape forward = mma_forward_shape<scalar_t>(p, most_shared);
  // grad_out's operands take 64 bytes per score block, sequence and column
  // for each byte of x's element (128 for bfloat16 rows, 256 for float32:
  // [Note: tensor-core operands]): not more than twice x's bytes, which
  // keeps batches of short sequences off these kernels.
  const int64_t rows = p.ragged() ? p.seq_len : p.batch * p.seq_len;
  return forward.mt > 0 && 32 * p.batch * mma_score_blocks(p, forward) <= rows &&
         mma_backward_buffers<scalar_t>(p, most_shared) > 0;
}

// Calls f(scalar_t{}) and returns true if the tensor-core kernels take this
// call: bfloat16 or float32 rows (takes_tensor_core_kernels).
template <typename F>
bool on_tensor_cores(
    const PoolInputs& p, at::ScalarType dtype, const at::Tensor& rows_of_x, F&& f) {
  if (dtype == at::kBFloat16 && takes_tensor_core_kernels<at::BFloat16>(p, rows_of_x)) {
    f(at::BFloat16{});
    return true;
  }
  if (dtype == at::kFloat && takes_tensor_core_kernels<float>(p, rows_of_x)) {
    f(float{});
    return true;
  }
  return false;
}

PieceCut cut_for_tensor_cores(int64_t sequences, int64_t seq_len) {
  return mma_cut(sequences, seq_len, device_attribute(cudaDevAttrMultiProcessorCount));
}

// An operand of the tensor-core kernels laid out on the device
// ([Note: tensor-core operands]).
at::Tensor laid_out(const MmaOperand& op, const at::Tensor& like, cudaStream_t stream) {
  auto words = at::empty({op.words()}, like.options().dtype(at::kInt));
  mma_operand_kernel<MmaOperand><<<mma_operand_blocks(op), kMmaOperandThreads, 0, stream>>>(
      op, reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return words;
}

const uint32_t* words_of(const at::Tensor& words) {
  return reinterpret_cast<const uint32_t*>(words.const_data_ptr<int32_t>());
}

// The work cut for the tensor-core kernels, which run `groups` blocks (groups
// of queries) per piece: the blocks per group, the most pieces a (sequence,
// query) merges, and a ragged batch's cut.
struct TensorCoreCut {
  int64_t blocks;
  int64_t merged_pieces;
  RaggedCut ragged;
};

TensorCoreCut cut_tensor_core_work(
    ForwardParams& a, const detail::PreparedPool& pool, int64_t groups) {
  TensorCoreCut work;
  if (a.ragged()) {
    // (cut_ragged's cut, pieces of at least kMinTilesPerPiece * kTileRows
    // rows for about 8 blocks per SM: not tuned for these kernels yet; whole
    // tiles, as mma_cut's.)
    work.ragged = cut_ragged(pool, groups, kMmaTileRows);
    a.cut = work.ragged.cut;
    a.first_piece = work.ragged.first_piece.const_data_ptr<int64_t>();
    work.blocks = work.ragged.most_items;
  } else {
    a.cut = cut_for_tensor_cores(a.batch * groups, a.seq_len);
    work.blocks = a.batch * a.cut.pieces;
  }
  work.merged_pieces = a.cut.pieces;
  return work;
}

// The forward on tensor cores ([Note: the tensor-core forward]), in the
// groups of queries and tiles of scores of mma_forward_shape.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> run_tensor_core_forward(detail::PreparedForward& f) {
  constexpr bool kTf32 = std::is_same_v<scalar_t, float>;
  ForwardParams& a = f.params;
  const MmaForwardShape shape = mma_forward_shape<scalar_t>(a, most_shared_per_block());
  const int64_t groups = mma_groups(a.num_queries, shape.nt);
  const TensorCoreCut work = cut_tensor_core_work(a, f.pool, groups);
  const bool merge = a.ragged() || a.cut.pieces > 1;
  at::Tensor partials;
  if (merge) {
    partials =
        at::empty({work.blocks * a.num_queries, 1 + 2 * a.num_heads + a.hidden}, f.out.options());
    a.partials = partials.mutable_data_ptr();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* u = static_cast<const float*>(a.u);
  const at::Tensor u_fragments = laid_out(
      mma_u_operand(u, a.num_queries, a.num_heads, a.hidden, shape.mt, shape.nt, false, kTf32),
      f.out,
      stream);
  const int64_t shared =
      mma_shared_layout<scalar_t>(a.hidden, shape.mt, shape.nt, shape.buffers).bytes;
  with_mma_score_tiles(shape.mt, [&](auto tiles) {
    constexpr int MT = decltype(tiles)::value;
    auto* kernel =
        shape.nt == 1 ? &mma_forward_kernel<scalar_t, MT, 1> : &mma_forward_kernel<scalar_t, MT, 2>;
    set_shared_limit<float>(reinterpret_cast<const void*>(kernel), shared);
    kernel<<<work.blocks * groups, kMmaThreads, shared, stream>>>(
        a, words_of(u_fragments), shape.buffers);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (merge) {
    const int threads = merge_threads(work.merged_pieces);
    merge_pieces_kernel<scalar_t>
        <<<a.batch * a.num_queries * merge_blocks_per_row(a.hidden, a.num_heads),
           threads,
           merge_shared_bytes<float>(threads),
           stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {f.out, f.lse};
}

// The backward on tensor cores ([Note: the tensor-core backward]): dx and
// du in one launch for one score block, else a launch each; then the sum of
// the du partials in order.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> run_tensor_core_backward(
    detail::PreparedBackward& g, const at::Tensor& u) {
  constexpr bool kTf32 = std::is_same_v<scalar_t, float>;
  const BackwardParams& call = g.params;
  const int64_t B = call.batch, Q = call.num_queries, n = call.num_heads, H = call.hidden;
  const int64_t most_shared = most_shared_per_block();
  const MmaForwardShape forward = mma_forward_shape<scalar_t>(call, most_shared);
  const int64_t score_blocks = mma_score_blocks(call, forward);
  const int buffers = mma_backward_buffers<scalar_t>(call, most_shared);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* u_values = static_cast<const float*>(call.u);
  const auto* grad = static_cast<const float*>(call.grad_out);
  const auto lay_out = [&](const MmaOperand& op) { return laid_out(op, g.du, stream); };
  const at::Tensor u_fragments =
      lay_out(mma_u_operand(u_values, Q, n, H, forward.mt, forward.nt, false, kTf32));
  const at::Tensor u_columns =
      lay_out(mma_u_operand(u_values, Q, n, H, forward.mt, forward.nt, true, kTf32));
  const at::Tensor grad_fragments =
      lay_out(mma_grad_operand(grad, B, Q, n, H, forward.mt, forward.nt, false, kTf32));
  const at::Tensor grad_columns =
      lay_out(mma_grad_operand(grad, B, Q, n, H, forward.mt, forward.nt, true, kTf32));
  // du's partials, one per (sequence, piece) of the launch that sums du; the
  // cuts (a ragged batch's piece tables) live until every launch is queued.
  at::Tensor du_partials;
  int64_t du_blocks = 0;
  std::vector<TensorCoreCut> cuts;
  cuts.reserve(2);
  with_mma_chains(forward.mt, [&](auto chains) {
    auto* kernel = &mma_backward_kernel<scalar_t, decltype(chains)::value>;
    set_shared_limit<float>(
        reinterpret_cast<const void*>(kernel),
        mma_backward_shared_bytes<scalar_t>(H, buffers, score_blocks));
    const auto launch = [&](MmaBackwardPart part) {
      BackwardParams a = call;
      const bool du_only = part == MmaBackwardPart::kDu;
      const int64_t groups = du_only ? score_blocks : 1;
      const TensorCoreCut& work = cuts.emplace_back(cut_tensor_core_work(a, g.pool, groups));
      if (part != MmaBackwardPart::kDx) {
        du_blocks = work.blocks;
        du_partials = at::empty({du_blocks, a.num_scores(), H}, g.du.options());
        a.du_partials = du_partials.mutable_data_ptr();
      }
      const int64_t shared =
          mma_backward_layout<scalar_t>(H, buffers, du_only ? 1 : score_blocks, part).bytes;
      kernel<<<work.blocks * groups, kMmaThreads, shared, stream>>>(
          a,
          words_of(u_fragments),
          words_of(u_columns),
          words_of(grad_fragments),
          words_of(grad_columns),
          MmaBackwardShape{forward.mt, forward.nt, buffers, part});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (score_blocks == 1) {
      launch(MmaBackwardPart::kBoth);
    } else {
      launch(MmaBackwardPart::kDx);
      launch(MmaBackwardPart::kDu);
    }
  });
  sum_du_partials<float>(du_partials, du_blocks, g.du, stream);
  return g.gradients(u);
}

// Cuts the work (ForwardParams), launches the forward and, for sequences in
// several pieces, the merge; returns (out, lse).
std::tuple<at::Tensor, at::Tensor> run_forward(detail::PreparedForward& f, at::ScalarType dtype) {
  if (f.lse.numel() == 0) {
    return {f.out, f.lse};
  }
  std::tuple<at::Tensor, at::Tensor> on_cores;
  if (on_tensor_cores(f.params, dtype, f.pool.rows, [&](auto rows) {
        on_cores = run_tensor_core_forward<decltype(rows)>(f);
      })) {
    return on_cores;
  }
  if (takes_matmul_path(f.params)) {
    return detail::pool_forward_by_matmul(f);
  }
  ForwardParams& a = f.params;
  const int64_t n = a.num_heads;
  int64_t blocks = 0;
  int64_t merged_pieces = 1;  // the most pieces one (b, i) merges
  RaggedCut ragged;
  if (a.ragged()) {
    ragged = cut_ragged(f.pool, a.num_queries);
    a.cut = ragged.cut;
    a.first_piece = ragged.first_piece.const_data_ptr<int64_t>();
    blocks = ragged.most_items * a.num_queries;
    merged_pieces = ragged.cut.pieces;
  } else {
    a.cut = cut_sequences(a.batch * a.num_queries, a.seq_len);
    blocks = a.batch * a.num_queries * a.cut.pieces;
    merged_pieces = a.cut.pieces;
  }
  const bool merge = a.ragged() || a.cut.pieces > 1;
  at::Tensor partials;
  if (merge) {
    partials = at::empty({blocks, 1 + 2 * n + a.hidden}, f.out.options());
    a.partials = partials.mutable_data_ptr();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "folded_attention_pool_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kWide = kPackWidth<scalar_t>;
        const int vec = vector_width<scalar_t>(f.pool.rows);
        if (takes_one_score_kernels<scalar_t>(a.num_scores(), a.hidden, vec)) {
          const int64_t shared = one_score_shared_bytes<acc_t>(kOneScoreWarps, a.hidden);
          with_lane_chunks<scalar_t>(a.hidden, [&](auto chunks_c) {
            auto* kernel = &one_score_forward_kernel<scalar_t, kWide, decltype(chunks_c)::value>;
            set_shared_limit<acc_t>(reinterpret_cast<const void*>(kernel), shared);
            kernel<<<blocks, 32 * kOneScoreWarps, shared, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        } else {
          const auto shape = launch_shape(a.hidden, vec);
          const int64_t shared = forward_shared_bytes<acc_t>(shape.threads / 32, n);
          with_layout<scalar_t>(vec, shape.chunks, [&](auto vec_c, auto chunks_c) {
            auto* kernel =
                &forward_kernel<scalar_t, decltype(vec_c)::value, decltype(chunks_c)::value>;
            set_shared_limit<acc_t>(reinterpret_cast<const void*>(kernel), shared);
            kernel<<<blocks, shape.threads, shared, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
        if (merge) {
          const int threads = merge_threads(merged_pieces);
          const int64_t merge_blocks = a.batch * a.num_queries * merge_blocks_per_row(a.hidden, n);
          merge_pieces_kernel<scalar_t>
              <<<merge_blocks, threads, merge_shared_bytes<acc_t>(threads), stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {f.out, f.lse};
}

// Cuts the work (BackwardParams), launches the backward and the sum of the
// du partials in order; returns (dx, du).
std::tuple<at::Tensor, at::Tensor> run_backward(
    detail::PreparedBackward& g, const at::Tensor& u, at::ScalarType dtype) {
  BackwardParams& a = g.params;
  const int64_t num_scores = a.num_scores();
  if (g.dx.numel() == 0 || num_scores == 0) {
    g.dx.zero_();
    g.du.zero_();
    return g.gradients(u);
  }
  std::tuple<at::Tensor, at::Tensor> on_cores;
  if (on_tensor_cores(a, dtype, g.pool.rows, [&](auto rows) {
        on_cores = run_tensor_core_backward<decltype(rows)>(g, u);
      })) {
    return on_cores;
  }
  if (takes_matmul_path(a)) {
    std::tie(g.dx, g.du) = detail::pool_backward_by_matmul(g);
    return g.gradients(u);
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t blocks = 0;
  RaggedCut ragged;
  if (a.ragged()) {
    ragged = cut_ragged(g.pool, 1);
    a.cut = ragged.cut;
    a.first_piece = ragged.first_piece.const_data_ptr<int64_t>();
    blocks = ragged.most_items;
  } else {
    a.cut = cut_sequences(a.batch, a.seq_len);
    blocks = a.batch * a.cut.pieces;
  }
  auto du_partials = at::empty({blocks, num_scores, a.hidden}, g.du.options());
  a.du_partials = du_partials.mutable_data_ptr();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "folded_attention_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kWide = kPackWidth<scalar_t>;
        const int vec = vector_width<scalar_t>(g.pool.rows);
        if (takes_one_score_kernels<scalar_t>(num_scores, a.hidden, vec)) {
          const int64_t shared = one_score_shared_bytes<acc_t>(kOneScoreWarps, a.hidden);
          with_lane_chunks<scalar_t>(a.hidden, [&](auto chunks_c) {
            auto* kernel = &one_score_backward_kernel<scalar_t, kWide, decltype(chunks_c)::value>;
            set_shared_limit<acc_t>(reinterpret_cast<const void*>(kernel), shared);
            kernel<<<blocks, 32 * kOneScoreWarps, shared, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        } else {
          const auto shape = launch_shape(a.hidden, vec);
          const int64_t shared =
              backward_shared_bytes<acc_t>(shape.threads / 32, a.num_heads, num_scores);
          with_layout<scalar_t>(vec, shape.chunks, [&](auto vec_c, auto chunks_c) {
            auto* kernel =
                &backward_kernel<scalar_t, decltype(vec_c)::value, decltype(chunks_c)::value>;
            set_shared_limit<acc_t>(reinterpret_cast<const void*>(kernel), shared);
            kernel<<<blocks, shape.threads, shared, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
        sum_du_partials<acc_t>(du_partials, blocks, g.du, stream);
      });
  return g.gradients(u);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto f = detail::prepare_forward(x, u, mask, scale, full_width, attn_bias, lengths);
  return run_forward(f, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto g = detail::prepare_backward(
      grad_out, x, u, mask, out, lse, scale, full_width, attn_bias, lengths);
  return run_backward(g, u, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> varlen_forward_cuda(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto f = detail::prepare_varlen_forward(x, cu_seqlens, u, scale, full_width);
  return run_forward(f, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> varlen_backward_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto g = detail::prepare_varlen_backward(grad_out, x, cu_seqlens, u, out, lse, scale, full_width);
  return run_backward(g, u, x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, CUDA, m) {
  m.impl("_folded_attention_pool_forward", &forward_cuda);
  m.impl("_folded_attention_pool_backward", &backward_cuda);
  m.impl("_folded_attention_pool_varlen_forward", &varlen_forward_cuda);
  m.impl("_folded_attention_pool_varlen_backward", &varlen_backward_cuda);
  m.impl("_fold_query_forward", &detail::fold_query_by_matmul);
  m.impl("_fold_query_backward", &detail::fold_query_backward_by_matmul);
}

}  // namespace attnpool::cuda
