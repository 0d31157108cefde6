#pragma once

// CPU compute kernels of attention_pool. This file is compiled once per
// instruction set through the attention_pool_kernel_<isa>.cpp wrappers,
// which define CPU_CAPABILITY (and CPU_CAPABILITY_<ISA>) first so that
// at::vec::Vectorized picks that instruction set, as ATen's own kernels do.

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including attention_pool_kernel_impl.h"
#endif

#include "ops/cpu/attention_pool_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// sum_e a[e] * b[e]. Four accumulators hide the latency of dependent FMAs.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
  int64_t e = 0;
  for (; e + 4 * W <= n; e += 4 * W) {
    s0 = at::vec::fmadd(Vec::loadu(a + e), Vec::loadu(b + e), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + e + W), Vec::loadu(b + e + W), s1);
    s2 = at::vec::fmadd(Vec::loadu(a + e + 2 * W), Vec::loadu(b + e + 2 * W), s2);
    s3 = at::vec::fmadd(Vec::loadu(a + e + 3 * W), Vec::loadu(b + e + 3 * W), s3);
  }
  for (; e + W <= n; e += W) {
    s0 = at::vec::fmadd(Vec::loadu(a + e), Vec::loadu(b + e), s0);
  }
  T tail(0);
  for (; e < n; ++e) {
    tail += a[e] * b[e];
  }
  const Vec total = (s0 + s1) + (s2 + s3);
  return at::vec::vec_reduce_all<T>([](Vec& p, Vec& q) { return p + q; }, total) + tail;
}

// y += alpha * x
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec a(alpha);
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    at::vec::fmadd(a, Vec::loadu(x + e), Vec::loadu(y + e)).store(y + e);
  }
  for (; e < n; ++e) {
    y[e] += alpha * x[e];
  }
}

// y *= alpha
template <typename T>
void scale_in_place(T alpha, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec a(alpha);
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    (a * Vec::loadu(y + e)).store(y + e);
  }
  for (; e < n; ++e) {
    y[e] *= alpha;
  }
}

// dst = src, converting to the accumulation dtype (or back) when they differ.
template <typename src_t, typename dst_t>
void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::copy(src, src + n, dst);
  } else if constexpr (at::is_reduced_floating_point_v<src_t>) {
    using bVec = Vectorized<src_t>;
    using fVec = Vectorized<float>;
    int64_t e = 0;
    for (; e + bVec::size() <= n; e += bVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<src_t>(bVec::loadu(src + e));
      lo.store(dst + e);
      hi.store(dst + e + fVec::size());
    }
    for (; e < n; ++e) {
      dst[e] = static_cast<float>(src[e]);
    }
  } else {
    using bVec = Vectorized<dst_t>;
    using fVec = Vectorized<float>;
    int64_t e = 0;
    for (; e + bVec::size() <= n; e += bVec::size()) {
      const auto lo = fVec::loadu(src + e);
      const auto hi = fVec::loadu(src + e + fVec::size());
      at::vec::convert_from_float<dst_t>(lo, hi).store(dst + e);
    }
    for (; e < n; ++e) {
      dst[e] = static_cast<dst_t>(src[e]);
    }
  }
}

// Rows of x seen in the accumulation dtype: the row itself for float32 and
// float64, a converted copy in a per-thread buffer for float16 and bfloat16.
template <typename scalar_t>
class RowReader {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kCopies = !std::is_same_v<scalar_t, acc_t>;

 public:
  explicit RowReader(int64_t hidden) : hidden_(hidden), buffer_(kCopies ? hidden : 0) {}

  const acc_t* read(const scalar_t* row) {
    if constexpr (kCopies) {
      convert_row(row, buffer_.data(), hidden_);
      return buffer_.data();
    } else {
      return row;
    }
  }

 private:
  int64_t hidden_;
  std::vector<acc_t> buffer_;
};

// Geometry shared by every loop: sizes and strides of x and the mask.
struct Rows {
  PoolShape shape;
  int64_t head_dim;
  int64_t num_scores;
  int64_t x_batch_stride;
  int64_t x_seq_stride;
  const bool* mask;
  int64_t mask_batch_stride;
  int64_t mask_seq_stride;

