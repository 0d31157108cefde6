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
// once per pass over one or two vectors of scores (kColumnScoreVectors), and
// each column of u once per block of rows. Each score is one chain of FMAs
// over h = 0..H-1 in order, whatever the instruction set, the vector width,
// the vectors a pass holds or the block of rows: the backward and
// the jvp recompute it bitwise ([Note: one order for every score]). The
// dot-product form (score_dot_rows_float, 4 rows x 4 scores, then
// accumulate_rows_into over 8 rows) reloaded each row once per 4 scores and
// u once per 4 rows. Forward, float32, 2 threads on a 2-core EPYC, both
// forms in one process: so400m's full width (16 x 729 x 1152, 16 scores)
// 3.37 -> 2.38 ms (1 thread 6.91 -> 4.77), 16 queries at 32 x 512 x 768
// 3.07 -> 2.17, full width 1 x 12 2.45 -> 1.96, head slices 16 x 12 16.3
// -> 14.1.

#include "ops/cpu/isa/vec_helpers.h"

#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>

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
CacheLineBuffer<acc_t> u_in_columns(const PoolShape& s, const acc_t* u) {
  CacheLineBuffer<acc_t> columns;
  if (!scores_by_columns<scalar_t>(s)) {
    return columns;
  }
  const int64_t H = s.hidden;
  const int64_t num_scores = s.num_scores();
  constexpr int64_t W = Vectorized<acc_t>::size();
  columns.assign(H * column_lanes<acc_t>(num_scores), acc_t(0));
  // By vectors of lanes, the stores in order: one score at a time, the
  // stores W apart, a float32 call at 16 x 12 on a 2 x 8 x 768 x took
  // 0.29 ms instead of 0.14.
  for (int64_t first = 0; first < num_scores; first += W) {
    const int64_t lanes = std::min<int64_t>(W, num_scores - first);
    acc_t* out = columns.data() + first * H;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j = 0; j < lanes; ++j) {
        out[h * W + j] = u[(first + j) * H + h];
      }
    }
  }
  return columns;
}

// Rows per tile of the forward that scores by columns: each weighted sum is
// loaded and stored once per tile. A standalone loop of so400m's full width
// (16 scores, H = 1152, one core of a 2-core EPYC) ran at 80 G multiply-adds/s
// with 8 rows, 90 with 16, 98 with 24 to 48. At AMX_BF16, 32: two whole
// tiles of rows for the scores on AMX tiles and a whole tile of pairs of
// rows for their weighted sums. Three grid runs each, 24 against 32 rows,
// bfloat16, eager / attnpool forward on a 2-core Xeon with AMX: 1 x 16
// 2.38-2.54 -> 2.64-2.65, 4 x 12 1.29-1.43 -> 1.40-1.62, so400m's full
// width 0.77-0.89 -> 0.86-1.14, the other points level; float32 level or
// better (two runs each).
#if defined(CPU_CAPABILITY_AMX_BF16)
constexpr int kColumnTileRows = 32;
#else
constexpr int kColumnTileRows = 24;
#endif

// Rows per block of scores: their accumulators, a column of u and the
// broadcast element stay in registers, and each row's pointer in a general
// register. With 12 rows GCC ran out of the latter and moved two pointers
// back from vector registers on every column (score_block_by_columns).
// Forward, float32, 2 threads, a 2-core Zen 4 EPYC, 8-row blocks over
// 12-row ones, taking turns in one process (median of 6 paired ratios, two
// runs): 1 x 12 and 1 x 16 0.93-0.95, so400m's full width 0.96-0.98,
// 4 x 12, 16 x 12 and CoCa's 256 x 8 0.97-0.98; forward+backward
// 0.99-1.00. 10-row blocks (10 + 10 + 4 a tile) gained half as much,
// 6-row ones 0.95 at 1 x 12.
constexpr int kColumnScoreRows = kVectorRegisters == 32 ? 8 : 6;

