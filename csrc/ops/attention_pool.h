#pragma once

// attention_pool as the composition of its two parts (SPEC.md §5), shared by
// the kernel that serves every backend and the autograd kernel.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace attnpool::detail {

// attention_pool's checks, then the scale it pools with: the given one, or
// 1/sqrt(H / num_heads). (The Python package composes the parts itself under
// torch.func transforms, and asks this for the scale; attnpool/_transforms.py.)
double checked_attention_pool_scale(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// The same for attention_pool_varlen (x [T, H], cu_seqlens [B + 1]).
double checked_attention_pool_varlen_scale(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    std::optional<double> scale);

// folded_attention_pool(x, fold_query(query, w_q, w_k, num_heads), mask,
// checked_attention_pool_scale(...)), or pool_by_projection where that is
// cheaper.
at::Tensor compose_attention_pool(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// Whether projecting every key costs fewer multiply-adds than the fold for Q
// queries and n heads over width H (attention_pool_by_projection.cpp).
bool projecting_keys_is_cheaper(int64_t num_queries, int64_t num_heads, int64_t hidden);

// attention_pool by projecting the keys (checked inputs, the resolved
// scale): SDPA over the projected keys with x's head slices as values, or,
// for inputs with a forward-mode tangent, the same product written in
// differentiable ATen ops.
at::Tensor pool_by_projection(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    double scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

}  // namespace attnpool::detail
