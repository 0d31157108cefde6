#!/usr/bin/env bash
# The checks that need a GPU, for a machine that has one and a CUDA build of
# torch already installed (no network needed): times the one-score kernels
# alone (benchmarks/one_score_kernels.cu) and the tensor-core kernels
# (benchmarks/tensor_core_kernels.cu), builds attnpool in place with its
# CUDA kernels, runs every test that has a CUDA case (twice: the second time
# with the tensor-core kernels opted in, followed by the benchmark's points
# they take), then the GPU benchmark: every point without torch.compile,
# then COMPILE_POINTS with it (compiling every point takes minutes). Logs, the benchmark's JSON and plot
# go to OUTDIR, the compiled run's to OUTDIR/compiled. On an H200 machine
# (16 cores) the build took 3.3 minutes (7.5 before setup.py compiled the
# CPU instruction sets side by side; now nvcc's files take longest), the
# tests 57 s, the benchmark without compile 40 s, the compiled one 40 s.
#
#   bash scripts/gpu_check.sh [OUTDIR]      (default gpu-output)
#
# PYTHON picks the interpreter (default python3), ATTNPOOL_CUDA_ARCHS the
# compute capabilities to build for (default: the GPU's own), BENCH_ARGS
# replaces the first benchmark's arguments (attnpool.bench_gpu: points,
# rounds, --no-compile), COMPILE_POINTS the second's points (empty: no
# second run), KERNELS_OTHER another version of one_score_kernel.cuh to time
# beside the kernels alone, TEST_TIMEOUT, BENCH_TIMEOUT and KERNELS_TIMEOUT
# the time limits of the tests, of each benchmark and of each kernels-alone
# run in seconds (default 240, 300 and 120). Exits non-zero if the build, a
# test or a benchmark fails.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR=${1:-gpu-output}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
source scripts/cuda_home.sh

step() {
  echo "== $1 ($(date +%T))"
}