// Vectors of lanes a block scores in one pass where the scores fill two: each
// broadcast element of x then feeds two FMAs, so a pass issues one load per
// two FMAs instead of one per FMA. The accumulators of a block's rows for
// both vectors, two columns and the broadcast fit the registers: 16 + 3 of
// AVX-512's 32 (24 + 3 in the 12-row blocks measured here), 12 + 3 of
// AVX2's 16. A standalone loop streaming 16,392 rows
// of 768 through 12-row blocks, 192 scores, one core of the 2-core Xeon, five
// runs each, taking turns: 56-60 -> 68-73 G multiply-adds/s. The op, float32,
// 2 threads on that Xeon, one vector a pass and two in one process, taking
// turns (8-12 pairs of 0.25 s windows, median of the paired ratios), time of
// two over one at 32 x 512 x 768 (so400m: 16 x 729 x 1152, full width):
//   AVX-512: 16 x 12 forward 0.86, forward+backward 0.89; 4 x 12 0.91 and
//     0.93; 1 x 16 and so400m (16 scores, one vector) level;
//   AVX2 (8 lanes, so 12 and 16 scores fill two): 16 x 12 0.74 and 0.83,
//     4 x 12 0.73 and 0.87, 1 x 12 0.79 and 0.90, 1 x 16 0.79 and 0.92,
//     so400m 0.82 and 0.94;
//   the default level: 4 x 12 forward 0.56, 1 x 16 0.47.
constexpr int kColumnScoreVectors = 2;

// scores[k * stride + r] = rows[r] . u_k for R rows and the scores k of the
// V vectors of lanes from score `first`, their accumulators in registers over
// the whole row ([Note: scores by columns]); kByRow: row r's lanes, pads
// included, at scores[r * stride] instead. ahead: the pass from score 0
// prefetches each row's line that many elements on (the forward's next
// tile), or none if 0. Not inlined: inside score_rows_by_columns' loop GCC
// kept four of 12 row pointers in vector registers and moved them back on
// every column, each move taking a slot of an FMA port (kColumnScoreRows).
template <int R, int V, bool kByRow, typename T, typename A>
C10_NOINLINE void score_block_by_columns(
    const T* const* rows,
    const A* columns,
    int64_t n,
    int64_t num_scores,
    int64_t first,
    int64_t stride,
    int64_t ahead,
    A* scores) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const T* xr[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = rows[r];
  }
  VecRegister<A> acc[V][R];
  for (int v = 0; v < V; ++v) {
    for (int r = 0; r < R; ++r) {
      acc[v][r] = Vec(A(0));
    }
  }
  // Vector v's columns follow vector v - 1's: [column_lanes / W, H, W].
  const A* column = columns + first * n;
  auto add_column = [&](int64_t h) {
    Vec u_h[V];
    for (int v = 0; v < V; ++v) {
      u_h[v] = Vec::loadu(column + v * W * n);
    }
    column += W;
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const Vec x_rh(xr[r][h]);
      for (int v = 0; v < V; ++v) {
        acc[v][r] = at::vec::fmadd(x_rh, u_h[v], Vec(acc[v][r]));
      }
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
  for (int v = 0; v < V; ++v) {
    const int64_t lanes_first = first + v * W;
    if constexpr (kByRow) {
      for (int r = 0; r < R; ++r) {
        Vec(acc[v][r]).store(scores + r * stride + lanes_first);
      }
      continue;
    }
    const int64_t count = std::min<int64_t>(W, num_scores - lanes_first);
    for (int r = 0; r < R; ++r) {
      A lane[W];
      Vec(acc[v][r]).store(lane);
      for (int64_t k = 0; k < count; ++k) {
        scores[(lanes_first + k) * stride + r] = lane[k];
      }
    }
  }
}

