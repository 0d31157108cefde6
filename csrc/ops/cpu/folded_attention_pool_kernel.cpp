// CPU entry points of folded_attention_pool's forward, backward and jvp: check,
// allocate, cut the work, and hand plain params to the kernels built for the
// best instruction set this CPU has (isa/forward.h, isa/backward.h,
// isa/jvp.h).

#include "ops/checks.h"
#include "ops/cpu/kernel_set.h"
#include "ops/folded_attention_pool.h"

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

namespace attnpool::cpu {
namespace {

// Forward: sequences are cut into pieces until there are about this many,
// enough to keep every core busy when B is small.
constexpr int64_t kForwardTargetPieces = 32;
// Backward: the number of du partials is bounded by this, whatever B and L.
constexpr int64_t kMaxBackwardPieces = 64;
// [Note: du partials against rows] Each backward piece zeroes, updates once
// per tile and hands over a du partial of num_scores * H floats. With many
// scores that outweighs the piece's rows: at CoCa's 256 x 8 (8 x 256 rows of
// 768) 48 pieces kept 302 MB of partials for 6 MB of x. So a piece gets at
// least this many rows per score (its partial at most a quarter of its rows'
// elements), as long as that leaves kFewestBackwardPieces pieces to share:
// CoCa's backward went from 101 to 75 ms (float32, 2 threads, 2-core EPYC).
// That count is rounded down to a multiple of kFewestBackwardPieces, so that
// 2, 4 or 8 threads get as many pieces each: at 16 x 12 (8 K rows of 768 per
// thread), 21 pieces gave one thread 11 and the other 10.
constexpr int64_t kBackwardRowsPerScore = 4;
constexpr int64_t kFewestBackwardPieces = 8;

// Pieces of each sequence for the forward; the cut depends on the shape only.
PieceCut forward_cut(const PoolShape& s) {
  const int64_t row_elems = std::max<int64_t>(s.hidden, 1);
  const int64_t most = std::max<int64_t>(1, s.seq_len * row_elems / kMinPieceElems);
  const int64_t wanted = at::ceil_div(kForwardTargetPieces, std::max<int64_t>(s.batch, 1));
  return PieceCut::into(s.seq_len, std::min(wanted, most), kMaxForwardPieceRows);
}

// A ragged batch: pieces of one size for sequences of any length, about
// kForwardTargetPieces of them over all T rows (ForwardParams::first_piece).
PieceCut ragged_forward_cut(const PoolShape& s) {
  const int64_t row_elems = std::max<int64_t>(s.hidden, 1);
  const int64_t rows = s.seq_len;
  const int64_t per_piece = std::min(
      kMaxForwardPieceRows,
      std::max(at::ceil_div(rows, kForwardTargetPieces), at::ceil_div(kMinPieceElems, row_elems)));
  return {std::max<int64_t>(1, at::ceil_div(rows, per_piece)), per_piece};
}

// Pieces of all B * L (or T) rows for the backward, each with its own du
// partial ([Note: du partials against rows]).
PieceCut backward_cut(const PoolInputs& s) {
  const int64_t rows = s.ragged() ? s.seq_len : s.batch * s.seq_len;
  const int64_t elems = rows * std::max<int64_t>(s.hidden, 1);
  const int64_t by_size = std::clamp<int64_t>(elems / kMinPieceElems, 1, kMaxBackwardPieces);
  const int64_t most_partials =
      rows / (kBackwardRowsPerScore * std::max<int64_t>(s.num_scores(), 1));
  const int64_t by_partials = std::max(
      kFewestBackwardPieces, most_partials / kFewestBackwardPieces * kFewestBackwardPieces);
  return PieceCut::into(rows, std::min(by_size, by_partials));
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

// [Note: non-temporal dx] Non-temporal stores write dx without reading its
// lines first: 2 passes over memory instead of 3 (measured 1.4x -> 0.97x the
// time of a plain copy_ when the pages are backed, and slower when they are
// not; see pages_backed). A bfloat16 or float16 dx streams where the
// one-score backward writes it (dx_du_rows), each vector a whole line;
// the other kernels store it plainly. One query and one head, forward+
// backward, 2 threads, a 2-core Zen 4 EPYC, against plain stores (paired
// in one process): bfloat16 at B x 512 x 768, B = 8 0.99, 16 0.88, 32
// 0.84-0.90, 64 0.92-0.93; float16 B = 16 0.75, 32 0.84.
// Every dtype the op takes streams; what decides is the layout and the pages.
bool stream_dx(const at::Tensor& dx) {
  const int64_t row_bytes = dx.size(-1) * static_cast<int64_t>(dx.element_size());
  return dx.numel() > 0 && reinterpret_cast<uintptr_t>(dx.const_data_ptr()) % 64 == 0 &&
         row_bytes % 64 == 0 && pages_backed(dx.mutable_data_ptr(), dx.nbytes());
}

// [Note: dx on zero pages] A padded batch's dx is mostly rows of zeros (a
// batch padded to its longest sequence can be 90% padding). Written, they
// cost what the whole backward costs without them: on Linux a large dx is
// fresh memory, and every page faults and is zeroed by the kernel before
// the kernel's zeros are written over it (measured: 134 ms of a 180 ms
// forward+backward of 64 x 2048 x 768 float32 with 9% of the rows valid).
// So a large dx with rows to skip, whose memory is fresh anyway, is mapped
// anonymous memory instead, which the OS guarantees to read as zeros: the
// rows not attended are never written, and pages holding only such rows are
// never touched. Memory that is already backed (an allocator that reuses
// freed blocks: jemalloc, tcmalloc, glibc's mallopt) is kept: there writing
// zeros costs less than faulting the attended rows' pages in afresh.
constexpr int64_t kZeroPagesMinBytes = int64_t{32} << 20;

// dx with its pages mapped as zeros, or an undefined tensor where that is
// not possible (then the caller keeps its own dx).
at::Tensor zero_pages_like(const at::Tensor& dx) {
#if defined(__linux__)
  const auto bytes = static_cast<size_t>(dx.nbytes());
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) {
    return {};
  }
  return at::from_blob(data, dx.sizes(), [bytes](void* p) { munmap(p, bytes); }, dx.options());
#else
  (void)dx;
  return {};
#endif
}

// Gives a backward with rows to skip (a mask, lengths or -inf bias) a dx on
// zero pages when dx is large ([Note: dx on zero pages]).
void use_zero_pages(detail::PreparedBackward& g) {
  BackwardParams& p = g.params;
  if (p.mask == nullptr || g.dx.nbytes() < static_cast<size_t>(kZeroPagesMinBytes) ||
      pages_backed(g.dx.mutable_data_ptr(), g.dx.nbytes())) {
    return;
  }
  auto zeroed = zero_pages_like(g.dx);
  if (zeroed.defined()) {
    g.dx = zeroed;
    p.dx = g.dx.mutable_data_ptr();
    p.dx_zeroed = true;
  }
}

// A jvp's partial per (sequence, piece): weighted sums of x and of its
// tangent (num_scores * head_dim each) and weight totals (num_scores)
// (isa/jvp.h).
int64_t tangent_sums_size(const PoolShape& s) {
  return s.num_scores() * (2 * s.head_dim + 1);
}

// The tensors that a cut's params point into.
struct SequenceCut {
  at::Tensor first_piece;  // ragged only
  at::Tensor partials;     // when some sequence has several pieces
};

// Cuts the sequences into the forward's work items (ForwardParams::cut and
// first_piece) and allocates `partials` of partial_size per item when a
// sequence has several pieces. The forward and the jvp cut alike.
SequenceCut cut_sequences(
    ForwardParams& p,
    const detail::PreparedPool& pool,
    int64_t partial_size,
    const at::TensorOptions& acc_options) {
  SequenceCut cut;
  if (p.ragged()) {
    p.cut = ragged_forward_cut(p);
    cut.first_piece = detail::ragged_first_piece(pool.offsets, p.cut.rows_per_piece);
    p.first_piece = cut.first_piece.const_data_ptr<int64_t>();
  } else {
    p.cut = forward_cut(p);
  }
  if (p.work_items() > p.batch) {
    cut.partials = at::empty({p.work_items(), partial_size}, acc_options);
    p.partials = cut.partials.mutable_data_ptr();
  }
  return cut;
}

// The caches of CPU 0 that hold data (Data and Unified; not Instruction),
// from sysfs: their levels and sizes in bytes; empty where not known.
struct DataCache {
  int level;
  int64_t bytes;
};

std::vector<DataCache> read_data_caches() {
  std::vector<DataCache> caches;
#if defined(__linux__)
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level");
    std::ifstream type_file(dir + "/type");
    std::ifstream size_file(dir + "/size");
    int level = 0;
    std::string type;
    int64_t size = 0;
    std::string unit;
    if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size)) {
      continue;
    }
    if (type == "Instruction") {
      continue;
    }
    size_file >> unit;  // "32768K": the number, then its unit
    const int64_t scale = unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : 1;
    caches.push_back({level, size * scale});
  }
