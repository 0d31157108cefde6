#include "ops/attention_pool_common.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace attnpool::detail {
namespace {

// PyTorch users read dtypes as torch.float32, not ATen's "Float".
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return "float64";
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(dtype);
  }
}

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

bool is_reduced_float(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_strided(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.layout() == at::kStrided,
      "attention_pool: ",
      name,
      " must be a dense (strided) tensor, got layout ",
      t.layout());
}

void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.device() == x.device(),
      "attention_pool: ",
      name,
      " must be on the same device as x (",
      x.device(),
      "), got ",
      t.device());
}

void check_square_weight(const at::Tensor& w, const c10::SymInt& hidden, const char* name) {
  TORCH_CHECK_VALUE(
      w.dim() == 2 && w.sym_size(0) == hidden && w.sym_size(1) == hidden,
      "attention_pool: ",
      name,
      " must have shape [H, H] = [",
      hidden,
      ", ",
      hidden,
      "] (nn.Linear layout), got ",
      w.sym_sizes());
}

void check_param_dtypes(
    const at::Tensor& x, const at::Tensor& query, const at::Tensor& w_q, const at::Tensor& w_k) {
  const auto dtype = query.scalar_type();
  TORCH_CHECK_TYPE(
      w_q.scalar_type() == dtype && w_k.scalar_type() == dtype,
      "attention_pool: query, w_q and w_k must share one dtype, got ",
      dtype_name(dtype),
      ", ",
      dtype_name(w_q.scalar_type()),
      " and ",
      dtype_name(w_k.scalar_type()));
  const auto x_dtype = x.scalar_type();
  const bool mixed_precision = is_reduced_float(x_dtype) && dtype == at::kFloat;
  TORCH_CHECK_TYPE(
      dtype == x_dtype || mixed_precision,
      "attention_pool: query, w_q and w_k must have x's dtype (",
      dtype_name(x_dtype),
      ") or float32 when x is float16/bfloat16, got ",
      dtype_name(dtype));
}

void check_mask(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(
      mask.dim() == 2 && mask.sym_size(0) == x.sym_size(0) && mask.sym_size(1) == x.sym_size(1),
      "attention_pool: mask must have shape [B, L] = [",
      x.sym_size(0),
      ", ",
      x.sym_size(1),
      "], got ",
      mask.sym_sizes());
  check_same_device(x, mask, "mask");
  TORCH_CHECK_TYPE(
      !at::isComplexType(mask.scalar_type()),
      "attention_pool: mask must be bool, integer or floating-point, got ",
      dtype_name(mask.scalar_type()));
}

}  // namespace

void check_attention_pool_args(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  check_strided(x, "x");
  check_strided(query, "query");
  check_strided(w_q, "w_q");
  check_strided(w_k, "w_k");
  if (mask.has_value() && mask->defined()) {
    check_strided(*mask, "mask");
  }
  TORCH_CHECK_VALUE(
      x.dim() == 3,
      "attention_pool: x must have shape [B, L, H], got a ",
      x.dim(),
      "-D tensor of shape ",
      x.sym_sizes());
  TORCH_CHECK_TYPE(
      is_supported_float(x.scalar_type()),
      "attention_pool: x must be float64, float32, float16 or bfloat16, got ",
      dtype_name(x.scalar_type()));
  const c10::SymInt& hidden = x.sym_size(2);
  TORCH_CHECK_VALUE(
      (query.dim() == 1 || query.dim() == 2) && query.sym_size(-1) == hidden,
      "attention_pool: query must have shape [H] or [Q, H] with H = ",
      hidden,
      " (x.shape[2]), got ",
      query.sym_sizes());
  check_square_weight(w_q, hidden, "w_q");
  check_square_weight(w_k, hidden, "w_k");
  TORCH_CHECK_VALUE(num_heads >= 1, "attention_pool: num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(
      hidden % num_heads == 0,
      "attention_pool: num_heads must divide H = ",
      hidden,
      ", got num_heads = ",
      num_heads);
  TORCH_CHECK_VALUE(
      !scale.has_value() || (std::isfinite(*scale) && *scale > 0.0),
      "attention_pool: scale must be a finite positive number, got ",
      scale.value_or(0.0));
  check_same_device(x, query, "query");
  check_same_device(x, w_q, "w_q");
  check_same_device(x, w_k, "w_k");
  check_param_dtypes(x, query, w_q, w_k);
  if (mask.has_value() && mask->defined()) {
    check_mask(x, *mask);
  }
}

void check_attention_pool_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t num_heads) {
  TORCH_CHECK_VALUE(
      grad_out.sym_sizes() == out.sym_sizes(),
      "attention_pool backward: grad_out must have the output's shape ",
      out.sym_sizes(),
      ", got ",
      grad_out.sym_sizes());
  const bool single_query = query.dim() == 1;
  const c10::SymInt num_queries = single_query ? c10::SymInt(1) : query.sym_size(0);
  const bool out_ok =
      single_query
          ? out.dim() == 2 && out.sym_size(0) == x.sym_size(0) && out.sym_size(1) == x.sym_size(2)
          : out.dim() == 3 && out.sym_size(0) == x.sym_size(0) && out.sym_size(1) == num_queries &&
                out.sym_size(2) == x.sym_size(2);
  TORCH_CHECK_VALUE(
      out_ok,
      "attention_pool backward: out has shape ",
      out.sym_sizes(),
      ", which does not match x and query");
  TORCH_CHECK_VALUE(
      lse.dim() == 3 && lse.sym_size(0) == x.sym_size(0) && lse.sym_size(1) == num_queries &&
          lse.sym_size(2) == num_heads,
      "attention_pool backward: lse must have shape [B, Q, num_heads], got ",
      lse.sym_sizes());
  TORCH_CHECK_TYPE(
      lse.scalar_type() == accumulate_dtype(x.scalar_type()),
      "attention_pool backward: lse must be ",
      dtype_name(accumulate_dtype(x.scalar_type())),
      ", got ",
      dtype_name(lse.scalar_type()));
  check_same_device(x, grad_out, "grad_out");
  check_same_device(x, out, "out");
  check_same_device(x, lse, "lse");
}