// scores[k * count + r] for `count` rows, in blocks of kColumnScoreRows rows
// and of kColumnScoreVectors vectors of lanes where that many remain, one
// otherwise (each score's chain of FMAs is the same either way); kByRow: at
// scores[r * column_lanes + k] instead; ahead: as in score_block_by_columns.
template <bool kByRow = false, typename T, typename A>
void score_rows_by_columns(
    const T* const* rows,
    int count,
    const A* columns,
    int64_t n,
    int64_t num_scores,
    A* scores,
    int64_t ahead = 0) {
  constexpr int64_t W = Vectorized<A>::size();
  constexpr int V = kColumnScoreVectors;
  const int64_t lanes = column_lanes<A>(num_scores);
  const int64_t stride = kByRow ? lanes : count;
  for (int first = 0; first < count; first += kColumnScoreRows) {
    const T* const* block_rows = rows + first;
    A* block_scores = scores + (kByRow ? first * stride : first);
    with_tile_size<kColumnScoreRows>(std::min(kColumnScoreRows, count - first), [&](auto size) {
      constexpr int R = decltype(size)::value;
      int64_t lane = 0;
      for (; lane + V * W <= lanes; lane += V * W) {
        score_block_by_columns<R, V, kByRow>(
            block_rows, columns, n, num_scores, lane, stride, ahead, block_scores);
      }
      for (; lane < lanes; lane += W) {
        score_block_by_columns<R, 1, kByRow>(
            block_rows, columns, n, num_scores, lane, stride, ahead, block_scores);
      }
    });
  }
}

// Sums per pass and vectors of columns per sum of
// add_weighted_rows_by_columns: its accumulators, a vector of each row and
// a weight in registers. AVX2 takes 6 sums of 2 vectors, 12 + 2 + 1 of its
// 16 registers: a row's 12 FMAs take 8 loads where 4 sums took 6 for 8, and
// the rows are loaded for two thirds as many passes. Float32, 2 threads, a
// 2-core Zen 4 EPYC whose CPU shows only AVX2, 6 against 4 in one process
// (median of 7 paired ratios): forward+backward at 32 x 512 x 768 16 x 12
// 0.92, 4 x 12 0.94, 1 x 12 0.90, so400m's full width (16 x 729 x 1152)
// 0.93 and its forward 0.95, the other forwards level. The same sums in the
// same order either way. At the default level, whose vectors are arrays, 6
// took 1.34x the time.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kColumnSums = 8;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kColumnSums = 6;
#else
constexpr int kColumnSums = 4;
#endif
constexpr int kColumnVectors = kVectorRegisters == 32 ? 3 : 2;

// Work done a piece at a time beside the weighted sums by columns
// (add_block_by_columns calls it once per row): none.
struct NothingBeside {
  void operator()() const {}
};

// How add_block_by_columns reads vector v of its V, K to a head slice:
// the last of a slice masked (kTail), the first two of a pair in a slice
// together (kPairs, neither masked).
//
// [Note: loops over a block's vectors] The G * V sums stay in registers
// only where every loop over v is unrolled before GCC places them, and
// GCC unrolls a plain loop over v where is_paired has its simple form
// (whole slices), not the form of slices in part. So whole slices keep
// plain loops and slices in part take for_each_index. Either way the
// other way put the sums on the stack, each multiply-add loading and
// storing its sum: for_each_index, or a lambda taking the row's vectors
// by reference, on whole slices took bfloat16 4 x 12 forward (2 threads,
// 32 x 512 x 768, a 2-core Xeon with AMX) from 1.77 to 2.18 ms.
template <int V, int K, bool kTail, bool kPairs>
struct BlockVectors {
  static constexpr bool is_tail(int v) {
    return kTail && v % K == K - 1;
  }
  static constexpr bool is_paired(int v) {
    if constexpr (kTail) {
      return kPairs && v % K % 2 == 0 && v % K + 1 < K - 1;
    } else {
      // K even or K = V: no pair crosses a slice ([Note: loops over a
      // block's vectors] on this form).
      return kPairs && v % 2 == 0 && v + 1 < V;
    }
  }
  static constexpr bool is_second(int v) {
    return v > 0 && is_paired(v - 1);
  }
};

