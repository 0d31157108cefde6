#pragma once

// Matrix products on AMX tiles (the AMX_BF16 kernels only): C = A . B or
// C += A . B, A and B in pairs of bfloat16, C in float32. The scores
// ([Note: scores on AMX tiles] in isa/amx_scores.h) and the backward's dx
// and du ([Note: bfloat16 products in the backward] in isa/backward_bf16.h)
// run on it. Per instruction set, like every file in isa/
// (ops/cpu/README.md).
//
// A tile holds up to 16 rows of 64 bytes. tdpbf16ps multiplies an A tile
// (rows x 16 pairs of bfloat16) by a B tile (16 pairs x 16 columns, each
// row of B holding the pair of two consecutive summed indices for each of
// 16 columns) into a C tile (rows x 16 float32 sums). Each sum of C runs
// over its pairs in one order of the hardware's, which depends on that row
// of A and that column of B only.
//
// Also here: pair_rows, the rows of a tile paired for B, which the
// backward's vdpbf16ps products (AVX512_BF16) take in the same layout.

#include "ops/cpu/isa/cache_lines.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512_BF16)
#include <immintrin.h>
#endif

namespace attnpool::cpu {
namespace CPU_CAPABILITY {
namespace {

#if defined(CPU_CAPABILITY_AMX_BF16)
constexpr bool kAmxScores = true;
#else
constexpr bool kAmxScores = false;
#endif

constexpr int64_t kTileRows = 16;      // rows of an A or C tile; pairs of a B tile
constexpr int64_t kTileColumns = 16;   // float32 sums of a C row; columns of B
constexpr int64_t kTileRowBytes = 64;  // one row of any tile
constexpr int64_t kTileBytes = kTileRows * kTileRowBytes;

#if defined(CPU_CAPABILITY_AVX512_BF16)
// row_pairs[p * H + e] = (rows[2 p][e], rows[2 p + 1][e]) for the
// (count + 1) / 2 pairs of `count` rows, 0 past the last row: each 32-bit
// lane a pair of the summed index (the rows), in column order.
inline void pair_rows(const at::BFloat16* const* rows, int count, int64_t H, uint32_t* row_pairs) {
  for (int p = 0; 2 * p < count; ++p) {
    const at::BFloat16* first = rows[2 * p];
    const at::BFloat16* second = 2 * p + 1 < count ? rows[2 * p + 1] : nullptr;
    uint32_t* out = row_pairs + p * H;
    int64_t e = 0;
    for (; e + 16 <= H; e += 16) {
      const __m512i low =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + e)));
      const __m512i high = second == nullptr ? _mm512_setzero_si512()
                                             : _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                   reinterpret_cast<const __m256i*>(second + e)));
      _mm512_storeu_si512(out + e, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
    for (; e < H; ++e) {
      const uint32_t high = second == nullptr ? 0u : second[e].x;
      out[e] = static_cast<uint32_t>(first[e].x) | (high << 16);
    }
  }
}
#endif

#if defined(CPU_CAPABILITY_AMX_BF16)
// The operands of multiply_on_tiles, by their bytes: A's row i, chunk c
// (16 pairs) at a + i * a_row_bytes + c * 64; B's tile for chunk c and block
// j (16 columns) at b + c * b_chunk_bytes + j * b_block_bytes, its rows
// b_row_bytes apart; C's row i, block j at c + i * c_row_bytes + j * 64.
struct TileOperands {
  const char* a = nullptr;
  int64_t a_row_bytes = 0;
  const char* b = nullptr;
  int64_t b_chunk_bytes = 0;
  int64_t b_block_bytes = 0;
  int64_t b_row_bytes = 0;
  char* c = nullptr;
  int64_t c_row_bytes = 0;
  bool accumulate = false;  // C += A . B, else C = A . B
};

// Operands of words (each a pair of bfloat16) stored as rows: A's rows
// a_stride words apart, B's rows (one pair of the summed index each, by
// column) b_stride words apart, C's rows c_stride floats apart.
inline TileOperands word_rows(
    const uint32_t* a,
    int64_t a_stride,
    const uint32_t* b,
    int64_t b_stride,
    float* c,
    int64_t c_stride,
    bool accumulate) {
  constexpr int64_t kWord = 4;
  TileOperands t;
  t.a = reinterpret_cast<const char*>(a);
  t.a_row_bytes = a_stride * kWord;
  t.b = reinterpret_cast<const char*>(b);
  t.b_chunk_bytes = kTileRows * b_stride * kWord;
  t.b_block_bytes = kTileRowBytes;
  t.b_row_bytes = b_stride * kWord;
  t.c = reinterpret_cast<char*>(c);
  t.c_row_bytes = c_stride * static_cast<int64_t>(sizeof(float));
  t.accumulate = accumulate;
  return t;
}

