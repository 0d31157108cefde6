#pragma once

// A layer norm of each row of x in the pooling pass (open_clip's ln_k on the
// keys): y = (x - mean) * rstd * weight + bias, per row, computed from the
// row just loaded into a small buffer that the pooling kernels read in place
// of x, so that x is read from memory once forward and once backward and no
// normalized copy of x is ever made. The backward recomputes each row's
// statistics and y exactly as the forward did. Per instruction set, like
// every file in isa/ (ops/cpu/README.md).

#include "ops/cpu/isa/vec_helpers.h"

#include <cmath>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename A>
struct RowStats {
  A mean;
  A rstd;  // 1 / sqrt(variance + eps)
};

// sum_e f(e) for e in [0, n), f giving one vector of W elements at e, in
// four chains of additions (one chain waits on the adder's latency: it had
// made the norm cost more than the pooling it is fused into), then the
// chains, then the tail from tail(t) in order.
template <typename A, typename F, typename Tail>
A row_sum(int64_t n, const F& f, const Tail& tail) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec chains[4] = {Vec(A(0)), Vec(A(0)), Vec(A(0)), Vec(A(0))};
  int64_t e = 0;
  for (; e + 4 * W <= n; e += 4 * W) {
    for (int c = 0; c < 4; ++c) {
      chains[c] = chains[c] + f(e + c * W);
    }
  }
  for (; e + W <= n; e += W) {
    chains[0] = chains[0] + f(e);
  }
  A total = reduce_add((chains[0] + chains[1]) + (chains[2] + chains[3]));
  for (; e < n; ++e) {
    total += tail(e);
  }
  return total;
}

// row_sum of two functions at once, in one pass: {sum f, sum g}.
template <typename A, typename F, typename G, typename FTail, typename GTail>
std::pair<A, A> row_sums(
    int64_t n, const F& f, const G& g, const FTail& f_tail, const GTail& g_tail) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec f_chains[2] = {Vec(A(0)), Vec(A(0))};
  Vec g_chains[2] = {Vec(A(0)), Vec(A(0))};
  int64_t e = 0;
  for (; e + 2 * W <= n; e += 2 * W) {
    for (int c = 0; c < 2; ++c) {
      f_chains[c] = f_chains[c] + f(e + c * W);
      g_chains[c] = g_chains[c] + g(e + c * W);
    }
  }
  for (; e + W <= n; e += W) {
    f_chains[0] = f_chains[0] + f(e);
    g_chains[0] = g_chains[0] + g(e);
  }
  A f_total = reduce_add(f_chains[0] + f_chains[1]);
  A g_total = reduce_add(g_chains[0] + g_chains[1]);
  for (; e < n; ++e) {
    f_total += f_tail(e);
    g_total += g_tail(e);
  }
  return {f_total, g_total};
}

// mean and rstd of a row of n elements, in the accumulation dtype: the mean
// first, then the variance as the mean of squared deviations (two passes
// over a row in L1; one-pass sums of squares lose digits on rows far from 0).
// The mean is summed from the row's first element: x[0] + sum(x - x[0]) / n,
// exact on a constant row, where an ulp off would come back times rstd
// (~1e6 at eps = 1e-12) as y off by O(0.1) where it must be the bias.
template <typename T, typename A>
RowStats<A> row_stats(const T* x, int64_t n, A eps) {
  using Vec = Vectorized<A>;
  const A first = static_cast<A>(x[0]);
  const Vec firsts(first);
  const A mean = first + row_sum<A>(
                             n,
                             [&](int64_t e) { return load_acc(x + e) - firsts; },
                             [&](int64_t t) { return static_cast<A>(x[t]) - first; }) /
                             static_cast<A>(n);
  const Vec means(mean);
  const A variance = row_sum<A>(
                         n,
                         [&](int64_t e) {
                           const Vec deviation = load_acc(x + e) - means;
                           return deviation * deviation;
                         },
                         [&](int64_t t) {
                           const A deviation = static_cast<A>(x[t]) - mean;
                           return deviation * deviation;
                         }) /
                     static_cast<A>(n);
  return {mean, A(1) / std::sqrt(variance + eps)};
}

// W values of the accumulation dtype stored as T at p (kStream: with a
// non-temporal store, p aligned to the vector, where T is A).
template <bool kStream = false, typename T, typename A>
void store_as(const Vectorized<A>& v, T* p) {
  if constexpr (std::is_same_v<T, A>) {
    store<kStream>(v, p);
  } else {
    at::vec::convert_from_float<T>(v, Vectorized<A>(A(0))).store(p, Vectorized<A>::size());
  }
}

