#pragma once

// Scores of bfloat16 rows against u laid out as AMX tiles: tile products
// on AMX tiles (AMX_BF16), or one row of a tile at a time by vdpbf16ps
// (AVX512_BF16). Per instruction set, like every file in isa/
// (ops/cpu/README.md).
//
// [Note: scores on AMX tiles] On a CPU with AMX-BF16, the scores of bfloat16
// rows against several vectors of u (rounded to bfloat16, as for
// [Note: bfloat16 products]) are tile products: a tile of 16 rows times 32
// values of x, by a tile of the same 32 values of 16 vectors of u, adds into
// 16 x 16 float32 sums in one instruction (tdpbf16ps), 16 times the
// multiply-adds of a vdpbf16ps. Each sum runs along the row, 32 values per
// instruction, in an order of the hardware's that depends on that row and
// that vector only, never on the tile's other rows, on how many rows the
// tile holds or on the thread count; the forward, the backward and the jvp
// all take their scores from amx_score_rows, so p stays the forward's
// ([Note: one order for every score]). The tiles read evenly spaced rows
// of whole tiles (H a multiple of 32, each row on a cache line), as a
// tile of x's rows mostly is, in place; other rows (masked rows left out,
// normalized rows, other H) are copied into a contiguous buffer first, its
// values past H zero, which gives the same products. In place against
// copied, bfloat16 forward, 2 threads, 32 x 512 x 768, one process taking
// turns: 1 x 12 1.96 -> 1.58 ms, 4 x 12 3.08 -> 2.37, 16 x 1 2.42 ->
// 1.96, so400m's full width 2.58 -> 2.08; prefetching the next tile's rows
// by hand instead of the copy's prefetch made each slower (1 x 12 1.85).
// u's tiles are laid out once per call, behind u's bfloat16 copy
// (u_in_bf16); without AMX, vdpbf16ps reads the same tiles where a row has
// 12 scores or more ([Note: scores from u's tiles by vdpbf16ps]). One score
// per row keeps its vdpbf16ps: AMX would fill 1 of a tile's 16 columns. The
// products, as vdpbf16ps', flush values below float32's normal range to
// zero.

#include "ops/cpu/isa/amx_tiles.h"
#include "ops/pool_params.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kTileDepth = 32;             // bfloat16 values of a row per A tile
constexpr int64_t kTileScores = kTileColumns;  // vectors of u per B tile
constexpr int64_t kTileValues = 512;           // bfloat16 values per A or B tile

// H rounded up to whole A tiles.
inline int64_t tile_depth(int64_t H) {
  return (H + kTileDepth - 1) / kTileDepth * kTileDepth;
}

// Blocks of kTileScores vectors of u.
constexpr int64_t score_blocks(int64_t num_scores) {
  return (num_scores + kTileScores - 1) / kTileScores;
}

// bfloat16 values of u's B tiles (pack_u_tiles).
inline int64_t u_tiles_size(int64_t num_scores, int64_t H) {
  return score_blocks(num_scores) * kTileScores * tile_depth(H);
}

// u [num_scores, H] (bfloat16, its vectors u_stride apart) as B tiles,
// [score block][32 values of H] each tile of 16 x 16 words: its row i holds
// values 2i and 2i + 1 of the 32 for each of the block's 16 vectors, a pair
// per word (the first in the low half), as tdpbf16ps reads them. `tiles`
// comes zeroed: vectors past num_scores and values past H stay zero.
inline void pack_u_tiles(
    const at::BFloat16* u, int64_t num_scores, int64_t H, int64_t u_stride, uint32_t* tiles) {
  const int64_t chunks = tile_depth(H) / kTileDepth;
  for (int64_t k = 0; k < num_scores; ++k) {
    const int64_t column = k % kTileScores;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      uint32_t* tile = tiles + (k / kTileScores * chunks + chunk) * kTileRows * kTileScores;
      const at::BFloat16* values = u + k * u_stride + chunk * kTileDepth;
      const int64_t count = std::min(kTileDepth, H - chunk * kTileDepth);
      for (int64_t i = 0; 2 * i < count; ++i) {
        const uint32_t high = 2 * i + 1 < count ? values[2 * i + 1].x : 0u;
        tile[i * kTileScores + column] = values[2 * i].x | (high << 16);
      }
    }
  }
}

