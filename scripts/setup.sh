#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU) and the dev tools, then builds
# attnpool into it (editable, no build isolation). Safe to run again: it
# reuses the venv, and rebuilds only when the C++ sources or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

STAMP=.venv/.attnpool-build-stamp
SOURCES_HASH=$(find csrc setup.py -type f -print0 | sort -z | xargs -0 sha1sum | sha1sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$SOURCES_HASH" ] && .venv/bin/python -c 'import attnpool' 2>/dev/null; then
  echo "setup: attnpool is built and up to date"
  exit 0
fi
# No build isolation: build against the torch just installed (an isolated
# build would fetch a different, multi-GB torch).
echo "setup: building attnpool (3 to 8 minutes on 2 cores)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
echo "$SOURCES_HASH" >"$STAMP"
