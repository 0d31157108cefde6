// The one-score CUDA kernels (csrc/ops/cuda/one_score_kernel.cuh) timed
// alone, without torch's dispatch, allocator or autograd: forward (with the
// merge of pieces) and backward (with the sum of du's partials) at the
// 256 MB+ shapes of the GPU benchmark and BERT size, float32 and bfloat16,
// for several launch variants (rows a warp takes between two softmax
// updates, warps per block, blocks per SM asked of the cut into pieces),
// beside one read of x (a 16-byte-load kernel) and one copy of it
// (cudaMemcpy), in the same run. Each call is timed between CUDA events with
// L2 flushed before it (a 512 MB memset outside the timed span); medians.
// Every variant's results are compared with the first variant's.
//
// scripts/gpu_check.sh builds and runs it; by hand:
//   nvcc -O3 --expt-relaxed-constexpr -std=c++20 -arch=sm_90 \
//     -I$(python3 -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])') \
//     -Icsrc -o one_score_kernels benchmarks/one_score_kernels.cu && ./one_score_kernels [rounds]
//
// To time another version of the kernels beside these, copy its
// one_score_kernel.cuh with its namespace renamed to attnpool::cuda::other
// (and its #pragma once removed) and add -DATTNPOOL_OTHER_ONE_SCORE='"path"':
// it then runs as the first variant, "other".

#include "ops/cuda/folded_attention_pool_kernel.cuh"
#include "ops/cuda/one_score_kernel.cuh"
#ifdef ATTNPOOL_OTHER_ONE_SCORE
#include ATTNPOOL_OTHER_ONE_SCORE
#endif

#include "kernel_timing.cuh"

#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

using attnpool::BackwardParams;
using attnpool::ForwardParams;
using attnpool::PieceCut;
using attnpool::bench::check;
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

// A launch variant: which kernels, rows per warp tile, warps per block, and
// the blocks per SM that the cut into pieces aims at (the entry point's 8).
struct Variant {
  const char* name;
  bool other;
  int rows;
  int warps;
  int blocks_per_sm;
  bool u_shared = false;  // the forward reads u from shared memory ([Note: u in shared memory])
};

// The entry point's cut (folded_attention_pool_kernel.cu, cut_sequences),
// with blocks_per_sm in place of its 8.
PieceCut cut_for(const Device& device, int64_t batch, int64_t seq_len, int blocks_per_sm) {
  return cuda::cut_for_blocks(
      batch, seq_len, device.sms, blocks_per_sm, cuda::kMinTilesPerPiece * cuda::kTileRows);
}

template <typename T>
struct Buffers {
  int64_t batch, seq_len, hidden;
  T* x;
  T* dx;
  float* u;
  float* out;
  float* lse;
  float* grad_out;
  float* partials;
  float* du_partials;
  float* du;

  size_t elements() const {
    return static_cast<size_t>(batch * seq_len * hidden);
  }
};

template <typename T>
ForwardParams forward_params(const Buffers<T>& b, const PieceCut& cut) {
  ForwardParams a{};
  a.batch = b.batch;
  a.seq_len = b.seq_len;
  a.hidden = b.hidden;
  a.num_queries = 1;
  a.num_heads = 1;
  a.head_dim = b.hidden;
  a.x = b.x;
  a.x_batch_stride = b.seq_len * b.hidden;
  a.x_seq_stride = b.hidden;
  a.u = b.u;
  a.scale = 0.03;
  a.cut = cut;
  a.out = b.out;
  a.lse = b.lse;
  a.partials = b.partials;
  return a;
}

template <typename T, int CHUNKS, int R, bool kUShared>
void forward(const Device& device, const Buffers<T>& b, const Variant& v, bool describe) {
  constexpr int V = cuda::kPackWidth<T>;
  const PieceCut cut = cut_for(device, b.batch, b.seq_len, v.blocks_per_sm);
  const ForwardParams a = forward_params(b, cut);
  const int64_t shared = cuda::one_score_shared_bytes<float>(
      v.warps, b.hidden, kUShared ? cuda::kLaneColumns<V, CHUNKS> : 0);
  auto* kernel = &cuda::one_score_forward_kernel<T, V, CHUNKS, R, kUShared>;
#ifdef ATTNPOOL_OTHER_ONE_SCORE
  if (v.other) {
    kernel = &cuda::other::one_score_forward_kernel<T, V, CHUNKS>;
  }
#endif
  prepare(kernel, v.warps, shared, describe, "forward");
  kernel<<<b.batch * cut.pieces, 32 * v.warps, shared>>>(a);
  if (cut.pieces > 1) {
    const int threads = cuda::merge_threads(cut.pieces);
    cuda::merge_pieces_kernel<T>
        <<<b.batch * cuda::merge_blocks_per_row(b.hidden, 1),
           threads,
           cuda::merge_shared_bytes<float>(threads)>>>(a);
  }
}

