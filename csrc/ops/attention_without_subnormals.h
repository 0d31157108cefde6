#pragma once

// The attention of the path that projects the keys
// (attention_pool_by_projection.cpp and the Python modules' copy of it),
// where its scores and softmax are SDPA's: scaled_dot_product_attention
// (no dropout, not causal), whose CPU backward treats subnormal numbers as 0
// ([Note: no subnormal weights] in ops/cpu/isa/vec_helpers.h). SDPA's CPU
// backward rebuilds every weight e^(s - lse); at scores tens apart, as a
// trained head's often are, many are subnormal, and arithmetic on them
// costs a CPU many times its usual time: at CoCa's pooler (8 x 256 x 768,
// 256 queries x 8 heads, float32, 2 threads, 2-core Xeon with AMX) SDPA's
// backward took 30 ms at scores 1 apart and 330 at 30; flushed, 27 at both.
// torch.set_flush_denormal sets the calling thread only: 1 thread, 657 ->
// 70 ms; 2 threads, 343 -> 334.

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace attnpool::detail {

// query: [B, n, Q, d]; key, value: [B, n, L, d], one floating dtype;
// attn_mask: [B or 1, 1, 1 or Q, L] additive, in that dtype, or none.
void check_attention_without_subnormals_args(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask);

// The operator attnpool::_attention_without_subnormals, through the
// dispatcher (its autograd kernel records the backward). Out: [B, n, Q, d].
at::Tensor attention_without_subnormals(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask,
    double scale);

// The operator attnpool::_attention_without_subnormals_backward: the
// gradients of query, key and value from SDPA's CPU flash kernel's output
// and log-sum-exp, with subnormal numbers flushed to 0 on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_without_subnormals_backward(
    const at::Tensor& grad_out,
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const at::Tensor& out,
    const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask,
    double scale);

// The same backward without flushing: ATen's kernel as it is (Meta, and the
// CPU kernel's inner call).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_without_subnormals_backward_by_aten(
    const at::Tensor& grad_out,
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const at::Tensor& out,
    const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask,
    double scale);

}  // namespace attnpool::detail
