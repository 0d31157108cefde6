// CPU kernel of _attention_without_subnormals_backward: ATen's SDPA flash
// backward with every thread flushing subnormal numbers to 0.

#include "ops/attention_without_subnormals.h"
#include "ops/cpu/subnormals_flushed.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace attnpool::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_without_subnormals_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const at::Tensor& out,
    const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask,
    double scale) {
  const SubnormalsFlushed flushed;
  return detail::attention_without_subnormals_backward_by_aten(
      grad_out, query, key, value, out, logsumexp, attn_mask, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("_attention_without_subnormals_backward", &attention_without_subnormals_backward_cpu);
}

}  // namespace attnpool::cpu