template <typename T, int CHUNKS, int R>
void backward(const Device& device, const Buffers<T>& b, const Variant& v, bool describe) {
  constexpr int V = cuda::kPackWidth<T>;
  const PieceCut cut = cut_for(device, b.batch, b.seq_len, v.blocks_per_sm);
  BackwardParams g{};
  static_cast<ForwardParams&>(g) = forward_params(b, cut);
  g.grad_out = b.grad_out;
  g.dx = b.dx;
  g.du_partials = b.du_partials;
  g.du = b.du;
  const int64_t shared = cuda::one_score_shared_bytes<float>(v.warps, b.hidden);
  auto* kernel = &cuda::one_score_backward_kernel<T, V, CHUNKS, R>;
#ifdef ATTNPOOL_OTHER_ONE_SCORE
  if (v.other) {
    kernel = &cuda::other::one_score_backward_kernel<T, V, CHUNKS>;
  }
#endif
  prepare(kernel, v.warps, shared, describe, "backward");
  const int64_t blocks = b.batch * cut.pieces;
  kernel<<<blocks, 32 * v.warps, shared>>>(g);
  constexpr int kReduceThreads = 256;
  cuda::reduce_partials_kernel<float>
      <<<(b.hidden + cuda::kStripeColumns - 1) / cuda::kStripeColumns,
         kReduceThreads,
         cuda::reduce_shared_bytes<float>(kReduceThreads)>>>(b.du_partials, b.du, blocks, b.hidden);
}

// Calls f with the compile-time rows of variant v.
template <typename F>
void with_rows(const Variant& v, F&& f) {
  if (v.rows == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (v.rows == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 2>{});
  }
}

