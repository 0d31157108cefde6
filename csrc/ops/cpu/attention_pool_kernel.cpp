// CPU entry points of attention_pool: check the arguments, fold the query,
// allocate, cut the work, and hand raw pointers to the kernels built for the
// best instruction set this CPU has (isa/attention_pool_kernel_*.cpp).

#include "ops/attention_pool_common.h"
#include "ops/cpu/attention_pool_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace attnpool::cpu {
namespace {

// A piece of work smaller than this many elements of x is not worth
// splitting further or handing to another thread.
constexpr int64_t kMinPieceElems = int64_t{1} << 15;
// Forward: sequences are cut into pieces until there are about this many
// work items, enough to keep every core busy when B is small.
constexpr int64_t kForwardTargetItems = 32;
// Backward: number of du partials is bounded by this, independent of B and L.
constexpr int64_t kMaxBackwardItems = 64;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Depends on the shape only, so results are bitwise identical for any number
// of threads.
WorkPlan plan_work(const PoolShape& s) {
  WorkPlan plan{};
  const int64_t row_elems = std::max<int64_t>(s.hidden, 1);
  const int64_t max_splits = std::max<int64_t>(1, s.seq_len * row_elems / kMinPieceElems);
  const int64_t wanted_splits = ceil_div(kForwardTargetItems, std::max<int64_t>(s.batch, 1));
  plan.rows_per_split =
      std::max<int64_t>(1, ceil_div(s.seq_len, std::min(wanted_splits, max_splits)));
  plan.splits = std::max<int64_t>(1, ceil_div(s.seq_len, plan.rows_per_split));
  plan.forward_grain = std::max<int64_t>(1, kMinPieceElems / (plan.rows_per_split * row_elems));

  const int64_t rows = s.batch * s.seq_len;
  const int64_t wanted_items =
      std::clamp<int64_t>(rows * row_elems / kMinPieceElems, 1, kMaxBackwardItems);
  plan.rows_per_item = std::max<int64_t>(1, ceil_div(rows, wanted_items));
  plan.items = ceil_div(rows, plan.rows_per_item);
  plan.backward_grain = std::max<int64_t>(1, kMinPieceElems / (plan.rows_per_item * row_elems));
  return plan;
}

PoolShape pool_shape(const detail::PoolDims& dims) {
  return {dims.batch, dims.seq_len, dims.hidden, dims.num_queries, dims.num_heads};
}

std::vector<int64_t> output_shape(const detail::PoolDims& dims, bool single_query) {
  if (single_query) {
    return {dims.batch, dims.hidden};
  }
  return {dims.batch, dims.num_queries, dims.hidden};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_forward_kernel(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  detail::check_attention_pool_args(x, query, w_q, w_k, mask, num_heads, scale);
  const auto dims = detail::pool_dims(x, query, num_heads);
  const auto acc_dtype = detail::accumulate_dtype(x.scalar_type());
  // out stays in the accumulation dtype: the backward's delta = G . out
  // needs it unrounded (attention_pool() rounds it to x's dtype).
  auto out = at::empty(output_shape(dims, query.dim() == 1), x.options().dtype(acc_dtype));
  auto lse = at::empty({dims.batch, dims.num_queries, num_heads}, x.options().dtype(acc_dtype));
  if (lse.numel() == 0) {
    return {out, lse};
  }
  const auto folded = detail::fold_query(query, w_q, w_k, num_heads, acc_dtype);
  const auto rows = detail::with_contiguous_rows(x);
  const auto keep = detail::bool_mask(mask);

  ForwardParams p{};
  p.shape = pool_shape(dims);
  p.plan = plan_work(p.shape);
  p.dtype = x.scalar_type();
  p.x = rows.const_data_ptr();
  p.x_batch_stride = rows.stride(0);
  p.x_seq_stride = rows.stride(1);
  p.mask = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  p.mask_batch_stride = keep.defined() ? keep.stride(0) : 0;
  p.mask_seq_stride = keep.defined() ? keep.stride(1) : 0;
  p.u = folded.score_vectors.const_data_ptr();
  p.scale = detail::resolve_scale(scale, dims.head_dim);
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  at::Tensor partials;
  if (p.plan.splits > 1) {
    const int64_t state_size = 1 + 2 * dims.num_scores() + dims.num_queries * dims.hidden;
    partials = at::empty({dims.batch * p.plan.splits, state_size}, lse.options());
    p.partials = partials.mutable_data_ptr();
  }
  selected_kernels().forward(p);
  return {out, lse};
}

at::Tensor attention_pool_kernel(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  const auto out =
      std::get<0>(attention_pool_forward_kernel(x, query, w_q, w_k, mask, num_heads, scale));
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_backward_kernel(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t num_heads,
    std::optional<double> scale) {
  detail::check_attention_pool_args(x, query, w_q, w_k, mask, num_heads, scale);
  detail::check_attention_pool_backward_args(grad_out, x, query, out, lse, num_heads);
  const auto dims = detail::pool_dims(x, query, num_heads);
  const auto acc_dtype = detail::accumulate_dtype(x.scalar_type());
  const auto folded = detail::fold_query(query, w_q, w_k, num_heads, acc_dtype);
  const auto rows = detail::with_contiguous_rows(x);
  const auto keep = detail::bool_mask(mask);
  const auto grad = grad_out.to(acc_dtype).contiguous();
  const auto out_acc = out.to(acc_dtype).contiguous();
  const auto lse_acc = lse.contiguous();
  auto dx = at::empty({dims.batch, dims.seq_len, dims.hidden}, x.options());

  BackwardParams p{};
  p.shape = pool_shape(dims);
  p.plan = plan_work(p.shape);
  p.dtype = x.scalar_type();
  p.x = rows.const_data_ptr();
  p.x_batch_stride = rows.stride(0);
  p.x_seq_stride = rows.stride(1);
  p.mask = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  p.mask_batch_stride = keep.defined() ? keep.stride(0) : 0;
  p.mask_seq_stride = keep.defined() ? keep.stride(1) : 0;
  p.u = folded.score_vectors.const_data_ptr();
  p.scale = detail::resolve_scale(scale, dims.head_dim);
  p.grad_out = grad.const_data_ptr();
  p.out = out_acc.const_data_ptr();
  p.lse = lse_acc.const_data_ptr();
  auto delta = at::empty({dims.batch, dims.num_scores()}, lse.options());
  auto du_partials = at::empty({p.plan.items, dims.num_scores(), dims.hidden}, lse.options());
  auto du = at::empty({dims.num_scores(), dims.hidden}, lse.options());
  p.delta = delta.mutable_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.du_partials = du_partials.mutable_data_ptr();
  p.du = du.mutable_data_ptr();
  selected_kernels().backward(p);

  const auto grads = detail::unfold_score_vector_grad(du, folded, query, w_q, w_k, num_heads);
  return {dx, grads.query, grads.w_q, grads.w_k};
}

std::vector<KernelSet>& kernel_registry() {
  static std::vector<KernelSet> registry;
  return registry;
}

// The instruction set ATen itself runs with: the CPU's best, lowered by the
// ATEN_CPU_CAPABILITY environment variable.
Isa cpu_capability() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return Isa::AVX512;
  }
  if (capability == "AVX2") {
    return Isa::AVX2;
  }
  return Isa::DEFAULT;
}

const KernelSet& choose_kernels() {
  const Isa limit = cpu_capability();
  const KernelSet* best = nullptr;
  for (const auto& kernels : kernel_registry()) {
    if (kernels.isa <= limit && (best == nullptr || kernels.isa > best->isa)) {
      best = &kernels;
    }
  }
  TORCH_CHECK(best != nullptr, "attnpool: no CPU kernels were built into this library");
  return *best;
}

}  // namespace

bool register_kernels(const KernelSet& kernels) {
  kernel_registry().push_back(kernels);
  return true;
}

const KernelSet& selected_kernels() {
  static const KernelSet& chosen = choose_kernels();
  return chosen;
}

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("attention_pool", &attention_pool_kernel);
  m.impl("_attention_pool_forward", &attention_pool_forward_kernel);
  m.impl("_attention_pool_backward", &attention_pool_backward_kernel);
}

}  // namespace attnpool::cpu

namespace attnpool {

const char* cpu_kernel_isa() {
  return cpu::selected_kernels().name;
}

}  // namespace attnpool