// Where u_in_bf16 keeps u's B tiles: behind u [num_scores, H] in bfloat16,
// on the next cache line (u_bf16 starts on one).
inline const at::BFloat16* u_tiles_of(const at::BFloat16* u_bf16, int64_t num_scores, int64_t H) {
  return u_bf16 + whole_lines<at::BFloat16>(num_scores * H);
}

// Whether the scores of T rows against u_bf16 come from u's tiles
// (score_rows_on_tiles): on AMX tiles with two scores or more; by vdpbf16ps
// from 12 scores on where they fill three quarters of their blocks' lanes
// ([Note: scores from u's tiles by vdpbf16ps]).
template <typename T>
constexpr bool scores_on_tiles(int64_t num_scores) {
  if constexpr (!std::is_same_v<T, at::BFloat16>) {
    return false;
  } else if constexpr (kAmxScores) {
    return num_scores > 1;
  } else {
#if defined(CPU_CAPABILITY_AVX512_BF16)
    return 4 * num_scores >= 3 * score_blocks(num_scores) * kTileScores;
#else
    return false;
#endif
  }
}

#if defined(CPU_CAPABILITY_AMX_BF16)
// Copies `count` rows into `packed`, `depth` values apart, the values past
// H zero, prefetching each row `ahead` elements on.
inline void pack_rows(
    const at::BFloat16* const* rows,
    int count,
    int64_t H,
    int64_t depth,
    int64_t ahead,
    at::BFloat16* packed) {
  for (int r = 0; r < count; ++r) {
    const at::BFloat16* row = rows[r];
    at::BFloat16* out = packed + r * depth;
    int64_t e = 0;
    for (; e + kTileDepth <= H; e += kTileDepth) {
      if (ahead != 0) {
        _mm_prefetch(reinterpret_cast<const char*>(row + e + ahead), _MM_HINT_T0);
      }
      _mm512_storeu_si512(out + e, _mm512_loadu_si512(row + e));
    }
    if (e < depth) {
      const auto mask = static_cast<__mmask32>((uint64_t{1} << (H - e)) - 1);
      _mm512_storeu_si512(out + e, _mm512_maskz_loadu_epi16(mask, row + e));
    }
  }
}

// How far apart `count` rows are in bytes where A tiles can read them in
// place: whole tiles of values (H a multiple of kTileDepth), evenly
// spaced, each on a cache line; 0 where they cannot.
inline int64_t in_place_row_bytes(const at::BFloat16* const* rows, int count, int64_t H) {
  constexpr int64_t kLine = kTileRowBytes;
  const auto address = [&](int r) { return reinterpret_cast<intptr_t>(rows[r]); };
  if (H % kTileDepth != 0 || address(0) % kLine != 0) {
    return 0;
  }
  const int64_t bytes = count > 1 ? address(1) - address(0) : H * 2;
  if (bytes < H * 2 || bytes % kLine != 0) {
    return 0;
  }
  for (int r = 2; r < count; ++r) {
    if (address(r) - address(r - 1) != bytes) {
      return 0;
    }
  }
  return bytes;
}

// The operands of the scores' tile products but A (x's rows): u's tiles
// (B) and the scores, stride floats a row (C).
inline TileOperands score_operands(
    const at::BFloat16* u_tiles, int64_t H, float* scores, int64_t stride) {
  TileOperands operands;
  operands.b = reinterpret_cast<const char*>(u_tiles);
  operands.b_chunk_bytes = kTileBytes;
  operands.b_block_bytes = tile_depth(H) / kTileDepth * kTileBytes;
  operands.b_row_bytes = kTileRowBytes;
  operands.c = reinterpret_cast<char*>(scores);
  operands.c_row_bytes = stride * static_cast<int64_t>(sizeof(float));
  operands.accumulate = false;
  return operands;
}

