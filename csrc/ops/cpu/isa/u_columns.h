#pragma once

// Several scores per row (every score is over the whole row: Q queries of n
// heads, or full width's Q * n one-head queries) as small matrix products:
// the scores of a tile, [rows, S] = X_tile . U^T, with U^T stored column by
// column ("u columns": column h holding element h of every score's vector),
// and the weighted sums, [S, H] += P^T . X_tile, register-blocked across the
// tile's rows. Per instruction set, like every file in isa/ (ops/cpu/README.md).
//
// [Note: scores by columns] A vector lane holds one score of one row, so a
// row's scores need no reduction across lanes, each element of x is loaded
// once per vector of scores, and each column of u once per block of rows. Each
// score is one chain of FMAs over h = 0..H-1 in order, whatever the
// instruction set, the vector width or the block of rows: the backward and
// the jvp recompute it bitwise ([Note: one order for every score]). The
// dot-product form (score_dot_rows_float, 4 rows x 4 scores, then
// accumulate_rows_into over 8 rows) reloaded each row once per 4 scores and
// u once per 4 rows. Forward, float32, 2 threads on a 2-core EPYC, both
// forms in one process: so400m's full width (16 x 729 x 1152, 16 scores)
// 3.37 -> 2.38 ms (1 thread 6.91 -> 4.77), 16 queries at 32 x 512 x 768
// 3.07 -> 2.17, full width 1 x 12 2.45 -> 1.96, head slices 16 x 12 16.3
// -> 14.1.

#include "ops/cpu/isa/vec_helpers.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// Whether rows of type T with this shape are scored by columns: rows read as
// they are (float32, float64) and scores (of every head: each is over the
// whole row) to fill three quarters of a vector's lanes. With fewer, the
// FMAs spend lanes on nothing: 32 x 512 x 768, float32, 16 lanes, 2
// threads, 2 and 4 scores took 1.5x and 1.1x the dot products' forward; 8
// scores 0.9x the forward but 1.12x the forward+backward, whose scores are
// recomputed 8 rows at a time.
template <typename T>
bool scores_by_columns(const PoolShape& s) {
  constexpr int64_t W = Vectorized<at::opmath_type<T>>::size();
  return std::is_same_v<T, at::opmath_type<T>> && 4 * s.num_scores() >= 3 * W;
}

// Lanes of a column of u: the scores, rounded up to whole vectors.
template <typename A>
int64_t column_lanes(int64_t num_scores) {
  constexpr int64_t W = Vectorized<A>::size();
  return (num_scores + W - 1) / W * W;
}

// u [num_scores, H] stored as columns, a vector of lanes (W scores) at a
// time: [column_lanes / W, H, W], the lanes past the scores zero, so that
// one pass of the scores reads its columns in order. Empty if the rows are
// not scored by columns.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> u_in_columns(const PoolShape& s, const acc_t* u) {
  std::vector<acc_t> columns;
  if (!scores_by_columns<scalar_t>(s)) {
    return columns;
  }
  const int64_t H = s.hidden;
  const int64_t num_scores = s.num_scores();
  constexpr int64_t W = Vectorized<acc_t>::size();
  columns.assign(H * column_lanes<acc_t>(num_scores), acc_t(0));
  for (int64_t k = 0; k < num_scores; ++k) {
    for (int64_t h = 0; h < H; ++h) {
      columns[(k / W * H + h) * W + k % W] = u[k * H + h];
    }
  }
  return columns;
}

// Rows per tile of the forward that scores by columns: each weighted sum is
// loaded and stored once per tile. A standalone loop of so400m's full width
// (16 scores, H = 1152, one core of a 2-core EPYC) ran at 80 G multiply-adds/s
// with 8 rows, 90 with 16, 98 with 24 to 48.
constexpr int kColumnTileRows = 24;

// Rows per block of scores: their accumulators, a column of u and the
// broadcast element stay in registers.
constexpr int kColumnScoreRows = kVectorRegisters == 32 ? 12 : 6;

// scores[k * stride + r] = rows[r] . u_k for R rows and every score k, one
// vector of lanes at a time ([Note: scores by columns]); kByRow: row r's
// lanes, pads included, at scores[r * stride] instead. ahead: the first
// pass prefetches each row's line that many elements on (the forward's next
// tile), or none if 0.
template <int R, bool kByRow, typename T, typename A>
void score_block_by_columns(
    const T* const* rows,
    const A* columns,
    int64_t n,
    int64_t num_scores,
    int64_t stride,
    int64_t ahead,
    A* scores) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const T* xr[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = rows[r];
  }
  for (int64_t first = 0; first < num_scores; first += W) {
    Vec acc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = Vec(A(0));
    }
    const A* column = columns + first * n;
    auto add_column = [&](int64_t h) {
      const Vec u_h = Vec::loadu(column);
      column += W;
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        acc[r] = at::vec::fmadd(Vec(xr[r][h]), u_h, acc[r]);
      }
    };
    // (Without, 4 scores at 32 x 512 x 768 ran at 0.73 of the dot-product
    // form's speed; with, 0.90. One run each.)
    const bool prefetches = ahead != 0 && first == 0;
    int64_t h = 0;
    for (; h + W <= n; h += W) {
      if (prefetches) {
        for (int r = 0; r < R; ++r) {
          prefetch(xr[r] + h, ahead);
        }
      }
      for (int64_t e = h; e < h + W; ++e) {
        add_column(e);
      }
    }
    for (; h < n; ++h) {
      add_column(h);
    }
    if constexpr (kByRow) {
      for (int r = 0; r < R; ++r) {
        acc[r].store(scores + r * stride + first);
      }
      continue;
    }
    const int64_t count = std::min<int64_t>(W, num_scores - first);
    for (int r = 0; r < R; ++r) {
      A lane[W];
      acc[r].store(lane);
      for (int64_t k = 0; k < count; ++k) {
        scores[(first + k) * stride + r] = lane[k];
      }
    }
  }
}