  template <typename Params>
  static Rows of(const Params& p) {
    return {
        p.shape,
        p.shape.num_heads > 0 ? p.shape.hidden / p.shape.num_heads : 0,
        p.shape.num_queries * p.shape.num_heads,
        p.x_batch_stride,
        p.x_seq_stride,
        p.mask,
        p.mask_batch_stride,
        p.mask_seq_stride};
  }

  bool attends(int64_t b, int64_t l) const {
    return mask == nullptr || mask[b * mask_batch_stride + l * mask_seq_stride];
  }

  template <typename scalar_t>
  const scalar_t* row(const scalar_t* x, int64_t b, int64_t l) const {
    return x + b * x_batch_stride + l * x_seq_stride;
  }
};

// Online-softmax state of one (piece of a) sequence for all Q*n scores:
// [any_valid, running max[K], running sum[K], weighted sum of x[Q*H]],
// one flat array so that a piece's state can live in the partials buffer.
template <typename acc_t>
class SoftmaxState {
 public:
  static int64_t size(const Rows& r) {
    return 1 + 2 * r.num_scores + r.shape.num_queries * r.shape.hidden;
  }

  SoftmaxState(acc_t* data, const Rows& r) : data_(data), r_(r) {}

  acc_t* max() const {
    return data_ + 1;
  }
  acc_t* sum() const {
    return data_ + 1 + r_.num_scores;
  }
  acc_t* weighted() const {
    return data_ + 1 + 2 * r_.num_scores;
  }
  bool any_valid() const {
    return data_[0] != acc_t(0);
  }

  void reset() {
    data_[0] = acc_t(0);
    std::fill_n(max(), r_.num_scores, -std::numeric_limits<acc_t>::infinity());
    std::fill_n(sum(), r_.num_scores + r_.shape.num_queries * r_.shape.hidden, acc_t(0));
  }

  // Adds one unmasked row xr (accumulation dtype) with score vectors u.
  void add_row(const acc_t* xr, const acc_t* u, acc_t scale) {
    const int64_t H = r_.shape.hidden;
    const int64_t n = r_.shape.num_heads;
    const int64_t d = r_.head_dim;
    data_[0] = acc_t(1);
    for (int64_t i = 0; i < r_.shape.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t k = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        const acc_t score = scale * dot(xr, u + k * H, H);
        if (score > max()[k]) {
          // exp(-inf) = 0 also covers the first valid row.
          const acc_t correction = std::exp(max()[k] - score);
          sum()[k] *= correction;
          scale_in_place(correction, acc, d);
          max()[k] = score;
        }
        // A -inf score has weight 0 even while the running max is still -inf.
        const acc_t w = score == -std::numeric_limits<acc_t>::infinity()
                            ? acc_t(0)
                            : std::exp(score - max()[k]);
        sum()[k] += w;
        axpy(w, xr + h * d, acc, d);
      }
    }
  }

  // Folds another piece's state into this one. Pieces are merged in a fixed
  // order by the caller, so the result does not depend on the thread count.
  void merge(const SoftmaxState& other) {
    const int64_t H = r_.shape.hidden;
    const int64_t n = r_.shape.num_heads;
    const int64_t d = r_.head_dim;
    if (!other.any_valid()) {
      return;
    }
    data_[0] = acc_t(1);
    for (int64_t i = 0; i < r_.shape.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t k = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        const acc_t* other_acc = other.weighted() + i * H + h * d;
        const acc_t m = std::max(max()[k], other.max()[k]);
        // Both maxima -inf: every score so far is -inf and weighs 0 (sums are
        // 0); keep the zero-weighted accumulations, as a softmax would.
        const bool none_finite = m == -std::numeric_limits<acc_t>::infinity();
        const acc_t mine = none_finite ? acc_t(1) : std::exp(max()[k] - m);
        const acc_t theirs = none_finite ? acc_t(1) : std::exp(other.max()[k] - m);
        sum()[k] = sum()[k] * mine + other.sum()[k] * theirs;
        scale_in_place(mine, acc, d);
        axpy(theirs, other_acc, acc, d);
        max()[k] = m;
      }
    }
  }

  // out[i, D_h] = weighted / sum and lse = max + log(sum); a sequence with
  // no unmasked position gives zeros and lse = -inf.
  template <typename scalar_t>
  void finish(scalar_t* out, acc_t* lse) {
    const int64_t H = r_.shape.hidden;
    const int64_t n = r_.shape.num_heads;
    const int64_t d = r_.head_dim;
    for (int64_t i = 0; i < r_.shape.num_queries; ++i) {
      for (int64_t h = 0; h < n; ++h) {
        const int64_t k = i * n + h;
        acc_t* acc = weighted() + i * H + h * d;
        if (any_valid()) {
          scale_in_place(acc_t(1) / sum()[k], acc, d);
          lse[k] = max()[k] + std::log(sum()[k]);
        } else {
          std::fill_n(acc, d, acc_t(0));
          lse[k] = -std::numeric_limits<acc_t>::infinity();
        }
        convert_row(acc, out + i * H + h * d, d);
      }
    }
  }

 private:
  acc_t* data_;
  Rows r_;
};

