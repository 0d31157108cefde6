#pragma once

// The backward's dx and du from bfloat16 products (AVX512-BF16 level only).
//
// [Note: bfloat16 products in the backward]
// With bfloat16 rows and several scores per row, the forward scores from
// vdpbf16ps against u rounded to bfloat16 ([Note: bfloat16 products]). The
// backward's two large products take their products the same way:
//   dx[r] = sum_i p * G_i  +  sum_k ds[k][r] * u_k     (num_scores terms)
//   du_k += sum_r ds[k][r] * x[r]                       (per row)
// with ds rounded to bfloat16 (the composition's bfloat16 matmuls round
// their gradients too), u the forward's rounded u and x exact, every sum in
// float32. The p * G part stays in float32. vdpbf16ps multiplies pairs of
// bfloat16 in a 32-bit lane and adds both products to the lane's float32
// sum, so each operand comes as pairs along the summed index: u and ds
// paired by scores for dx, x and ds paired by rows for du.

#include "ops/cpu/isa/amx_tiles.h"
#include "ops/cpu/isa/vec_helpers.h"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

// [Note: du over several tiles] du_k += sum_r ds[k][r] * x[r] adds to
// du's num_scores * H sums, which at 16 x 12 take 590 KB: L2, not registers.
// Added tile by tile (8 rows, 4 products per sum), each sum was loaded and
// stored once per 4 products; L2, not the products, bounded du. So the
// tiles' paired rows and ds are gathered, kDuPairs pairs (64 rows), and
// added at once, each sum staying in a register over all of them. Every
// lane takes the same vdpbf16ps in the same order as tile by tile, so du is
// bitwise the same; only the columns past the last whole vector are added
// per tile, from the tile's rows.
constexpr int64_t kDuPairs = 32;
static_assert(kDuPairs >= (kBackwardTileRows + 1) / 2);

// Scratch and the paired u of one backward call; null pointers where the
// level or the dtype takes no bfloat16 products.
struct Bf16Products {
  const uint32_t* u_pairs = nullptr;  // [score_pair_rows][score_pair_stride]
  uint32_t* ds_pairs = nullptr;       // [ceil(num_scores / 2)][R], per tile
  uint32_t* row_pairs = nullptr;      // [kDuPairs][H], gathered over tiles
  uint32_t* ds_row_pairs = nullptr;   // [num_scores][kDuPairs], gathered
  int64_t gathered = 0;               // pairs in row_pairs not yet in du
  // AMX_BF16 only ([Note: the backward's products on AMX tiles]), R up to
  // kColumnTileRows ([Note: the backward's tiles on AMX]):
  uint32_t* ds_by_row = nullptr;  // [R][score_pair_rows], ds_pairs by rows
  float* ds_u = nullptr;          // [R][score_pair_stride], sum_k ds[k][r] u_k
};

// Pairs of scores in u_pairs: ceil(num_scores / 2), rounded up to whole
// tiles (zero pairs past the scores) where the products run on AMX tiles.
inline int64_t score_pair_rows(int64_t num_scores) {
  const int64_t pairs = (num_scores + 1) / 2;
  return kAmxScores ? (pairs + kTileRows - 1) / kTileRows * kTileRows : pairs;
}

// How far apart u_pairs' rows are: H, rounded up to whole tiles (zero past
// H) where the products run on AMX tiles.
inline int64_t score_pair_stride(int64_t H) {
  return kAmxScores ? (H + kTileColumns - 1) / kTileColumns * kTileColumns : H;
}

inline float bf16_rounded(float value) {
  return static_cast<float>(c10::BFloat16(value));
}

// acc[r][c] += sum over the pairs of scores of ds[k][r] * u_k[e + 16 c]
// (dx_columns). kTail: C is 1 and only the first `lanes` columns from e are
// read (the last of a head slice). Defined at the AVX512_BF16 level only.
template <int R, int C, bool kTail = false>
void add_score_pair_products(
    Vectorized<float> (&acc)[R][C],
    const Bf16Products& products,
    int64_t score_pairs,
    int64_t H,
    int64_t e,
    int64_t lanes = 16);

#if defined(CPU_CAPABILITY_AVX512_BF16)

