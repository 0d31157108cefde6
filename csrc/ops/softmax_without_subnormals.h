#pragma once

// The softmax of the path that projects the keys
// (attention_pool_by_projection.cpp and the Python modules' copy of it):
// the softmax over the last dimension with every weight below 2^-100
// (2^-996 in float64) set to 0, as the pooling kernels set theirs
// ([Note: no subnormal weights] in ops/cpu/isa/vec_helpers.h).

#include <ATen/core/Tensor.h>

namespace attnpool::detail {

// The weights that the kernels cut are 0, never subnormal: e^(s - max)
// below 2^-100 is a weight no float32 sum of weights (at least 1) can
// resolve, and a CPU takes many times its usual time over arithmetic on
// subnormals. With the scores of a trained head (tens apart), the products
// after ATen's softmax took CoCa's pooler forward+backward (8 x 256 x 768,
// 256 queries x 8 heads, 2 threads, 2-core Xeon with AMX) from 39 to 620 ms
// in bfloat16 and from 65 to 396 in float32 (SDPA's kernel, whose backward
// now flushes them: attention_without_subnormals.h): the gradient of the
// scores, subnormal where the weight is, fed to a float32 matmul.
// Scores: float32 or float64, any shape; weights of the same shape and dtype.
void check_softmax_without_subnormals_args(const at::Tensor& scores);

// The operator attnpool::_softmax_without_subnormals, through the
// dispatcher (its autograd kernel records the backward).
at::Tensor softmax_without_subnormals(const at::Tensor& scores);

// The same weights from ATen ops on any device (the operator's kernel
// where the CPU's is not, Meta included).
at::Tensor softmax_without_subnormals_by_aten(const at::Tensor& scores);

}  // namespace attnpool::detail