// scores[r * stride + k] = rows[r] . u_k for every score k of `count` rows
// ([Note: scores on AMX tiles]); stride: at least num_scores rounded up to
// kTileScores, the lanes past num_scores getting the pads' sums (zero for
// finite rows). ahead != 0: rows that are copied prefetch the row `ahead`
// elements further.
inline void amx_score_rows(
    const at::BFloat16* const* rows,
    int count,
    const at::BFloat16* u_tiles,
    int64_t H,
    int64_t num_scores,
    float* scores,
    int64_t stride,
    int64_t ahead = 0) {
  const int64_t depth = tile_depth(H);
  const int64_t chunks = depth / kTileDepth;
  TileOperands operands = score_operands(u_tiles, H, scores, stride);
  const int64_t row_bytes = in_place_row_bytes(rows, count, H);
  if (row_bytes != 0) {
    operands.a = reinterpret_cast<const char*>(rows[0]);
    operands.a_row_bytes = row_bytes;
    return multiply_on_tiles(operands, count, chunks, score_blocks(num_scores));
  }
  thread_local CacheLineBuffer<at::BFloat16> packed;
  packed.resize(2 * kTileRows * depth);
  operands.a = reinterpret_cast<const char*>(packed.data());
  operands.a_row_bytes = depth * static_cast<int64_t>(sizeof(at::BFloat16));
  for (int first = 0; first < count; first += 2 * kTileRows) {
    const int rows_here = std::min<int>(2 * kTileRows, count - first);
    pack_rows(rows + first, rows_here, H, depth, ahead, packed.data());
    operands.c = reinterpret_cast<char*>(scores + first * stride);
    multiply_on_tiles(operands, rows_here, chunks, score_blocks(num_scores));
  }
}

// [Note: scores beside the weighted sums] amx_score_rows waits on the
// tile's rows (x from L3 or memory, read in place), and the weighted sums
// that follow read those rows again from L1/L2 while no read of x is in
// flight. Where the sums are by columns, the forward scores each tile
// while it adds the previous tile's sums: the products of a whole tile read
// in place are issued a chunk at a time (TileScoresInSteps), one chunk per
// row of the sums (the `beside` of add_block_by_columns) until all are
// issued, so the tile's reads overlap the sums' arithmetic. Each tile is
// weighed after the previous one's sums are added, as before, so every
// value is the same. Bfloat16 forward, 2 threads, a 2-core Xeon with AMX,
// 32 x 512 x 768, two builds in alternating processes (median of paired
// ratios, with the sums' paired read in both): 1 x 12 0.92, 2 x 12 0.86,
// 4 x 12 0.96, 1 x 16 0.98; one head's sums too: 2 x 1 0.98, 4 x 1 0.98,
// 6 x 1 0.97, full width 1 x 4 at 16 x 729 x 1152 0.97. Spreading the
// chunks evenly over the sums' rows instead: 1 x 12 0.92-0.96, 2 x 12 1.09,
// 4 x 12 1.27 (with three blocks of scores or more a tile's rows are read
// once per pair of blocks, and spread out, the later reads find them
// evicted).

// The products of amx_score_rows for one tile of 2 * kTileRows rows read
// in place, issued a chunk (of both blocks of a pair of blocks of scores)
// at a time. The tiles stay configured from the first start() to the
// object's end (no other code may use them in between but
// amx_score_rows, which start() calls for rows that are not such a tile:
// it scores them at once).
class TileScoresInSteps {
 public:
  TileScoresInSteps() = default;
  TileScoresInSteps(const TileScoresInSteps&) = delete;
  TileScoresInSteps& operator=(const TileScoresInSteps&) = delete;
  ~TileScoresInSteps() {
    if (configured_) {
      _tile_release();
    }
  }