// Two bfloat16 in one 32-bit lane: `first` in the low half, the first
// element of a vdpbf16ps pair.
inline uint32_t bf16_pair(float first, float second) {
  return static_cast<uint32_t>(c10::BFloat16(first).x) |
         (static_cast<uint32_t>(c10::BFloat16(second).x) << 16);
}

// u_pairs[kp * score_pair_stride + e] = (u[2 kp][e], u[2 kp + 1][e]), 0
// past the last score (and past H).
inline CacheLineBuffer<uint32_t> u_in_score_pairs(int64_t num_scores, int64_t H, const float* u) {
  const int64_t stride = score_pair_stride(H);
  CacheLineBuffer<uint32_t> pairs(score_pair_rows(num_scores) * stride, 0u);
  for (int64_t k = 0; k < num_scores; k += 2) {
    int64_t e = 0;
    for (; e + 16 <= H; e += 16) {
      const __m512i first = bf16_bits(_mm512_loadu_ps(u + k * H + e));
      const __m512i second = k + 1 < num_scores ? bf16_bits(_mm512_loadu_ps(u + (k + 1) * H + e))
                                                : _mm512_setzero_si512();
      _mm512_storeu_si512(
          pairs.data() + (k / 2) * stride + e,
          _mm512_or_si512(first, _mm512_slli_epi32(second, 16)));
    }
    for (; e < H; ++e) {
      const float second = k + 1 < num_scores ? u[(k + 1) * H + e] : 0.0f;
      pairs[(k / 2) * stride + e] = bf16_pair(u[k * H + e], second);
    }
  }
  return pairs;
}

#if defined(CPU_CAPABILITY_AMX_BF16)
// [Note: the backward's products on AMX tiles] At AMX_BF16 both products
// run on tiles ([Note: scores on AMX tiles]), with the same operands as
// vdpbf16ps takes them: dx's sum over the scores, ds . U, as one product
// per tile of rows (ds_u_on_tiles, ds paired by scores, one row of A per
// row of x; B is u_pairs as it is stored), which dx_columns then adds to
// its p . G part; du's, over the gathered pairs of rows, as one product
// per gathering (add_gathered_to_du, A the scores' paired ds, B the paired
// rows as stored), accumulated into du.

// products.ds_by_row's rows first.. first + R - 1 = a tile's ds_pairs (kp *
// R + r), by row, the pairs past the scores zero.
template <int R>
void ds_pairs_by_row(Bf16Products& products, int64_t num_scores, int first) {
  const int64_t pairs = (num_scores + 1) / 2;
  const int64_t rows_of_pairs = score_pair_rows(num_scores);
  for (int r = 0; r < R; ++r) {
    uint32_t* row = products.ds_by_row + (first + r) * rows_of_pairs;
    for (int64_t kp = 0; kp < pairs; ++kp) {
      row[kp] = products.ds_pairs[kp * R + r];
    }
    std::fill(row + pairs, row + rows_of_pairs, 0u);
  }
}

// products.ds_u[r][e] = sum_k ds[k][r] * u_k[e] for `count` rows and every
// column, from ds_by_row.
inline void ds_u_on_tiles(Bf16Products& products, int count, int64_t num_scores, int64_t H) {
  const int64_t rows_of_pairs = score_pair_rows(num_scores);
  const int64_t stride = score_pair_stride(H);
  const TileOperands t = word_rows(
      products.ds_by_row, rows_of_pairs, products.u_pairs, stride, products.ds_u, stride, false);
  multiply_on_tiles(t, count, rows_of_pairs / kTileRows, stride / kTileColumns);
}