step "machine"
nvidia-smi -L
nvcc --version | tail -n 2
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
ARCH=$("$PYTHON" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')

# torch loads libstdc++ as a shared library; an extension linked with its
# own static copy crashes on its first error message (two copies of the C++
# locale). The H200 machine's CXX (/opt/gcc/bin/g++) links it statically,
# so take the first compiler that links it as a shared library.
links_shared_libstdcxx() {
  local dir
  dir=$(mktemp -d)
  printf '#include <string>\nstd::string f(int i) { return std::to_string(i); }\n' >"$dir/t.cpp"
  "$1" -shared -fPIC "$dir/t.cpp" -o "$dir/t.so" 2>/dev/null &&
    readelf -d "$dir/t.so" 2>/dev/null | grep -q 'libstdc++'
  local found=$?
  rm -rf "$dir"
  return $found
}
if command -v readelf >/dev/null && ! links_shared_libstdcxx "${CXX:-c++}"; then
  for pair in /usr/bin/g++:/usr/bin/gcc /usr/bin/c++:/usr/bin/cc; do
    if [ -x "${pair%%:*}" ] && links_shared_libstdcxx "${pair%%:*}"; then
      echo "CXX=${CXX:-c++} links libstdc++ statically; building with ${pair%%:*}"
      export CXX=${pair%%:*} CC=${pair#*:}
      break
    fi
  done
fi

# The one-score kernels alone (benchmarks/one_score_kernels.cu): about a
# minute (9 variants, 11 rounds), and it needs no build of attnpool. KERNELS_OTHER names a copy of
# another version of one_score_kernel.cuh to time beside them (see the file).
step "one-score kernels alone (CUDA events, L2 flushed between calls)"
TORCH_INCLUDE=$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
OTHER=()
if [ -n "${KERNELS_OTHER:-}" ]; then
  OTHER=("-DATTNPOOL_OTHER_ONE_SCORE=\"$(realpath "$KERNELS_OTHER")\"")
fi
if nvcc -O3 --expt-relaxed-constexpr -std=c++20 "-arch=sm_$ARCH" -I"$TORCH_INCLUDE" -Icsrc \
  "${OTHER[@]}" -o "$OUTDIR/one_score_kernels" benchmarks/one_score_kernels.cu >"$OUTDIR/one_score_kernels.log" 2>&1; then
  timeout "${KERNELS_TIMEOUT:-120}" "$OUTDIR/one_score_kernels" 11 2>&1 | tee "$OUTDIR/one_score_kernels.txt"
  KERNELS=${PIPESTATUS[0]}
else
  tail -n 30 "$OUTDIR/one_score_kernels.log"
  KERNELS=1
fi

# The tensor-core kernels for several scores alone
# (benchmarks/tensor_core_kernels.cu), beside forward_kernel, backward_kernel
# and a read and a copy: how far their results are from those kernels' says
# whether the hardware lays out fragments as the emulated tests assume.
step "tensor-core kernels alone (CUDA events, L2 flushed between calls)"
if nvcc -O3 --expt-relaxed-constexpr -std=c++20 "-arch=sm_$ARCH" -I"$TORCH_INCLUDE" -Icsrc \
  -o "$OUTDIR/tensor_core_kernels" benchmarks/tensor_core_kernels.cu >"$OUTDIR/tensor_core_kernels.log" 2>&1; then
  timeout "${KERNELS_TIMEOUT:-120}" "$OUTDIR/tensor_core_kernels" 11 2>&1 | tee "$OUTDIR/tensor_core_kernels.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || KERNELS=1
else
  tail -n 30 "$OUTDIR/tensor_core_kernels.log"
  KERNELS=1
fi

step "build (CUDA archs ${ATTNPOOL_CUDA_ARCHS:-$ARCH})"
if ! ATTNPOOL_WITH_CUDA=1 ATTNPOOL_CUDA_ARCHS=${ATTNPOOL_CUDA_ARCHS:-$ARCH} \
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" setup.py -q build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
  tail -n 60 "$OUTDIR/build.log"
  exit 1
fi
export PYTHONPATH="$PWD/torch_ext${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import attnpool, sys; sys.exit(0 if attnpool._C.with_cuda else "built without CUDA")'

step "tests with a CUDA case (pytest -k cuda)"
WORKERS=$(($(nproc) < 12 ? $(nproc) : 12))
XDIST=$("$PYTHON" -c 'import xdist' 2>/dev/null && echo "-n $WORKERS" || echo "")
# (-p no:benchmark: pytest-benchmark, where installed, warns once per worker.)
# shellcheck disable=SC2086 # XDIST is empty or two words
timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest -q -k cuda $XDIST -p no:benchmark -rfs \
  --junitxml "$OUTDIR/junit.xml" 2>&1 | tee "$OUTDIR/pytest.log"
TESTS=${PIPESTATUS[0]}

# The tensor-core kernels through the op, opted in
# ([Note: opting in to the tensor-core kernels]): the CUDA tests again, then
# the benchmark's bfloat16 points of several scores.
step "tests with a CUDA case, ATTNPOOL_CUDA_TENSOR_CORES=1"
# shellcheck disable=SC2086 # XDIST is empty or two words
ATTNPOOL_CUDA_TENSOR_CORES=1 timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest -q -k cuda $XDIST \
  -p no:benchmark -rfs --junitxml "$OUTDIR/junit-tensor-cores.xml" 2>&1 | tee "$OUTDIR/pytest-tensor-cores.log"
TENSOR_CORE_TESTS=${PIPESTATUS[0]}
mkdir -p "$OUTDIR/tensor-cores"
ATTNPOOL_CUDA_TENSOR_CORES=1 timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" -m attnpool.bench_gpu \
  --out "$OUTDIR/tensor-cores" --no-compile --rounds 10 --dtypes bfloat16,float32 \
  --points big-1x16,1x12,1x16,4x12,8x1,16x12,so400m-full 2>&1 | tee "$OUTDIR/tensor-cores/gpu.txt"

step "GPU benchmark (CUDA events, L2 flushed between calls)"
# shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" -m attnpool.bench_gpu --out "$OUTDIR" \
  ${BENCH_ARGS:---no-compile --rounds 10} 2>&1 | tee "$OUTDIR/gpu.txt"
BENCH=${PIPESTATUS[0]}

COMPILE_POINTS=${COMPILE_POINTS-big-1x1,bert-fold,long-fold,so400m-full}
COMPILED=0
if [ -n "$COMPILE_POINTS" ]; then
  step "GPU benchmark with torch.compile ($COMPILE_POINTS)"
  mkdir -p "$OUTDIR/compiled"
  timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" -m attnpool.bench_gpu --out "$OUTDIR/compiled" \
    --points "$COMPILE_POINTS" --rounds 5 2>&1 | tee "$OUTDIR/compiled/gpu.txt"
  COMPILED=${PIPESTATUS[0]}
fi

step "done: tests exit $TESTS ($TENSOR_CORE_TESTS with tensor cores), benchmarks exit $BENCH and $COMPILED, kernels alone $KERNELS"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ] && [ "$COMPILED" -eq 0 ] && [ "$KERNELS" -eq 0 ] &&
  [ "$TENSOR_CORE_TESTS" -eq 0 ]
