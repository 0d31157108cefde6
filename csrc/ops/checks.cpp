#include "ops/checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>

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
    case at::kByte:
      return "uint8";
    case at::kChar:
      return "int8";
    case at::kShort:
      return "int16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kComplexHalf:
      return "complex32";
    case at::kComplexFloat:
      return "complex64";
    case at::kComplexDouble:
      return "complex128";
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

bool defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

void check_strided(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.layout() == at::kStrided,
      op,
      ": ",
      name,
      " must be a dense (strided) tensor, got layout ",
      t.layout());
}

void check_same_device(
    const char* op,
    const at::Tensor& t,
    const char* name,
    const at::Tensor& ref,
    const char* ref_name) {
  TORCH_CHECK_VALUE(
      t.device() == ref.device(),
      op,
      ": ",
      name,
      " must be on the same device as ",
      ref_name,
      " (",
      ref.device(),
      "), got ",
      t.device());
}

// Tensors the kernels read as numbers of some floating-point dtype (they
// convert to the accumulation dtype): gradients, tangents, saved outputs.
void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(t.scalar_type()),
      op,
      ": ",
      name,
      " must be floating point, got ",
      dtype_name(t.scalar_type()));
}

// x as [B, L, H] (dense batches) or [T, H] (ragged batches, SPEC.md §6).
void check_float_x(const char* op, const at::Tensor& x, bool ragged = false) {
  TORCH_CHECK_VALUE(
      x.dim() == (ragged ? 2 : 3),
      op,
      ragged ? ": x must have shape [T, H] (the rows of all sequences), got a "
             : ": x must have shape [B, L, H], got a ",
      x.dim(),
      "-D tensor of shape ",
      x.sym_sizes());
  TORCH_CHECK_TYPE(
      is_supported_float(x.scalar_type()),
      op,
      ": x must be float64, float32, float16 or bfloat16, got ",
      dtype_name(x.scalar_type()));
}

void check_num_heads(
    const char* op, int64_t num_heads, const c10::SymInt& width, const char* what) {
  TORCH_CHECK_VALUE(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(
      width % num_heads == 0,
      op,
      ": num_heads must divide ",
      what,
      " = ",
      width,
      ", got num_heads = ",
      num_heads);
}

void check_scale(const char* op, double scale) {
  TORCH_CHECK_VALUE(
      std::isfinite(scale) && scale > 0.0,
      op,
      ": scale must be a finite positive number, got ",
      scale);
}

void check_mask(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  check_strided(op, mask, "mask");
  TORCH_CHECK_VALUE(
      mask.dim() == 2 && mask.sym_size(0) == x.sym_size(0) && mask.sym_size(1) == x.sym_size(1),
      op,
      ": mask must have shape [B, L] = [",
      x.sym_size(0),
      ", ",
      x.sym_size(1),
      "], got ",
      mask.sym_sizes());
  check_same_device(op, mask, "mask", x, "x");
  // A floating-point mask is ambiguous: SDPA's additive masks use 0 for
  // "attend" and -inf for "masked", which nonzero-means-attend would invert.
  const auto dtype = mask.scalar_type();
  TORCH_CHECK_TYPE(
      !at::isFloatingType(dtype),
      op,
      ": mask must be bool or an integer dtype (nonzero = attend), got ",
      dtype_name(dtype),
      ". A floating-point mask is refused because SDPA-style additive masks mean the opposite "
      "(0 = attend, -inf = masked): pass a bool mask, e.g. mask = (additive_mask == 0), or "
      "the additive mask itself as attn_bias");
  TORCH_CHECK_TYPE(
      dtype == at::kBool || at::isIntegralType(dtype, /*includeBool=*/false),
      op,
      ": mask must be bool or an integer dtype (nonzero = attend), got ",
      dtype_name(dtype));
}

void check_attn_bias(const char* op, const at::Tensor& x, const at::Tensor& attn_bias) {
  check_strided(op, attn_bias, "attn_bias");
  TORCH_CHECK_VALUE(
      attn_bias.dim() == 2 && attn_bias.sym_size(0) == x.sym_size(0) &&
          attn_bias.sym_size(1) == x.sym_size(1),
      op,
      ": attn_bias must have shape [B, L] = [",
      x.sym_size(0),
      ", ",
      x.sym_size(1),
      "], got ",
      attn_bias.sym_sizes());
  check_same_device(op, attn_bias, "attn_bias", x, "x");
  TORCH_CHECK_TYPE(
      at::isFloatingType(attn_bias.scalar_type()),
      op,
      ": attn_bias must be a floating-point tensor (added to the scores; -inf = masked), got ",
      dtype_name(attn_bias.scalar_type()),
      "; a bool or integer mask goes in mask");
}

void check_lengths(
    const char* op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& lengths) {
  check_strided(op, lengths, "lengths");
  TORCH_CHECK_VALUE(
      !defined(mask),
      op,
      ": pass at most one of mask and lengths (lengths [B] means mask[b, l] = l < lengths[b])");
  TORCH_CHECK_VALUE(
      lengths.dim() == 1 && lengths.sym_size(0) == x.sym_size(0),
      op,
      ": lengths must have shape [B] = [",
      x.sym_size(0),
      "], got ",
      lengths.sym_sizes());
  check_same_device(op, lengths, "lengths", x, "x");
  TORCH_CHECK_TYPE(
      at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false),
      op,
      ": lengths must be an integer tensor (valid positions per sequence), got ",
      dtype_name(lengths.scalar_type()));
}

