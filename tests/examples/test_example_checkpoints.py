"""The examples' ``--save-steps`` / ``--resume-from-checkpoint``, and their trainer options checked before any model
is loaded (a bad ``--alpha`` used to fail only after the base was pre-trained and loaded)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hfx.testing import save_tiny_model


@pytest.fixture
def no_base(tmp_path, monkeypatch):
    """An empty model cache: a run that pre-trains or loads the base leaves something in it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HFX_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize(
    "name, argv, flag",
    [
        ("bvpo", ["--alpha", "1.5"], "--alpha (sets bvpo_alpha)"),
        ("masked_thought", ["--mask-rate", "1.5"], "--mask-rate (sets mask_rate)"),
        ("masked_thought", ["--peft", "bone", "--r", "0"], "--r (sets r)"),
        ("sft", ["--peft", "bone", "--dropout", "1.5"], "--dropout (sets bone_dropout)"),
        ("sft", ["--peft", "paca", "--r", "0"], "--r (sets r)"),
        ("constrained_grpo", ["--lagrange-lr", "-1"], "--lagrange-lr (sets lagrange_lr)"),
        ("constrained_grpo", ["--num-generations", "3"], "--batch-size (sets generation_batch_size)"),
        ("dynamic_weights_grpo", ["--weights", "1", "-1", "1"], "--weights (sets reward_weights)"),
        ("gvm_raft", ["--num-generations", "5"], "--num-generations (sets num_generations)"),
    ],
)
def test_trainer_options_are_checked_before_the_base_is_loaded(name, argv, flag, no_base, tmp_path, load_example):
    with pytest.raises(SystemExit) as info:
        load_example(name).main([*argv, "--output-dir", str(tmp_path / "out")])
    assert flag in str(info.value)
    assert not no_base.exists()  # nothing was pre-trained or loaded


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resume-from-checkpoint", "last"], "no checkpoint-* folder in --output-dir"),
        (["--resume-from-checkpoint", "{tmp}"], "is not a Trainer checkpoint"),
    ],
)
def test_a_missing_checkpoint_is_refused_before_the_base_is_loaded(argv, message, no_base, tmp_path, load_example):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as info:
        load_example("sft").main([*argv, "--output-dir", str(tmp_path / "out")])
    assert message in str(info.value)
    assert not no_base.exists()


def _losses(checkpoint) -> dict[int, float]:
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}


def test_sft_resumed_from_a_checkpoint_ends_where_the_whole_run_does(tmp_path, load_example, monkeypatch):
    """Two steps, save, resume for two more: the losses and the saved adapter equal the uninterrupted run's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sft = load_example("sft")
    model = save_tiny_model(tmp_path / "tiny", hidden_size=32)
    common = ["--model", model, "--peft", "bone", "--r", "8", "--max-steps", "4", "--n-train", "64", "--n-eval", "4",
              "--batch-size", "8", "--logging-steps", "1", "--save-steps", "2"]  # fmt: skip
    whole, part = tmp_path / "whole", tmp_path / "part"
    sft.main([*common, "--output-dir", str(whole)])
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(whole))
    sft.main([*common, "--output-dir", str(part), "--resume-from-checkpoint", str(whole / "checkpoint-2")])
    assert not (part / "checkpoint-2").exists()  # it resumed at step 2; a fresh run of the same seed would match too

    expected, resumed = _losses(whole / "checkpoint-4"), _losses(part / "checkpoint-4")
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4]
    assert resumed == pytest.approx(expected, rel=1e-6)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    # 'last' finds the newest checkpoint of --output-dir
    args = sft.parse_args([*common, "--output-dir", str(whole), "--resume-from-checkpoint", "last"])
    assert sft.resume_checkpoint(args) == str(whole / "checkpoint-4")


def test_constrained_resumed_from_a_checkpoint_keeps_its_multipliers(tmp_path, load_example, monkeypatch):
    """The Lagrange multipliers and the per-step rewards after a resume equal those of the uninterrupted run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = load_example("constrained_grpo")
    model = save_tiny_model(tmp_path / "tiny", hidden_size=32)
    common = ["--model", model, "--max-steps", "4", "--n-train", "16", "--n-eval", "4", "--batch-size", "8",
              "--num-generations", "4", "--max-completion-length", "8", "--save-steps", "2"]  # fmt: skip
    whole, part = tmp_path / "whole", tmp_path / "part"
    example.main([*common, "--output-dir", str(whole)])
    example.main([*common, "--output-dir", str(part), "--resume-from-checkpoint", str(whole / "checkpoint-2")])
    assert not (part / "checkpoint-2").exists()  # it resumed at step 2

    def final(run):
        with open(run / "checkpoint-4" / "constraint_state.json") as f:
            state = json.load(f)
        with open(run / "checkpoint-4" / "trainer_state.json") as f:
            rewards = [h["rewards/brevity_reward/mean"] for h in json.load(f)["log_history"] if "loss" in h]
        return state, rewards

    (expected, expected_rewards), (resumed, resumed_rewards) = final(whole), final(part)
    assert expected["multipliers"]["steps"] == resumed["multipliers"]["steps"] == 4
    assert resumed["multipliers"]["raw"] == pytest.approx(expected["multipliers"]["raw"], abs=1e-9)
    # TRL's micro-step counter continues from the checkpoint (it used to restart at 0 with one step per generation)
    assert resumed["generation_cycle"] == expected["generation_cycle"] == {"micro_step": 4, "generate_every": 1}
    assert len(resumed_rewards) == 4 and resumed_rewards == pytest.approx(expected_rewards, abs=1e-9)
