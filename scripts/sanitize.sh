#!/usr/bin/env bash
# Builds the C++ (GoogleTest) suite with AddressSanitizer and
# UndefinedBehaviorSanitizer in its own build directory (build/asan) and runs
# it. Any sanitizer finding aborts the run, so the script exits non-zero.
#
#   bash scripts/sanitize.sh                             # uses .venv/bin/python, else python3
#   PYTHON=/path/to/python bash scripts/sanitize.sh      # the python whose torch to build against
#   BUILD_DIR=build/asan-other bash scripts/sanitize.sh  # another build directory
#   bash scripts/sanitize.sh --gtest_filter='AttentionPool.*'   # arguments go to the test binary
#
# Needs cmake, ninja, g++ (or clang++) with libasan/libubsan, and libgtest-dev.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUILD_DIR=${BUILD_DIR:-build/asan}
SANITIZE="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
TORCH_CMAKE=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
# One run of the suite exercises one CPU level: the one attnpool picks here
# (ops/cpu/kernel_set.cpp). Only it and default are built: the other levels
# took two of the build's largest files, two minutes on a 2-core EPYC. Asked
# of the Python package where it is installed; otherwise every level.
RUN_ISA=$("$PYTHON" -c 'import attnpool; print(attnpool._C.cpu_kernel_isa().lower())' 2>/dev/null || true)

# Only our code is instrumented: libattnpool and the test binary (Debug: -O0,
# so the compiler optimises no UB away). libtorch is not instrumented, which
# ASan tolerates since the runtime is linked into the executable itself.
# PRE_TEST discovery: gtest_discover_tests would otherwise run the binary at
# build time, before the sanitizer options below are in force.
cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS="$SANITIZE" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
  -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST \
  -DATTNPOOL_CPU_ISAS="$RUN_ISA" \
  -DATTNPOOL_BUILD_TESTS=ON >/dev/null
cmake --build "$BUILD_DIR" --target attnpool_cpp_tests

# Any finding fails the run: -fno-sanitize-recover=all makes every UBSan check
# fatal, and halt_on_error=1 says so at run time too (ASan stops at its first
# error anyway; the explicit setting keeps it so if someone's environment says
# otherwise). Distinct exit codes tell the two apart: 23 ASan, 24 UBSan.
#   detect_stack_use_after_return=1  also catch uses of a returned frame's stack
#                                    (off by default: it costs memory)
#   check_initialization_order=1, strict_init_order=1
#                                    catch globals read before their initialiser ran
#   strict_string_checks=1           check whole strings passed to libc, not the bytes read
# What is *not* needed, despite libtorch being uninstrumented (checked with
# torch 2.13): neither detect_leaks=0 (LeakSanitizer stays on and finds nothing)
# nor detect_odr_violation=0 (no ODR reports between libattnpool and the test
# binary), nor an LD_PRELOAD of libasan (the instrumented executable loads the
# runtime first). Extra options: ASAN_EXTRA_OPTIONS / UBSAN_EXTRA_OPTIONS.
export ASAN_OPTIONS="halt_on_error=1:exitcode=23:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:strict_string_checks=1${ASAN_EXTRA_OPTIONS:+:$ASAN_EXTRA_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=24${UBSAN_EXTRA_OPTIONS:+:$UBSAN_EXTRA_OPTIONS}"
echo "== attnpool_cpp_tests under ASan+UBSan (ASAN_OPTIONS=$ASAN_OPTIONS)"
"$BUILD_DIR/attnpool_cpp_tests" "$@"
echo "== no sanitizer findings"