PoolDims pool_dims(const at::Tensor& x, const at::Tensor& query, int64_t num_heads) {
  PoolDims dims{};
  dims.batch = x.size(0);
  dims.seq_len = x.size(1);
  dims.hidden = x.size(2);
  dims.num_queries = query.dim() == 1 ? 1 : query.size(0);
  dims.num_heads = num_heads;
  dims.head_dim = dims.hidden / num_heads;
  return dims;
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) {
    return *scale;
  }
  // A zero-width head has no scores to scale; any finite value will do.
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

at::ScalarType accumulate_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor bool_mask(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value() || !mask->defined()) {
    return at::Tensor();
  }
  return mask->scalar_type() == at::kBool ? *mask : mask->ne(0);
}

at::Tensor with_contiguous_rows(const at::Tensor& x) {
  return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
}

FoldedQuery fold_query(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    at::ScalarType acc_dtype) {
  // Under autocast these products would run in float16/bfloat16; the kernels
  // need them in the accumulation dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t hidden = w_k.size(0);
  const int64_t head_dim = hidden / num_heads;
  const int64_t num_queries = query.dim() == 1 ? 1 : query.size(0);
  const auto queries = query.to(acc_dtype).reshape({num_queries, hidden});
  const auto projected = at::matmul(queries, w_q.to(acc_dtype).t());
  // u[i, h, f] = sum_j q'[i, h, j] * w_k[h, j, f]: one [Q, d] x [d, H] product per head.
  const auto per_head_query = projected.view({num_queries, num_heads, head_dim}).transpose(0, 1);
  const auto per_head_wk = w_k.to(acc_dtype).view({num_heads, head_dim, hidden});
  const auto u = at::bmm(per_head_query, per_head_wk).transpose(0, 1);
  return {projected.contiguous(), u.reshape({num_queries * num_heads, hidden}).contiguous()};
}

ParamGrads unfold_score_vector_grad(
    const at::Tensor& grad_score_vectors,
    const FoldedQuery& folded,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t hidden = w_k.size(0);
  const int64_t head_dim = hidden / num_heads;
  const auto acc_dtype = grad_score_vectors.scalar_type();
  const int64_t num_queries = folded.projected_query.size(0);
  // Per head h: du_h [Q, H], q'_h [Q, d], w_k_h [d, H].
  const auto du = grad_score_vectors.view({num_queries, num_heads, hidden}).transpose(0, 1);
  const auto qp = folded.projected_query.view({num_queries, num_heads, head_dim}).transpose(0, 1);
  const auto wk = w_k.to(acc_dtype).view({num_heads, head_dim, hidden});
  // dq'_h = du_h @ w_k_h.T, dw_k_h = q'_h.T @ du_h
  const auto grad_projected =
      at::bmm(du, wk.transpose(1, 2)).transpose(0, 1).reshape({num_queries, hidden});
  const auto grad_wk = at::bmm(qp.transpose(1, 2), du).reshape({hidden, hidden});
  const auto queries = query.to(acc_dtype).reshape({num_queries, hidden});
  const auto grad_wq = at::matmul(grad_projected.t(), queries);
  const auto grad_query = at::matmul(grad_projected, w_q.to(acc_dtype));
  const auto param_dtype = query.scalar_type();
  return {
      grad_query.reshape(query.sizes()).to(param_dtype),
      grad_wq.to(param_dtype),
      grad_wk.to(param_dtype)};
}

PreparedInputs prepare_inputs(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    QueryFolder fold) {
  check_attention_pool_args(x, query, w_q, w_k, mask, num_heads, scale);
  PreparedInputs in;
  in.dims = pool_dims(x, query, num_heads);
  in.acc_dtype = accumulate_dtype(x.scalar_type());
  in.scale = resolve_scale(scale, in.dims.head_dim);
  in.folded = fold(query, w_q, w_k, num_heads, in.acc_dtype);
  in.rows = with_contiguous_rows(x);
  in.keep = bool_mask(mask);
  in.output_shape = query.dim() == 1
                        ? std::vector<int64_t>{in.dims.batch, in.dims.hidden}
                        : std::vector<int64_t>{in.dims.batch, in.dims.num_queries, in.dims.hidden};
  return in;
}

PreparedGradients prepare_gradients(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t num_heads,
    at::ScalarType acc_dtype) {
  check_attention_pool_backward_args(grad_out, x, query, out, lse, num_heads);
  return {grad_out.to(acc_dtype).contiguous(), out.to(acc_dtype).contiguous(), lse.contiguous()};
}

}  // namespace attnpool::detail
