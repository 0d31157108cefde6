#pragma once

// The interface between the CPU entry points (ops/cpu/*_kernel.cpp, compiled
// once) and the compute kernels (isa/, compiled once per instruction set).
// Only plain data crosses it (ops/pool_params.h): the kernels see raw
// pointers and sizes, never at::Tensor, so nothing that depends on the
// instruction set leaks into code shared by all of them.

#include "ops/pool_params.h"

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace attnpool::cpu {

// Each kernel dispatches on a dtype: x's for pooling (and its jvp), the accumulation
// dtype (float32 or float64) for the fold and the softmax.
using ForwardFn = void (*)(const ForwardParams&, c10::ScalarType);
using BackwardFn = void (*)(const BackwardParams&, c10::ScalarType);
using JvpFn = void (*)(const JvpParams&, c10::ScalarType);
using FoldFn = void (*)(const FoldParams&, c10::ScalarType);
using FoldBackwardFn = void (*)(const FoldBackwardParams&, c10::ScalarType);
using SoftmaxFn = void (*)(const SoftmaxParams&, c10::ScalarType);

// A piece of work smaller than this many elements of x is not worth cutting
// further or handing to a thread of its own.
constexpr int64_t kMinPieceElems = int64_t{1} << 15;

// Fewest pieces of `cut` worth a thread of their own.
inline int64_t parallel_grain(const PieceCut& cut, int64_t hidden) {
  const int64_t piece_elems = cut.rows_per_piece * (hidden > 0 ? hidden : 1);
  return piece_elems >= kMinPieceElems ? 1 : kMinPieceElems / piece_elems;
}

// How many of sequence b's `rows` the mask keeps. (A contiguous mask is
// summed as bytes, which the compiler vectorises: this runs before the
// kernels, on one thread.)
inline int64_t attended_rows(const PoolInputs& p, int64_t b, RowRange rows) {
  int64_t count = 0;
  if (p.mask_seq_stride == 1) {
    const auto* bytes = reinterpret_cast<const uint8_t*>(p.mask + b * p.mask_batch_stride);
    for (int64_t l = rows.begin; l < rows.end; ++l) {
      count += bytes[l];
    }
    return count;
  }
  for (int64_t l = rows.begin; l < rows.end; ++l) {
    count += p.attends(b, l) ? 1 : 0;
  }
  return count;
}

// Runs f(begin, end) over the forward's (or jvp's) work items, in parallel,
// each thread taking one contiguous range of items that reads about the same
// number of rows. Items can differ in size: a ragged batch's (a sequence
// shorter than a piece is one short item, a long one several full ones) and
// a masked batch's (its masked rows are skipped, never read), and a split by
// count can then leave one thread most of the rows. Which thread runs an
// item never changes what it computes.
template <typename Params, typename F>
void parallel_over_items(const Params& p, const F& f) {
  const int64_t items = p.work_items();
  const int64_t grain = parallel_grain(p.cut, p.hidden);
  const int64_t ranges = std::min<int64_t>(at::get_num_threads(), items / grain);
  // A dense batch without a mask: items of one size.
  if ((!p.ragged() && p.mask == nullptr) || ranges <= 1) {
    at::parallel_for(0, items, grain, f);
    return;
  }
  // rows_before[i]: the rows that items 0 .. i - 1 read.
  std::vector<int64_t> rows_before(items + 1, 0);
  for (int64_t item = 0; item < items; ++item) {
    const SequencePiece work = p.work_item(item);
    const int64_t rows =
        p.mask != nullptr ? attended_rows(p, work.b, work.rows) : work.rows.end - work.rows.begin;
    rows_before[item + 1] = rows_before[item] + rows;
  }
  // first[r]: range r starts with the item that holds row
  // rows_before[items] * r / ranges of the rows read.
  std::vector<int64_t> first(ranges + 1, items);
  first[0] = 0;
  for (int64_t r = 1; r < ranges; ++r) {
    const int64_t row = rows_before[items] * r / ranges;
    first[r] = std::upper_bound(rows_before.begin() + 1, rows_before.end(), row) -
               (rows_before.begin() + 1);
  }
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (first[r] < first[r + 1]) {
        f(first[r], first[r + 1]);
      }
    }
  });
}

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3, AMX_BF16 = 4 };

struct KernelSet {
  Isa isa;
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
  JvpFn jvp;
  FoldFn fold;
  FoldBackwardFn fold_backward;
  SoftmaxFn softmax;
};

// Each isa/ translation unit registers its KernelSet from a static
// initializer; the best one the CPU supports is picked on first use.
bool register_kernels(const KernelSet& kernels);
const KernelSet& selected_kernels();

}  // namespace attnpool::cpu
