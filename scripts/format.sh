#!/usr/bin/env bash
# Formats C++ (clang-format) and Python (ruff); with --check, only reports.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mapfile -t CPP < <(git ls-files -co --exclude-standard -- 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/*.cpp' 'tests/*.h' 'examples/*.cpp' 'benchmarks/*.cu' 'benchmarks/*.cuh' 'benchmarks/*.cpp')
if [ "${1:-}" = "--check" ]; then
  "$BIN/clang-format" --dry-run --Werror "${CPP[@]}"
  "$BIN/ruff" check .
  "$BIN/ruff" format --check .
else
  "$BIN/clang-format" -i "${CPP[@]}"
  "$BIN/ruff" check --fix .
  "$BIN/ruff" format .
fi