#endif
  return caches;
}

// The sizes of CPU 0's caches that the kernels plan with, from one reading
// of sysfs per process; 0 where not known.
struct CacheSizes {
  int64_t l1_data = 0;  // its L1 data cache
  // The highest-level cache it shares. (glibc's sysconf gave the whole
  // package's 384 MB of L3 on a 2-core EPYC VM whose cores share 32 MB.)
  int64_t last_level = 0;
};

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = [] {
    CacheSizes found;
    int highest = 0;
    for (const DataCache& cache : read_data_caches()) {
      if (cache.level == 1 && found.l1_data == 0) {
        found.l1_data = cache.bytes;
      }
      if (cache.level > highest) {
        highest = cache.level;
        found.last_level = cache.bytes;
      }
    }
    return found;
  }();
  return sizes;
}

// Whether `copies` tensors of x's size fit the last-level cache
// (ForwardParams::x_fits_cache, [Note: rows one at a time]): x for the
// forward, x and dx for the backward.
bool x_fits_cache(const PoolInputs& p, int64_t element_size, int64_t copies) {
  const int64_t rows = p.ragged() ? p.seq_len : p.batch * p.seq_len;
  return copies * rows * p.hidden * element_size <= cache_sizes().last_level;
}

// Cuts the work (ForwardParams), runs the forward kernel, returns (out, lse).
std::tuple<at::Tensor, at::Tensor> run_forward(detail::PreparedForward& f, at::ScalarType dtype) {
  if (f.lse.numel() == 0) {
    return {f.out, f.lse};
  }
  ForwardParams& p = f.params;
  p.x_fits_cache = x_fits_cache(p, c10::elementSize(dtype), 1);
  p.l1_data_bytes = cache_sizes().l1_data;
  const SequenceCut cut = cut_sequences(p, f.pool, p.softmax_state_size(), f.out.options());
  selected_kernels().forward(p, dtype);
  return {f.out, f.lse};
}

