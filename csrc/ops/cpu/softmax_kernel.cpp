// CPU entry point of _softmax_without_subnormals: check, make the scores
// contiguous, and hand plain params to the kernels (isa/softmax.h), whose
// exponentials are the pooling kernels' (at AVX2 and above).

#include "ops/cpu/kernel_set.h"
#include "ops/softmax_without_subnormals.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace attnpool::cpu {
namespace {

at::Tensor softmax_without_subnormals_cpu(const at::Tensor& scores) {
  detail::check_softmax_without_subnormals_args(scores);
  // Without AVX2 at::vec computes exponentials one lane at a time (28 ms
  // where ATen's softmax, vectorised at its own level, took 2.6: 8 x 8 x 256
  // rows of 256, 1 thread, forced to the default level on the Xeon).
  if (selected_kernels().isa == Isa::DEFAULT) {
    return detail::softmax_without_subnormals_by_aten(scores);
  }
  const auto rows = scores.contiguous();
  auto weights = at::empty_like(rows);
  if (rows.numel() == 0) {
    return weights;
  }
  SoftmaxParams p{};
  p.scores = rows.const_data_ptr();
  p.weights = weights.mutable_data_ptr();
  p.width = rows.size(-1);
  p.rows = rows.numel() / p.width;
  selected_kernels().softmax(p, rows.scalar_type());
  return weights;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("_softmax_without_subnormals", &softmax_without_subnormals_cpu);
}

}  // namespace attnpool::cpu
