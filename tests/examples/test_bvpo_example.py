"""examples/bvpo.py end to end under accelerate launch (CPU config), on a tiny saved model, at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hfx.testing import save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--alpha", "auto", "--peft", "lora", "--format", "conversational"]])
def test_bvpo_example_runs(extra, tmp_path):
    model = save_tiny_model(tmp_path / "tiny", hidden_size=32)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "configs", "accelerate", "cpu.yaml"),
        os.path.join(ROOT, "examples", "bvpo.py"), "--model", model, "--max-steps", "3", "--n-train", "32",
        "--n-eval", "8", "--batch-size", "8", "--logging-steps", "1", "--output-dir", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for line in (
        "training pairs",
        "empty-trace view:",
        "held-out preference pairs before",
        "BVPO: α =",
        "model saved",
    ):
        assert line in log, line
    with open(out / "hfx_result.json") as f:
        result = json.load(f)
    assert 0.0 <= result["final_alpha"] <= 1.0 and "trace/rewards/accuracies" in result["after"]