template <int R, int C, bool kTail>
void add_score_pair_products(
    Vectorized<float> (&acc)[R][C],
    const Bf16Products& products,
    int64_t score_pairs,
    int64_t H,
    int64_t e,
    int64_t lanes) {
  (void)score_pairs;
  const int64_t stride = score_pair_stride(H);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const float* ds_u = products.ds_u + r * stride + e + c * 16;
      acc[r][c] = acc[r][c] +
                  (kTail ? Vectorized<float>::loadu(ds_u, lanes) : Vectorized<float>::loadu(ds_u));
    }
  }
}
#else
template <int R, int C, bool kTail>
void add_score_pair_products(
    Vectorized<float> (&acc)[R][C],
    const Bf16Products& products,
    int64_t score_pairs,
    int64_t H,
    int64_t e,
    int64_t lanes) {
  static_assert(!kTail || C == 1, "a tail is under one vector");
  constexpr int64_t W = 16;
  const __mmask16 read = kTail ? static_cast<__mmask16>((1u << lanes) - 1) : __mmask16(0xffff);
  for (int64_t kp = 0; kp < score_pairs; ++kp) {
    __m512bh uv[C];
    for (int c = 0; c < C; ++c) {
      const uint32_t* pairs = products.u_pairs + kp * H + e + c * W;
      uv[c] = reinterpret_cast<__m512bh>(
          kTail ? _mm512_maskz_loadu_epi32(read, pairs) : _mm512_loadu_si512(pairs));
    }
    for (int r = 0; r < R; ++r) {
      const auto weight = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(products.ds_pairs[kp * R + r])));
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], uv[c], weight);
      }
    }
  }
}
#endif

// A tile's ds rounded to bfloat16 in place, and paired two ways: by scores
// for dx's products, ds_pairs[kp * R + r] = (ds[2 kp][r], ds[2 kp + 1][r]),
// and by rows for du's, ds_row_pairs[k * kDuPairs + p] = (ds[k][2 p],
// ds[k][2 p + 1]), 0 past the last score or row (ds_row_pairs points at the
// tile's first pair). With 8 rows, two scores per vector; the same bits as
// bf16_rounded and bf16_pair one value at a time, which at 16 x 12 took a
// tenth of the backward.
template <int R>
void round_and_pair_scores(
    int64_t num_scores, float* dscores, uint32_t* ds_pairs, uint32_t* ds_row_pairs) {
  constexpr int P = (R + 1) / 2;
  int64_t k = 0;
  if constexpr (R == 8) {
    for (; k + 2 <= num_scores; k += 2) {
      const __m512i bits = bf16_bits(_mm512_loadu_ps(dscores + k * R));
      _mm512_storeu_ps(dscores + k * R, _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)));
      // Lanes 0-7 are score k's rows, 8-15 score k + 1's.
      const __m256i first = _mm512_castsi512_si256(bits);
      const __m256i second = _mm512_extracti64x4_epi64(bits, 1);
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(ds_pairs + (k / 2) * R),
          _mm256_or_si256(first, _mm256_slli_epi32(second, 16)));
      // Packed to 16 bits, neighbouring rows share a 32-bit lane: score k's
      // four pairs, then score k + 1's.
      const __m256i row_pairs = _mm512_cvtepi32_epi16(bits);
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(ds_row_pairs + k * kDuPairs),
          _mm256_castsi256_si128(row_pairs));
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(ds_row_pairs + (k + 1) * kDuPairs),
          _mm256_extracti128_si256(row_pairs, 1));
    }
  }
  for (; k < num_scores; ++k) {
    for (int r = 0; r < R; ++r) {
      dscores[k * R + r] = bf16_rounded(dscores[k * R + r]);
    }
    for (int p = 0; p < P; ++p) {
      const float second = 2 * p + 1 < R ? dscores[k * R + 2 * p + 1] : 0.0f;
      ds_row_pairs[k * kDuPairs + p] = bf16_pair(dscores[k * R + 2 * p], second);
    }
    if (k % 2 == 0) {
      // Score k + 1, not rounded yet, rounds as bf16_pair reads it.
      for (int r = 0; r < R; ++r) {
        const float second = k + 1 < num_scores ? dscores[(k + 1) * R + r] : 0.0f;
        ds_pairs[(k / 2) * R + r] = bf16_pair(dscores[k * R + r], second);
      }
    }
  }
}

// du_k[e + 16 c] += the gathered pairs' products, for S scores from k and
// C vectors of columns from e, the sums in registers over all the pairs.
template <int S, int C>
void du_block_bf16(const Bf16Products& products, int64_t k, int64_t e, int64_t H, float* du) {
  constexpr int64_t W = 16;
  // Local copies, and every loop over the sums unrolled: otherwise GCC
  // kept acc on the stack.
  const uint32_t* rows = products.row_pairs + e;
  const uint32_t* weights = products.ds_row_pairs + k * kDuPairs;
  const int64_t pairs = products.gathered;
  __m512 acc[S][C];
#pragma GCC unroll 8
  for (int j = 0; j < S; ++j) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      acc[j][c] = _mm512_loadu_ps(du + (k + j) * H + e + c * W);
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh xv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      xv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(rows + p * H + c * W));
    }