// y = (x - mean) * rstd * weight + bias, rounded to T as it is stored.
template <typename T, typename A>
void normalize_row(const T* x, RowStats<A> stats, const A* weight, const A* bias, int64_t n, T* y) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const Vec means(stats.mean);
  const Vec rstds(stats.rstd);
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    const Vec z = (load_acc(x + e) - means) * rstds;
    store_as(at::vec::fmadd(z, Vec::loadu(weight + e), Vec::loadu(bias + e)), y + e);
  }
  for (; e < n; ++e) {
    const A z = (static_cast<A>(x[e]) - stats.mean) * stats.rstd;
    y[e] = static_cast<T>(z * weight[e] + bias[e]);
  }
}

// The backward of normalize_row for one row, from dy (the gradient of y):
//   z = (x - mean) * rstd,  g = dy * weight,
//   dx = rstd * (g - mean(g) - z * mean(g * z)),
//   dweight += dy * z,  dbias += dy.
template <bool kStream, typename T, typename A>
void normalize_row_backward(
    const T* x,
    const T* dy,
    RowStats<A> stats,
    const A* weight,
    int64_t n,
    T* dx,
    A* dweight,
    A* dbias) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const Vec means(stats.mean);
  const Vec rstds(stats.rstd);
  auto z_at = [&](int64_t e) { return (load_acc(x + e) - means) * rstds; };
  auto g_at = [&](int64_t e) { return load_acc(dy + e) * Vec::loadu(weight + e); };
  auto z_of = [&](int64_t t) { return (static_cast<A>(x[t]) - stats.mean) * stats.rstd; };
  auto g_of = [&](int64_t t) { return static_cast<A>(dy[t]) * weight[t]; };
  const auto [g_total, gz_total] = row_sums<A>(
      n,
      g_at,
      [&](int64_t e) { return g_at(e) * z_at(e); },
      g_of,
      [&](int64_t t) { return g_of(t) * z_of(t); });
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    const Vec d = load_acc(dy + e);
    at::vec::fmadd(d, z_at(e), Vec::loadu(dweight + e)).store(dweight + e);
    (d + Vec::loadu(dbias + e)).store(dbias + e);
  }
  for (; e < n; ++e) {
    const A d = static_cast<A>(dy[e]);
    dweight[e] += d * z_of(e);
    dbias[e] += d;
  }
  const A g_mean = g_total / static_cast<A>(n);
  const A gz_mean = gz_total / static_cast<A>(n);
  const Vec g_means(g_mean);
  const Vec gz_means(gz_mean);
  for (e = 0; e + W <= n; e += W) {
    store_as<kStream>(rstds * (g_at(e) - g_means - z_at(e) * gz_means), dx + e);
  }
  for (; e < n; ++e) {
    dx[e] = static_cast<T>(stats.rstd * (g_of(e) - g_mean - z_of(e) * gz_mean));
  }
}

// The normalized rows the pooling kernels read instead of x's: `capacity`
// rows of H, reused in turn, so a row's y stays valid until `capacity` more
// rows have been normalized (the forward keeps two tiles alive, the one it
// scores and the one before it). Empty, and never used, without a norm.
template <typename T>
class NormalizedRows {
 public:
  using A = at::opmath_type<T>;

  NormalizedRows(const PoolInputs& p, int capacity)
      : weight_(static_cast<const A*>(p.norm_weight)),
        bias_(static_cast<const A*>(p.norm_bias)),
        eps_(static_cast<A>(p.norm_eps)),
        hidden_(p.hidden),
        row_stride_(p.x_seq_stride),
        capacity_(capacity),
        rows_(p.normalizes() ? capacity * p.hidden : 0),
        stats_(p.normalizes() ? capacity : 0) {}

  // row itself without a norm, else its y in the next buffer row.
  const T* operator()(const T* row) {
    if (weight_ == nullptr) {
      return row;
    }
    T* y = rows_.data() + next_ * hidden_;
    // The kernels' prefetches now reach y, not x: ask for the row that many
    // rows on here instead (the next rows of x are usually that far apart).
    prefetch_row(row, hidden_, kRowByRowAhead * row_stride_);
    stats_[next_] = row_stats(row, hidden_, eps_);
    normalize_row(row, stats_[next_], weight_, bias_, hidden_, y);
    next_ = (next_ + 1) % capacity_;
    return y;
  }

  // dx of `row` from the gradient of its y (which operator() returned, and
  // which is still in the buffer; see normalize_row_backward). stream: dx
  // is written with non-temporal stores ([Note: non-temporal dx]).
  void backward(
      const T* y, const T* row, const T* dy, T* dx, A* dweight, A* dbias, bool stream) const {
    const RowStats<A> stats = stats_[(y - rows_.data()) / hidden_];
    if (stream) {
      return normalize_row_backward<true>(row, dy, stats, weight_, hidden_, dx, dweight, dbias);
    }
    normalize_row_backward<false>(row, dy, stats, weight_, hidden_, dx, dweight, dbias);
  }

 private:
  const A* weight_;
  const A* bias_;
  A eps_;
  int64_t hidden_;
  int64_t row_stride_;
  int capacity_;
  int next_ = 0;
  std::vector<T> rows_;
  std::vector<RowStats<A>> stats_;  // of the row normalized into each buffer row
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
