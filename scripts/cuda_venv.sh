#!/usr/bin/env bash
# Creates .venv-cuda for scripts/check_cuda_build.sh and
# scripts/test_peer_heads.sh: torch 2.14.1 (a CUDA 13.0 build, ~5.5 GB, that
# also runs on the CPU), the build tools, and the peer libraries with
# torchvision, whose PyPI wheels do not import beside torch 2.13.0. Safe to
# run again: it returns at once when the venv holds what it asks for (pip
# alone takes 20 s to find that out). make test runs it in the background
# while the Python tests run (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_TORCH=${ATTNPOOL_CUDA_TORCH:-torch==2.14.1}
BUILD_TOOLS=("$CUDA_TORCH" numpy ninja setuptools wheel)
PEERS=(torchvision==0.29.1 timm==1.0.31 open_clip_torch==3.3.0 transformers==5.24.0 pytest==9.2.0)
STAMP=.venv-cuda/.attnpool-requirements
if [ "$(cat "$STAMP" 2>/dev/null)" = "${BUILD_TOOLS[*]} ${PEERS[*]}" ]; then
  exit 0
fi
if [ ! -x .venv-cuda/bin/python ]; then
  python3 -m venv .venv-cuda
fi
pip_install() {
  .venv-cuda/bin/python -m pip install --quiet --disable-pip-version-check "$@"
}
pip_install "${BUILD_TOOLS[@]}"
pip_install "${PEERS[@]}"
echo "${BUILD_TOOLS[*]} ${PEERS[*]}" >"$STAMP"
