// The loop shapes of the CPU's one-score forward (one query, one head,
// float32 rows; csrc/ops/cpu/isa/forward.h) alone, beside one read of the
// same rows, at sizes that sit in L1, L2, L3 and memory: how far from a read
// this CPU lets such a loop come, whatever the op around it does. Each
// thread takes its share of the rows (two threads by default, as the
// benchmarks run). Every loop sums a score per row (x . u, one chain of FMAs per row)
// and adds each row, weighted, to a sum y:
//
// - read: x.sum()'s loop, four accumulators;
// - rows R, pipelined: R rows scored while the R before them are added (the
//   op's add_rows_pipelined takes R = 4, its rows one at a time R = 1), the
//   next rows prefetched into L2 (t1) or not at all;
// - tile R, by columns: R rows scored, then added four vectors of y at a
//   time.
//
// Printed: nanoseconds per 64-byte line of x per thread (medians of 15
// rounds, the loops taking turns) and the ratio to the read at that size. AVX-512 only; build and
// run (threads: 2 unless given):
//
//   g++ -O2 -march=x86-64-v4 -fopenmp -o loops benchmarks/one_score_loops.cpp
//   ./loops [threads]

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kHidden = 768;
constexpr int kVectors = kHidden / 16;
constexpr int kRounds = 15;
constexpr double kRoundSeconds = 0.02;

alignas(64) float g_u[kHidden];

// What one thread's loop gets: its rows and a sum of its own.
using Loop = void (*)(const float* x, long rows, float* y);

void read(const float* x, long rows, float* y) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const long vectors = rows * kVectors;
  for (long i = 0; i + 4 <= vectors; i += 4) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + 16 * i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + 16 * i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(x + 16 * i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(x + 16 * i + 48));
  }
  y[0] += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// A stand-in for the softmax weight of a score: small, so that y stays finite.
inline float weight_of(float score) {
  return score * 1e-9f;
}

template <int R, bool kPrefetch>
void rows_pipelined(const float* x, long rows, float* y) {
  float weights[R];
  std::fill_n(weights, R, 0.001f);
  for (long first = R; first + R <= rows; first += R) {
    const float* current = x + first * kHidden;
    const float* previous = current - R * kHidden;
    __m512 scores[R];
    __m512 w[R];
    for (int r = 0; r < R; ++r) {
      scores[r] = _mm512_setzero_ps();
      w[r] = _mm512_set1_ps(weights[r]);
    }
    for (int e = 0; e < kHidden; e += 16) {
      const __m512 u = _mm512_loadu_ps(g_u + e);
      for (int r = 0; r < R; ++r) {
        if constexpr (kPrefetch) {
          _mm_prefetch(reinterpret_cast<const char*>(current + (r + R) * kHidden + e), _MM_HINT_T1);
        }
        scores[r] = _mm512_fmadd_ps(_mm512_loadu_ps(current + r * kHidden + e), u, scores[r]);
      }
      __m512 sum = _mm512_loadu_ps(y + e);
      for (int r = 0; r < R; ++r) {
        sum = _mm512_fmadd_ps(w[r], _mm512_loadu_ps(previous + r * kHidden + e), sum);
      }
      _mm512_storeu_ps(y + e, sum);
    }
    for (int r = 0; r < R; ++r) {
      weights[r] = weight_of(_mm512_reduce_add_ps(scores[r]));
    }
  }
}