// x's tangent with the strides of x's rows (the jvp kernel reads both at
// the same offsets), in x's dtype.
at::Tensor laid_out_as(const at::Tensor& tangent, const at::Tensor& rows) {
  TORCH_CHECK(
      tangent.sizes() == rows.sizes(),
      "attnpool: the tangent of x must have x's shape ",
      rows.sizes(),
      ", got ",
      tangent.sizes());
  if (tangent.strides() == rows.strides() && tangent.scalar_type() == rows.scalar_type()) {
    return tangent;
  }
  return at::empty_strided(rows.sizes(), rows.strides(), rows.options()).copy_(tangent);
}

// Runs the jvp kernel on a prepared forward call, with the forward's saved
// out and lse (checked: detail::check_saved_forward) and the tangents of x, u and attn_bias (each
// optional); returns the output's tangent, shaped and typed like out.
at::Tensor run_jvp(
    detail::PreparedForward& f,
    const at::Tensor& out,
    const at::Tensor& lse,
    const std::optional<at::Tensor>& x_tangent,
    const std::optional<at::Tensor>& u_tangent,
    const std::optional<at::Tensor>& bias_tangent,
    at::ScalarType dtype) {
  const detail::PreparedPool& pool = f.pool;
  const auto acc_options = f.out.options();
  auto tangent = at::empty(f.out.sizes(), acc_options);
  if (f.lse.numel() == 0) {
    return tangent;
  }
  JvpParams p{};
  static_cast<ForwardParams&>(p) = f.params;
  const auto saved_out = out.to(pool.acc_dtype).contiguous();
  const auto saved_lse = lse.to(pool.acc_dtype).contiguous();
  p.out = const_cast<void*>(saved_out.const_data_ptr());
  p.lse = const_cast<void*>(saved_lse.const_data_ptr());
  p.tangent = tangent.mutable_data_ptr();
  at::Tensor rows_tangent;
  if (x_tangent.has_value() && x_tangent->defined()) {
    rows_tangent = laid_out_as(*x_tangent, pool.rows);
    p.x_tangent = rows_tangent.const_data_ptr();
  }
  at::Tensor query_tangent;
  if (u_tangent.has_value() && u_tangent->defined()) {
    TORCH_CHECK(
        u_tangent->numel() == pool.u.numel(), "attnpool: the tangent of u must have u's shape");
    query_tangent = u_tangent->to(pool.acc_dtype).reshape(pool.u.sizes()).contiguous();
    p.u_tangent = query_tangent.const_data_ptr();
  }
  at::Tensor row_bias_tangent;
  if (bias_tangent.has_value() && bias_tangent->defined()) {
    TORCH_CHECK(
        !p.ragged() && bias_tangent->sizes() == at::IntArrayRef({p.batch, p.seq_len}),
        "attnpool: the tangent of attn_bias must have attn_bias's shape [B, L]");
    row_bias_tangent = bias_tangent->to(pool.acc_dtype).contiguous();
    p.bias_tangent = row_bias_tangent.const_data_ptr();
  }
  const SequenceCut cut = cut_sequences(p, pool, tangent_sums_size(p), acc_options);
  selected_kernels().jvp(p, dtype);
  return tangent;
}

