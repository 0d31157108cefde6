#pragma once

// The softmax over rows of scores with weights below 2^-100 set to 0
// ([Note: no subnormal weights]), for the path that projects the keys
// (ops/softmax_without_subnormals.cpp). Each row of scores is read twice
// (its maximum, its exponentials) and its weights written twice (then
// divided by their sum), the exponentials those of the pooling kernels
// (exp_of). Per instruction set, like every file in isa/ (ops/cpu/README.md).

#include "ops/cpu/isa/vec_helpers.h"
#include "ops/cpu/kernel_set.h"

#include <limits>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// The largest of a row's scores, NaN left out (a NaN score still makes its
// row NaN through its own weight).
template <typename A>
A row_max(const A* s, int64_t width) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec top(-std::numeric_limits<A>::infinity());
  int64_t e = 0;
  for (; e + W <= width; e += W) {
    top = running_max(top, Vec::loadu(s + e));
  }
  A lanes[W];
  top.store(lanes);
  A m = lanes[0];
  for (int64_t i = 1; i < W; ++i) {
    m = lanes[i] > m ? lanes[i] : m;
  }
  for (; e < width; ++e) {
    m = s[e] > m ? s[e] : m;
  }
  return m;
}

// weights[e] = e^(s[e] - max) / sum over the row, 0 where e^(s[e] - max) is
// below 2^-100.
template <typename A>
void softmax_row(const A* s, A* weights, int64_t width) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const A m = row_max(s, width);
  const Vec top(m);
  Vec total(A(0));
  int64_t e = 0;
  for (; e + W <= width; e += W) {
    const Vec w = exp_of</*kMayOverflow=*/false>(Vec::loadu(s + e) - top);
    w.store(weights + e);
    total = total + w;
  }
  A lanes[W];
  total.store(lanes);
  A sum = A(0);
  for (int64_t i = 0; i < W; ++i) {
    sum += lanes[i];
  }
  for (; e < width; ++e) {
    weights[e] = exp_of(s[e] - m);
    sum += weights[e];
  }
  const A inverse = A(1) / sum;
  e = 0;
  for (; e + W <= width; e += W) {
    (Vec::loadu(weights + e) * Vec(inverse)).store(weights + e);
  }
  for (; e < width; ++e) {
    weights[e] *= inverse;
  }
}

template <typename A>
void softmax_impl(const SoftmaxParams& p) {
  const auto* scores = static_cast<const A*>(p.scores);
  auto* weights = static_cast<A*>(p.weights);
  const int64_t grain = p.width >= kMinPieceElems ? 1 : kMinPieceElems / p.width;
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      softmax_row(scores + r * p.width, weights + r * p.width, p.width);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
