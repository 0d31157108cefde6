// The tensor-core forward for several scores per row
// (csrc/ops/cuda/tensor_core_kernel.cuh, [Note: the tensor-core forward])
// timed alone beside the kernel the op runs today for such calls when they
// are small (forward_kernel, a block per query) and one read of x, bfloat16,
// at the shapes of the GPU benchmark's queries x heads grid and one of
// 256 MB. Each call is timed between CUDA events with L2 flushed before it;
// medians. The matrix-product path that large calls take goes through torch
// and is timed by `python -m attnpool.bench_gpu` in the same GPU session.
// Both kernels' out is compared.
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

using attnpool::ForwardParams;
using attnpool::PieceCut;
using attnpool::bench::copy_to_host;
using attnpool::bench::Device;
using attnpool::bench::fill_kernel;
using attnpool::bench::kFlushBytes;
using attnpool::bench::median;
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
  bf16* x;
  float* u;
  uint32_t* u_fragments;
  float* out;
  float* lse;
  float* partials;
};

// Pieces of each sequence for `blocks_per_piece` blocks per piece: about
// two waves of `per_sm` blocks on every SM, pieces of at least 64 rows.
PieceCut cut_for(const Device& device, const Shape& s, int64_t blocks_per_piece, int per_sm) {
  const int64_t per_sequence = s.batch * blocks_per_piece;
  const int64_t wanted = (2 * int64_t{per_sm} * device.sms + per_sequence - 1) / per_sequence;
  const int64_t most = std::max<int64_t>(1, s.seq_len / 64);
  return PieceCut::into(
      s.seq_len, std::clamp<int64_t>(wanted, 1, most), attnpool::kMaxForwardPieceRows);
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

void merge(const ForwardParams& a) {
  if (a.cut.pieces > 1) {
    const int threads = cuda::merge_threads(a.cut.pieces);
    cuda::merge_pieces_kernel<bf16>
        <<<a.batch * a.num_queries * cuda::merge_blocks_per_row(a.hidden, a.num_heads),
           threads,
           cuda::merge_shared_bytes<float>(threads)>>>(a);
  }
}

// forward_kernel as the entry point launches it for bfloat16 rows of H <= 2048.
void forward_by_queries(const Device& device, const Buffers& b, bool describe) {
  constexpr int V = cuda::kPackWidth<bf16>;
  const int threads = 128 * static_cast<int>((b.shape.hidden + 2 * 128 * V - 1) / (2 * 128 * V));
  ForwardParams a = params_of(b, PieceCut{1, b.shape.seq_len});
  a.cut = cut_for(device, b.shape, a.num_queries, 8);
  const int64_t shared = cuda::forward_shared_bytes<float>(threads / 32, a.num_heads);
  auto* kernel = b.shape.hidden <= threads * V ? &cuda::forward_kernel<bf16, V, 1>
                                               : &cuda::forward_kernel<bf16, V, 2>;
  prepare(kernel, threads / 32, shared, describe, "forward_kernel");
  kernel<<<a.batch * a.num_queries * a.cut.pieces, threads, shared>>>(a);
  merge(a);
}

template <int MT, int NT>
void forward_on_tensor_cores(const Device& device, const Buffers& b, bool describe) {
  ForwardParams a = params_of(b, PieceCut{1, b.shape.seq_len});
  const int64_t groups = cuda::mma_groups(a.num_queries, NT);
  a.cut = cut_for(device, b.shape, groups, 1);
  const int64_t shared = cuda::mma_shared_layout(a.hidden, MT, NT).bytes;
  auto* kernel = &cuda::mma_forward_kernel<MT, NT>;
  prepare(kernel, cuda::kMmaWarps, shared, describe, "mma_forward_kernel");
  kernel<<<a.batch * groups * a.cut.pieces, cuda::kMmaThreads, shared>>>(a, b.u_fragments);
  merge(a);
}

void run_shape(const Device& device, const Shape& s, int64_t most_shared, int rounds) {
  Buffers b{s};
  const ForwardParams shape = params_of(b, PieceCut{1, s.seq_len});
  const int64_t Q = shape.num_queries, n = shape.num_heads, H = s.hidden;
  const size_t elements = static_cast<size_t>(s.batch * s.seq_len * H);
  const int64_t out_values = s.batch * Q * H;
  int nt = Q > 8 ? 2 : 1;
  if (!cuda::takes_mma_forward(shape, nt, most_shared)) {
    nt = 1;
  }
  // A state per (sequence, query, piece) for the larger of the two cuts.
  const int64_t most_pieces = std::max(
      cut_for(device, s, Q, 8).pieces, cut_for(device, s, cuda::mma_groups(Q, nt), 1).pieces);
  const int64_t most_states = s.batch * Q * most_pieces;
  std::printf(
      "%s: %lldx%lldx%lld bfloat16, %lld queries x %lld heads%s\n",
      s.label,
      static_cast<long long>(s.batch),
      static_cast<long long>(s.seq_len),
      static_cast<long long>(H),
      static_cast<long long>(s.num_queries),
      static_cast<long long>(s.num_heads),
      s.full_width ? " full width" : "");
  if (!cuda::takes_mma_forward(shape, nt, most_shared)) {
    std::printf("  not a shape the tensor-core forward takes\n");
    return;
  }
  const int mt = cuda::mma_score_tiles(Q, n, nt);
  std::vector<float> u(static_cast<size_t>(Q * n * H));
  for (size_t i = 0; i < u.size(); ++i) {
    u[i] = 0.5f * std::sin(0.37f * static_cast<float>(i));
  }
  const auto fragments = cuda::mma_u_fragments(u.data(), Q, n, H, mt, nt);
  CHECK(cudaMalloc(&b.x, elements * sizeof(bf16)));
  CHECK(cudaMalloc(&b.u, u.size() * sizeof(float)));
  CHECK(cudaMalloc(&b.u_fragments, fragments.size() * sizeof(uint32_t)));
  CHECK(cudaMalloc(&b.out, out_values * sizeof(float)));
  CHECK(cudaMalloc(&b.lse, s.batch * Q * n * 2 * sizeof(float)));
  CHECK(cudaMalloc(&b.partials, most_states * (1 + 2 * n + H) * sizeof(float)));
  float* sink;
  CHECK(cudaMalloc(&sink, sizeof(float)));
  CHECK(cudaMemcpy(b.u, u.data(), u.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(
      b.u_fragments,
      fragments.data(),
      fragments.size() * sizeof(uint32_t),
      cudaMemcpyHostToDevice));
  fill_kernel<bf16><<<1024, 256>>>(b.x, elements, 1, 2.0f);
  CHECK(cudaDeviceSynchronize());

  const auto run_mma = [&](bool describe) {
    cuda::with_mma_score_tiles(mt, [&](auto tiles) {
      constexpr int MT = decltype(tiles)::value;
      if (nt == 1) {
        forward_on_tensor_cores<MT, 1>(device, b, describe);
      } else {
        forward_on_tensor_cores<MT, 2>(device, b, describe);
      }
    });
  };
  forward_by_queries(device, b, true);
  CHECK(cudaDeviceSynchronize());
  const auto want = copy_to_host(b.out, out_values);
  run_mma(true);
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaGetLastError());
  std::printf(
      "    %d score tiles, %d column tiles of queries; out differs from forward_kernel's by "
      "%.1e\n",
      mt,
      nt,
      relative_difference(copy_to_host(b.out, out_values), want));

  std::vector<float> reads, by_queries, on_tensor_cores;
  const size_t words = elements * sizeof(bf16) / 16;
  for (int r = 0; r < rounds; ++r) {
    reads.push_back(time_ms(device, [&] {
      read_kernel<<<device.sms * 8, 512>>>(reinterpret_cast<const uint4*>(b.x), words, sink);
    }));
    by_queries.push_back(time_ms(device, [&] { forward_by_queries(device, b, false); }));
    on_tensor_cores.push_back(time_ms(device, [&] { run_mma(false); }));
  }
  const double bytes = static_cast<double>(elements * sizeof(bf16));
  const float read = median(reads);
  std::printf("  read %.3f ms (%.0f GB/s)\n", read, bytes / read / 1e6);
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
  std::fflush(stdout);
  for (void* p :
       {static_cast<void*>(b.x),
        static_cast<void*>(b.u),
        static_cast<void*>(b.u_fragments),
        static_cast<void*>(b.out),
        static_cast<void*>(b.lse),
        static_cast<void*>(b.partials),
        static_cast<void*>(sink)}) {
    CHECK(cudaFree(p));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 11;
  Device device;
  cudaDeviceProp properties;
  CHECK(cudaGetDeviceProperties(&properties, 0));
  device.sms = properties.multiProcessorCount;
  CHECK(cudaMalloc(&device.flush, kFlushBytes));
  std::printf(
      "%s, %d SMs: the tensor-core forward alone; CUDA events, L2 flushed before each call, "
      "medians of %d rounds\n",
      properties.name,
      device.sms,
      rounds);
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
    run_shape(device, s, properties.sharedMemPerBlockOptin, rounds);
  }
  return 0;
}
