#!/usr/bin/env bash
# Runs tests/test_peer_heads.py against timm and open_clip, which need
# torchvision, and transformers: PyPI's torchvision does not import beside
# torch 2.13.0, so this runs in .venv-cuda (torch 2.14.1 with torchvision
# 0.29.1, a CUDA build that runs on the CPU), with the attnpool that
# scripts/check_cuda_build.sh built there. Run it after that script.
set -euo pipefail
cd "$(dirname "$0")/.."

LIB=$(ls build/cuda/lib/attnpool/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$LIB" ]; then
  echo "test_peer_heads: SKIPPED, no attnpool built in build/cuda (scripts/check_cuda_build.sh)"
  exit 0
fi
bash scripts/cuda_venv.sh

# The package as it would be installed: its Python files and that library.
PKG=build/cuda/pkg
rm -rf "$PKG"
mkdir -p "$PKG"
cp -r torch_ext/attnpool "$PKG/attnpool"
rm -f "$PKG"/attnpool/_C*.so
cp "$LIB" "$PKG/attnpool/"
PYTHONPATH="$PKG" .venv-cuda/bin/python -m pytest -q -p no:cacheprovider tests/test_peer_heads.py
