// CPU entry points of attention_pool: check the arguments, fold the query,
// allocate, cut the work, and hand raw pointers to the kernels built for the
// best instruction set this CPU has (isa/attention_pool_kernel_*.cpp).

#include "ops/attention_pool_common.h"
#include "ops/cpu/attention_pool_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
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

// Whether the pages of [data, data + bytes) are backed by memory, judged by
// the first, middle and last page. Fresh memory (glibc maps blocks of 32 MB
// and more anew) is not: the first write to each page faults, and the page
// the kernel zeroes for it is then in the cache, where a non-temporal store
// to it costs more than a plain one.
bool pages_backed(void* data, size_t bytes) {
#if defined(__linux__)
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(data);
  for (const uintptr_t offset : {size_t{0}, bytes / 2, bytes - 1}) {
    unsigned char resident = 0;
    const uintptr_t page_start = (begin + offset) & ~(page - 1);
    if (mincore(reinterpret_cast<void*>(page_start), page, &resident) != 0 || !(resident & 1)) {
      return false;
    }
  }
  return true;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

// Non-temporal stores write dx without reading its lines first: 2 passes over
// memory instead of 3 (measured 1.4x -> 0.97x the time of a plain copy_ when
// the pages are backed, and slower when they are not; see pages_backed).
bool stream_dx(const at::Tensor& dx) {
  const auto dtype = dx.scalar_type();
  const int64_t row_bytes = dx.size(2) * static_cast<int64_t>(dx.element_size());
  return (dtype == at::kFloat || dtype == at::kDouble) && dx.numel() > 0 &&
         reinterpret_cast<uintptr_t>(dx.const_data_ptr()) % 64 == 0 && row_bytes % 64 == 0 &&
         pages_backed(dx.mutable_data_ptr(), dx.nbytes());
}

// The fold and its backward cut the rows of the weights into about this many
// tasks; like plan_work, the cut depends on the shape only.
constexpr int64_t kFoldTargetTasks = 8;
// Fewest rows of the weights worth a task of their own.
constexpr int64_t kFoldMinTaskRows = 32;

FoldShape fold_shape(const at::Tensor& query, const at::Tensor& w_k, int64_t num_heads) {
  const int64_t hidden = w_k.size(0);
  const int64_t head_dim = hidden / num_heads;
  const int64_t wanted = ceil_div(kFoldTargetTasks, num_heads);
  const int64_t runs = std::clamp<int64_t>(
      std::min(wanted, head_dim / kFoldMinTaskRows), 1, std::max<int64_t>(head_dim, 1));
  return {hidden, query.dim() == 1 ? 1 : query.size(0), num_heads, runs};
}

// The weights as the fold kernels read them: contiguous, in the accumulation dtype.
struct FoldWeights {
  at::Tensor queries;  // [Q, H]
  at::Tensor w_q;
  at::Tensor w_k;
};

FoldWeights fold_weights(
    const FoldShape& s,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    at::ScalarType acc_dtype) {
  return {
      query.to(acc_dtype).reshape({s.num_queries, s.hidden}).contiguous(),
      w_q.to(acc_dtype).contiguous(),
      w_k.to(acc_dtype).contiguous()};
}

// detail::fold_query, computed by this CPU's fold kernel.
detail::FoldedQuery fold_query_kernel(
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads,
    at::ScalarType acc_dtype) {
  const FoldShape s = fold_shape(query, w_k, num_heads);
  const auto weights = fold_weights(s, query, w_q, w_k, acc_dtype);
  const auto options = weights.queries.options();
  auto projected = at::empty({s.num_queries, s.hidden}, options);
  auto u = at::empty({s.num_queries * num_heads, s.hidden}, options);
  if (projected.numel() == 0) {
    return {projected, u};
  }
  at::Tensor partials;
  if (s.runs_per_head > 1) {
    partials = at::empty({s.runs_per_head, s.num_queries * num_heads, s.hidden}, options);
  }
  selected_kernels().fold(
      {s,
       acc_dtype,
       weights.queries.const_data_ptr(),
       weights.w_q.const_data_ptr(),
       weights.w_k.const_data_ptr(),
       projected.mutable_data_ptr(),
       u.mutable_data_ptr(),
       partials.defined() ? partials.mutable_data_ptr() : nullptr});
  return {projected, u};
}

// detail::unfold_score_vector_grad, computed by this CPU's kernel for it.
detail::ParamGrads unfold_score_vector_grad_kernel(
    const at::Tensor& grad_u,
    const detail::FoldedQuery& folded,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    int64_t num_heads) {
  const auto acc_dtype = grad_u.scalar_type();
  const auto grad_u_rows = grad_u.contiguous();
  const FoldShape s = fold_shape(query, w_k, num_heads);
  const auto weights = fold_weights(s, query, w_q, w_k, acc_dtype);
  const auto options = weights.queries.options();
  auto grad_query = at::empty({s.num_queries, s.hidden}, options);
  auto grad_w_q = at::empty({s.hidden, s.hidden}, options);
  auto grad_w_k = at::empty({s.hidden, s.hidden}, options);
  if (grad_query.numel() == 0) {
    grad_w_q.zero_();
    grad_w_k.zero_();
  } else {
    at::Tensor partials;
    if (s.tasks() > 1) {
      partials = at::empty({s.tasks(), s.num_queries, s.hidden}, options);
    }
    selected_kernels().unfold(
        {s,
         acc_dtype,
         weights.queries.const_data_ptr(),
         weights.w_q.const_data_ptr(),
         weights.w_k.const_data_ptr(),
         folded.projected_query.const_data_ptr(),
         grad_u_rows.const_data_ptr(),
         grad_query.mutable_data_ptr(),
         grad_w_q.mutable_data_ptr(),
         grad_w_k.mutable_data_ptr(),
         partials.defined() ? partials.mutable_data_ptr() : nullptr});
  }
  const auto param_dtype = query.scalar_type();
  return {
      grad_query.reshape(query.sizes()).to(param_dtype),
      grad_w_q.to(param_dtype),
      grad_w_k.to(param_dtype)};
}

PoolShape pool_shape(const detail::PoolDims& dims) {
  return {dims.batch, dims.seq_len, dims.hidden, dims.num_queries, dims.num_heads};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_forward_kernel(
    const at::Tensor& x,
    const at::Tensor& query,
    const at::Tensor& w_q,
    const at::Tensor& w_k,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  const auto in =
      detail::prepare_inputs(x, query, w_q, w_k, mask, num_heads, scale, &fold_query_kernel);
  const auto& dims = in.dims;
  // out stays in the accumulation dtype: the backward's delta = G . out
  // needs it unrounded (attention_pool() rounds it to x's dtype).
  const auto acc_options = x.options().dtype(in.acc_dtype);
  auto out = at::empty(in.output_shape, acc_options);
  auto lse = at::empty({dims.batch, dims.num_queries, num_heads}, acc_options);
  if (lse.numel() == 0) {
    return {out, lse};
  }
  ForwardParams p{};
  detail::set_input_args(p, in);
  p.shape = pool_shape(dims);
  p.plan = plan_work(p.shape);
  p.dtype = x.scalar_type();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  at::Tensor partials;
  if (p.plan.splits > 1) {
    const int64_t state_size = 1 + 2 * dims.num_scores() + dims.num_queries * dims.hidden;
    partials = at::empty({dims.batch * p.plan.splits, state_size}, acc_options);
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
  const auto in =
      detail::prepare_inputs(x, query, w_q, w_k, mask, num_heads, scale, &fold_query_kernel);
  const auto grads_in =
      detail::prepare_gradients(grad_out, x, query, out, lse, num_heads, in.acc_dtype);
  const auto& dims = in.dims;
  const auto acc_options = x.options().dtype(in.acc_dtype);
  auto dx = at::empty({dims.batch, dims.seq_len, dims.hidden}, x.options());

  BackwardParams p{};
  detail::set_input_args(p, in);
  p.shape = pool_shape(dims);
  p.plan = plan_work(p.shape);
  p.dtype = x.scalar_type();
  p.grad_out = grads_in.grad_out.const_data_ptr();
  p.out = grads_in.out.const_data_ptr();
  p.lse = grads_in.lse.const_data_ptr();
  auto delta = at::empty({dims.batch, dims.num_scores()}, acc_options);
  auto du_partials = at::empty({p.plan.items, dims.num_scores(), dims.hidden}, acc_options);
  auto du = at::empty({dims.num_scores(), dims.hidden}, acc_options);
  p.delta = delta.mutable_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.du_partials = du_partials.mutable_data_ptr();
  p.du = du.mutable_data_ptr();
  p.stream_dx = stream_dx(dx);
  selected_kernels().backward(p);

  const auto grads = unfold_score_vector_grad_kernel(du, in.folded, query, w_q, w_k, num_heads);
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
