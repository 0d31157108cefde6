#pragma once

// Argument checks of the attnpool operators and the small conversions every
// entry point shares. Each check throws a c10::ValueError (c10::TypeError for
// dtypes) that names the operator, the argument, what was expected and what
// was given. They work on real and Meta tensors (symbolic sizes), so
// compile-time shape errors read like run-time ones.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace attnpool::detail {

void check_attention_pool_args(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// attention_pool_varlen: x [T, H] and cu_seqlens [B + 1] (shape, dtype and
// device; check_cu_seqlens_values checks the values).
void check_attention_pool_varlen_args(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    std::optional<double> scale);

void check_fold_query_args(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias);

// The backward's extra inputs: grad_u and projected as the forward made them.
void check_fold_query_backward_args(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads);

// The checks every pooling op makes of x [B, L, H] (strided, floating) and
// of the positions it attends: mask, attn_bias and lengths against x. For
// callers that pool without the ops (MultiheadAttentionPooling when it
// projects the keys), so that they refuse what the ops refuse.
void check_pooled_positions(
    const std::string& op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

void check_folded_attention_pool_args(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// The layer norm of layer_norm_folded_attention_pool: H >= 1, weight and
// bias [H] (each optional), eps finite and > 0. After the pooling checks,
// which check x itself.
void check_layer_norm_args(
    const at::Tensor& x,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps);

void check_folded_attention_pool_varlen_args(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width);

// cu_seqlens[0] = 0, non-decreasing, cu_seqlens[B] = rows (SPEC.md §6). Reads
// the values, so only where that costs no host synchronisation (a CPU tensor).
// Reports under the name a ValuesCheckedFor in scope gives, else under `op`.
void check_cu_seqlens_values(const char* op, const at::Tensor& cu_seqlens, int64_t rows);

// While one is in scope, the checks of argument values in the ops that this
// thread calls (check_cu_seqlens_values) report under `op`: a composite op
// (attention_pool_varlen) names itself in the errors of the parts it calls,
// where only the part's kernel can read the values (its own checks run
// under fake tensors too, which hold none).
class ValuesCheckedFor {
 public:
  explicit ValuesCheckedFor(const char* op);
  ~ValuesCheckedFor();
  ValuesCheckedFor(const ValuesCheckedFor&) = delete;
  ValuesCheckedFor& operator=(const ValuesCheckedFor&) = delete;

 private:
  const char* outer_;
};

// What the forward op saved, out and lse, with the shapes, dtype and device it
// produced for these arguments (B from cu_seqlens for a ragged x); `op` names
// the caller in the errors (the backward, the jvp).
void check_saved_forward(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    bool full_width,
    const std::optional<at::Tensor>& cu_seqlens = std::nullopt);

// The jvp's tangents, each where given: dense, floating point, on x's
// device, with the shape of its primal (x, u, attn_bias).
void check_tangents(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& x_tangent,
    const std::optional<at::Tensor>& u_tangent,
    const std::optional<at::Tensor>& bias_tangent);

// The backward's extra inputs: grad_out of out's shape, and check_saved_forward.
void check_folded_attention_pool_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    bool full_width,
    const std::optional<at::Tensor>& cu_seqlens = std::nullopt);

// 1/sqrt(head_dim) unless the caller gave a scale.
double resolve_scale(std::optional<double> scale, int64_t head_dim);

// Accumulation dtype of the kernels: float64 for float64, else float32.
at::ScalarType accumulate_dtype(at::ScalarType dtype);

// The mask as a bool tensor (nonzero = attend), or an undefined tensor.
at::Tensor bool_mask(const std::optional<at::Tensor>& mask);

// lengths [B] as a [B, L] bool mask: l < lengths[b] (right padding).
at::Tensor within_lengths(const c10::SymInt& seq_len, const at::Tensor& lengths);

// [B, L] bool: the positions that count (SPEC.md §2, §6), as the fold's
// kernels see them: mask (nonzero attends) or l < lengths[b], and a -inf
// bias excludes its position. For the paths that pool without the kernels'
// own mask (the key projection, a MAP head's value bias).
at::Tensor attended_positions(
    const at::Tensor& x,
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths);

// x itself when its rows are contiguous (stride(-1) == 1), else a contiguous copy.
at::Tensor with_contiguous_rows(const at::Tensor& x);

}  // namespace attnpool::detail
