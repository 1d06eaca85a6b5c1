#!/usr/bin/env bash
# Download, here, the wheels a GPU run needs (the GPU machine has no network): the competitors (Liger,
# cut_cross_entropy) and the versions of transformers and PEFT this checkout is tested with (the GPU image has its
# own, older ones). All are pure-Python wheels. benchmarks/gpu_run.sh installs them with
#   pip install --no-index --no-deps --target /tmp/site benchmarks/wheels/*.whl
# Not committed (.gitignore): run this before a GPU run, then carry benchmarks/wheels with it.
set -euo pipefail
version() { "${PYTHON:-python3}" -c "import importlib.metadata as m; print(m.version('$1'))"; }
transformers="$(version transformers)"
peft="$(version peft)"
cd "$(dirname "$0")"
mkdir -p wheels
pip download --no-deps --only-binary=:all: -d wheels "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" \
    "transformers==$transformers" "peft==$peft"
ls -la wheels