#pragma GCC unroll 8
    for (int j = 0; j < S; ++j) {
      const auto weight = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(weights[j * kDuPairs + p])));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        acc[j][c] = _mm512_dpbf16_ps(acc[j][c], xv[c], weight);
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < S; ++j) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(du + (k + j) * H + e + c * W, acc[j][c]);
    }
  }
}

#if defined(CPU_CAPABILITY_AMX_BF16)
// The gathered pairs into du's whole vectors of columns on tiles ([Note:
// the backward's products on AMX tiles]), then none gathered; the pairs
// rounded up to a whole tile's with zeros.
inline void add_gathered_to_du(Bf16Products& products, int64_t num_scores, int64_t H, float* du) {
  if (products.gathered == 0) {
    return;
  }
  const int64_t gathered = products.gathered;
  const int64_t pairs = (gathered + kTileRows - 1) / kTileRows * kTileRows;
  std::fill(products.row_pairs + gathered * H, products.row_pairs + pairs * H, 0u);
  for (int64_t k = 0; k < num_scores; ++k) {
    uint32_t* weights = products.ds_row_pairs + k * kDuPairs;
    std::fill(weights + gathered, weights + pairs, 0u);
  }
  const TileOperands t =
      word_rows(products.ds_row_pairs, kDuPairs, products.row_pairs, H, du, H, true);
  multiply_on_tiles(t, static_cast<int>(num_scores), pairs / kTileRows, H / kTileColumns);
  products.gathered = 0;
}
#else
// The gathered pairs into du's whole vectors of columns, then none gathered
// ([Note: du over several tiles]). Columns outer: a block of columns of
// every pair stays in L1 while each score's sums pass over it.
inline void add_gathered_to_du(Bf16Products& products, int64_t num_scores, int64_t H, float* du) {
  constexpr int kScores = 6;  // 6 x 4 sums, 4 rows, a weight: 29 registers
  constexpr int64_t W = 16;
  if (products.gathered == 0) {
    return;
  }
  auto columns = [&](int64_t e, auto width) {
    constexpr int C = decltype(width)::value;
    for (int64_t k = 0; k < num_scores; k += kScores) {
      const int count = static_cast<int>(std::min<int64_t>(kScores, num_scores - k));
      with_tile_size<kScores>(count, [&](auto size) {
        du_block_bf16<decltype(size)::value, C>(products, k, e, H, du);
      });
    }
  };
  int64_t e = 0;
  for (; e + 4 * W <= H; e += 4 * W) {
    columns(e, std::integral_constant<int, 4>{});
  }
  for (; e + W <= H; e += W) {
    columns(e, std::integral_constant<int, 1>{});
  }
  products.gathered = 0;
}
#endif

// du for every score of a tile: its rows and ds paired and gathered, added
// to du's whole vectors when the next tile's might not fit (and by the
// caller at the end of its rows); the columns past them added now, row by
// row.
template <int R>
void du_rows_bf16(
    const at::BFloat16* const* rows,
    const float* dscores,
    int64_t num_scores,
    int64_t H,
    Bf16Products& products,
    float* du) {
  constexpr int P = (R + 1) / 2;
  pair_rows(rows, R, H, products.row_pairs + products.gathered * H);
  products.gathered += P;
  if (products.gathered + (kBackwardTileRows + 1) / 2 > kDuPairs) {
    add_gathered_to_du(products, num_scores, H, du);
  }
  for (int64_t e = H - H % 16; e < H; ++e) {
    for (int64_t k = 0; k < num_scores; ++k) {
      float total = du[k * H + e];
      for (int r = 0; r < R; ++r) {
        total += dscores[k * R + r] * static_cast<float>(rows[r][e]);
      }
      du[k * H + e] = total;
    }
  }
}

#endif  // CPU_CAPABILITY_AVX512_BF16

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
