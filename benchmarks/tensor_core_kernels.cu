// The tensor-core kernels for several scores per row
// (csrc/ops/cuda/tensor_core_kernel.cuh, [Note: the tensor-core forward] and
// [Note: the tensor-core backward]) timed alone beside the kernels the op
// runs today for such calls when they are small (forward_kernel, a block
// per query; backward_kernel) and one read and one copy of x, at the shapes
// of the GPU benchmark's queries x heads grid and one of 256 MB: bfloat16,
// then float32 rows (3xTF32 against the other kernels' float32 FMA). The
// backward runs where shared memory allows (one launch up to 16 scores,
// dx's and du's past that). The tensor-core calls include
// laying out their operands from u and grad_out (mma_operand_kernel), as the op would per call.
// Each call is timed between CUDA events with L2 flushed before it; medians. The matrix-product
// path that large calls take goes through torch and is timed by `python -m attnpool.bench_gpu` in
// the same GPU session. The kernels' out, dx and du are compared.
//
// scripts/gpu_check.sh builds and runs it; by hand:
//   nvcc -O3 --expt-relaxed-constexpr -std=c++20 -arch=sm_90 \
//     -I$(python3 -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])') \
//     -Icsrc -o tensor_core_kernels benchmarks/tensor_core_kernels.cu && ./tensor_core_kernels
//     [rounds]

#include "kernel_timing.cuh"
#include "ops/cuda/tensor_core_kernel.cuh"

#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

namespace {

using attnpool::BackwardParams;
using attnpool::ForwardParams;
using attnpool::PieceCut;
using attnpool::bench::copy_to_host;
using attnpool::bench::Device;
using attnpool::bench::fill_kernel;
using attnpool::bench::free_all;
using attnpool::bench::median;
using attnpool::bench::open_device;
using attnpool::bench::prepare;
using attnpool::bench::read_kernel;
using attnpool::bench::relative_difference;
using attnpool::bench::time_ms;
namespace cuda = attnpool::cuda;
using bf16 = c10::BFloat16;

struct Shape {
  const char* label;
  int64_t batch, seq_len, hidden, num_queries, num_heads;
  bool full_width;  // as the kernels see it: Q * n one-head queries of H columns
};

struct Buffers {
  Shape shape;
  int score_tiles;  // the tensor-core forward's MT, NT and tiles of x
  int nt;
  int forward_buffers;
  void* x;  // bfloat16 or float32

