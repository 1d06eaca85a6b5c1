"""Shared by the example scripts: the process state on CPU-only machines, the per-process batch, option checks,
checkpoints and resuming."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable

import torch
from accelerate import PartialState


def launch_state() -> PartialState:
    """The launch's process state. Without CUDA it is asked for the CPU, so that ``torchrun --nproc_per_node N``
    gives N gloo processes: a bare ``PartialState()`` there reports one process, every rank then ran the
    main-process-only steps and the global batch was multiplied by N."""
    return PartialState(cpu=not torch.cuda.is_available())


def per_device_batch(batch_size: int, state: PartialState, flag: str = "--batch-size") -> int:
    """The per-process share of a global batch, which must split evenly (it used to be rounded down silently)."""
    n = state.num_processes
    if batch_size % n:
        raise SystemExit(
            f"{flag} {batch_size} is the global batch and must be divisible by the {n} processes; "
            f"use e.g. {flag} {n * max(1, batch_size // n)}"
        )
    return batch_size // n


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a step or example count of 0 or -1 used to be accepted and misreported)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (where 0 switches something off)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate of -1 failed in torch's optimizer after the model loaded)."""
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def model_ref(text: str) -> str:
    """argparse type for ``--model``: a saved model folder, or a hub id (``org/name``). A value written as a path
    (``/...``, ``./...``, ``~/...`` or several ``/``) must be a folder with a ``config.json``; transformers took a
    missing folder for a malformed hub id ("Repo id must be in the form ...")."""
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise argparse.ArgumentTypeError(f"{text!r} is a folder but not a saved model (no config.json in it)")
        return path
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise argparse.ArgumentTypeError(f"no such model folder: {text!r}")
    return text


def difficulty(text: str) -> str:
    """argparse type: a difficulty preset of the built-in task."""
    from hfx.data import DIFFICULTIES

    if text not in DIFFICULTIES:
        raise argparse.ArgumentTypeError(f"unknown difficulty {text!r}; choose one of {', '.join(DIFFICULTIES)}")
    return text


def refuse_unused(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    rules: dict[str, tuple[Callable[[argparse.Namespace], bool], str]],
) -> None:
    """``parser.error`` for an option set away from its default that the chosen mode ignores. ``rules`` maps an
    option's dest to (``ignored(args)``, the reason): a flag that does nothing is an error, not silently dropped."""
    for dest, (ignored, why) in rules.items():
        if getattr(args, dest) != parser.get_default(dest) and ignored(args):
            parser.error(f"--{dest.replace('_', '-')} does nothing {why}")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--save-steps`` and ``--resume-from-checkpoint``, the Trainer's checkpointing under the examples' flag style."""
    parser.add_argument(
        "--save-steps",
        type=positive_int,
        default=None,
        help="save a checkpoint (weights, optimizer, scheduler, RNG and the method's state) every N steps in "
        "--output-dir (default: no checkpoints)",
    )
    parser.add_argument(
        "--resume-from-checkpoint",
        default=None,
        metavar="PATH|last",
        help="continue a run from a checkpoint folder, or 'last' for the newest checkpoint-* in --output-dir; give "
        "the same options as the run that saved it",
    )


def run_args(args: argparse.Namespace) -> dict:
    """The TrainingArguments every example sets the same way: where it writes, its seed and precision, no reporting
    integrations, the CPU without CUDA, no activation checkpointing, and ``--save-steps`` checkpoints (or none)."""
    from hfx.compat import activation_checkpointing

    saving = (
        {"save_strategy": "no"}
        if args.save_steps is None
        else {"save_strategy": "steps", "save_steps": args.save_steps}
    )
    return dict(
        output_dir=args.output_dir,
        seed=args.seed,
        bf16=args.bf16,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        **activation_checkpointing(False),
        **saving,
    )


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint folder ``--resume-from-checkpoint`` names, checked before any model is loaded."""
    from transformers.trainer_utils import get_last_checkpoint

    wanted = args.resume_from_checkpoint
    if wanted is None:
        return None
    if wanted == "last":
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise SystemExit(
                f"--resume-from-checkpoint last: no checkpoint-* folder in --output-dir {args.output_dir!r}; "
                "a run saves them with --save-steps N"
            )
        return last
    if not os.path.isfile(os.path.join(wanted, "trainer_state.json")):
        raise SystemExit(
            f"--resume-from-checkpoint {wanted!r} is not a Trainer checkpoint (no trainer_state.json there); give a "
            "checkpoint-* folder of a run saved with --save-steps, or 'last'"
        )
    return wanted


#: The ``make_config`` flags of the TRL GRPO/RLOO fields the online examples all set from their command line.
GRPO_FLAGS = {
    "num_generations": "--num-generations",
    "generation_batch_size": "--batch-size",  # TRL's: per-device batch x processes x steps_per_generation
    "learning_rate": "--learning-rate",
}


def make_config(cls: Callable, flags: dict[str, str], *args, what: str | None = None, **kwargs):
    """``cls(*args, **kwargs)``, called before the model is loaded so that a bad option fails at once; its ValueError
    names the command-line flag of each config field it mentions (``flags`` maps field -> flag)."""
    try:
        return cls(*args, **kwargs)
    except ValueError as err:
        named = [f"{flag} (sets {field})" for field, flag in flags.items() if re.search(rf"\b{field}\b", str(err))]
        hint = f"; check {', '.join(named)}" if named else ""
        raise SystemExit(f"invalid options for {what or cls.__name__}: {err}{hint}") from None
