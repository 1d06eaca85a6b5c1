#!/usr/bin/env bash
# Everything issue 10 needs from a GPU session, in two calls of under 10 minutes each (run
# `benchmarks/fetch_wheels.sh` here first and carry benchmarks/wheels):
#   benchmarks/gpu_run.sh 1   # GPU tests (bf16) + the CCE table at the Gemma-2 shape, both regimes
#   benchmarks/gpu_run.sh 2   # CCE at the Llama-3 shape + the adapter-layer table + end-to-end step times (1B shape)
# Writes under ${OUT:-gpu_out}.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
unset TRITON_INTERPRET
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    pip install --quiet --no-index --no-deps benchmarks/wheels/*.whl
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/device.txt" 2>&1
part="${1:-1}"
if [ "$part" = 1 ]; then
timeout 240 python -m pytest -q -m gpu tests/kernels -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >> "$out/device.txt"
timeout 330 python benchmarks/cce.py --device cuda --shape gemma2 --out "$out/cce-gemma2" > "$out/cce-gemma2.log" 2>&1
else
timeout 200 python benchmarks/cce.py --device cuda --shape llama3 --regimes flat,spread --out "$out/cce-llama3" \
    > "$out/cce-llama3.log" 2>&1
timeout 150 python benchmarks/adapters.py --device cuda --out "$out/adapters" > "$out/adapters.log" 2>&1
timeout 200 hfx bench speed --device cuda --shape 1b --dtype bf16 --seq 1024 --bs 4 --r 32 --rounds 1 \
    --methods lora,paca,paca_fused,bone,bone_fused --out "$out/speed-1b" > "$out/speed-1b.log" 2>&1
fi
tail -n 3 "$out"/*.log
