"""examples/masked_thought.py end to end under accelerate launch (CPU config), on a tiny saved model, at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hfx.testing import save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_masked_thought_example_runs(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", hidden_size=32)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "configs", "accelerate", "cpu.yaml"),
        os.path.join(ROOT, "examples", "masked_thought.py"), "--model", model, "--max-steps", "4", "--n-train", "16",
        "--replay", "0.5", "--n-eval", "4", "--batch-size", "4", "--logging-steps", "1", "--mask-rate", "0.5",
        "--mask-scope", "think", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for line in ("mask token '<mask>'", "accuracy before", "Masked Thought: p rises", "as the model reads it:",
                 "<mask>", "logged (step:", "model saved"):  # fmt: skip
        assert line in log, line
    with open(out / "hfx_result.json") as f:
        result = json.load(f)
    assert [s[1] for s in result["schedule"]] == pytest.approx([0.0, 0.1875, 0.375, 0.5])  # 0.5·k/(4·2/3)
    assert set(result["after"]) == {"easy", "hard"}