  void start(
      const at::BFloat16* const* rows,
      int count,
      const at::BFloat16* u_tiles,
      int64_t H,
      int64_t num_scores,
      float* scores,
      int64_t stride) {
    const int64_t row_bytes = count == 2 * kTileRows ? in_place_row_bytes(rows, count, H) : 0;
    steps_ = 0;
    done_ = 0;
    if (row_bytes == 0) {
      amx_score_rows(rows, count, u_tiles, H, num_scores, scores, stride);
      configured_ = false;  // amx_score_rows releases the tiles
      return;
    }
    chunks_ = tile_depth(H) / kTileDepth;
    blocks_ = score_blocks(num_scores);
    steps_ = chunks_ * ((blocks_ + 1) / 2);
    t_ = score_operands(u_tiles, H, scores, stride);
    t_.a = reinterpret_cast<const char*>(rows[0]);
    t_.a_row_bytes = row_bytes;
    // ldtilecfg waits for what came before it: about 9 ns a row of a
    // 32-row tile from L3 in scratch code, once per tile.
    if (!configured_) {
      configure_tiles(2 * kTileRows);
      configured_ = true;
    }
  }

  // One row of the work beside: the next chunk, if any is left.
  void operator()() {
    if (done_ < steps_) {
      step();
    }
  }

  // The chunks not yet issued; the scores are in place after it.
  void finish() {
    while (done_ < steps_) {
      step();
    }
    // tilestored does not tell GCC that it writes the scores.
    asm volatile("" : : : "memory");
  }

