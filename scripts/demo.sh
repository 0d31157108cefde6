#!/usr/bin/env bash
# Quick start 1/2: set up, then train and compare the poolings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m attnpool.demo "$@"
