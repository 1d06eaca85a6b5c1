"""examples/sft.py end to end, launched the way the README says (accelerate launch, CPU config), at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bone", "bat"])
def test_sft_example_runs_and_saves_a_loadable_adapter(method, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "configs", "accelerate", "cpu.yaml"),
        os.path.join(ROOT, "examples", "sft.py"),
        "--peft", method, "--r", "8", "--base-steps", "3", "--max-steps", "3", "--n-train", "64",
        "--n-eval", "8", "--batch-size", "8", "--logging-steps", "1", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HFX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # it says what it did
    for line in ("pre-training the tiny base", "trainable parameters:", "accuracy before adaptation",
                 "accuracy after adaptation", "adapter saved to"):  # fmt: skip
        assert line in log, line
    assert "'loss':" in log  # per-step loss from the Trainer's logging
    with open(out / "hfx_result.json") as f:
        result = json.load(f)
    assert result["method"] == method and 0.0 <= result["after"]["hard"] <= 1.0 and result["trainable_params"] > 0
    assert os.path.isdir(tmp_path / "cache") and any(n.startswith("base-") for n in os.listdir(tmp_path / "cache"))

    # the saved adapter loads onto the cached base in this process
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import hfx  # noqa: F401

    base_dir = next(
        os.path.join(tmp_path / "cache", n) for n in os.listdir(tmp_path / "cache") if n.startswith("base-")
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    assert type(model.peft_config["default"]).__name__ == "BoneConfig"
    assert model.peft_config["default"].init_weights == (True if method == "bone" else "bat")
    trained = [p for n, p in model.named_parameters() if "bone_block" in n]
    assert trained and any(torch.count_nonzero(p) > 0 for p in trained)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--peft", "sara", "--r", "4"], "--r"),
        (["--peft", "none", "--r", "4"], "--r"),
        (["--peft", "paca", "--dropout", "0.1"], "--dropout"),
        (["--peft", "lift", "--dropout", "0.1"], "--dropout"),
        (["--peft", "bone", "--lora-alpha", "8"], "--lora-alpha"),
    ],
)
def test_sft_example_refuses_an_option_its_method_does_not_use(argv, flag, capsys, load_example):
    with pytest.raises(SystemExit):
        load_example("sft").parse_args(argv)
    assert f"{flag} does not apply to --peft {argv[1]}" in capsys.readouterr().err


def test_sft_example_passes_each_option_to_the_methods_that_use_it(load_example):
    sft = load_example("sft")
    dsee = sft.PEFT_METHODS["dsee"](sft.parse_args(["--peft", "dsee", "--dropout", "0.1", "--r", "4"]))
    assert (dsee.r, dsee.lora_alpha, dsee.lora_dropout) == (4, 8, 0.1)
    bone = sft.PEFT_METHODS["bone"](sft.parse_args(["--peft", "bone"]))
    assert (bone.r, bone.bone_dropout) == (sft.DEFAULT_R, 0.0)