 private:
  // Chunk done_ % chunks_ of the pair of blocks done_ / chunks_ (its
  // second block, if there is one, in tiles 2, 3 and 7), the sums zeroed
  // before the first chunk and stored after the last.
  void step() {
    const int64_t chunk = done_ % chunks_;
    const int64_t block = 2 * (done_ / chunks_);
    const bool two = block + 1 < blocks_;
    const int64_t cs = t_.c_row_bytes;
    char* c0 = t_.c + block * kTileRowBytes;
    char* c1 = c0 + kTileRows * cs;
    if (chunk == 0) {
      _tile_zero(0);
      _tile_zero(1);
      if (two) {
        _tile_zero(2);
        _tile_zero(3);
      }
    }
    const char* a0 = t_.a + chunk * kTileRowBytes;
    const char* b0 = t_.b + block * t_.b_block_bytes + chunk * t_.b_chunk_bytes;
    _tile_loadd(4, a0, t_.a_row_bytes);
    _tile_loadd(6, b0, t_.b_row_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, a0 + kTileRows * t_.a_row_bytes, t_.a_row_bytes);
    _tile_dpbf16ps(1, 5, 6);
    if (two) {
      _tile_loadd(7, b0 + t_.b_block_bytes, t_.b_row_bytes);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    if (chunk == chunks_ - 1) {
      _tile_stored(0, c0, cs);
      _tile_stored(1, c1, cs);
      if (two) {
        _tile_stored(2, c0 + kTileRowBytes, cs);
        _tile_stored(3, c1 + kTileRowBytes, cs);
      }
    }
    ++done_;
  }

  TileOperands t_;
  int64_t chunks_ = 0;
  int64_t blocks_ = 0;
  int64_t steps_ = 0;  // chunks of products for this tile; 0: none
  int64_t done_ = 0;
  bool configured_ = false;
};

// [Note: weighted sums on AMX tiles] The forward's weighted sums of a tile
// of rows scored on tiles are tile products too where 8 queries or more
// share a head (one head, full width, or several heads): for each head, the
// sums of its queries (rows of C, in the state) += their weights, each as
// two bfloat16 and paired by rows (A), times the head's slice of the
// tile's rows paired by rows (B), as vdpbf16ps takes them in [Note:
// weighted sums from bfloat16 products]. Fewer queries leave most of each
// product's 16 rows of A empty, and the sums in float32 by columns
// (add_weighted_rows_by_columns, add_head_slices_by_columns) are faster.
// Bfloat16 forward, 2 threads, a 2-core Xeon with AMX, one process taking
// turns (median of 25 calls each; tiles -> float32 by columns): 1 x 12 at
// 32 x 512 x 768 3.96 -> 3.26 ms, 1 x 16 2.95 -> 2.25, 8 x 1 4.25 -> 3.56;
// but 16 x 1 4.0 -> 3.3 on tiles, 32 x 1 6.9 -> 5.7 and so400m's full
// width (16 x 729 x 1152, 16 scores) 5.7 -> 4.8. Since the tiles' operands
// and the sums start on cache lines, 8 x 1 gains on tiles too (1.78 ->
// 1.62 ms, nine turns each); 4 x 1 still loses (1.38 -> 1.51). With
// several heads (median of paired ratios, tiles / by columns): 16 x 12
// 0.84 (1 and 2 threads), 8 x 12 0.96; 4 x 12 1.13 and 2 x 12 1.29 stay by
// columns. A's weights are moved into place by 16 x 16 transposes in
// registers (pair_weights_for_tiles), which took 16 x 12 0.91, 16 x 1 0.95
// of the time that scattering them did (1 thread).

// Whether the forward adds the weighted sums of T rows on tiles.
template <typename T>
bool sums_on_tiles(const PoolShape& s) {
  return scores_on_tiles<T>(s.num_scores()) && s.num_queries >= kTileRows / 2 &&
         s.head_dim % kTileColumns == 0;
}

// Pairs of rows of a tile of up to 2 * kTileRows rows: one tile's worth.
constexpr int64_t kTilePairs = kTileRows;

// pair_rows for a tile's whole kTilePairs pairs: those past `count` rows
// zero, so that B's one chunk of pairs holds no stale values.
inline void pair_rows_for_tiles(
    const at::BFloat16* const* rows, int count, int64_t H, uint32_t* pairs) {
  pair_rows(rows, count, H, pairs);
  std::fill(pairs + (count + 1) / 2 * H, pairs + kTilePairs * H, 0u);
}

// Each weight of a tile goes in as two bfloat16, its rounding and the
// rounding of what that left, so that the weighted sums keep float32's
// precision (about 2^-16 relative) instead of bfloat16's: A's row of score
// k holds the pairs of the first parts, then those of the second, and B
// (the rows) serves both.
constexpr int64_t kWeightWords = 2 * kTilePairs;

// Transposes 16 x 16 floats in place, v[r] lane c -> v[c] lane r: pairs of
// values, then of pairs, then of 128-bit lanes (four steps of 16 shuffles).
inline void transpose_16x16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // u[4 g + m], 128-bit lane L: column 4 L + m of rows 4 g .. 4 g + 3.
  __m512 u[16];
  const auto as_pd = [](__m512 x) { return _mm512_castps_pd(x); };
  for (int g = 0; g < 4; ++g) {
    for (int m = 0; m < 2; ++m) {
      const __m512d a = as_pd(t[4 * g + m]);
      const __m512d b = as_pd(t[4 * g + m + 2]);
      u[4 * g + 2 * m] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      u[4 * g + 2 * m + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
    const __m512 x1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
    v[m] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    v[4 + m] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    v[8 + m] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    v[12 + m] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// weights[k * kWeightWords + p] = (w[2 p][k], w[2 p + 1][k]) rounded to
// bfloat16 (vcvtneps2bf16: to nearest even) and weights[k * kWeightWords +
// kTilePairs + p] the same of what the rounding left, zero past `count`
// rows; w[r * lanes + k] as the lanes hold them (lanes a multiple of 16).
// 16 rows by 16 scores at a time, transposed in registers: each score's 16
// rows are then one vector, whose bfloat16 halves are 8 of A's pairs.
inline void pair_weights_for_tiles(
    const float* w, int64_t lanes, int count, int64_t num_scores, uint32_t* weights) {
  constexpr int64_t kHalfPairs = kTilePairs / 2;
  const auto to_float = [](__m256bh half) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(half)), 16));
  };
  for (int64_t k = 0; k < num_scores; k += 16) {
    for (int half = 0; half < 2; ++half) {
      __m512 values[16];
      for (int j = 0; j < 16; ++j) {
        const int row = half * 16 + j;
        values[j] = row < count ? _mm512_loadu_ps(w + row * lanes + k) : _mm512_setzero_ps();
      }
      transpose_16x16(values);
      for (int64_t j = 0; j < std::min<int64_t>(16, num_scores - k); ++j) {
        uint32_t* pairs = weights + (k + j) * kWeightWords + half * kHalfPairs;
        const __m256bh first = _mm512_cvtneps_pbh(values[j]);
        const __m256bh rest = _mm512_cvtneps_pbh(_mm512_sub_ps(values[j], to_float(first)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs), reinterpret_cast<__m256i>(first));
        _mm256_storeu_si256(
            reinterpret_cast<__m256i*>(pairs + kTilePairs), reinterpret_cast<__m256i>(rest));
      }
    }
  }
}

