#pragma once

// The interface between the CPU entry points (ops/cpu/*_kernel.cpp, compiled
// once) and the compute kernels (isa/, compiled once per instruction set).
// Only plain data crosses it (ops/pool_params.h): the kernels see raw
// pointers and sizes, never at::Tensor, so nothing that depends on the
// instruction set leaks into code shared by all of them.

#include "ops/pool_params.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace attnpool::cpu {

// Each kernel dispatches on a dtype: x's for pooling (and its jvp), the accumulation
// dtype (float32 or float64) for the fold.
using ForwardFn = void (*)(const ForwardParams&, c10::ScalarType);
using BackwardFn = void (*)(const BackwardParams&, c10::ScalarType);
using JvpFn = void (*)(const JvpParams&, c10::ScalarType);
using FoldFn = void (*)(const FoldParams&, c10::ScalarType);
using FoldBackwardFn = void (*)(const FoldBackwardParams&, c10::ScalarType);

// A piece of work smaller than this many elements of x is not worth cutting
// further or handing to a thread of its own.
constexpr int64_t kMinPieceElems = int64_t{1} << 15;

// Fewest pieces of `cut` worth a thread of their own.
inline int64_t parallel_grain(const PieceCut& cut, int64_t hidden) {
  const int64_t piece_elems = cut.rows_per_piece * (hidden > 0 ? hidden : 1);
  return piece_elems >= kMinPieceElems ? 1 : kMinPieceElems / piece_elems;
}

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

struct KernelSet {
  Isa isa;
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
  JvpFn jvp;
  FoldFn fold;
  FoldBackwardFn fold_backward;
};

// Each isa/ translation unit registers its KernelSet from a static
// initializer; the best one the CPU supports is picked on first use.
bool register_kernels(const KernelSet& kernels);
const KernelSet& selected_kernels();

}  // namespace attnpool::cpu
