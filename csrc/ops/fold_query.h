#pragma once

// The fold as a few matrix products on any device: the CUDA kernels of
// fold_query and its backward (the CPU has kernels of its own, which the C++
// tests compare with these).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace attnpool::detail {

// The private operators attnpool::_fold_query_forward and _backward, called
// through the dispatcher (by the composite and by the autograd kernel).
std::tuple<at::Tensor, at::Tensor> call_fold_query_forward(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_fold_query_backward(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads);

// (u, projected) in the accumulation dtype of query's: u [Q, n, Hx] ([n, Hx]
// for a 1-D query), projected = w_q @ query + q_bias [Q, E].
std::tuple<at::Tensor, at::Tensor> fold_query_by_matmul(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias);

// (grad_query, grad_w_q, grad_w_k, grad_q_bias) in query's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_query_backward_by_matmul(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads);

}  // namespace attnpool::detail
