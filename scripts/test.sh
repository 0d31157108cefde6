#!/usr/bin/env bash
# Quick start 2/2: set up, then run every check: formatting, the Python tests
# and the C++ (GoogleTest) tests. Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
if ! dpkg -s libgtest-dev >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libgtest-dev
fi

echo "== format (clang-format, ruff)"
bash scripts/format.sh --check

echo "== Python tests"
.venv/bin/python -m pytest -q

echo "== C++ tests"
TORCH_CMAKE=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" -DATTNPOOL_BUILD_TESTS=ON >/dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

echo "== C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer"
PYTHON=.venv/bin/python bash scripts/sanitize.sh

echo "== CUDA build (compile only; see scripts/check_cuda_build.sh)"
bash scripts/check_cuda_build.sh

echo "== Peer heads: timm and open_clip, in .venv-cuda (see scripts/test_peer_heads.sh)"
bash scripts/test_peer_heads.sh
