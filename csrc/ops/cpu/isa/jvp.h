#pragma once

// The forward-mode derivative (jvp) of folded_attention_pool on the CPU: one
// pass over x and its tangent, with the forward's softmax recomputed from the
// saved log-sum-exp (SPEC.md §5). Per instruction set, like every file in
// isa/ (ops/cpu/README.md).
//
// With ds_l = scale * (dx_l . u + x_l . du) + dbias_l the tangent of row l's
// score, the output's tangent is
//   d out = sum_l p_l ds_l x_l + sum_l p_l dx_l - (sum_l p_l ds_l) out,
// so the pass adds, per score, a weighted sum of the rows of x (weights
// p ds), one of the rows of dx (weights p) and the total of p ds; the
// forward's out is subtracted at the end. The two sums are kept apart: when
// the softmax puts all its weight on one row, the first minus total * out is
// exactly 0 while each term can be 1e11 times the second sum (|x| ~ 1e10),
// which added into the same sum would be lost. Each tile of rows is read
// from memory once and stays in L1 for its scores and sums.

#include "ops/cpu/isa/recompute.h"
#include "ops/cpu/isa/vec_helpers.h"
#include "ops/cpu/kernel_set.h"

#include <algorithm>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// What the rows of one work item add up, per score: the weighted sums of
// head_dim columns of x (weights p ds) and of dx (weights p), and the total
// of p ds (JvpParams::partials).
template <typename acc_t>
struct TangentSums {
  acc_t* x_sums;   // [num_scores, head_dim]
  acc_t* dx_sums;  // [num_scores, head_dim]
  acc_t* totals;   // [num_scores]

  static int64_t size(const PoolShape& s) {
    return s.num_scores() * (2 * s.head_dim + 1);
  }
  TangentSums(acc_t* data, const PoolShape& s)
      : x_sums(data),
        dx_sums(data + s.num_scores() * s.head_dim),
        totals(data + 2 * s.num_scores() * s.head_dim) {}
};

// sums[k] += sum_r weights[k][r] * rows[r][columns of score k] for every
// score k: head slice by head slice, kSumsPerPass of its queries per pass
// over the tile.
template <int R, typename T, typename A>
void add_weighted_slices(const PoolShape& s, const A* weights, const T* const* rows, A* sums) {
  const int64_t n = s.num_heads;
  const int64_t d = s.head_dim;
  const T* segments[R];
  A group_weights[kSumsPerPass * R];
  A* group_sums[kSumsPerPass];
  for (int64_t h = 0; h < n; ++h) {
    offset_rows<R>(rows, h * d, segments);
    for (int64_t i = 0; i < s.num_queries; i += kSumsPerPass) {
      const int count = static_cast<int>(std::min<int64_t>(kSumsPerPass, s.num_queries - i));
      for (int g = 0; g < count; ++g) {
        const int64_t k = (i + g) * n + h;
        group_sums[g] = sums + k * d;
        std::copy_n(weights + k * R, R, group_weights + g * R);
      }
      with_tile_size<kSumsPerPass>(count, [&](auto size) {
        accumulate_rows_into<R, decltype(size)::value, false>(
            group_weights, segments, group_sums, d);
      });
    }
  }
}

// What the rows are scored against: u (and in paired order, for bfloat16
// rows the forward read in pairs, or rounded to bfloat16, if the forward
// scored from bfloat16 products, or as columns, if the forward scored by
// columns), and u's tangent. When u is needed as it is only, `both` holds u and then u's tangent
// ([2 * num_scores, H]), so that one pass over a tile gives every x . u and x . du, each load of x
// serving up to four of them.
template <typename acc_t>
struct ScoredVectors {
  const acc_t* u;
  const acc_t* u_paired;       // or null
  const at::BFloat16* u_bf16;  // or null
  const acc_t* u_columns;      // or null
  const acc_t* u_tangent;      // or null
  const acc_t* both;           // or null
};