template <int R>
void tile_by_columns(const float* x, long rows, float* y) {
  for (long first = 0; first + R <= rows; first += R) {
    const float* tile = x + first * kHidden;
    __m512 scores[R];
    for (int r = 0; r < R; ++r) {
      scores[r] = _mm512_setzero_ps();
    }
    for (int e = 0; e < kHidden; e += 16) {
      const __m512 u = _mm512_loadu_ps(g_u + e);
      for (int r = 0; r < R; ++r) {
        scores[r] = _mm512_fmadd_ps(_mm512_loadu_ps(tile + r * kHidden + e), u, scores[r]);
      }
    }
    __m512 w[R];
    for (int r = 0; r < R; ++r) {
      w[r] = _mm512_set1_ps(weight_of(_mm512_reduce_add_ps(scores[r])));
    }
    for (int e = 0; e < kHidden; e += 64) {
      __m512 sums[4];
      for (int k = 0; k < 4; ++k) {
        sums[k] = _mm512_loadu_ps(y + e + 16 * k);
      }
      for (int r = 0; r < R; ++r) {
        for (int k = 0; k < 4; ++k) {
          sums[k] =
              _mm512_fmadd_ps(w[r], _mm512_loadu_ps(tile + r * kHidden + e + 16 * k), sums[k]);
        }
      }
      for (int k = 0; k < 4; ++k) {
        _mm512_storeu_ps(y + e + 16 * k, sums[k]);
      }
    }
  }
}

struct Contender {
  const char* name;
  Loop loop;
};

const Contender kContenders[] = {
    {"read", read},
    {"rows 1, t1", rows_pipelined<1, true>},
    {"rows 2", rows_pipelined<2, false>},
    {"rows 2, t1", rows_pipelined<2, true>},
    {"rows 4, t1", rows_pipelined<4, true>},
    {"tile 8, by columns", tile_by_columns<8>},
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds per pass of `loop` over all rows, each thread over its half,
// timed over back-to-back passes for kRoundSeconds.
double seconds_per_pass(Loop loop, const float* x, long rows, int threads) {
  const long per_thread = rows / threads;
  const int passes = per_thread * kHidden * 4 < (1 << 20) ? 64 : 1;  // tiny sizes: many a round
  long calls = 0;
  const double start = now();
  do {
#pragma omp parallel num_threads(threads)
    {
      alignas(64) float y[kHidden] = {};
      const int t = omp_get_thread_num();
      for (int pass = 0; pass < passes; ++pass) {
        loop(x + t * per_thread * kHidden, per_thread, y);
      }
      if (y[1] == 12345.0f) {  // keeps the sums live
        std::printf(" ");
      }
    }
    calls += passes;
  } while (now() - start < kRoundSeconds);
  return (now() - start) / calls;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  for (int i = 0; i < kHidden; ++i) {
    g_u[i] = 1e-3f * static_cast<float>(i % 7);
  }
  const int count = static_cast<int>(sizeof(kContenders) / sizeof(kContenders[0]));
  std::printf(
      "float32 rows of %d, %d threads; ns per 64-byte line per thread (x read)\n",
      kHidden,
      threads);
  std::printf("%-10s", "x");
  for (const auto& c : kContenders) {
    std::printf(" | %-18s", c.name);
  }
  std::printf("\n");
  // 8 rows a thread (24 KB: L1), then L2, L3 and memory sizes.
  const long sizes[] = {8L * threads, 64L * threads, 4096, 11392, 65536};
  for (const long rows : sizes) {
    std::vector<float> x(static_cast<size_t>(rows + 16) * kHidden);
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] = 0.01f * static_cast<float>(i % 13);
    }
    std::vector<std::vector<double>> ns(count);
    for (int round = 0; round < kRounds; ++round) {
      for (int k = 0; k < count; ++k) {
        const double pass = seconds_per_pass(kContenders[k].loop, x.data(), rows, threads);
        ns[k].push_back(1e9 * pass / (static_cast<double>(rows / threads) * kVectors));
      }
    }
    std::vector<double> median(count);
    for (int k = 0; k < count; ++k) {
      std::nth_element(ns[k].begin(), ns[k].begin() + kRounds / 2, ns[k].end());
      median[k] = ns[k][kRounds / 2];
    }
    std::printf("%7.2f MB", 4e-6 * static_cast<double>(rows) * kHidden);
    for (int k = 0; k < count; ++k) {
      std::printf(" | %5.2f (%4.2fx)      ", median[k], median[k] / median[0]);
    }
    std::printf("\n");
  }
}
