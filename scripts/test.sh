#!/usr/bin/env bash
# Builds (via setup.sh) and runs the whole test suite. GPU tests (ctest label
# "gpu") run only where nvidia-smi finds a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exclude=(-LE gpu)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then exclude=(); fi
ctest --test-dir build --output-on-failure -j"$(nproc)" "${exclude[@]}"
