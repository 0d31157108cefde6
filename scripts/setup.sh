#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU) and the dev tools, then builds
# attnpool into it (editable, no build isolation). Safe to run again: it
# reuses the venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# No build isolation: build against the torch just installed (an isolated
# build would fetch a different, multi-GB torch).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