// sums[(i * n + h) * d + c] += sum_r w[r * lanes + i * n + h] *
// rows[r][h * d + c] for every query i, head h (d = H / n) and column c < d:
// each head slice's weighted sums, of one head (n = 1, full width included)
// or several, on tiles ([Note: weighted sums on AMX tiles]); `count` up to
// 2 * kTilePairs, d a multiple of kTileColumns. A's rows for head h are the
// scores i * n + h, n apart.
inline void add_head_slices_on_tiles(
    const float* w,
    int64_t lanes,
    int count,
    const at::BFloat16* const* rows,
    int64_t H,
    int64_t num_queries,
    int64_t num_heads,
    float* sums) {
  const int64_t num_scores = num_queries * num_heads;
  const int64_t d = H / num_heads;
  thread_local CacheLineBuffer<uint32_t> scratch;
  scratch.resize(kTilePairs * H + kWeightWords * num_scores);
  uint32_t* row_pairs = scratch.data();
  uint32_t* weight_pairs = scratch.data() + kTilePairs * H;
  pair_rows_for_tiles(rows, count, H, row_pairs);
  pair_weights_for_tiles(w, lanes, count, num_scores, weight_pairs);
  // multiply_on_tiles per head would configure and release the tiles once
  // per head (about 68 ns a pair): here once per group of queries.
  for (int64_t first = 0; first < num_queries; first += 2 * kTileRows) {
    const int group = static_cast<int>(std::min(2 * kTileRows, num_queries - first));
    configure_tiles(group);
    for (int64_t h = 0; h < num_heads; ++h) {
      TileOperands t = word_rows(
          weight_pairs + (first * num_heads + h) * kWeightWords,
          num_heads * kWeightWords,
          row_pairs + h * d,
          H,
          sums + (first * num_heads + h) * d,
          num_heads * d,
          true);
      // Two chunks of A (the weights' two parts) against the same B.
      t.b_chunk_bytes = 0;
      products_on_tiles(t, group, 2, d / kTileColumns);
    }
  }
  _tile_release();
}
#endif

#if defined(CPU_CAPABILITY_AVX512_BF16) && !defined(CPU_CAPABILITY_AMX_BF16)
// [Note: scores from u's tiles by vdpbf16ps] Without AMX, bfloat16 rows with
// many scores read u's tiles too, one row of a tile at a time: a vector of
// 16 pairs, one pair of each of 16 vectors of u, against a pair of a row's
// values broadcast to every lane; vdpbf16ps adds both products into each
// lane. A lane holds one score of one row and runs along the row, one pair
// after another, in one chain whatever the block of rows or of scores, so
// the forward, the backward and the jvp sum each score alike ([Note: one
// order for every score]), and no score needs a sum across lanes. The dot
// products (bf16_score_dot_rows_impl, 8 rows x 3 scores) load a vector of
// a row for every 3 products and end each score with a horizontal sum; here
// 8 rows x 3 blocks of 16 scores load 3 vectors of u and broadcast 8 pairs
// per 24 products. A scratch loop of each, one core of a 2-core Zen 4 EPYC,
// 512 rows of 768 against 192 vectors (in L2): 93-101 against 115-118 G
// multiply-adds/s, the latter the core's vdpbf16ps peak. Where the scores
// leave more than a quarter of their blocks' lanes idle, the dot products
// are faster: bfloat16 forward, 2 threads, 32 x 512 x 768, one process
// taking turns (median of 15 paired ratios, these over the dot products),
// 17, 18 and 20 scores 1.06-1.11, 24 1.01-1.03 (one head 0.95); 12 to 16
// and 28 to 64 0.73-0.97 (12 scores of 3 queries 1.07, forward+backward
// 0.99).

