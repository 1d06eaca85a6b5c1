#!/usr/bin/env bash
# Every GPU figure issues 10 and 11 ask for, in ONE device call (a task that draws a GPU gets 15 minutes of
# device time in all, the machine's start included, and at most 10 minutes per call).
#
#   here:  PYTHON=.venv/bin/python benchmarks/fetch_wheels.sh        # competitors + this checkout's transformers/PEFT
#   run:   command "OUT=$OUT BUDGET=540 bash benchmarks/gpu_run.sh", carry ["benchmarks/wheels"], timeout_s 590
#
# Steps, most needed first, each under its own cap and all under BUDGET seconds (a step that ends early leaves its
# time to the next ones; what a step measured before its cap stays in its log and files):
#   1. the @pytest.mark.gpu tests (bf16 kernels vs the reference, a tiny-model training run with fused adapters and
#      the CCE kernel against the reference path, bf16 GEMMs in LIFT/SaRA/DSEE/BAT layers vs float64)
#   2. the CCE table at the Gemma-2 shape, flat and spread regimes, against every competitor installed
#   3. the adapter-layer table (frozen, LoRA, MiSS, PaCA and Bone unfused and fused) at the 1B shapes
#   4. CCE at the Llama-3 shape
#   5. end-to-end step time at the Llama-3.2-1B shape, bf16 (hfx bench speed)
# Writes ${OUT:-gpu_out}/device.txt (versions, each step's rc and time) and ${OUT:-gpu_out}/gpu_results.tgz (one log
# per step, cce-gemma2/, adapters/, cce-llama3/, speed-1b/), refreshed after every step: the device tool brings back
# at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
work="$(mktemp -d)"
mkdir -p "$out"
end=$(($(date +%s) + ${BUDGET:-540}))
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site benchmarks/wheels/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD"  # the carried wheels first, then hfx from this tree (nothing to install)
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)"
    git log -1 --format='commit %H %cs' 2>/dev/null
} > "$work/device.txt" 2>&1

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds and never past the budget
step() {
    local name=$1 cap=$2 left
    shift 2
    left=$((end - $(date +%s) - 5))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -le 10 ]; then
        echo "$name: not run (budget spent)" >> "$work/device.txt"
        return
    fi
    local t0=$(date +%s)
    timeout "$cap" "$@" > "$work/$name.log" 2>&1
    echo "$name: rc=$? in $(($(date +%s) - t0)) s (cap $cap s)" >> "$work/device.txt"
    cp "$work/device.txt" "$out/" && tar czf "$out/gpu_results.tgz" -C "$work" .
}

step gpu_tests 150 python3 -m pytest -q -m gpu tests/kernels tests/tuners/test_sparse.py -p no:cacheprovider
step cce-gemma2 220 python3 benchmarks/cce.py --device cuda --shape gemma2 --sets 2 --method-timeout 75 \
    --methods floor,eager,compile,torch_lce,cce,liger,hfx,hfx_filter --out "$work/cce-gemma2"
step adapters 90 python3 benchmarks/adapters.py --device cuda --sets 2 --reps 5 --out "$work/adapters"
step cce-llama3 90 python3 benchmarks/cce.py --device cuda --shape llama3 --sets 1 --method-timeout 45 \
    --methods floor,compile,cce,liger,hfx,hfx_filter --out "$work/cce-llama3"
step speed-1b 120 python3 -m hfx.bench.speed --device cuda --shape 1b --dtype bf16 --seq 1024 --bs 4 --r 32 \
    --rounds 1 --steps 3 --warmup 1 --methods lora,paca,paca_fused,bone,bone_fused,lift,dsee --out "$work/speed-1b"
cat "$work/device.txt"
tail -n 4 "$work"/*.log