// x: [B, L, H] rows contiguous; u: [K, H]; out: [B, Q, H]; lse: [B, K].
// One pass over x. Work item = (sequence b, piece of its rows); a sequence
// cut into several pieces keeps each piece's state in `partials` and the
// pieces are merged in order afterwards (flash-decoding on the CPU).
template <typename scalar_t>
void forward_impl(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Rows r = Rows::of(p);
  const PoolShape& s = p.shape;
  const WorkPlan& plan = p.plan;
  const int64_t K = r.num_scores;
  const int64_t state_size = SoftmaxState<acc_t>::size(r);
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* u = static_cast<const acc_t*>(p.u);
  auto* out = static_cast<scalar_t*>(p.out);
  auto* lse = static_cast<acc_t*>(p.lse);
  auto* partials = static_cast<acc_t*>(p.partials);
  const auto scale = static_cast<acc_t>(p.scale);
  const bool split = plan.splits > 1;

  at::parallel_for(0, s.batch * plan.splits, plan.forward_grain, [&](int64_t begin, int64_t end) {
    RowReader<scalar_t> reader(s.hidden);
    std::vector<acc_t> local(split ? 0 : state_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / plan.splits;
      const int64_t first = (item % plan.splits) * plan.rows_per_split;
      const int64_t last = std::min(s.seq_len, first + plan.rows_per_split);
      SoftmaxState<acc_t> state(split ? partials + item * state_size : local.data(), r);
      state.reset();
      for (int64_t l = first; l < last; ++l) {
        if (r.attends(b, l)) {
          state.add_row(reader.read(r.row(x, b, l)), u, scale);
        }
      }
      if (!split) {
        state.finish(out + b * s.num_queries * s.hidden, lse + b * K);
      }
    }
  });
  if (!split) {
    return;
  }
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> merged(state_size);
    for (int64_t b = begin; b < end; ++b) {
      SoftmaxState<acc_t> state(merged.data(), r);
      state.reset();
      for (int64_t piece = 0; piece < plan.splits; ++piece) {
        state.merge(SoftmaxState<acc_t>(partials + (b * plan.splits + piece) * state_size, r));
      }
      state.finish(out + b * s.num_queries * s.hidden, lse + b * K);
    }
  });
}

// delta[b, k] = sum over head h's dims of grad_out[b, i] * out[b, i].
template <typename acc_t>
void compute_delta(const BackwardParams& p, const Rows& r, acc_t* delta) {
  const auto* g = static_cast<const acc_t*>(p.grad_out);
  const auto* o = static_cast<const acc_t*>(p.out);
  const PoolShape& s = p.shape;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t i = 0; i < s.num_queries; ++i) {
      for (int64_t h = 0; h < s.num_heads; ++h) {
        const int64_t offset = (b * s.num_queries + i) * s.hidden + h * r.head_dim;
        delta[b * r.num_scores + i * s.num_heads + h] = dot(g + offset, o + offset, r.head_dim);
      }
    }
  }
}

