"""examples/constrained_grpo.py end to end under accelerate launch (CPU config), on a tiny saved model, at a tiny size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hfx.testing import save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_constrained_example_runs(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", hidden_size=32)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "configs", "accelerate", "cpu.yaml"),
        os.path.join(ROOT, "examples", "constrained_grpo.py"), "--model", model, "--max-steps", "2",
        "--n-train", "16", "--n-eval", "4", "--batch-size", "8", "--num-generations", "4",
        "--max-completion-length", "8", "--output-dir", str(tmp_path / "out"), "--search", "--phase-steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "base accuracy on held-out medium" in log and "accuracy after training" in log
    assert "[constrained] step   2  correctness_reward=" in log
    # per step: each reward's mean, the completion length and each multiplier, under its own name (the multipliers
    # used to be printed as a second "brevity_reward=")
    assert log.count(" brevity_reward=") >= 2 and log.count("multiplier(brevity_reward)=") >= 2
    assert log.count("multiplier(format_reward)=") >= 2 and log.count("length=") >= 2
    assert log.count("threshold search: thresholds [") == 2  # phases of one step: two vertices scored
