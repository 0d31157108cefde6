#!/usr/bin/env bash
# Compiles attnpool with its CUDA kernels (setup.py, ATTNPOOL_WITH_CUDA=1)
# against a CUDA build of torch in .venv-cuda, then checks that the result
# registers the CUDA kernels. Nothing runs on a GPU here; this catches CUDA
# compile errors on machines without one. It also compiles the standalone
# kernel benchmarks of benchmarks/*.cu.
#
# torch 2.14.1 is a CUDA 13.0 build, matching nvcc 13.0; the script stops if
# their CUDA major versions differ. Without nvcc it says so and exits 0,
# unless ATTNPOOL_REQUIRE_CUDA_BUILD=1 (set by CI), where that is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  if [ "${ATTNPOOL_REQUIRE_CUDA_BUILD:-0}" = "1" ]; then
    echo "check_cuda_build: nvcc not found, and ATTNPOOL_REQUIRE_CUDA_BUILD=1" >&2
    exit 1
  fi
  echo "check_cuda_build: SKIPPED, nvcc not found (the CUDA kernels were not compiled)"
  exit 0
fi
source scripts/cuda_home.sh

bash scripts/cuda_venv.sh

NVCC_MAJOR=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
TORCH_CUDA=$(.venv-cuda/bin/python -c 'import torch; print(torch.version.cuda or "")')
if [ "${TORCH_CUDA%%.*}" != "$NVCC_MAJOR" ]; then
  echo "check_cuda_build: torch is built for CUDA '$TORCH_CUDA' but nvcc is CUDA $NVCC_MAJOR" >&2
  exit 1
fi
TORCH_VERSION=$(.venv-cuda/bin/python -c 'import torch; print(torch.__version__)')
echo "check_cuda_build: torch $TORCH_VERSION (CUDA $TORCH_CUDA), nvcc CUDA $NVCC_MAJOR, CUDA_HOME=$CUDA_HOME"

# ATTNPOOL_CUDA_CHECK_CPU_ISAS (CI sets it to "default") limits the CPU
# instruction sets of this build only: the main build's tests cover every level,
# and here the CPU kernels serve only the peer-head tests. Three levels fewer
# take 3-5 minutes off a 2-core run.
if [ -n "${ATTNPOOL_CUDA_CHECK_CPU_ISAS:-}" ]; then
  export ATTNPOOL_CPU_ISAS=$ATTNPOOL_CUDA_CHECK_CPU_ISAS
fi
# ATTNPOOL_CUDA_CHECK_OPTIMIZE=0 (CI) compiles this build's C++ at -O0
# (setup.py's ATTNPOOL_OPTIMIZE): the device code is compiled as always, and
# the peer-head tests that run this build's CPU kernels use small tensors.
if [ -n "${ATTNPOOL_CUDA_CHECK_OPTIMIZE:-}" ]; then
  export ATTNPOOL_OPTIMIZE=$ATTNPOOL_CUDA_CHECK_OPTIMIZE
fi
ATTNPOOL_WITH_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} .venv-cuda/bin/python setup.py --quiet build_ext \
  --build-temp build/cuda/temp --build-lib build/cuda/lib

# The CUDA kernels are registered when the library loads, even without a GPU.
.venv-cuda/bin/python - <<'PY'
import glob
import importlib.util

import torch

path = glob.glob("build/cuda/lib/attnpool/_C*.so")[0]
spec = importlib.util.spec_from_file_location("attnpool._C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.with_cuda, "built without ATTNPOOL_WITH_CUDA"
for op in (
    "_folded_attention_pool_forward",
    "_folded_attention_pool_backward",
    "_folded_attention_pool_varlen_forward",
    "_folded_attention_pool_varlen_backward",
    "_fold_query_forward",
    "_fold_query_backward",
):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attnpool::{op}", "CUDA"), op
print(f"check_cuda_build: OK, {path} registers attnpool's CUDA kernels")
PY

# The standalone kernel benchmarks that scripts/gpu_check.sh runs include
# device code the extension does not (yet) launch, such as the tensor-core
# forward: compile them too, for the architecture the GPU runs have.
TORCH_INCLUDE=$(.venv-cuda/bin/python -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')
for bench in one_score_kernels tensor_core_kernels; do
  nvcc -O3 --expt-relaxed-constexpr -std=c++20 -arch=sm_90 -I"$TORCH_INCLUDE" -Icsrc \
    -o "build/cuda/$bench" "benchmarks/$bench.cu"
done
echo "check_cuda_build: OK, the kernel benchmarks compile (sm_90)"