  float* u;
  uint32_t* u_fragments;
  float* out;
  float* lse;
  float* partials;
  // The backward's:
  void* dx;
  float* grad_out;
  float* du_partials;
  float* du;
  uint32_t* u_columns;
  uint32_t* grad_fragments;
  uint32_t* grad_columns;
};

// Pieces of each sequence for `blocks_per_piece` blocks per piece: about
// two waves of `per_sm` blocks on every SM, pieces of at least 64 rows.
// The entry point's cuts: cut_sequences for forward_kernel (a block per
// query) and backward_kernel, pieces for about 8 blocks per SM of at least
// 32 rows; mma_cut for the tensor-core kernels.
PieceCut cut_by_rows(const Device& device, const Shape& s, int64_t blocks_per_piece) {
  return cuda::cut_for_blocks(
      s.batch * blocks_per_piece,
      s.seq_len,
      device.sms,
      cuda::kBlocksPerSm,
      cuda::kMinTilesPerPiece * cuda::kTileRows);
}

PieceCut cut_on_tensor_cores(const Device& device, const Shape& s, int64_t groups) {
  return cuda::mma_cut(s.batch * groups, s.seq_len, device.sms);
}

ForwardParams params_of(const Buffers& b, const PieceCut& cut) {
  const Shape& s = b.shape;
  ForwardParams a{};
  a.batch = s.batch;
  a.seq_len = s.seq_len;
  a.hidden = s.hidden;
  a.num_queries = s.full_width ? s.num_queries * s.num_heads : s.num_queries;
  a.num_heads = s.full_width ? 1 : s.num_heads;
  a.head_dim = s.hidden / a.num_heads;
  a.x = b.x;
  a.x_batch_stride = s.seq_len * s.hidden;
  a.x_seq_stride = s.hidden;
  a.u = b.u;
  a.scale = 0.03;
  a.cut = cut;
  a.out = b.out;
  a.lse = b.lse;
  a.partials = b.partials;
  return a;
}

template <typename scalar_t>
void merge(const ForwardParams& a) {
  if (a.cut.pieces > 1) {
    const int threads = cuda::merge_threads(a.cut.pieces);
    cuda::merge_pieces_kernel<scalar_t>
        <<<a.batch * a.num_queries * cuda::merge_blocks_per_row(a.hidden, a.num_heads),
           threads,
           cuda::merge_shared_bytes<float>(threads)>>>(a);
  }
}

// forward_kernel as the entry point launches it for rows of 16-byte packs
// that 256 threads cover with two packs each.
template <typename scalar_t>
void forward_by_queries(const Device& device, const Buffers& b, bool describe) {
  constexpr int V = cuda::kPackWidth<scalar_t>;
  const int threads = 128 * static_cast<int>((b.shape.hidden + 2 * 128 * V - 1) / (2 * 128 * V));
  ForwardParams a = params_of(b, PieceCut{1, b.shape.seq_len});
  a.cut = cut_by_rows(device, b.shape, a.num_queries);
  const int64_t shared = cuda::forward_shared_bytes<float>(threads / 32, a.num_heads);
  auto* kernel = b.shape.hidden <= threads * V ? &cuda::forward_kernel<scalar_t, V, 1>
                                               : &cuda::forward_kernel<scalar_t, V, 2>;
  prepare(kernel, threads / 32, shared, describe, "forward_kernel");
  kernel<<<a.batch * a.num_queries * a.cut.pieces, threads, shared>>>(a);
  merge<scalar_t>(a);
}

BackwardParams backward_params_of(const Buffers& b, const PieceCut& cut) {
  BackwardParams g{};
  static_cast<ForwardParams&>(g) = params_of(b, cut);
  g.grad_out = b.grad_out;
  g.dx = b.dx;
  g.du_partials = b.du_partials;
  g.du = b.du;
  return g;
}

void sum_du_partials(const BackwardParams& g, int64_t blocks) {
  constexpr int kThreads = 256;
  const int64_t width = g.num_scores() * g.hidden;
  cuda::reduce_partials_kernel<float>
      <<<(width + cuda::kStripeColumns - 1) / cuda::kStripeColumns,
         kThreads,
         cuda::reduce_shared_bytes<float>(kThreads)>>>(
          static_cast<const float*>(g.du_partials), static_cast<float*>(g.du), blocks, width);
}

// backward_kernel as the entry point launches it.
template <typename scalar_t>
void backward_by_rows(const Device& device, const Buffers& b, bool describe) {
  constexpr int V = cuda::kPackWidth<scalar_t>;
  const int threads = 128 * static_cast<int>((b.shape.hidden + 2 * 128 * V - 1) / (2 * 128 * V));
  const BackwardParams g = backward_params_of(b, cut_by_rows(device, b.shape, 1));
  const int64_t shared =
      cuda::backward_shared_bytes<float>(threads / 32, g.num_heads, g.num_scores());
  auto* kernel = b.shape.hidden <= threads * V ? &cuda::backward_kernel<scalar_t, V, 1>
                                               : &cuda::backward_kernel<scalar_t, V, 2>;
  prepare(kernel, threads / 32, shared, describe, "backward_kernel");
  kernel<<<g.batch * g.cut.pieces, threads, shared>>>(g);
  sum_du_partials(g, g.batch * g.cut.pieces);
}

void lay_out(const cuda::MmaOperand& op, uint32_t* words) {
  cuda::mma_operand_kernel<cuda::MmaOperand>
      <<<cuda::mma_operand_blocks(op), cuda::kMmaOperandThreads>>>(op, words);
}

// The tensor-core backward as the entry point launches it: dx and du in one
// launch for one score block, else a launch each ([Note: the tensor-core
// backward]), then the sum of du's partials.
template <typename scalar_t>
void backward_on_tensor_cores(const Device& device, const Buffers& b, int buffers, bool describe) {
  constexpr bool kTf32 = std::is_same_v<scalar_t, float>;
  const BackwardParams call = backward_params_of(b, cut_on_tensor_cores(device, b.shape, 1));
  const int64_t Q = call.num_queries, n = call.num_heads, H = call.hidden, B = call.batch;
  const int mt = b.score_tiles;
  const int64_t score_blocks = cuda::mma_groups(Q, b.nt) * mt;
  lay_out(cuda::mma_u_operand(b.u, Q, n, H, mt, b.nt, false, kTf32), b.u_fragments);
  lay_out(cuda::mma_u_operand(b.u, Q, n, H, mt, b.nt, true, kTf32), b.u_columns);
  lay_out(cuda::mma_grad_operand(b.grad_out, B, Q, n, H, mt, b.nt, false, kTf32), b.grad_fragments);
  lay_out(cuda::mma_grad_operand(b.grad_out, B, Q, n, H, mt, b.nt, true, kTf32), b.grad_columns);
  const int64_t shared = cuda::mma_backward_shared_bytes<scalar_t>(H, buffers, score_blocks);
  cuda::with_mma_chains(mt, [&](auto chains) {
    auto* kernel = &cuda::mma_backward_kernel<scalar_t, decltype(chains)::value>;
    prepare(kernel, cuda::kMmaWarps, shared, describe, "mma_backward_kernel");
    const auto launch = [&](cuda::MmaBackwardPart part) {
      const bool du_only = part == cuda::MmaBackwardPart::kDu;
      const int64_t groups = du_only ? score_blocks : 1;
      const BackwardParams g = backward_params_of(b, cut_on_tensor_cores(device, b.shape, groups));
      const int64_t part_shared =
          cuda::mma_backward_layout<scalar_t>(H, buffers, du_only ? 1 : score_blocks, part).bytes;
      kernel<<<g.batch * groups * g.cut.pieces, cuda::kMmaThreads, part_shared>>>(
          g,
          b.u_fragments,
          b.u_columns,
          b.grad_fragments,
          b.grad_columns,
          cuda::MmaBackwardShape{mt, b.nt, buffers, part});
      if (part != cuda::MmaBackwardPart::kDx) {
        sum_du_partials(g, g.batch * g.cut.pieces);
      }
    };
    if (score_blocks == 1) {
      launch(cuda::MmaBackwardPart::kBoth);
    } else {
      launch(cuda::MmaBackwardPart::kDx);
      launch(cuda::MmaBackwardPart::kDu);
    }
  });
}

template <typename scalar_t, int MT, int NT>
void forward_on_tensor_cores(const Device& device, const Buffers& b, bool describe) {
  ForwardParams a = params_of(b, PieceCut{1, b.shape.seq_len});
  const int64_t groups = cuda::mma_groups(a.num_queries, NT);
  a.cut = cut_on_tensor_cores(device, b.shape, groups);
  const int64_t shared =
      cuda::mma_shared_layout<scalar_t>(a.hidden, MT, NT, b.forward_buffers).bytes;
  constexpr bool kTf32 = std::is_same_v<scalar_t, float>;
  lay_out(
      cuda::mma_u_operand(b.u, a.num_queries, a.num_heads, a.hidden, MT, NT, false, kTf32),
      b.u_fragments);
  auto* kernel = &cuda::mma_forward_kernel<scalar_t, MT, NT>;
  prepare(kernel, cuda::kMmaWarps, shared, describe, "mma_forward_kernel");
  kernel<<<a.batch * groups * a.cut.pieces, cuda::kMmaThreads, shared>>>(
      a, b.u_fragments, b.forward_buffers);
  merge<scalar_t>(a);
}

template <typename scalar_t>
void run_shape(const Device& device, const Shape& s, int64_t most_shared, int rounds) {
  constexpr bool kBFloat16 = std::is_same_v<scalar_t, bf16>;
  Buffers b{s};
  const ForwardParams shape = params_of(b, PieceCut{1, s.seq_len});
  const int64_t Q = shape.num_queries, n = shape.num_heads, H = s.hidden;
  const size_t elements = static_cast<size_t>(s.batch * s.seq_len * H);
  const int64_t out_values = s.batch * Q * H;
  const cuda::MmaForwardShape forward = cuda::mma_forward_shape<scalar_t>(shape, most_shared);
  const int nt = std::max(forward.nt, 1);
  // A state per (sequence, query, piece) for the larger of the two cuts.
  const int64_t most_pieces = std::max(
      cut_by_rows(device, s, Q).pieces,
      cut_on_tensor_cores(device, s, cuda::mma_groups(Q, nt)).pieces);
  const int64_t most_states = s.batch * Q * most_pieces;
  std::printf(
      "%s: %lldx%lldx%lld %s, %lld queries x %lld heads%s\n",
      s.label,
      static_cast<long long>(s.batch),
      static_cast<long long>(s.seq_len),
      static_cast<long long>(H),
      kBFloat16 ? "bfloat16" : "float32 (3xTF32)",
      static_cast<long long>(s.num_queries),
      static_cast<long long>(s.num_heads),
      s.full_width ? " full width" : "");
  if (forward.mt == 0) {
    std::printf("  not a shape the tensor-core forward takes\n");
    return;
  }
  const int mt = forward.mt;
  const int64_t score_blocks = cuda::mma_score_blocks(shape, forward);
  const int buffers = cuda::mma_backward_buffers<scalar_t>(shape, most_shared);
  std::vector<float> u(static_cast<size_t>(Q * n * H));
  for (size_t i = 0; i < u.size(); ++i) {
    u[i] = 0.5f * std::sin(0.37f * static_cast<float>(i));
  }
  std::vector<float> grad_out(static_cast<size_t>(out_values));
  for (size_t i = 0; i < grad_out.size(); ++i) {
    grad_out[i] = std::cos(0.11f * static_cast<float>(i));
  }
  b.score_tiles = mt;
  b.nt = nt;
  b.forward_buffers = forward.buffers;
  // Words of the operands, all in the forward's score blocks: u's fragments
  // and columns, grad_out's fragments and columns.
  const int64_t u_words = cuda::mma_u_operand(nullptr, Q, n, H, mt, nt, false, !kBFloat16).words();
  const int64_t grad_words =
      cuda::mma_grad_operand(nullptr, s.batch, Q, n, H, mt, nt, false, !kBFloat16).words();
  const int64_t most_blocks = s.batch * std::max(
                                            cut_by_rows(device, s, 1).pieces,
                                            cut_on_tensor_cores(device, s, score_blocks).pieces);
  const auto to_device = [](auto*& to, const auto& values) {
    CHECK(cudaMalloc(&to, values.size() * sizeof(values[0])));
    CHECK(cudaMemcpy(to, values.data(), values.size() * sizeof(values[0]), cudaMemcpyHostToDevice));
  };
  CHECK(cudaMalloc(&b.x, elements * sizeof(scalar_t)));
  CHECK(cudaMalloc(&b.dx, elements * sizeof(scalar_t)));
  CHECK(cudaMalloc(&b.out, out_values * sizeof(float)));
  CHECK(cudaMalloc(&b.lse, s.batch * Q * n * 2 * sizeof(float)));
  CHECK(cudaMalloc(&b.partials, most_states * (1 + 2 * n + H) * sizeof(float)));
  CHECK(cudaMalloc(&b.du_partials, most_blocks * Q * n * H * sizeof(float)));
  CHECK(cudaMalloc(&b.du, Q * n * H * sizeof(float)));
  CHECK(cudaMalloc(&b.u_fragments, u_words * sizeof(uint32_t)));
  CHECK(cudaMalloc(&b.u_columns, u_words * sizeof(uint32_t)));
  CHECK(cudaMalloc(&b.grad_fragments, grad_words * sizeof(uint32_t)));
  CHECK(cudaMalloc(&b.grad_columns, grad_words * sizeof(uint32_t)));
  to_device(b.u, u);
  to_device(b.grad_out, grad_out);
  float* sink;
  CHECK(cudaMalloc(&sink, sizeof(float)));
  fill_kernel<scalar_t><<<1024, 256>>>(static_cast<scalar_t*>(b.x), elements, 1, 2.0f);
  CHECK(cudaDeviceSynchronize());

  const auto run_mma = [&](bool describe) {
    cuda::with_mma_score_tiles(mt, [&](auto tiles) {
      constexpr int MT = decltype(tiles)::value;
      if (nt == 1) {
        forward_on_tensor_cores<scalar_t, MT, 1>(device, b, describe);
      } else {
        forward_on_tensor_cores<scalar_t, MT, 2>(device, b, describe);
      }
    });
  };
  forward_by_queries<scalar_t>(device, b, true);
  CHECK(cudaDeviceSynchronize());
  const auto want = copy_to_host(b.out, out_values);
  run_mma(true);
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaGetLastError());
  std::printf(
      "    %d score tiles, %d column tiles of queries, %d tiles of x; out differs from "
      "forward_kernel's by %.1e\n",
      mt,
      nt,
      forward.buffers,
      relative_difference(copy_to_host(b.out, out_values), want));