void check_square_weight(
    const char* op, const at::Tensor& w, const c10::SymInt& hidden, const char* name) {
  TORCH_CHECK_VALUE(
      w.dim() == 2 && w.sym_size(0) == hidden && w.sym_size(1) == hidden,
      op,
      ": ",
      name,
      " must have shape [H, H] = [",
      hidden,
      ", ",
      hidden,
      "] (nn.Linear layout), got ",
      w.sym_sizes());
}

// x's dtype, or float32 for float16/bfloat16 x (mixed precision).
bool pairs_with_x(at::ScalarType dtype, at::ScalarType x_dtype) {
  return dtype == x_dtype || (is_reduced_float(x_dtype) && dtype == at::kFloat);
}

// query, w_q, w_k, num_heads and scale of attention_pool(_varlen), against
// the width H of x's rows.
void check_query_and_weights(
    const char* op,
    const at::Tensor& x,
    const c10::SymInt& hidden,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    std::optional<double> scale) {
  check_strided(op, query, "query");
  check_strided(op, w_q, "w_q");
  check_strided(op, w_k, "w_k");
  TORCH_CHECK_VALUE(
      (query.dim() == 1 || query.dim() == 2) && query.sym_size(-1) == hidden,
      op,
      ": query must have shape [H] or [Q, H] with H = ",
      hidden,
      " (x.shape[-1]), got ",
      query.sym_sizes());
  check_square_weight(op, w_q, hidden, "w_q");
  check_square_weight(op, w_k, hidden, "w_k");
  check_num_heads(op, num_heads, hidden, "H");
  if (scale.has_value()) {
    check_scale(op, *scale);
  }
  check_same_device(op, query, "query", x, "x");
  check_same_device(op, w_q, "w_q", x, "x");
  check_same_device(op, w_k, "w_k", x, "x");
  const auto dtype = query.scalar_type();
  TORCH_CHECK_TYPE(
      w_q.scalar_type() == dtype && w_k.scalar_type() == dtype,
      op,
      ": query, w_q and w_k must share one dtype, got ",
      dtype_name(dtype),
      ", ",
      dtype_name(w_q.scalar_type()),
      " and ",
      dtype_name(w_k.scalar_type()));
  TORCH_CHECK_TYPE(
      pairs_with_x(dtype, x.scalar_type()),
      op,
      ": query, w_q and w_k must have x's dtype (",
      dtype_name(x.scalar_type()),
      ") or float32 when x is float16/bfloat16, got ",
      dtype_name(dtype));
}