// Cuts the work (BackwardParams), runs the backward kernel, returns (dx, du).
std::tuple<at::Tensor, at::Tensor> run_backward(
    detail::PreparedBackward& g, const at::Tensor& u, at::ScalarType dtype) {
  use_zero_pages(g);
  BackwardParams& p = g.params;
  const auto acc_options = g.du.options();
  p.flat_cut = backward_cut(p);
  auto delta = at::empty({p.batch, p.num_scores()}, acc_options);
  auto du_partials = at::empty({p.flat_cut.pieces, p.num_scores(), p.hidden}, acc_options);
  p.delta = delta.mutable_data_ptr();
  p.du_partials = du_partials.mutable_data_ptr();
  at::Tensor norm_partials;
  if (p.normalizes()) {
    norm_partials = at::empty({p.flat_cut.pieces, 2, p.hidden}, acc_options);
    g.norm_grads = at::empty({2, p.hidden}, acc_options);
    p.norm_partials = norm_partials.mutable_data_ptr();
    p.norm_grads = g.norm_grads.mutable_data_ptr();
  }
  p.stream_dx = stream_dx(g.dx);
  p.x_fits_cache = x_fits_cache(p, c10::elementSize(dtype), 2);
  selected_kernels().backward(p, dtype);
  return g.gradients(u);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  auto f = detail::prepare_forward(x, u, mask, scale, full_width, attn_bias, lengths);
  return run_forward(f, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  auto g = detail::prepare_backward(
      grad_out, x, u, mask, out, lse, scale, full_width, attn_bias, lengths);
  return run_backward(g, u, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> varlen_forward_cpu(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    double scale,
    bool full_width) {
  auto f = detail::prepare_varlen_forward(x, cu_seqlens, u, scale, full_width);
  return run_forward(f, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> varlen_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width) {
  auto g = detail::prepare_varlen_backward(grad_out, x, cu_seqlens, u, out, lse, scale, full_width);
  return run_backward(g, u, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> layer_norm_forward_cpu(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  auto pool = detail::prepare_pool(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::set_norm(pool, x, norm_weight, norm_bias, norm_eps);
  auto f = detail::forward_from(std::move(pool), x);
  return run_forward(f, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias,
    double norm_eps,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths) {
  auto pool = detail::prepare_pool(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::set_norm(pool, x, norm_weight, norm_bias, norm_eps);
  detail::check_folded_attention_pool_backward_args(grad_out, x, u, out, lse, full_width);
  auto g = detail::backward_from(std::move(pool), grad_out, x, out, lse);
  auto [dx, du] = run_backward(g, u, x.scalar_type());
  return {
      dx,
      du,
      detail::norm_gradient(g.norm_grads[0], norm_weight),
      detail::norm_gradient(g.norm_grads[1], norm_bias)};
}

constexpr const char* kJvp = "folded_attention_pool jvp";

at::Tensor jvp_cpu(
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& mask,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& x_tangent,
    const std::optional<at::Tensor>& u_tangent,
    const std::optional<at::Tensor>& bias_tangent) {
  auto f = detail::prepare_forward(x, u, mask, scale, full_width, attn_bias, lengths);
  detail::check_saved_forward(kJvp, x, u, out, lse, full_width);
  detail::check_tangents(kJvp, x, u, attn_bias, x_tangent, u_tangent, bias_tangent);
  return run_jvp(f, out, lse, x_tangent, u_tangent, bias_tangent, x.scalar_type());
}

at::Tensor varlen_jvp_cpu(
    const at::Tensor& x,
    const at::Tensor& cu_seqlens,
    const at::Tensor& u,
    const at::Tensor& out,
    const at::Tensor& lse,
    double scale,
    bool full_width,
    const std::optional<at::Tensor>& x_tangent,
    const std::optional<at::Tensor>& u_tangent) {
  auto f = detail::prepare_varlen_forward(x, cu_seqlens, u, scale, full_width);
  detail::check_saved_forward(kJvp, x, u, out, lse, full_width, cu_seqlens);
  detail::check_tangents(kJvp, x, u, std::nullopt, x_tangent, u_tangent, std::nullopt);
  return run_jvp(f, out, lse, x_tangent, u_tangent, std::nullopt, x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("_folded_attention_pool_forward", &forward_cpu);
  m.impl("_folded_attention_pool_backward", &backward_cpu);
  m.impl("_folded_attention_pool_varlen_forward", &varlen_forward_cpu);
  m.impl("_folded_attention_pool_varlen_backward", &varlen_backward_cpu);
  m.impl("_folded_attention_pool_jvp", &jvp_cpu);
  m.impl("_folded_attention_pool_varlen_jvp", &varlen_jvp_cpu);
  m.impl("_layer_norm_folded_attention_pool_forward", &layer_norm_forward_cpu);
  m.impl("_layer_norm_folded_attention_pool_backward", &layer_norm_backward_cpu);
}

}  // namespace attnpool::cpu