  // The backwards read the tensor-core forward's out and lse.
  const auto* dx = static_cast<const scalar_t*>(b.dx);
  if (buffers > 0) {
    backward_by_rows<scalar_t>(device, b, true);
    CHECK(cudaDeviceSynchronize());
    const auto want_dx = copy_to_host(dx, elements);
    const auto want_du = copy_to_host(b.du, Q * n * H);
    backward_on_tensor_cores<scalar_t>(device, b, buffers, true);
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaGetLastError());
    std::printf(
        "    %d tiles of x in shared memory; dx differs from backward_kernel's by %.1e, du by "
        "%.1e\n",
        buffers,
        relative_difference(copy_to_host(dx, elements), want_dx),
        relative_difference(copy_to_host(b.du, Q * n * H), want_du));
  }

  std::vector<float> reads, copies, by_queries, on_tensor_cores, by_rows, backward_on_cores;
  const size_t words = elements * sizeof(scalar_t) / 16;
  for (int r = 0; r < rounds; ++r) {
    reads.push_back(time_ms(device, [&] {
      read_kernel<<<device.sms * 8, 512>>>(reinterpret_cast<const uint4*>(b.x), words, sink);
    }));
    copies.push_back(time_ms(device, [&] {
      CHECK(cudaMemcpyAsync(b.dx, b.x, elements * sizeof(scalar_t), cudaMemcpyDeviceToDevice));
    }));
    by_queries.push_back(time_ms(device, [&] { forward_by_queries<scalar_t>(device, b, false); }));
    on_tensor_cores.push_back(time_ms(device, [&] { run_mma(false); }));
    if (buffers > 0) {
      by_rows.push_back(time_ms(device, [&] { backward_by_rows<scalar_t>(device, b, false); }));
      backward_on_cores.push_back(
          time_ms(device, [&] { backward_on_tensor_cores<scalar_t>(device, b, buffers, false); }));
    }
  }
  const double bytes = static_cast<double>(elements * sizeof(scalar_t));
  const float read = median(reads);
  const float copy = median(copies);
  std::printf(
      "  read %.3f ms (%.0f GB/s), copy %.3f ms (%.0f GB/s read + written)\n",
      read,
      bytes / read / 1e6,
      copy,
      2 * bytes / copy / 1e6);
  for (const auto& [name, times] :
       {std::pair{"forward_kernel", median(by_queries)},
        std::pair{"mma_forward_kernel", median(on_tensor_cores)}}) {
    std::printf(
        "  %-20s fwd %.3f ms %5.0f GB/s = %.2f of read\n",
        name,
        times,
        bytes / times / 1e6,
        read / times);
  }
  if (buffers > 0) {
    for (const auto& [name, times] :
         {std::pair{"backward_kernel", median(by_rows)},
          std::pair{"mma_backward_kernel", median(backward_on_cores)}}) {
      std::printf("  %-20s bwd %.3f ms = %.2f of copy\n", name, times, copy / times);
    }
  }
  std::fflush(stdout);
  free_all(
      {b.x,
       b.dx,
       b.u,
       b.u_fragments,
       b.out,
       b.lse,
       b.partials,
       b.du_partials,
       b.du,
       b.grad_out,
       b.u_columns,
       b.grad_fragments,
       b.grad_columns,
       sink});
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 11;
  cudaDeviceProp properties;
  const Device device = open_device("the tensor-core kernels", rounds, properties);
  const Shape shapes[] = {
      {"1x16 big", 64, 2048, 1024, 1, 16, false},
      {"1x12", 32, 512, 768, 1, 12, false},
      {"1x16", 32, 512, 768, 1, 16, false},
      {"4x12", 32, 512, 768, 4, 12, false},
      {"8x1", 32, 512, 768, 8, 1, false},
      {"16x12", 32, 512, 768, 16, 12, false},
      {"so400m full width", 16, 729, 1152, 1, 16, true},
      {"coca 256x8", 8, 256, 768, 256, 8, false},
  };
  for (const Shape& s : shapes) {
    run_shape<bf16>(device, s, properties.sharedMemPerBlockOptin, rounds);
  }
  for (const Shape& s : shapes) {
    run_shape<float>(device, s, properties.sharedMemPerBlockOptin, rounds);
  }
  return 0;
}