// Rows and blocks of 16 scores per pass: 24 sums, 3 vectors of u and the
// broadcast pair in registers.
constexpr int kDpScoreRows = 8;
constexpr int kDpScoreBlocks = 3;

// A row's values 2 i and 2 i + 1 as one word in every lane; with kHalf the
// second zero (a row of odd H ends in half a pair, and the value after it
// may lie past the end of x).
template <bool kHalf>
inline __m512bh broadcast_pair(const at::BFloat16* row, int64_t i) {
  uint32_t word = row[2 * i].x;
  if constexpr (!kHalf) {
    std::memcpy(&word, row + 2 * i, sizeof(word));
  }
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(word)));
}

// scores[r * stride + 16 b + c] for R rows and S blocks of 16 scores, the
// blocks' tiles at u_blocks, block_words apart; kPrefetch: each row's
// line `ahead` elements on, once per line.
template <int R, int S, bool kPrefetch>
void dp_score_block(
    const at::BFloat16* const* rows,
    const uint32_t* u_blocks,
    int64_t block_words,
    int64_t H,
    float* scores,
    int64_t stride,
    int64_t ahead) {
  constexpr int64_t kLinePairs = kTileRowBytes / 4;
  __m512 acc[R][S];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
    for (int b = 0; b < S; ++b) {
      acc[r][b] = _mm512_setzero_ps();
    }
  }
  const auto add_pair = [&](int64_t i, auto half) {
    __m512bh u_pairs[S];
#pragma GCC unroll 3
    for (int b = 0; b < S; ++b) {
      u_pairs[b] =
          reinterpret_cast<__m512bh>(_mm512_loadu_si512(u_blocks + b * block_words + i * 16));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh x_pair = broadcast_pair<decltype(half)::value>(rows[r], i);
#pragma GCC unroll 3
      for (int b = 0; b < S; ++b) {
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], x_pair, u_pairs[b]);
      }
    }
  };
  const int64_t pairs = H / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    if constexpr (kPrefetch) {
      if (i % kLinePairs == 0) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(rows[r] + 2 * i + ahead), _MM_HINT_T0);
        }
      }
    }
    add_pair(i, std::false_type{});
  }
  if (H % 2 != 0) {
    add_pair(pairs, std::true_type{});
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
    for (int b = 0; b < S; ++b) {
      _mm512_storeu_ps(scores + r * stride + b * kTileScores, acc[r][b]);
    }
  }
}

// dp_score_block for R rows, every block of scores, kDpScoreBlocks at a
// time; the first pass prefetches.
template <int R>
void dp_score_rows_of(
    const at::BFloat16* const* rows,
    const uint32_t* u_tiles,
    int64_t H,
    int64_t blocks,
    float* scores,
    int64_t stride,
    int64_t ahead) {
  const int64_t block_words = tile_depth(H) / 2 * kTileScores;
  for (int64_t first = 0; first < blocks; first += kDpScoreBlocks) {
    const uint32_t* u_blocks = u_tiles + first * block_words;
    float* out = scores + first * kTileScores;
    const bool prefetches = first == 0 && ahead != 0;
    const auto pass = [&](auto blocks_here) {
      constexpr int S = decltype(blocks_here)::value;
      prefetches ? dp_score_block<R, S, true>(rows, u_blocks, block_words, H, out, stride, ahead)
                 : dp_score_block<R, S, false>(rows, u_blocks, block_words, H, out, stride, ahead);
    };
    switch (std::min<int64_t>(kDpScoreBlocks, blocks - first)) {
      case 3:
        pass(std::integral_constant<int, 3>{});
        break;
      case 2:
        pass(std::integral_constant<int, 2>{});
        break;
      default:
        pass(std::integral_constant<int, 1>{});
    }
  }
}