// scores[k * count + r] for `count` rows, in blocks of kColumnScoreRows
// (kByRow: at scores[r * column_lanes + k] instead; ahead: as in
// score_block_by_columns).
template <bool kByRow = false, typename T, typename A>
void score_rows_by_columns(
    const T* const* rows,
    int count,
    const A* columns,
    int64_t n,
    int64_t num_scores,
    A* scores,
    int64_t ahead = 0) {
  const int64_t stride = kByRow ? column_lanes<A>(num_scores) : count;
  for (int first = 0; first < count; first += kColumnScoreRows) {
    const int block = std::min(kColumnScoreRows, count - first);
    with_tile_size<kColumnScoreRows>(block, [&](auto size) {
      score_block_by_columns<decltype(size)::value, kByRow>(
          rows + first,
          columns,
          n,
          num_scores,
          stride,
          ahead,
          scores + (kByRow ? first * stride : first));
    });
  }
}

// Sums per pass and vectors of columns per sum of
// add_weighted_rows_by_columns: its
// accumulators, a vector of each row and a weight in registers.
constexpr int kColumnSums = kVectorRegisters == 32 ? 8 : 4;
constexpr int kColumnVectors = kVectorRegisters == 32 ? 3 : 2;

// ys[g * n + c] += sum over the `count` rows of w[r * w_stride + g] *
// rows[r][c] for G sums and columns [column, column + V * W): the sums of
// all rows in registers, then added to ys once.
template <int G, int V, typename T, typename A>
void add_block_by_columns(
    const A* w,
    int64_t w_stride,
    int count,
    const T* const* rows,
    int64_t column,
    int64_t ys_stride,
    A* ys) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec acc[G][V];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < V; ++v) {
      acc[g][v] = Vec(A(0));
    }
  }
  const A* w_r = w;
  for (int r = 0; r < count; ++r, w_r += w_stride) {
    Vec xv[V];
    for (int v = 0; v < V; ++v) {
      xv[v] = load_acc(rows[r] + column + v * W);
    }
    for (int g = 0; g < G; ++g) {
      const Vec weight(w_r[g]);
      for (int v = 0; v < V; ++v) {
        acc[g][v] = at::vec::fmadd(weight, xv[v], acc[g][v]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < V; ++v) {
      A* y = ys + g * ys_stride + column + v * W;
      (Vec::loadu(y) + acc[g][v]).store(y);
    }
  }
}

// ys[k * ys_stride + c] += sum_r w[r * w_stride + k] * rows[r][c] for
// every score k of `count` rows (n columns each; the weights row by row, so
// that one pointer reaches a row's weights): a block of sums and columns at a
// time, each row loaded once per block ([Note: scores by columns]). Every
// element is summed in one order for any thread count.
template <typename T, typename A>
void add_weighted_rows_by_columns(
    const A* w,
    int64_t w_stride,
    int count,
    const T* const* rows,
    int64_t n,
    int64_t num_scores,
    A* ys,
    int64_t ys_stride) {
  constexpr int64_t W = Vectorized<A>::size();
  constexpr int64_t kBlock = kColumnVectors * W;
  for (int64_t first = 0; first < num_scores; first += kColumnSums) {
    const int sums = static_cast<int>(std::min<int64_t>(kColumnSums, num_scores - first));
    const A* wg = w + first;
    A* yg = ys + first * ys_stride;
    with_tile_size<kColumnSums>(sums, [&](auto size) {
      constexpr int G = decltype(size)::value;
      int64_t c = 0;
      for (; c + kBlock <= n; c += kBlock) {
        add_block_by_columns<G, kColumnVectors>(wg, w_stride, count, rows, c, ys_stride, yg);
      }
      for (; c + W <= n; c += W) {
        add_block_by_columns<G, 1>(wg, w_stride, count, rows, c, ys_stride, yg);
      }
      for (; c < n; ++c) {
        for (int g = 0; g < G; ++g) {
          A acc(0);
          for (int r = 0; r < count; ++r) {
            acc += wg[r * w_stride + g] * static_cast<A>(rows[r][c]);
          }
          yg[g * ys_stride + c] += acc;
        }
      }
    });
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
