#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace attnpool {

// Attention pooling of a batch of sequences with a learned query (SPEC.md §1).
//
//   x:     [B, L, H]  float64, float32, float16 or bfloat16, any strides
//   query: [H] or [Q, H]
//   w_q:   [H, H]     nn.Linear layout (out, in)
//   w_k:   [H, H]     nn.Linear layout (out, in)
//   mask:  [B, L]     optional; nonzero (or true) means "attend" (the opposite
//                     of nn.MultiheadAttention's key_padding_mask)
//   attn_bias: [B, L] optional, floating point, added to every score; -inf
//                     excludes a position
//   lengths: [B]      optional, integer, for right-padded batches: position l
//                     of sequence b counts iff l < lengths[b], and the rows
//                     past it are never read. At most one of mask and lengths.
//
// Returns [B, H] for a 1-D query and [B, Q, H] otherwise, in x's dtype: the
// same as folded_attention_pool(x, fold_query(query, w_q, w_k, num_heads),
// mask, scale or 1/sqrt(H / num_heads), false, attn_bias, lengths). Calls the
// `attnpool::attention_pool` operator through the dispatcher, so it is differentiable with respect
// to x, query, w_q and w_k from C++ as well.
at::Tensor attention_pool(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask = std::nullopt,
    int64_t num_heads = 1,
    std::optional<double> scale = std::nullopt,
    const std::optional<at::Tensor>& attn_bias = std::nullopt,
    const std::optional<at::Tensor>& lengths = std::nullopt);

// The query folded through both projections (SPEC.md §5): for each query i
// and head h, u[i, h] = w_k[D_h, :].T @ (w_q @ query[i] + q_bias)[D_h], where
// D_h are head h's E / num_heads rows.
//
//   query:  [Hq] or [Q, Hq]   float64, float32, float16 or bfloat16
//   w_q:    [E, Hq]           nn.Linear layout (out, in), query's dtype
//   w_k:    [E, Hx]           nn.Linear layout (out, in), query's dtype
//   q_bias: [E]               optional, query's dtype
//
// Returns u [Q, num_heads, Hx] ([num_heads, Hx] for a 1-D query) in float64
// for float64 weights, else float32. Differentiable in all four tensors.
at::Tensor fold_query(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads = 1,
    const std::optional<at::Tensor>& q_bias = std::nullopt);

// Attention pooling on a folded query u (SPEC.md §5): per score (query i,
// head h), p = softmax over l of scale * x[b, l] . u[i, h] (masked positions
// excluded), then
//   full_width = false: out[b, i, D_h] = sum_l p * x[b, l, D_h]  -> [B, Q, H]
//   full_width = true:  out[b, i, h, :] = sum_l p * x[b, l, :]    -> [B, Q, n, H]
// (without the Q dimension for a 2-D u). x: [B, L, H], any strides; u:
// [Q, n, H] or [n, H] in x's dtype or, for float16/bfloat16 x, float32; mask:
// [B, L], nonzero = attend (the opposite of nn.MultiheadAttention's
// key_padding_mask); attn_bias: [B, L] floating point, added to every score
// (in the accumulation dtype; -inf excludes a position, like the mask);
// lengths: [B], as in attention_pool. Without
// full_width, n must divide H. A sequence with nothing to attend pools to
// zeros. Differentiable in x and u (attn_bias: no reverse-mode gradient).
at::Tensor folded_attention_pool(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask = std::nullopt,
    double scale = 1.0,
    bool full_width = false,
    const std::optional<at::Tensor>& attn_bias = std::nullopt,
    const std::optional<at::Tensor>& lengths = std::nullopt);

// Attention pooling of a ragged batch (SPEC.md §6): x [T, H] holds the rows
// of B sequences one after another, sequence b being rows cu_seqlens[b] ..
// cu_seqlens[b + 1] - 1 (flash-attn's cu_seqlens, a nested tensor's
// offsets(), PyG's ptr). cu_seqlens: [B + 1], int32 or int64, on x's device,
// starting at 0, non-decreasing, ending at T (checked on the CPU; on a GPU
// checked asynchronously, since reading it would wait for the device).
// Returns [B, H] for a 1-D query, else [B, Q, H]; an empty sequence pools to
// zeros. Equal to attention_pool on the same sequences padded, with a mask.
at::Tensor attention_pool_varlen(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads = 1,
    std::optional<double> scale = std::nullopt);

// folded_attention_pool of a ragged batch: x [T, H], cu_seqlens [B + 1] as
// in attention_pool_varlen, u as in folded_attention_pool. Returns [B, (Q,)
// H], or full width [B, (Q,) n, H]. Differentiable in x and u (forward mode
// needs the Python package, as for folded_attention_pool).
at::Tensor folded_attention_pool_varlen(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale = 1.0,
    bool full_width = false);

// The CPU instruction set the CPU kernels run with in this process
// ("AMX_BF16", "AVX512_BF16", "AVX512", "AVX2" or "DEFAULT"), chosen once at run time
// from the CPU and the ATEN_CPU_CAPABILITY and ATTNPOOL_CPU_CAPABILITY
// environment variables (either lowers it).
const char* cpu_kernel_isa();

}  // namespace attnpool