// ys[g * ys_stride + c] += sum over the `count` rows of w_r[g * w_step +
// v / K] * rows[r][c] (w_r = w + r * w_stride) for G sums and the V vectors
// of columns from `column` (c in vector v): the sums of all rows in
// registers, then added to ys once. K = V: one weight per sum, w_step
// apart; K < V: one per K vectors of columns (a head slice of K vectors).
// kTail: each head slice is `width` columns, short of K whole vectors, its
// last vector read and added in part, in place of the per-column scalar
// sums that such slices took (so400m's 16 head slices of 72 columns,
// forward, 2 threads, 16 x 729 x 1152, a 2-core Xeon with AMX: bfloat16
// 2.16 -> 1.21 ms, with 4 queries 5.1 -> 2.5; float32 2.86 -> 2.42);
// without it `width` is unused.
// ahead != 0: the same columns of each row `ahead` elements on are
// prefetched to L2. bfloat16 rows are widened two vectors of a head slice
// at a time (neither of them masked): the sums of those two vectors are then
// held in paired order (load_pairs) and put back in natural order
// as they are added to ys (two instructions a pair instead of four, the
// widening's shuffles gone: bfloat16 1 x 12 forward on a 2-core Xeon with
// AMX, 0.95 of the time). Each column's sum takes the same
// products in the same order either way. beside: called once per row.
template <
    int G,
    int V,
    int K = V,
    bool kTail = false,
    typename T,
    typename A,
    typename Beside = NothingBeside>
