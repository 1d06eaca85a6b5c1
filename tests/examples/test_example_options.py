"""The examples' command lines: counts must be >= 1, an option the chosen mode ignores is an error, and a global
batch must split evenly between the processes (``examples/_launch.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from _launch import per_device_batch


@pytest.mark.parametrize(
    "name", ["sft", "bvpo", "masked_thought", "gvm_raft", "constrained_grpo", "dynamic_weights_grpo"]
)
@pytest.mark.parametrize("flag", ["--max-steps", "--n-eval", "--batch-size"])
def test_counts_below_one_are_refused(name, flag, capsys, load_example):
    """``--max-steps -1`` used to print "for -1 steps" and train 3 epochs; ``0`` still took a step."""
    for value in ("0", "-1"):
        with pytest.raises(SystemExit):
            load_example(name).parse_args([flag, value])
        assert f"argument {flag}: must be an integer >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("bvpo", ["--r", "4"], "--r does nothing with --peft none"),
        ("masked_thought", ["--r", "4"], "--r does nothing with --peft none"),
        ("constrained_grpo", ["--fixed", "--type", "eq"], "--type does nothing with --fixed"),
        ("constrained_grpo", ["--fixed", "--search"], "--search does nothing with --fixed"),
        ("constrained_grpo", ["--fixed", "--lagrange-lr", "9"], "--lagrange-lr does nothing with --fixed"),
        ("constrained_grpo", ["--phase-steps", "3"], "--phase-steps does nothing without --search"),
        ("dynamic_weights_grpo", ["--weighting", "fixed", "--weight-regularization", "0.1"],
         "--weight-regularization does nothing with --weighting fixed"),
        ("dynamic_weights_grpo", ["--weighting", "hypervolume", "--weight-regularization", "0.1"],
         "--weight-regularization does nothing with --weighting hypervolume"),
        ("sft", ["--peft", "none", "--target-modules", "q_proj"], "--target-modules does not apply to --peft none"),
    ],
)  # fmt: skip
def test_options_the_mode_ignores_are_refused(name, argv, message, capsys, load_example):
    """These used to run silently without the option's effect (e.g. ``--fixed --search`` ran plain GRPO)."""
    with pytest.raises(SystemExit):
        load_example(name).parse_args(argv)
    assert message in capsys.readouterr().err


EXAMPLES = ["sft", "bvpo", "masked_thought", "gvm_raft", "constrained_grpo", "dynamic_weights_grpo"]


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning-rate", "-1"], "argument --learning-rate: must be a number > 0, got -1"),
        (["--learning-rate", "0"], "argument --learning-rate: must be a number > 0, got 0"),
        (["--difficulty", "bogus"], "argument --difficulty: unknown difficulty 'bogus'; choose one of easy, medium"),
        (["--model", "/no/such/model"], "argument --model: no such model folder: '/no/such/model'"),
    ],
)
def test_values_checked_before_the_model_loads(name, argv, message, capsys, load_example):
    """A negative learning rate, an unknown difficulty or a missing --model folder failed only after the model
    loaded (and after pre-training the tiny base), in torch's optimizer, the task generator or as a "Repo id must be
    in the form ..." error from transformers."""
    with pytest.raises(SystemExit):
        load_example(name).parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("gvm_raft", ["--max-completion-length", "0"], "--max-completion-length: must be an integer >= 1"),
        ("constrained_grpo", ["--max-completion-length", "0"], "--max-completion-length: must be an integer >= 1"),
        ("constrained_grpo", ["--search", "--phase-steps", "0"], "--phase-steps: must be an integer >= 1"),
        ("dynamic_weights_grpo", ["--eval-every", "-1"], "--eval-every: must be an integer >= 0"),
        ("sft", ["--replay", "-1"], "--replay: must be a number >= 0"),
        ("masked_thought", ["--replay", "-1"], "--replay: must be a number >= 0"),
        ("sft", ["--base-steps", "0"], "--base-steps: must be an integer >= 1"),
        # 0 was replaced by 2r (`a.lora_alpha or 2 * a.r`); PaCA / DSEE refuse it, PEFT's LoRA trained a no-op adapter
        ("sft", ["--lora-alpha", "0"], "--lora-alpha: must be a number > 0, got 0"),
        # failed in TrainingArguments as "requires non-zero --logging_steps", a flag the examples do not have
        ("sft", ["--logging-steps", "0"], "--logging-steps: must be an integer >= 1"),
        ("bvpo", ["--logging-steps", "0"], "--logging-steps: must be an integer >= 1"),
        ("masked_thought", ["--logging-steps", "0"], "--logging-steps: must be an integer >= 1"),
    ],
)  # fmt: skip
def test_out_of_range_values_are_refused(name, argv, message, capsys, load_example):
    with pytest.raises(SystemExit):
        load_example(name).parse_args(argv)
    assert message in capsys.readouterr().err


