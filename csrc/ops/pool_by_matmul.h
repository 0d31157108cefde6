#pragma once

// folded_attention_pool's forward and backward as matrix products, for the
// CUDA entry points' large calls with several scores per row (ops/cuda,
// takes_matmul_path): cuBLAS reads x at the GPU's bandwidth, where the CUDA
// kernels read it once per query with a block-wide reduction per head and
// tile (H200: 0.01-0.09 of x.sum()'s speed, benchmarks/README.md#gpu); but
// its launches cost more than small calls. Written with ATen operators, so
// the CPU runs it too (tests/cpp/test_cuda_kernels_emulated.cpp), except the
// softmax, which on a GPU is two kernels each way (score_softmax_kernel.cuh)
// instead of some twenty operators.
//
// Each score is one product's output, and the backward recomputes it with
// the same product, so its p = exp(score - lse) stays at most 1 (the CPU's
// [Note: one order for every score]). delta is sum_l p_l dp_l, from the same
// dp the backward weighs: when one row holds all the weight, dp - delta is
// exactly 0 there, as in the reference. bfloat16 rows multiply bfloat16
// operands into float32 sums, float32 ones (u, the weights, G, ds) as two
// bfloat16 terms each (hi + lo, about 16 significant bits); float16 rows are
// widened to float32.
//
// Unlike the kernels, the products follow torch's global matmul settings:
// float32 products run in TF32 where torch.backends.cuda.matmul.allow_tf32
// is set, and torch.use_deterministic_algorithms(True) needs
// CUBLAS_WORKSPACE_CONFIG as for any cuBLAS call.

#include "ops/folded_attention_pool.h"

#include <ATen/core/Tensor.h>

#include <tuple>

namespace attnpool::detail {

// The softmax over each sequence's rows of scale * products + bias (-inf
// where keep is false), by tensor operators: the CPU's, and the reference of
// the CUDA kernels that replace them (ops/cuda/score_softmax_kernel.cuh).
// products [B, L, S]; bias [B, L] in products' dtype, keep [B, L] bool, each
// or undefined. Returns (weights [B, L, S], lse [B, S, 2]: max and log of
// the sum, -inf and 0 where a sequence has nothing to attend).
std::tuple<at::Tensor, at::Tensor> score_softmax_by_operators(
    const at::Tensor& products, const at::Tensor& bias, const at::Tensor& keep, double scale);

// Its backward from the same scores, lse and dp [B, L, S]: (p [B, L, S],
// ds = p * scale * (dp - delta) [B, L, S]) with delta = sum_l p * dp.
std::tuple<at::Tensor, at::Tensor> score_softmax_backward_by_operators(
    const at::Tensor& products,
    const at::Tensor& bias,
    const at::Tensor& keep,
    double scale,
    const at::Tensor& lse,
    const at::Tensor& dp);

// (out, lse) of a dense (not ragged) prepared call, as the kernels give them.
std::tuple<at::Tensor, at::Tensor> pool_forward_by_matmul(const PreparedForward& f);

// (dx, du) of a dense prepared call: dx in x's dtype, du [num_scores, H] in
// the accumulation dtype (as PreparedBackward holds them before gradients()).
std::tuple<at::Tensor, at::Tensor> pool_backward_by_matmul(const PreparedBackward& g);

}  // namespace attnpool::detail