// du = sum over items of du_partials, in item order.
template <typename acc_t>
void reduce_partials(const BackwardParams& p, int64_t width) {
  const auto* partials = static_cast<const acc_t*>(p.du_partials);
  auto* du = static_cast<acc_t*>(p.du);
  const int64_t items = p.plan.items;
  at::parallel_for(0, width, 4096, [&](int64_t begin, int64_t end) {
    std::fill(du + begin, du + end, acc_t(0));
    for (int64_t item = 0; item < items; ++item) {
      axpy(acc_t(1), partials + item * width + begin, du + begin, end - begin);
    }
  });
}

// x: [B, L, H]; grad_out, out: [B, Q, H]; lse, delta: [B, K]; u: [K, H].
// One pass over x writing dx; each work item (a run of rows of the flattened
// [B * L]) accumulates its own du partial, reduced afterwards in item order.
template <typename scalar_t>
void backward_impl(const BackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDxInPlace = std::is_same_v<scalar_t, acc_t>;
  const Rows r = Rows::of(p);
  const PoolShape& s = p.shape;
  const WorkPlan& plan = p.plan;
  const int64_t H = s.hidden;
  const int64_t n = s.num_heads;
  const int64_t d = r.head_dim;
  const int64_t K = r.num_scores;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* u = static_cast<const acc_t*>(p.u);
  const auto* g = static_cast<const acc_t*>(p.grad_out);
  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* delta = static_cast<const acc_t*>(p.delta);
  auto* dx = static_cast<scalar_t*>(p.dx);
  auto* du_partials = static_cast<acc_t*>(p.du_partials);
  const auto scale = static_cast<acc_t>(p.scale);
  const int64_t rows = s.batch * s.seq_len;

  at::parallel_for(0, plan.items, plan.backward_grain, [&](int64_t begin, int64_t end) {
    RowReader<scalar_t> reader(H);
    std::vector<acc_t> dx_buffer(kDxInPlace ? 0 : H);
    for (int64_t item = begin; item < end; ++item) {
      acc_t* du = du_partials + item * K * H;
      std::fill_n(du, K * H, acc_t(0));
      const int64_t last = std::min(rows, (item + 1) * plan.rows_per_item);
      for (int64_t row = item * plan.rows_per_item; row < last; ++row) {
        const int64_t b = row / s.seq_len;
        const int64_t l = row % s.seq_len;
        scalar_t* dx_row = dx + row * H;
        if (!r.attends(b, l)) {
          std::fill_n(dx_row, H, scalar_t(0));
          continue;
        }
        const acc_t* xr = reader.read(r.row(x, b, l));
        acc_t* dxr = nullptr;
        if constexpr (kDxInPlace) {
          dxr = dx_row;
        } else {
          dxr = dx_buffer.data();
        }
        std::fill_n(dxr, H, acc_t(0));
        for (int64_t i = 0; i < s.num_queries; ++i) {
          const acc_t* gi = g + (b * s.num_queries + i) * H;
          for (int64_t h = 0; h < n; ++h) {
            const int64_t k = i * n + h;
            const acc_t* uk = u + k * H;
            const acc_t prob = std::exp(scale * dot(xr, uk, H) - lse[b * K + k]);
            const acc_t dprob = dot(gi + h * d, xr + h * d, d);
            const acc_t dscore = scale * prob * (dprob - delta[b * K + k]);
            axpy(prob, gi + h * d, dxr + h * d, d);
            axpy(dscore, uk, dxr, H);
            axpy(dscore, xr, du + k * H, H);
          }
        }
        if constexpr (!kDxInPlace) {
          convert_row(dxr, dx_row, H);
        }
      }
    }
  });
  reduce_partials<acc_t>(p, K * H);
}

void forward(const ForwardParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "attention_pool_forward", [&] {
    forward_impl<scalar_t>(p);
  });
}

void backward(const BackwardParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.dtype, "attention_pool_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        compute_delta<acc_t>(p, Rows::of(p), static_cast<acc_t*>(p.delta));
        backward_impl<scalar_t>(p);
      });
}

#define ATTNPOOL_STRINGIFY_(x) #x
#define ATTNPOOL_STRINGIFY(x) ATTNPOOL_STRINGIFY_(x)

[[maybe_unused]] const bool registered = register_kernels(
    {Isa::CPU_CAPABILITY, ATTNPOOL_STRINGIFY(CPU_CAPABILITY), &forward, &backward});

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