void add_block_by_columns(
    const A* w,
    int64_t w_stride,
    int64_t w_step,
    int count,
    const T* const* rows,
    int64_t column,
    int64_t ys_stride,
    A* ys,
    int64_t ahead = 0,
    Beside&& beside = {},
    int64_t width = 0) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  static_assert(V % K == 0, "a block holds whole head slices");
  constexpr bool kPairs = std::is_same_v<T, at::BFloat16> && (K % 2 == 0 || K == V || kTail);
  // Slices in part (kTail; whole slices take vector v at v * W): the
  // columns of each slice's last vector, where vector v of a row starts,
  // and vector v of a row.
  const int64_t tail = width - (K - 1) * W;
  const auto offset = [width](int v) { return v / K * width + v % K * W; };
  using Vectors = BlockVectors<V, K, kTail, kPairs>;
  const auto load = [&](const T* row, int v) __attribute__((always_inline)) {
    return Vectors::is_tail(v) ? load_acc(row + offset(v), tail) : load_acc(row + offset(v));
  };
  Vec acc[G][V];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < V; ++v) {
      acc[g][v] = Vec(A(0));
    }
  }
  // The row loop with or without the prefetch, chosen once, not per row:
  // with the choice inside the loop, where `ahead` was not a constant after
  // inlining (the head sums of rows scored on AMX tiles), GCC 12 kept all
  // but one of the G * V sums on the stack, each multiply-add loading its
  // sum and storing it back. Bfloat16 forward, 2 threads, a 2-core Xeon with
  // AMX, one process per build taking turns (median of 5 paired ratios,
  // new / old): 4 x 12 0.74, 2 x 12 0.89, 1 x 16 0.93, 16 x 12 1.00;
  // float32 4 x 12 0.90. The same sums, bit for bit. (The backward's dx and
  // du, whose `ahead` is a run-time 0, had taken half as long again the same
  // way: float32 16 x 12 forward+backward on a Zen 4 EPYC, 112 -> 169 ms.)
  auto each_row = [&](auto prefetching) {
    const A* w_r = w;
    for (int r = 0; r < count; ++r, w_r += w_stride) {
      const T* row = rows[r] + column;
      beside();
      if constexpr (decltype(prefetching)::value) {
        prefetch_row<CacheLevel::kL2>(row, V * W, ahead);
      }
      if constexpr (K == V && !kTail) {
        // The row's vectors, then one weight at a time: G * V sums, V
        // vectors and a weight in registers (the other order kept all G
        // weights too, and spilled a sum at G = 8, V = 3).
        Vec xv[V];
        for (int v = 0; v < V; ++v) {
          if constexpr (kPairs) {
            if (Vectors::is_paired(v)) {
              const WidenedPairs pair = load_pairs(row + v * W);
              xv[v] = pair.even;
              xv[v + 1] = pair.odd;
              ++v;
              continue;
            }
          }
          xv[v] = load_acc(row + v * W);
        }
        for (int g = 0; g < G; ++g) {
          const Vec weight(w_r[g * w_step]);
          for (int v = 0; v < V; ++v) {
            acc[g][v] = at::vec::fmadd(weight, xv[v], acc[g][v]);
          }
        }
      } else if constexpr (kTail) {
        // [Note: loops over a block's vectors]
        for_each_index<V>([&](auto vector) __attribute__((always_inline)) {
          constexpr int v = decltype(vector)::value;
          if constexpr (Vectors::is_paired(v)) {
            const WidenedPairs pair = load_pairs(row + offset(v));
            for (int g = 0; g < G; ++g) {
              const Vec weight(w_r[g * w_step + v / K]);
              acc[g][v] = at::vec::fmadd(weight, pair.even, acc[g][v]);
              acc[g][v + 1] = at::vec::fmadd(weight, pair.odd, acc[g][v + 1]);
            }
          } else if constexpr (!Vectors::is_second(v)) {
            const Vec x = load(row, v);
            for (int g = 0; g < G; ++g) {
              acc[g][v] = at::vec::fmadd(Vec(w_r[g * w_step + v / K]), x, acc[g][v]);
            }
          }
        });
      } else {
        for (int v = 0; v < V; ++v) {
          if constexpr (kPairs) {
            if (Vectors::is_paired(v)) {
              const WidenedPairs pair = load_pairs(row + v * W);
              for (int g = 0; g < G; ++g) {
                const Vec weight(w_r[g * w_step + v / K]);
                acc[g][v] = at::vec::fmadd(weight, pair.even, acc[g][v]);
                acc[g][v + 1] = at::vec::fmadd(weight, pair.odd, acc[g][v + 1]);
              }
              ++v;
              continue;
            }
          }
          const Vec x = load_acc(row + v * W);
          for (int g = 0; g < G; ++g) {
            acc[g][v] = at::vec::fmadd(Vec(w_r[g * w_step + v / K]), x, acc[g][v]);
          }
        }
      }
    }
  };
  if (ahead != 0) {
    each_row(std::true_type{});
  } else {
    each_row(std::false_type{});
  }
  for (int g = 0; g < G; ++g) {
    if constexpr (kTail) {
      for_each_index<V>([&](auto vector) __attribute__((always_inline)) {
        constexpr int v = decltype(vector)::value;
        A* y = ys + g * ys_stride + column + offset(v);
        if constexpr (Vectors::is_paired(v)) {
          const auto natural = at::vec::interleave2(acc[g][v], acc[g][v + 1]);
          (Vec::loadu(y) + natural.first).store(y);
          (Vec::loadu(y + W) + natural.second).store(y + W);
        } else if constexpr (Vectors::is_tail(v)) {
          (Vec::loadu(y, tail) + acc[g][v]).store(y, tail);
        } else if constexpr (!Vectors::is_second(v)) {
          (Vec::loadu(y) + acc[g][v]).store(y);
        }
      });
    } else {
      for (int v = 0; v < V; ++v) {
        A* y = ys + g * ys_stride + column + v * W;
        if (Vectors::is_paired(v)) {
          const auto natural = at::vec::interleave2(acc[g][v], acc[g][v + 1]);
          (Vec::loadu(y) + natural.first).store(y);
          (Vec::loadu(y + W) + natural.second).store(y + W);
          ++v;
          continue;
        }
        (Vec::loadu(y) + acc[g][v]).store(y);
      }
    }
  }
}

// Accumulators of add_head_slices_in_groups: half the registers.
constexpr int kSliceSums = kVectorRegisters / 2;