// The layout ldtilecfg reads (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 sum two blocks of rows (r0, r1) by two blocks of columns (j0,
// j1): 0 = (r0, j0), 1 = (r1, j0), 2 = (r0, j1), 3 = (r1, j1); tiles 4 and
// 5 hold A's rows of r0 and r1, 6 and 7 B's tiles of j0 and j1. With
// `second` rows in r1 (0: none), r1's tiles are left unconfigured.
inline TileConfig tile_config(int first, int second) {
  TileConfig config;
  auto set = [&](int tile, int rows) {
    config.rows[tile] = static_cast<uint8_t>(rows);
    config.bytes_per_row[tile] = rows == 0 ? 0 : kTileRowBytes;
  };
  for (int tile : {0, 2, 4}) {
    set(tile, first);
  }
  for (int tile : {1, 3, 5}) {
    set(tile, second);
  }
  set(6, kTileRows);
  set(7, kTileRows);
  return config;
}

// C (+)= A . B for up to 2 * kTileRows rows (kSecond: whether r1 holds
// any), over `chunks` chunks of pairs, for one or two blocks of columns
// (kBlocks) from block `block`. Tile numbers are literals: GCC's AMX
// intrinsics paste them into the instruction's text.
template <int kBlocks, bool kSecond>
inline void tile_products(const TileOperands& t, int64_t chunks, int64_t block) {
  const char* a0 = t.a;
  const char* a1 = t.a + kTileRows * t.a_row_bytes;
  const char* b0 = t.b + block * t.b_block_bytes;
  const char* b1 = b0 + t.b_block_bytes;
  char* c0 = t.c + block * kTileRowBytes;
  char* c1 = c0 + kTileRows * t.c_row_bytes;
  const int64_t cs = t.c_row_bytes;
  if (t.accumulate) {
    _tile_loadd(0, c0, cs);
    if constexpr (kSecond) {
      _tile_loadd(1, c1, cs);
    }
    if constexpr (kBlocks == 2) {
      _tile_loadd(2, c0 + kTileRowBytes, cs);
      if constexpr (kSecond) {
        _tile_loadd(3, c1 + kTileRowBytes, cs);
      }
    }
  } else {
    _tile_zero(0);
    if constexpr (kSecond) {
      _tile_zero(1);
    }
    if constexpr (kBlocks == 2) {
      _tile_zero(2);
      if constexpr (kSecond) {
        _tile_zero(3);
      }
    }
  }
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    _tile_loadd(4, a0 + chunk * kTileRowBytes, t.a_row_bytes);
    _tile_loadd(6, b0 + chunk * t.b_chunk_bytes, t.b_row_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kSecond) {
      _tile_loadd(5, a1 + chunk * kTileRowBytes, t.a_row_bytes);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (kBlocks == 2) {
      _tile_loadd(7, b1 + chunk * t.b_chunk_bytes, t.b_row_bytes);
      _tile_dpbf16ps(2, 4, 7);
      if constexpr (kSecond) {
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c0, cs);
  if constexpr (kSecond) {
    _tile_stored(1, c1, cs);
  }
  if constexpr (kBlocks == 2) {
    _tile_stored(2, c0 + kTileRowBytes, cs);
    if constexpr (kSecond) {
      _tile_stored(3, c1 + kTileRowBytes, cs);
    }
  }
}

// Loads the tile configuration for products of `rows` rows (up to
// 2 * kTileRows) of A and C. Not by _tile_loadconfig: GCC 12's tells the
// compiler that ldtilecfg reads the first 8 bytes of the configuration
// only, and the stores of the rest were then moved past it (a fault on an
// invalid configuration). The asm here reads all 64 bytes, and is a
// compiler barrier too: GCC 12's _tile_loadd does not tell the compiler
// that it reads memory, so the stores of its operands (the rows copied or
// paired for the tiles) must be finished before the products begin.
inline void configure_tiles(int rows) {
  const int in_first = std::min<int>(kTileRows, rows);
  const TileConfig config = tile_config(in_first, rows - in_first);
  asm volatile("ldtilecfg %0" : : "m"(config) : "memory");
}

// C (+)= A . B for `rows` rows of A and C (up to 2 * kTileRows, the tiles
// configured for them by configure_tiles), `chunks` chunks of 16 pairs and
// `blocks` blocks of 16 columns: 32 rows by 32 columns at a time, so that
// each tile loaded serves two products.
inline void products_on_tiles(const TileOperands& t, int rows, int64_t chunks, int64_t blocks) {
  auto each_block = [&](auto second) {
    constexpr bool kSecond = decltype(second)::value;
    int64_t block = 0;
    for (; block + 2 <= blocks; block += 2) {
      tile_products<2, kSecond>(t, chunks, block);
    }
    if (block < blocks) {
      tile_products<1, kSecond>(t, chunks, block);
    }
  };
  if (rows > kTileRows) {
    each_block(std::true_type{});
  } else {
    each_block(std::false_type{});
  }
}

// products_on_tiles for any number of rows, 2 * kTileRows at a time, each
// group with its own configuration; the tiles released after.
inline void multiply_on_tiles(TileOperands t, int rows, int64_t chunks, int64_t blocks) {
  for (int first = 0; first < rows; first += 2 * kTileRows) {
    const int group = std::min<int>(2 * kTileRows, rows - first);
    configure_tiles(group);
    products_on_tiles(t, group, chunks, blocks);
    t.a += 2 * kTileRows * t.a_row_bytes;
    t.c += 2 * kTileRows * t.c_row_bytes;
  }
  _tile_release();
}
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace attnpool::cpu
