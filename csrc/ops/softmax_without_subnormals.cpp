// attnpool::_softmax_without_subnormals: its schema, its checks and its
// kernel from ATen ops for every device but the CPU (ops/cpu/softmax_kernel.cpp)
// and for Meta.

#include "ops/softmax_without_subnormals.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

namespace attnpool::detail {

void check_softmax_without_subnormals_args(const at::Tensor& scores) {
  TORCH_CHECK_TYPE(
      scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
      "attnpool::_softmax_without_subnormals: scores must be float32 or float64, got ",
      scores.scalar_type());
  TORCH_CHECK_VALUE(
      scores.dim() >= 1,
      "attnpool::_softmax_without_subnormals: scores must have at least one dimension, got a "
      "0-dim tensor");
}

at::Tensor softmax_without_subnormals(const at::Tensor& scores) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_softmax_without_subnormals", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(scores);
}

at::Tensor softmax_without_subnormals_by_aten(const at::Tensor& scores) {
  check_softmax_without_subnormals_args(scores);
  const double smallest =
      scores.scalar_type() == at::kFloat ? std::ldexp(1.0, -100) : std::ldexp(1.0, -996);
  // threshold keeps a weight above `smallest` (and NaN), else gives 0.
  return at::threshold(at::_softmax(scores, -1, /*half_to_float=*/false), smallest, 0);
}

}  // namespace attnpool::detail

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def("_softmax_without_subnormals(Tensor scores) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(attnpool, CompositeExplicitAutograd, m) {
  m.impl("_softmax_without_subnormals", &attnpool::detail::softmax_without_subnormals_by_aten);
}
