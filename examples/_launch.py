"""Shared by the example scripts: the process state on CPU-only machines, the per-process batch, option checks."""

from __future__ import annotations

import argparse
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