// add_head_slices for G queries at a time and K vectors per head slice of
// d columns (kTail: the last vector in part); ahead != 0: the first
// group's passes prefetch the rows `ahead` elements on, each column once.
// beside: as add_block_by_columns takes it.
template <int K, int G, bool kTail, typename T, typename A, typename Beside>
void add_head_slices_in_groups(
    const A* w,
    int64_t w_stride,
    int count,
    const T* const* rows,
    int64_t num_queries,
    int64_t num_heads,
    int64_t d,
    A* ys,
    int64_t ahead,
    Beside& beside) {
  const int64_t H = num_heads * d;
  // Sums of G queries over `heads` whole head slices from head `head`.
  auto block = [&](int64_t first_query, int64_t head, auto heads) {
    add_block_by_columns<G, decltype(heads)::value * K, K, kTail>(
        w + first_query * num_heads + head,
        w_stride,
        num_heads,
        count,
        rows,
        head * d,
        H,
        ys + first_query * H,
        first_query == 0 ? ahead : 0,
        beside,
        d);
  };
  constexpr int kHeads = std::max(1, kSliceSums / (G * K));
  for (int64_t first_query = 0; first_query < num_queries; first_query += G) {
    int64_t h = 0;
    for (; h + kHeads <= num_heads; h += kHeads) {
      block(first_query, h, std::integral_constant<int, kHeads>{});
    }
    for (; h < num_heads; ++h) {
      block(first_query, h, std::integral_constant<int, 1>{});
    }
  }
}

// ys[(i * n + c / d) * d + c % d] += sum over the `count` rows of w[r *
// w_stride + i * n + c / d] * rows[r][c] for every query i and column c <
// H: the weighted head slices of every query and head (the weights of
// query i, head h in lane i * n + h of each row's), several heads' or
// queries' sums a pass, each with its own chain of multiply-adds: one head
// slice of a query by itself (G = 1 in add_block_by_columns) holds too
// few chains to hide the latency of each (the tail's 16 columns of a
// 64-column slice: G chains). Forward, 2 threads, 32 x 512 x 768, one
// process taking turns, bfloat16: 1 x 12 1.25 -> 1.04 ms, 1 x 16 1.15 ->
// 1.04, 4 x 12 2.24 -> 2.00, 16 x 12 8.79 -> 7.40; float32: 1 x 12 2.61
// -> 2.40, 4 x 12 6.08 -> 5.99, 16 x 12 20.4 -> 19.8. Each sum adds the
// same products in the same order as before. ahead, beside: as in the
// groups' add_head_slices_in_groups. Returns false where d is over 8
// vectors.
template <typename T, typename A, typename Beside = NothingBeside>
bool add_head_slices_in_groups(
    const A* w,
    int64_t w_stride,
    int count,
    const T* const* rows,
    int64_t num_queries,
    int64_t num_heads,
    int64_t d,
    A* ys,
    int64_t ahead = 0,
    Beside&& beside = {}) {
  constexpr int64_t W = Vectorized<A>::size();
  const int64_t vectors = (d + W - 1) / W;
  if (d == 0 || vectors > 8) {
    return false;
  }
  auto run = [&](auto size, auto tail) {
    constexpr int K = decltype(size)::value;
    constexpr bool kTail = decltype(tail)::value;
    if (num_queries % 4 == 0 && 4 * K <= kSliceSums) {
      add_head_slices_in_groups<K, 4, kTail>(
          w, w_stride, count, rows, num_queries, num_heads, d, ys, ahead, beside);
    } else if (num_queries % 2 == 0 && 2 * K <= kSliceSums) {
      add_head_slices_in_groups<K, 2, kTail>(
          w, w_stride, count, rows, num_queries, num_heads, d, ys, ahead, beside);
    } else {
      add_head_slices_in_groups<K, 1, kTail>(
          w, w_stride, count, rows, num_queries, num_heads, d, ys, ahead, beside);
    }
  };
  with_tile_size<8>(static_cast<int>(vectors), [&](auto size) {
    if (d % W == 0) {
      run(size, std::false_type{});
    } else {
      run(size, std::true_type{});
    }
  });
  return true;
}

