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

# .venv-cuda (torch 2.14.1 and the peer libraries, about 3 minutes of pip,
# mostly disk) installs in the background while the checks below compute.
CUDA_VENV_LOG=build/cuda-venv.log
if command -v nvcc >/dev/null 2>&1; then
  mkdir -p build
  bash scripts/cuda_venv.sh >"$CUDA_VENV_LOG" 2>&1 &
  CUDA_VENV=$!
  # A check that fails ends the run; pip need not go on. Each command is
  # allowed to fail: under set -e a failing pkill (pip already done, no
  # children left) made the trap, and so the whole run, exit with 1.
  trap 'pkill -P "$CUDA_VENV" 2>/dev/null || true; kill "$CUDA_VENV" 2>/dev/null || true' EXIT
fi

echo "== format (clang-format, ruff)"
bash scripts/format.sh --check

echo "== Python tests"
.venv/bin/python -m pytest -q

# The GoogleTest suite runs once, built with the sanitizers: an optimised
# build of the same tests took another 4 minutes on 2 cores and checked
# nothing more (the Python tests run the optimised library).
echo "== C++ tests (GoogleTest) under AddressSanitizer + UndefinedBehaviorSanitizer"
PYTHON=.venv/bin/python bash scripts/sanitize.sh

if [ -n "${CUDA_VENV:-}" ] && ! wait "$CUDA_VENV"; then
  echo "scripts/cuda_venv.sh failed:" >&2
  cat "$CUDA_VENV_LOG" >&2
  exit 1
fi

echo "== CUDA build (compile only; see scripts/check_cuda_build.sh)"
bash scripts/check_cuda_build.sh

echo "== Peer heads: timm and open_clip, in .venv-cuda (see scripts/test_peer_heads.sh)"
bash scripts/test_peer_heads.sh