// u of folded_attention_pool(_varlen), against the width H of x's rows.
void check_folded_query(
    const char* op,
    const at::Tensor& x,
    const c10::SymInt& hidden,
    const at::Tensor& u,
    bool full_width) {
  check_strided(op, u, "u");
  TORCH_CHECK_VALUE(
      (u.dim() == 2 || u.dim() == 3) && u.sym_size(-1) == hidden,
      op,
      ": u must have shape [Q, num_heads, H] or [num_heads, H] with H = ",
      hidden,
      " (x.shape[-1]), got ",
      u.sym_sizes());
  TORCH_CHECK_VALUE(
      u.sym_size(-2) >= 1,
      op,
      ": u must have at least one head (u.shape[-2] >= 1), got ",
      u.sym_sizes());
  if (!full_width) {
    TORCH_CHECK_VALUE(
        hidden % u.sym_size(-2) == 0,
        op,
        ": the number of heads u.shape[-2] = ",
        u.sym_size(-2),
        " must divide H = ",
        hidden,
        " unless full_width=True");
  }
  check_same_device(op, u, "u", x, "x");
  TORCH_CHECK_TYPE(
      pairs_with_x(u.scalar_type(), x.scalar_type()),
      op,
      ": u must have x's dtype (",
      dtype_name(x.scalar_type()),
      ") or float32 when x is float16/bfloat16, got ",
      dtype_name(u.scalar_type()));
}

// The shape, dtype and device of cu_seqlens; its values are checked by
// check_cu_seqlens_values where that needs no host synchronisation.
void check_cu_seqlens(const char* op, const at::Tensor& x, const at::Tensor& cu_seqlens) {
  check_strided(op, cu_seqlens, "cu_seqlens");
  TORCH_CHECK_VALUE(
      cu_seqlens.dim() == 1 && cu_seqlens.sym_size(0) >= 1,
      op,
      ": cu_seqlens must have shape [B + 1] (offsets of the sequences' rows in x, from 0 to T), "
      "got ",
      cu_seqlens.sym_sizes());
  TORCH_CHECK_TYPE(
      cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
      op,
      ": cu_seqlens must be int32 or int64, got ",
      dtype_name(cu_seqlens.scalar_type()));
  check_same_device(op, cu_seqlens, "cu_seqlens", x, "x");
}

// mask, attn_bias and lengths, each where given, against x [B, L, H].
void check_positions(
    const char* op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  if (defined(mask)) {
    check_mask(op, x, *mask);
  }
  if (defined(attn_bias)) {
    check_attn_bias(op, x, *attn_bias);
  }
  if (defined(lengths)) {
    check_lengths(op, x, mask, *lengths);
  }
}

}  // namespace

void check_attention_pool_args(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  constexpr const char* op = "attention_pool";
  check_strided(op, x, "x");
  if (defined(mask)) {
    check_strided(op, *mask, "mask");
  }
  check_float_x(op, x);
  check_query_and_weights(op, x, x.sym_size(2), query, w_q, w_k, num_heads, scale);
  check_positions(op, x, mask, attn_bias, lengths);
}

void check_attention_pool_varlen_args(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    std::optional<double> scale) {
  constexpr const char* op = "attention_pool_varlen";
  check_strided(op, x, "x");
  check_float_x(op, x, /*ragged=*/true);
  check_cu_seqlens(op, x, cu_seqlens);
  check_query_and_weights(op, x, x.sym_size(1), query, w_q, w_k, num_heads, scale);
}

