// Launches of score_softmax_kernel.cuh (see ops/cuda/score_softmax.h).

#include "ops/cuda/device_attribute.h"
#include "ops/cuda/score_softmax.h"
#include "ops/cuda/score_softmax_kernel.cuh"
#include "ops/pool_params.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace attnpool::detail {
namespace {

// Pieces of each sequence's rows: blocks enough to fill the GPU twice over
// when the sequences and score columns alone do not, none shorter than
// kMinPieceRows rows (32 per row group) nor longer than
// kMaxForwardPieceRows ([Note: rows per piece] in ops/pool_params.h).
constexpr int64_t kMinPieceRows = 32 * cuda::kSoftmaxGroups;

template <typename acc_t>
int64_t pieces_per_sequence(const cuda::ScoreSoftmaxParams<acc_t>& a) {
  const int64_t sms = cuda::device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t blocks = std::max<int64_t>(a.batch * a.column_blocks(), 1);
  const int64_t most = std::max<int64_t>(at::ceil_div(a.seq_len, kMinPieceRows), 1);
  const int64_t fewest = at::ceil_div(a.seq_len, kMaxForwardPieceRows);
  return std::max(fewest, std::clamp<int64_t>(at::ceil_div(2 * sms, blocks), 1, most));
}

// Room for the pieces' states, [B, pieces, S, 2].
template <typename acc_t>
at::Tensor partials_for(cuda::ScoreSoftmaxParams<acc_t>& a, const at::Tensor& like) {
  at::Tensor partials = at::empty({a.batch, a.pieces, a.num_scores, 2}, like.options());
  a.partials = partials.mutable_data_ptr<acc_t>();
  return partials;
}

template <typename acc_t>
cuda::ScoreSoftmaxParams<acc_t> softmax_params(
    const at::Tensor& product, const at::Tensor& bias, const at::Tensor& keep, double scale) {
  TORCH_INTERNAL_ASSERT(product.dim() == 3 && product.is_contiguous());
  TORCH_INTERNAL_ASSERT(
      !bias.defined() || (bias.is_contiguous() && bias.dtype() == product.dtype()));
  TORCH_INTERNAL_ASSERT(
      !keep.defined() || (keep.is_contiguous() && keep.scalar_type() == at::kBool));
  cuda::ScoreSoftmaxParams<acc_t> a{};
  a.product = product.const_data_ptr<acc_t>();
  a.bias = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  a.keep = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  a.scale = static_cast<acc_t>(scale);
  a.batch = product.size(0);
  a.seq_len = product.size(1);
  a.num_scores = product.size(2);
  a.cut(pieces_per_sequence(a));
  return a;
}

template <typename acc_t>
void launch(
    void (*kernel)(cuda::ScoreSoftmaxParams<acc_t>), const cuda::ScoreSoftmaxParams<acc_t>& a) {
  if (a.blocks() == 0) {
    return;
  }
  kernel<<<
      a.blocks(),
      cuda::kSoftmaxThreads,
      cuda::score_softmax_shared_bytes<acc_t>(),
      c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> score_softmax_cuda(
    const at::Tensor& product, const at::Tensor& bias, const at::Tensor& keep, double scale) {
  const c10::cuda::CUDAGuard guard(product.device());
  auto weights = at::empty_like(product);
  auto lse = at::empty({product.size(0), product.size(2), 2}, product.options());
  AT_DISPATCH_FLOATING_TYPES(product.scalar_type(), "score_softmax_cuda", [&] {
    auto a = softmax_params<scalar_t>(product, bias, keep, scale);
    a.weights = weights.mutable_data_ptr<scalar_t>();
    a.lse_out = lse.mutable_data_ptr<scalar_t>();
    const auto partials = partials_for(a, product);
    launch(&cuda::score_softmax_state_kernel<scalar_t>, a);
    launch(&cuda::score_softmax_weights_kernel<scalar_t>, a);
  });
  return {weights, lse};
}

std::tuple<at::Tensor, at::Tensor> score_softmax_backward_cuda(
    const at::Tensor& product,
    const at::Tensor& bias,
    const at::Tensor& keep,
    double scale,
    const at::Tensor& lse,
    const at::Tensor& dp) {
  const c10::cuda::CUDAGuard guard(product.device());
  auto probs = at::empty_like(product);
  auto dscores = at::empty_like(product);
  AT_DISPATCH_FLOATING_TYPES(product.scalar_type(), "score_softmax_backward_cuda", [&] {
    auto a = softmax_params<scalar_t>(product, bias, keep, scale);
    TORCH_INTERNAL_ASSERT(
        lse.is_contiguous() && dp.is_contiguous() && dp.sizes() == product.sizes());
    a.lse = lse.const_data_ptr<scalar_t>();
    a.dp = dp.const_data_ptr<scalar_t>();
    a.probs = probs.mutable_data_ptr<scalar_t>();
    a.dscores = dscores.mutable_data_ptr<scalar_t>();
    const auto partials = partials_for(a, product);
    launch(&cuda::score_softmax_probs_kernel<scalar_t>, a);
    launch(&cuda::score_softmax_dscores_kernel<scalar_t>, a);
  });
  return {probs, dscores};
}

}  // namespace attnpool::detail