template <typename acc_t>
CacheLineBuffer<acc_t> u_and_tangent(
    const JvpParams& p, const acc_t* u_paired, const at::BFloat16* u_bf16, const acc_t* u_columns) {
  CacheLineBuffer<acc_t> both;
  const auto* u_tangent = static_cast<const acc_t*>(p.u_tangent);
  if (u_tangent != nullptr && u_paired == nullptr && u_bf16 == nullptr && u_columns == nullptr) {
    const int64_t size = p.num_scores() * p.hidden;
    both.resize(2 * size);
    std::copy_n(static_cast<const acc_t*>(p.u), size, both.data());
    std::copy_n(u_tangent, size, both.data() + size);
  }
  return both;
}

// One tile of R attended rows of sequence b (and their tangents, if x has
// one) added to `sums`. scratch: 3 * num_scores * R.
template <int R, typename scalar_t, typename acc_t>
void jvp_rows(
    const JvpParams& p,
    int64_t b,
    const scalar_t* const* rows,
    const scalar_t* const* tangent_rows,
    const ScoredVectors<acc_t>& v,
    const acc_t* bias,
    const acc_t* bias_tangent,
    acc_t* scratch,
    TangentSums<acc_t> sums) {
  const int64_t H = p.hidden;
  const int64_t num_scores = p.num_scores();
  const auto scale = static_cast<acc_t>(p.scale);
  const auto* lse = static_cast<const acc_t*>(p.lse) + 2 * b * num_scores;
  // x . u (as the forward summed it, [Note: one order for every score]), then x . du.
  acc_t* probs = scratch;
  acc_t* u_tangent_scores = scratch + num_scores * R;
  acc_t* dscores = scratch + 2 * num_scores * R;
  if (v.both != nullptr) {
    score_dot_rows_each<R>(rows, v.both, H, 2 * num_scores, probs);
  } else {
    forward_scores<R>(rows, v.u, v.u_paired, v.u_bf16, v.u_columns, H, num_scores, probs);
    if (v.u_tangent != nullptr) {
      score_dot_rows_each<R>(rows, v.u_tangent, H, num_scores, u_tangent_scores);
    }
  }
  if (tangent_rows != nullptr) {
    score_dot_rows_each<R>(tangent_rows, v.u, H, num_scores, dscores);
  } else {
    std::fill_n(dscores, num_scores * R, acc_t(0));
  }
  if (v.u_tangent != nullptr) {
    for (int64_t j = 0; j < num_scores * R; ++j) {
      dscores[j] += u_tangent_scores[j];
    }
  }
  probabilities(R, scale, bias, lse, num_scores, probs);
  for (int64_t k = 0; k < num_scores; ++k) {
    for (int r = 0; r < R; ++r) {
      const int64_t j = k * R + r;
      const acc_t dscore = scale * dscores[j] + (bias_tangent == nullptr ? 0 : bias_tangent[r]);
      dscores[j] = probs[j] * dscore;
      sums.totals[k] += dscores[j];
    }
  }
  add_weighted_slices<R>(p, dscores, rows, sums.x_sums);
  if (tangent_rows != nullptr) {
    add_weighted_slices<R>(p, probs, tangent_rows, sums.dx_sums);
  }
}

// tangent[b] = dx_sums + (x_sums - totals * out[b]), score by score.
template <typename acc_t>
void finish_tangent(const JvpParams& p, int64_t b, TangentSums<acc_t> sums) {
  const int64_t d = p.head_dim;
  const int64_t offset = b * p.num_scores() * d;
  const auto* out = static_cast<const acc_t*>(p.out) + offset;
  auto* tangent = static_cast<acc_t*>(p.tangent) + offset;
  for (int64_t k = 0; k < p.num_scores(); ++k) {
    const acc_t total = sums.totals[k];
    for (int64_t c = 0; c < d; ++c) {
      const int64_t j = k * d + c;
      tangent[j] = sums.dx_sums[j] + (sums.x_sums[j] - total * out[j]);
    }
  }
}

