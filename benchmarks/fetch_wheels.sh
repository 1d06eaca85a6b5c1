#!/usr/bin/env bash
# Download the competitors' wheels here (the GPU machine has no network); the device run installs them with
#   pip install --no-index --no-deps benchmarks/wheels/*.whl
# Not committed (.gitignore): run this before a GPU benchmark, then carry benchmarks/wheels with the run.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
pip download --no-deps --only-binary=:all: -d wheels "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
ls -la wheels