template <typename T, int CHUNKS>
void run_shape(
    const Device& device,
    const std::vector<Variant>& variants,
    const char* label,
    int64_t batch,
    int64_t seq_len,
    int64_t hidden,
    int rounds) {
  Buffers<T> b{batch, seq_len, hidden};
  const size_t n = b.elements();
  const int64_t most_blocks = batch * 4096;
  CHECK(cudaMalloc(&b.x, n * sizeof(T)));
  CHECK(cudaMalloc(&b.dx, n * sizeof(T)));
  CHECK(cudaMalloc(&b.u, hidden * sizeof(float)));
  CHECK(cudaMalloc(&b.out, batch * hidden * sizeof(float)));
  CHECK(cudaMalloc(&b.lse, batch * 2 * sizeof(float)));
  CHECK(cudaMalloc(&b.grad_out, batch * hidden * sizeof(float)));
  CHECK(cudaMalloc(&b.partials, most_blocks * (3 + hidden) * sizeof(float)));
  CHECK(cudaMalloc(&b.du_partials, most_blocks * hidden * sizeof(float)));
  CHECK(cudaMalloc(&b.du, hidden * sizeof(float)));
  float* sink;
  CHECK(cudaMalloc(&sink, sizeof(float)));
  fill_kernel<T><<<1024, 256>>>(b.x, n, 1, 2.0f);
  fill_kernel<float><<<64, 256>>>(b.u, hidden, 2, 1.0f);
  fill_kernel<float><<<64, 256>>>(b.grad_out, batch * hidden, 3, 1.0f);
  CHECK(cudaDeviceSynchronize());

  std::printf(
      "%s %lldx%lldx%lld %s\n",
      label,
      static_cast<long long>(batch),
      static_cast<long long>(seq_len),
      static_cast<long long>(hidden),
      sizeof(T) == 4 ? "float32" : "bfloat16");
  const auto run_forward = [&](const Variant& v, bool describe) {
    with_rows(v, [&](auto rows) {
      constexpr int kRows = decltype(rows)::value;
      if (v.u_shared) {
        forward<T, CHUNKS, kRows, true>(device, b, v, describe);
      } else {
        forward<T, CHUNKS, kRows, false>(device, b, v, describe);
      }
    });
  };
  const auto run_backward = [&](const Variant& v, bool describe) {
    with_rows(
        v, [&](auto rows) { backward<T, CHUNKS, decltype(rows)::value>(device, b, v, describe); });
  };
  std::vector<float> want[4];
  for (size_t i = 0; i < variants.size(); ++i) {
    std::printf("  %s\n", variants[i].name);
    run_forward(variants[i], true);
    run_backward(variants[i], true);
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaGetLastError());
    std::vector<float> got[4] = {
        copy_to_host(b.out, batch * hidden),
        copy_to_host(b.lse, batch * 2),
        copy_to_host(b.dx, n),
        copy_to_host(b.du, hidden)};
    if (i == 0) {
      std::copy(std::begin(got), std::end(got), std::begin(want));
      continue;
    }
    std::printf(
        "    differences from %s: out %.1e, lse %.1e, dx %.1e, du %.1e\n",
        variants[0].name,
        relative_difference(got[0], want[0]),
        relative_difference(got[1], want[1]),
        relative_difference(got[2], want[2]),
        relative_difference(got[3], want[3]));
  }

  std::vector<float> reads, copies;
  std::vector<std::vector<float>> forwards(variants.size()), backwards(variants.size());
  const size_t words = n * sizeof(T) / 16;
  for (int r = 0; r < rounds; ++r) {
    reads.push_back(time_ms(device, [&] {
      read_kernel<<<device.sms * 8, 512>>>(reinterpret_cast<const uint4*>(b.x), words, sink);
    }));
    copies.push_back(time_ms(device, [&] {
      CHECK(cudaMemcpyAsync(b.dx, b.x, n * sizeof(T), cudaMemcpyDeviceToDevice));
    }));
    for (size_t i = 0; i < variants.size(); ++i) {
      forwards[i].push_back(time_ms(device, [&] { run_forward(variants[i], false); }));
      backwards[i].push_back(time_ms(device, [&] { run_backward(variants[i], false); }));
    }
  }
  const double bytes = static_cast<double>(n * sizeof(T));
  const float read = median(reads);
  const float copy = median(copies);
  std::printf(
      "  read %.3f ms (%.0f GB/s), copy %.3f ms (%.0f GB/s read + written)\n",
      read,
      bytes / read / 1e6,
      copy,
      2 * bytes / copy / 1e6);
  for (size_t i = 0; i < variants.size(); ++i) {
    const float fwd = median(forwards[i]);
    const float bwd = median(backwards[i]);
    std::printf(
        "  %-22s fwd %.3f ms %5.0f GB/s = %.2f of read | bwd %.3f ms = %.2f of copy | "
        "fwd+bwd %.2f of read+copy\n",
        variants[i].name,
        fwd,
        bytes / fwd / 1e6,
        read / fwd,
        bwd,
        copy / bwd,
        (read + copy) / (fwd + bwd));
  }
  std::fflush(stdout);
  free_all({b.x, b.dx, b.u, b.out, b.lse, b.grad_out, b.partials, b.du_partials, b.du, sink});
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  cudaDeviceProp properties;
  const Device device = open_device("the one-score kernels", rounds, properties);
  std::vector<Variant> variants;
#ifdef ATTNPOOL_OTHER_ONE_SCORE
  variants.push_back({"other (R 2, 4 warps)", true, 2, 4, 8});
#endif
  variants.push_back({"R 2, 4 warps (default)", false, 2, 4, 8});
  variants.push_back({"R 1, 4 warps", false, 1, 4, 8});
  variants.push_back({"R 4, 4 warps", false, 4, 4, 8});
  variants.push_back({"R 2, 8 warps", false, 2, 8, 8});
  variants.push_back({"R 2, 4 warps, 4/SM", false, 2, 4, 4});
  variants.push_back({"R 2, 4 warps, 16/SM", false, 2, 4, 16});
  variants.push_back({"R 2, u shared", false, 2, 4, 8, true});
  variants.push_back({"R 4, u shared", false, 4, 4, 8, true});
  variants.push_back({"R 1, u shared", false, 1, 4, 8, true});
  run_shape<float, 8>(device, variants, "big", 64, 2048, 1024, rounds);
  run_shape<c10::BFloat16, 4>(device, variants, "big", 64, 2048, 1024, rounds);
  run_shape<float, 8>(device, variants, "longest", 1, 262144, 1024, rounds);
  run_shape<c10::BFloat16, 4>(device, variants, "longest", 1, 262144, 1024, rounds);
  run_shape<float, 8>(device, variants, "bert", 32, 512, 768, rounds);
  run_shape<c10::BFloat16, 4>(device, variants, "bert", 32, 512, 768, rounds);
  return 0;
}