def test_model_folders_and_hub_ids(tmp_path, capsys, load_example):
    sft = load_example("sft")
    (tmp_path / "config.json").write_text("{}")
    assert sft.parse_args(["--model", str(tmp_path)]).model == str(tmp_path)
    assert sft.parse_args(["--model", "org/name"]).model == "org/name"  # a hub id goes to transformers as before
    with pytest.raises(SystemExit):
        sft.parse_args(["--model", str(tmp_path.parent)])
    assert "is a folder but not a saved model (no config.json in it)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the tiny base's recipe is not used with --model
        sft.parse_args(["--model", str(tmp_path), "--base-steps", "5"])
    assert "--base-steps does nothing with --model" in capsys.readouterr().err


def test_options_the_mode_uses_are_accepted(load_example):
    assert load_example("bvpo").parse_args(["--peft", "lora", "--r", "4"]).r == 4
    assert load_example("constrained_grpo").parse_args(["--search", "--phase-steps", "3"]).phase_steps == 3
    assert load_example("constrained_grpo").parse_args(["--fixed", "--weights", "1", "2", "3"]).weights == [1, 2, 3]
    # GVM's --uniform still sizes its rounds with --budget / --num-pilot: not refused
    assert load_example("gvm_raft").parse_args(["--uniform", "--budget", "64"]).budget == 64


def test_global_batch_must_split_evenly_between_processes():
    two = SimpleNamespace(num_processes=2)
    assert per_device_batch(32, two) == 16 and per_device_batch(7, SimpleNamespace(num_processes=1)) == 7
    with pytest.raises(
        SystemExit, match="--batch-size 9 is the global batch and must be divisible by the 2 processes"
    ):
        per_device_batch(9, two)


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@pytest.mark.parametrize(
    "name", ["sft", "bvpo", "masked_thought", "gvm_raft", "constrained_grpo", "dynamic_weights_grpo"]
)
def test_every_option_has_a_spelling_torchrun_passes_through(name, load_example, monkeypatch):
    """torchrun's parser matches abbreviations of its own options even after the script path: ``torchrun ...
    examples/sft.py --r 8`` stopped with "ambiguous option: --r could match --rdzv-backend, ...". Every option needs
    one spelling torchrun hands to the script unchanged (``--r`` has ``--rank``)."""
    import argparse

    from torch.distributed.run import get_args_parser

    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as info:
        load_example(name).parse_args([])
    monkeypatch.undo()
    torchrun = get_args_parser()
    torchrun.exit_on_error = False
    blocked = []
    for action in info.value.parser._actions:
        if not action.option_strings or action.dest == "help":
            continue

        def passes(flag: str) -> bool:
            try:
                parsed = torchrun.parse_args(["--nproc-per-node", "1", "script.py", flag, "1"])
            except (SystemExit, argparse.ArgumentError):
                return False
            return parsed.training_script_args == [flag, "1"]

        if not any(passes(flag) for flag in action.option_strings):
            blocked.append(action.option_strings)
    assert not blocked, f"options torchrun swallows or rejects: {blocked}"