void check_fold_query_args(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    const std::optional<at::Tensor>& q_bias) {
  constexpr const char* op = "fold_query";
  check_strided(op, query, "query");
  check_strided(op, w_q, "w_q");
  check_strided(op, w_k, "w_k");
  TORCH_CHECK_VALUE(
      query.dim() == 1 || query.dim() == 2,
      "fold_query: query must have shape [Hq] or [Q, Hq], got ",
      query.sym_sizes());
  TORCH_CHECK_VALUE(
      w_q.dim() == 2 && w_q.sym_size(1) == query.sym_size(-1),
      "fold_query: w_q must have shape [E, Hq] with Hq = ",
      query.sym_size(-1),
      " (query.shape[-1]), got ",
      w_q.sym_sizes());
  TORCH_CHECK_VALUE(
      w_k.dim() == 2 && w_k.sym_size(0) == w_q.sym_size(0),
      "fold_query: w_k must have shape [E, Hx] with E = ",
      w_q.sym_size(0),
      " (w_q.shape[0]), got ",
      w_k.sym_sizes());
  check_num_heads(op, num_heads, w_q.sym_size(0), "E (w_q.shape[0])");
  TORCH_CHECK_TYPE(
      is_supported_float(query.scalar_type()),
      "fold_query: query must be float64, float32, float16 or bfloat16, got ",
      dtype_name(query.scalar_type()));
  TORCH_CHECK_TYPE(
      w_q.scalar_type() == query.scalar_type() && w_k.scalar_type() == query.scalar_type(),
      "fold_query: query, w_q and w_k must share one dtype, got ",
      dtype_name(query.scalar_type()),
      ", ",
      dtype_name(w_q.scalar_type()),
      " and ",
      dtype_name(w_k.scalar_type()));
  check_same_device(op, w_q, "w_q", query, "query");
  check_same_device(op, w_k, "w_k", query, "query");
  if (defined(q_bias)) {
    check_strided(op, *q_bias, "q_bias");
    TORCH_CHECK_VALUE(
        q_bias->dim() == 1 && q_bias->sym_size(0) == w_q.sym_size(0),
        "fold_query: q_bias must have shape [E] = [",
        w_q.sym_size(0),
        "], got ",
        q_bias->sym_sizes());
    TORCH_CHECK_TYPE(
        q_bias->scalar_type() == query.scalar_type(),
        "fold_query: q_bias must have query's dtype (",
        dtype_name(query.scalar_type()),
        "), got ",
        dtype_name(q_bias->scalar_type()));
    check_same_device(op, *q_bias, "q_bias", query, "query");
  }
}

void check_fold_query_backward_args(
    const at::Tensor& grad_u,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const at::Tensor& projected,
    int64_t num_heads) {
  check_fold_query_args(query, w_q, w_k, num_heads, std::nullopt);
  const c10::SymInt num_queries = query.dim() == 1 ? c10::SymInt(1) : query.sym_size(0);
  // u's shape: [Q, num_heads, Hx], or [num_heads, Hx] for a 1-D query.
  const bool shaped_as_u = query.dim() == 1
                               ? grad_u.dim() == 2 && grad_u.sym_size(0) == num_heads &&
                                     grad_u.sym_size(1) == w_k.sym_size(1)
                               : grad_u.dim() == 3 && grad_u.sym_size(0) == num_queries &&
                                     grad_u.sym_size(1) == num_heads &&
                                     grad_u.sym_size(2) == w_k.sym_size(1);
  TORCH_CHECK_VALUE(
      shaped_as_u,
      "fold_query backward: grad_u must have u's shape [Q, num_heads, Hx] (or [num_heads, Hx] "
      "for a 1-D query), got ",
      grad_u.sym_sizes());
  check_floating("fold_query backward", grad_u, "grad_u");
  TORCH_CHECK_VALUE(
      projected.dim() == 2 && projected.sym_size(0) == num_queries &&
          projected.sym_size(1) == w_q.sym_size(0),
      "fold_query backward: projected must have shape [Q, E] = [",
      num_queries,
      ", ",
      w_q.sym_size(0),
      "], got ",
      projected.sym_sizes());
  check_same_device("fold_query backward", grad_u, "grad_u", query, "query");
  check_same_device("fold_query backward", projected, "projected", query, "query");
}

void check_pooled_positions(
    const std::string& op,
    const at::Tensor& x,
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  const char* name = op.c_str();
  check_strided(name, x, "x");
  check_float_x(name, x);
  check_positions(name, x, mask, attn_bias, lengths);
}

void check_folded_attention_pool_args(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  constexpr const char* op = "folded_attention_pool";
  check_strided(op, x, "x");
  check_float_x(op, x);
  check_folded_query(op, x, x.sym_size(2), u, full_width);
  check_scale(op, scale);
  check_positions(op, x, mask, attn_bias, lengths);
}