// ys[k * ys_stride + c] += sum_r w[r * w_stride + k] * rows[r][c] for
// every score k of `count` rows (n columns each; the weights row by row, so
// that one pointer reaches a row's weights): a block of sums and columns at a
// time, each row loaded once per block ([Note: scores by columns]). Every
// element is summed in one order for any thread count. ahead != 0: the
// first block of sums prefetches each row's columns `ahead` elements on
// into L2, as add_block_by_columns does. beside: as add_block_by_columns
// takes it.
template <typename T, typename A, typename Beside = NothingBeside>
void add_weighted_rows_by_columns(
    const A* w,
    int64_t w_stride,
    int count,
    const T* const* rows,
    int64_t n,
    int64_t num_scores,
    A* ys,
    int64_t ys_stride,
    int64_t ahead = 0,
    Beside&& beside = {}) {
  constexpr int64_t W = Vectorized<A>::size();
  constexpr int64_t kBlock = kColumnVectors * W;
  for (int64_t first = 0; first < num_scores; first += kColumnSums) {
    const int sums = static_cast<int>(std::min<int64_t>(kColumnSums, num_scores - first));
    const A* wg = w + first;
    A* yg = ys + first * ys_stride;
    with_tile_size<kColumnSums>(sums, [&](auto size) {
      constexpr int G = decltype(size)::value;
      const int64_t block_ahead = first == 0 ? ahead : 0;
      int64_t c = 0;
      for (; c + kBlock <= n; c += kBlock) {
        add_block_by_columns<G, kColumnVectors>(
            wg, w_stride, 1, count, rows, c, ys_stride, yg, block_ahead, beside);
      }
      for (; c + W <= n; c += W) {
        add_block_by_columns<G, 1>(
            wg, w_stride, 1, count, rows, c, ys_stride, yg, block_ahead, beside);
      }
      if (c < n) {
        add_block_by_columns<G, 1, 1, true>(
            wg, w_stride, 1, count, rows, c, ys_stride, yg, block_ahead, beside, n - c);
      }
    });
  }
}

#if defined(CPU_CAPABILITY_AVX512_BF16)
// [Note: weighted sums from bfloat16 products] With bfloat16 rows, a tile's
// weighted sums take vdpbf16ps products, two rows per instruction: each
// vector of x holds the pairs (row 2p, row 2p + 1) of 16 columns, each
// weight the pair of those rows' weights rounded to bfloat16, and every
// product is exact and summed in float32 ([Note: bfloat16 products]). Half
// the instructions of float32 FMAs on widened rows. Taken where the tiles are
// long (add_dot_scored_rows: one head, 8 scores or more, 24 rows); bfloat16
// forward, 2 threads, in one process against float32 FMAs: so400m's full
// width (16 x 729 x 1152) 2.18 -> 1.60 ms, 16 x 1 at 32 x 512 x 768 1.97 ->
// 1.52, 8 x 1 1.36 -> 1.13. The weights rounded to bfloat16 add about as
// much error as the scores' u rounded there already does (relative error
// against float64 3.44e-3 -> 3.46e-3 at 4 x 729 x 1152). With several heads
// (head slices, 4 queries or more) it gained 1.07x at 16 x 12 and lost 0.92x
// at 4 x 12, so those keep their 8-row tiles. Pairing 8-row tiles, as tried
// earlier, cost more in pairing than the products saved.

// The weights of a tile in pairs of rows: pairs[p * num_scores + k] holds
// weight k of row 2p, rounded to bfloat16, in its low 16 bits and that of
// row 2p + 1 (0 past the last row) in its high 16, as a float's bits.
// w[r * w_stride + k] as add_weighted_rows_by_columns takes them.
inline void pair_weights(
    const float* w, int64_t w_stride, int count, int64_t num_scores, float* pairs) {
  for (int r = 0; r < count; r += 2) {
    for (int64_t k = 0; k < num_scores; ++k) {
      const uint32_t low = c10::BFloat16(w[r * w_stride + k]).x;
      const uint32_t high = r + 1 < count ? c10::BFloat16(w[(r + 1) * w_stride + k]).x : 0;
      pairs[r / 2 * num_scores + k] = c10::bit_cast<float>(low | high << 16);
    }
  }
}

