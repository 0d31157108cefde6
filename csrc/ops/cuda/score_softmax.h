#pragma once

// Host entry points of score_softmax_kernel.cuh, for ops/pool_by_matmul.cpp
// (CUDA builds only). Tensors as that file holds them: product [B, L, S],
// bias [B, L] in product's dtype or undefined, keep [B, L] bool or
// undefined, lse [B, S, 2], dp [B, L, S]; all contiguous, on one GPU.

#include <ATen/core/Tensor.h>

#include <tuple>

namespace attnpool::detail {

// (weights [B, L, S], lse [B, S, 2]) of the scores scale * product + bias.
std::tuple<at::Tensor, at::Tensor> score_softmax_cuda(
    const at::Tensor& product, const at::Tensor& bias, const at::Tensor& keep, double scale);

// (p [B, L, S], ds [B, L, S]) from the same scores, lse and dp.
std::tuple<at::Tensor, at::Tensor> score_softmax_backward_cuda(
    const at::Tensor& product,
    const at::Tensor& bias,
    const at::Tensor& keep,
    double scale,
    const at::Tensor& lse,
    const at::Tensor& dp);

}  // namespace attnpool::detail