void check_layer_norm_args(
    const at::Tensor& x,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps) {
  constexpr const char* op = "layer_norm_folded_attention_pool";
  TORCH_CHECK_VALUE(
      x.sym_size(-1) >= 1, op, ": x's rows must have at least one element to normalize, got H = 0");
  for (const auto& [param, name] :
       {std::pair{&norm_weight, "norm_weight"}, std::pair{&norm_bias, "norm_bias"}}) {
    if (!defined(*param)) {
      continue;
    }
    const at::Tensor& t = **param;
    check_strided(op, t, name);
    TORCH_CHECK_VALUE(
        t.dim() == 1 && t.sym_size(0) == x.sym_size(-1),
        op,
        ": ",
        name,
        " must have shape [H] = [",
        x.sym_size(-1),
        "] (x.shape[-1]), got ",
        t.sym_sizes());
    check_same_device(op, t, name, x, "x");
    TORCH_CHECK_TYPE(
        is_supported_float(t.scalar_type()),
        op,
        ": ",
        name,
        " must be float64, float32, float16 or bfloat16, got ",
        dtype_name(t.scalar_type()));
  }
  TORCH_CHECK_VALUE(
      std::isfinite(norm_eps) && norm_eps > 0,
      op,
      ": norm_eps must be finite and > 0 (added to each row's variance), got ",
      norm_eps);
}

void check_folded_attention_pool_varlen_args(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  constexpr const char* op = "folded_attention_pool_varlen";
  check_strided(op, x, "x");
  check_float_x(op, x, /*ragged=*/true);
  check_cu_seqlens(op, x, cu_seqlens);
  check_folded_query(op, x, x.sym_size(1), u, full_width);
  check_scale(op, scale);
}

namespace {
thread_local const char* values_checked_for = nullptr;
}  // namespace

ValuesCheckedFor::ValuesCheckedFor(const char* op) : outer_(values_checked_for) {
  values_checked_for = op;
}

ValuesCheckedFor::~ValuesCheckedFor() {
  values_checked_for = outer_;
}