// ys[g * ys_stride + c] += sum over the `count` rows of their paired
// weights (pair_weights, pairs[p * pair_stride + g]) times rows[r][c], for
// G sums and the 32 columns from `column`: the sums in registers across the
// tile, then added to ys once.
template <int G>
void add_block_in_pairs(
    const float* pairs,
    int64_t pair_stride,
    int count,
    const at::BFloat16* const* rows,
    int64_t column,
    int64_t ys_stride,
    float* ys) {
  // unpacklo pairs columns 8j..8j+3 of each 128-bit lane j, unpackhi
  // 8j+4..8j+7: these take the sums back to the columns' order.
  alignas(64) static constexpr int32_t kFirst[16] = {
      0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static constexpr int32_t kSecond[16] = {
      8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  __m512 low[G];
  __m512 high[G];
  for (int g = 0; g < G; ++g) {
    low[g] = _mm512_setzero_ps();
    high[g] = _mm512_setzero_ps();
  }
  for (int r = 0; r < count; r += 2) {
    const __m512i a = _mm512_loadu_si512(rows[r] + column);
    const __m512i b =
        r + 1 < count ? _mm512_loadu_si512(rows[r + 1] + column) : _mm512_setzero_si512();
    const auto x_low = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
    const auto x_high = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
    const float* weights = pairs + r / 2 * pair_stride;
    for (int g = 0; g < G; ++g) {
      const auto weight = reinterpret_cast<__m512bh>(_mm512_set1_ps(weights[g]));
      low[g] = _mm512_dpbf16_ps(low[g], x_low, weight);
      high[g] = _mm512_dpbf16_ps(high[g], x_high, weight);
    }
  }
  const __m512i first = _mm512_load_si512(kFirst);
  const __m512i second = _mm512_load_si512(kSecond);
  for (int g = 0; g < G; ++g) {
    float* y = ys + g * ys_stride + column;
    const __m512 head = _mm512_permutex2var_ps(low[g], first, high[g]);
    const __m512 tail = _mm512_permutex2var_ps(low[g], second, high[g]);
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), head));
    _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_loadu_ps(y + 16), tail));
  }
}

// add_weighted_rows_by_columns for bfloat16 rows from bfloat16 products
// ([Note: weighted sums from bfloat16 products]), 32 columns at a time; the
// columns past the last 32 as add_weighted_rows_by_columns sums them.
// pairs: (count + 1) / 2 * num_scores of scratch.
inline void add_weighted_rows_in_pairs(
    const float* w,
    int64_t w_stride,
    int count,
    const at::BFloat16* const* rows,
    int64_t n,
    int64_t num_scores,
    float* ys,
    int64_t ys_stride,
    float* pairs) {
  constexpr int64_t kBlock = 32;
  pair_weights(w, w_stride, count, num_scores, pairs);
  const int64_t whole = n / kBlock * kBlock;
  for (int64_t first = 0; first < num_scores; first += kColumnSums) {
    const int sums = static_cast<int>(std::min<int64_t>(kColumnSums, num_scores - first));
    with_tile_size<kColumnSums>(sums, [&](auto size) {
      for (int64_t c = 0; c < whole; c += kBlock) {
        add_block_in_pairs<decltype(size)::value>(
            pairs + first, num_scores, count, rows, c, ys_stride, ys + first * ys_stride);
      }
    });
  }
  if (whole < n) {
    const at::BFloat16* rest[kColumnTileRows];
    for (int r = 0; r < count; ++r) {
      rest[r] = rows[r] + whole;
    }
    add_weighted_rows_by_columns(
        w, w_stride, count, rest, n - whole, num_scores, ys + whole, ys_stride);
  }
}
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