// scores[r * stride + k] = rows[r] . u_k for every score k of `count` rows,
// as amx_score_rows leaves them ([Note: scores from u's tiles by
// vdpbf16ps]): blocks of kDpScoreRows rows, then 4, 2 and 1.
inline void dp_score_rows(
    const at::BFloat16* const* rows,
    int count,
    const at::BFloat16* u_tiles,
    int64_t H,
    int64_t num_scores,
    float* scores,
    int64_t stride,
    int64_t ahead = 0) {
  const auto* tiles = reinterpret_cast<const uint32_t*>(u_tiles);
  const int64_t blocks = score_blocks(num_scores);
  int first = 0;
  for (; first + kDpScoreRows <= count; first += kDpScoreRows) {
    dp_score_rows_of<kDpScoreRows>(
        rows + first, tiles, H, blocks, scores + first * stride, stride, ahead);
  }
  if (count - first >= 4) {
    dp_score_rows_of<4>(rows + first, tiles, H, blocks, scores + first * stride, stride, ahead);
    first += 4;
  }
  if (count - first >= 2) {
    dp_score_rows_of<2>(rows + first, tiles, H, blocks, scores + first * stride, stride, ahead);
    first += 2;
  }
  if (count - first >= 1) {
    dp_score_rows_of<1>(rows + first, tiles, H, blocks, scores + first * stride, stride, ahead);
  }
}
#endif

// scores[r * stride + k] = rows[r] . u_k for every score k of `count` rows
// from u's tiles (scores_on_tiles), the lanes past num_scores getting the
// pads' sums (zero for finite rows), stride at least num_scores rounded up
// to kTileScores: amx_score_rows or dp_score_rows.
inline void score_rows_on_tiles(
    const at::BFloat16* const* rows,
    int count,
    const at::BFloat16* u_tiles,
    int64_t H,
    int64_t num_scores,
    float* scores,
    int64_t stride,
    int64_t ahead = 0) {
#if defined(CPU_CAPABILITY_AMX_BF16)
  amx_score_rows(rows, count, u_tiles, H, num_scores, scores, stride, ahead);
#elif defined(CPU_CAPABILITY_AVX512_BF16)
  dp_score_rows(rows, count, u_tiles, H, num_scores, scores, stride, ahead);
#else
  (void)rows, (void)count, (void)u_tiles, (void)H, (void)num_scores, (void)scores, (void)stride,
      (void)ahead;
  TORCH_INTERNAL_ASSERT(false, "scores from u's tiles need AVX512-BF16");
#endif
}

// out[k * count + r] = by_row[r * stride + k] for every score k of `count`
// rows: scores by row, as score_rows_on_tiles leaves them, score by score.
inline void scores_by_score(
    const float* by_row, int64_t stride, int count, int64_t num_scores, float* out) {
  for (int64_t k = 0; k < num_scores; ++k) {
    for (int r = 0; r < count; ++r) {
      out[k * count + r] = by_row[r * stride + k];
    }
  }
}

// out[k * count + r] = rows[r] . u_k (score by score, as score_dot_rows_each
// leaves them) from score_rows_on_tiles, for the callers that take that
// layout.
template <typename T>
void tile_scores_by_score(
    const T* const* rows,
    int count,
    const at::BFloat16* u_bf16,
    int64_t H,
    int64_t num_scores,
    float* out,
    int64_t ahead = 0) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const int64_t stride = score_blocks(num_scores) * kTileScores;
    thread_local CacheLineBuffer<float> lanes;
    lanes.resize(count * stride);
    score_rows_on_tiles(
        rows, count, u_tiles_of(u_bf16, num_scores, H), H, num_scores, lanes.data(), stride, ahead);
    return scores_by_score(lanes.data(), stride, count, num_scores, out);
  }
  (void)rows, (void)count, (void)u_bf16, (void)H, (void)num_scores, (void)out, (void)ahead;
  TORCH_INTERNAL_ASSERT(false, "scores from u's tiles need bfloat16 rows");
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