// x: [B, L, H] (or ragged [T, H]) with its tangent laid out alike; out:
// [B, num_scores, head_dim] and lse [B, num_scores, 2] from the forward. One
// pass over x and its tangent, cut into the forward's work items; pieces of
// a sequence are added in piece order, so the result does not depend on the
// thread count.
template <typename scalar_t>
void jvp_impl(const JvpParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTile = kBackwardTileRows;
  const int64_t num_scores = p.num_scores();
  const int64_t state_size = TangentSums<acc_t>::size(p);
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* x_tangent = static_cast<const scalar_t*>(p.x_tangent);
  const auto* u = static_cast<const acc_t*>(p.u);
  const auto* bias = static_cast<const acc_t*>(p.bias);
  const auto* bias_tangent = static_cast<const acc_t*>(p.bias_tangent);
  auto* partials = static_cast<acc_t*>(p.partials);
  const int64_t items = p.work_items();
  const bool in_pieces = items > p.batch;
  const CacheLineBuffer<acc_t> u_paired = u_in_paired_order<scalar_t>(p, u);
  const CacheLineBuffer<at::BFloat16> u_bf16 = u_in_bf16<scalar_t>(p, u);
  const CacheLineBuffer<acc_t> u_columns = u_in_columns<scalar_t>(p, u);
  const CacheLineBuffer<acc_t> both = u_and_tangent(
      p,
      u_paired.empty() ? nullptr : u_paired.data(),
      u_bf16.empty() ? nullptr : u_bf16.data(),
      u_columns.empty() ? nullptr : u_columns.data());
  const ScoredVectors<acc_t> vectors{
      u,
      u_paired.empty() ? nullptr : u_paired.data(),
      u_bf16.empty() ? nullptr : u_bf16.data(),
      u_columns.empty() ? nullptr : u_columns.data(),
      static_cast<const acc_t*>(p.u_tangent),
      both.empty() ? nullptr : both.data()};

  parallel_over_items(p, [&](int64_t begin, int64_t end) {
    RowTile<scalar_t, kTile> tile;
    RowTile<scalar_t, kTile> tangent_tile;
    acc_t tile_bias[kTile] = {};
    acc_t tile_bias_tangent[kTile] = {};
    CacheLineBuffer<acc_t> scratch(3 * num_scores * kTile);
    CacheLineBuffer<acc_t> local(in_pieces ? 0 : state_size);
    for (int64_t item = begin; item < end; ++item) {
      // (Named, not a structured binding: C++17 lambdas cannot capture those.)
      const SequencePiece work = p.work_item(item);
      const int64_t b = work.b;
      acc_t* state = in_pieces ? partials + item * state_size : local.data();
      std::fill_n(state, state_size, acc_t(0));
      const TangentSums<acc_t> sums(state, p);
      auto flush = [&] {
        with_tile_size<kTile>(tile.count(), [&](auto size) {
          jvp_rows<decltype(size)::value>(
              p,
              b,
              tile.rows(),
              x_tangent == nullptr ? nullptr : tangent_tile.rows(),
              vectors,
              bias == nullptr ? nullptr : tile_bias,
              bias_tangent == nullptr ? nullptr : tile_bias_tangent,
              scratch.data(),
              sums);
        });
        tile.clear();
        tangent_tile.clear();
      };
      for (int64_t l = work.rows.begin; l < work.rows.end; ++l) {
        if (!p.attends(b, l)) {
          continue;
        }
        const int64_t offset = p.row_offset(b, l);
        if (bias != nullptr) {
          tile_bias[tile.count()] = bias[b * p.seq_len + l];
        }
        if (bias_tangent != nullptr) {
          tile_bias_tangent[tile.count()] = bias_tangent[b * p.seq_len + l];
        }
        if (x_tangent != nullptr) {
          tangent_tile.add(x_tangent + offset);
        }
        tile.add(x + offset);
        if (tile.full()) {
          flush();
        }
      }
      if (tile.count() > 0) {
        flush();
      }
      if (!in_pieces) {
        finish_tangent(p, b, sums);
      }
    }
  });
  if (!in_pieces) {
    return;
  }
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    CacheLineBuffer<acc_t> merged(state_size);
    for (int64_t b = begin; b < end; ++b) {
      // A sequence's pieces are consecutive work items.
      const acc_t* parts = partials + p.item_of(b, 0) * state_size;
      sum_parts_in_order(parts, p.pieces_of(b), state_size, merged.data());
      finish_tangent(p, b, TangentSums<acc_t>(merged.data(), p));
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