void check_cu_seqlens_values(const char* called, const at::Tensor& cu_seqlens, int64_t rows) {
  const char* op = values_checked_for != nullptr ? values_checked_for : called;
  const auto offsets = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t batch = offsets.numel() - 1;
  TORCH_CHECK_VALUE(o[0] == 0, op, ": cu_seqlens[0] must be 0, got ", o[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(
        o[b + 1] >= o[b],
        op,
        ": cu_seqlens must be non-decreasing, got cu_seqlens[",
        b + 1,
        "] = ",
        o[b + 1],
        " < cu_seqlens[",
        b,
        "] = ",
        o[b]);
  }
  TORCH_CHECK_VALUE(
      o[batch] == rows, op, ": cu_seqlens[-1] must be T = x.shape[0] = ", rows, ", got ", o[batch]);
}

void check_saved_forward(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    bool full_width,
    const std::optional<at::Tensor>& cu_seqlens) {
  // B and H of a dense [B, L, H] or a ragged [T, H] batch.
  const c10::SymInt batch = cu_seqlens.has_value() ? cu_seqlens->sym_size(0) - 1 : x.sym_size(0);
  const c10::SymInt& hidden = x.sym_size(-1);
  // out: [B, (Q,) H] or, full width, [B, (Q,) n, H]; lse: [B, (Q,) n].
  const int64_t out_dim = u.dim() + (full_width ? 1 : 0);
  bool out_ok = out.dim() == out_dim && out.sym_size(0) == batch && out.sym_size(-1) == hidden;
  bool lse_ok = lse.dim() == u.dim() + 1 && lse.sym_size(0) == batch && lse.sym_size(-1) == 2;
  for (int64_t dim = 0; dim + 1 < u.dim(); ++dim) {
    lse_ok = lse_ok && lse.sym_size(dim + 1) == u.sym_size(dim);
    if (full_width || dim + 2 < u.dim()) {
      out_ok = out_ok && out.sym_size(dim + 1) == u.sym_size(dim);
    }
  }
  TORCH_CHECK_VALUE(
      out_ok, op, ": out has shape ", out.sym_sizes(), ", which does not match x and u");
  TORCH_CHECK_VALUE(
      lse_ok,
      op,
      ": lse must have shape [B, *u.shape[:-1], 2] = [B, Q, num_heads, 2] or [B, num_heads, "
      "2], got ",
      lse.sym_sizes());
  const auto acc = accumulate_dtype(x.scalar_type());
  TORCH_CHECK_TYPE(
      lse.scalar_type() == acc,
      op,
      ": lse must be ",
      dtype_name(acc),
      ", got ",
      dtype_name(lse.scalar_type()));
  check_floating(op, out, "out");
  check_same_device(op, out, "out", x, "x");
  check_same_device(op, lse, "lse", x, "x");
}

namespace {

void check_tangent(
    const char* op,
    const char* name,
    const at::Tensor& tangent,
    const at::Tensor& primal,
    const char* primal_name,
    const at::Tensor& x) {
  check_strided(op, tangent, name);
  check_same_device(op, tangent, name, x, "x");
  check_floating(op, tangent, name);
  TORCH_CHECK_VALUE(
      tangent.sym_sizes() == primal.sym_sizes(),
      op,
      ": ",
      name,
      " must have ",
      primal_name,
      "'s shape ",
      primal.sym_sizes(),
      ", got ",
      tangent.sym_sizes());
}

}  // namespace

void check_tangents(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& x_tangent,
    const std::optional<at::Tensor>& u_tangent,
    const std::optional<at::Tensor>& bias_tangent) {
  if (defined(x_tangent)) {
    check_tangent(op, "x_tangent", *x_tangent, x, "x", x);
  }
  if (defined(u_tangent)) {
    check_tangent(op, "u_tangent", *u_tangent, u, "u", x);
  }
  if (defined(bias_tangent)) {
    TORCH_CHECK_VALUE(defined(attn_bias), op, ": bias_tangent was given without an attn_bias");
    check_tangent(op, "bias_tangent", *bias_tangent, *attn_bias, "attn_bias", x);
  }
}

void check_folded_attention_pool_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    bool full_width,
    const std::optional<at::Tensor>& cu_seqlens) {
  constexpr const char* op = "folded_attention_pool backward";
  TORCH_CHECK_VALUE(
      grad_out.sym_sizes() == out.sym_sizes(),
      op,
      ": grad_out must have the output's shape ",
      out.sym_sizes(),
      ", got ",
      grad_out.sym_sizes());
  check_saved_forward(op, x, u, out, lse, full_width, cu_seqlens);
  check_same_device(op, grad_out, "grad_out", x, "x");
  check_floating(op, grad_out, "grad_out");
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) {
    return *scale;
  }
  // A zero-width head has no scores to scale; any finite value will do.
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor bool_mask(const std::optional<at::Tensor>& mask) {
  if (!defined(mask)) {
    return at::Tensor();
  }
  return mask->scalar_type() == at::kBool ? *mask : mask->ne(0);
}

at::Tensor within_lengths(const c10::SymInt& seq_len, const at::Tensor& lengths) {
  // Positions in int64: in the lengths' own dtype they would wrap (uint8 at 256).
  const auto positions = at::arange(c10::Scalar(seq_len), lengths.options().dtype(at::kLong));
  return positions.unsqueeze(0) < lengths.unsqueeze(1);
}

at::Tensor attended_positions(
    const at::Tensor& x,
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  at::Tensor keep;
  if (defined(mask)) {
    keep = bool_mask(mask);
  } else if (defined(lengths)) {
    keep = within_lengths(x.sym_size(1), *lengths);
  } else {
    keep = at::ones_symint(x.sym_sizes().slice(0, 2), x.options().dtype(at::kBool));
  }
  if (defined(attn_bias)) {
    keep = keep & (*attn_bias != -std::numeric_limits<double>::infinity());
  }
  return keep;
}

at::Tensor with_contiguous_rows(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

}  // namespace attnpool::detail
