"""Checks on the datasets handed to hfx's trainers, made before TRL's own setup (which fails unclearly on them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _named(train_dataset: Any, eval_dataset: Any) -> list[tuple[str, Any]]:
    """``(argument name, dataset)`` pairs for the train dataset and each eval dataset (a dict of them, too)."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, Mapping):
        named += [(f"eval_dataset[{key!r}]", ds) for key, ds in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    return [(name, ds) for name, ds in named if ds is not None]


def check_not_empty(train_dataset: Any = None, eval_dataset: Any = None) -> None:
    """Raise a ``ValueError`` naming the dataset when a map-style train/eval dataset has no rows (TRL's trainers
    then stop with a bare ``StopIteration`` while peeking at the first example)."""
    for name, ds in _named(train_dataset, eval_dataset):
        if hasattr(ds, "__len__") and len(ds) == 0:
            raise ValueError(f"{name} is empty (0 rows): give it at least one example, or leave it None.")


def check_prompt_column(train_dataset: Any = None, eval_dataset: Any = None, trainer: str = "this trainer") -> None:
    """Raise a ``ValueError`` naming the dataset when it has no ``prompt`` column.

    TRL's online trainers (GRPO, RLOO) generate completions from ``prompt`` but only read it when the first
    generation batch is due, so a missing column surfaces as a bare ``KeyError: 'prompt'`` deep in training. Datasets
    that do not expose their columns (``column_names`` is ``None``, e.g. some iterable datasets) are not checked.
    """
    for name, ds in _named(train_dataset, eval_dataset):
        columns = getattr(ds, "column_names", None)
        if columns is None or isinstance(columns, Mapping):  # a DatasetDict is not a dataset a trainer takes
            continue
        if "prompt" not in columns:
            raise ValueError(
                f"{name} has no 'prompt' column (columns: {sorted(columns)}); {trainer} generates completions from "
                "it. Rename your prompt column, e.g. `dataset.rename_column('question', 'prompt')`."
            )


def check_reward_function_columns(
    reward_funcs: Any, train_dataset: Any = None, eval_dataset: Any = None, trainer: str = "this trainer"
) -> None:
    """Raise a ``ValueError`` naming the reward function, the parameter and the dataset when a reward function
    requires a column the dataset lacks (e.g. :func:`hfx.data.correctness_reward` and ``answer``).

    TRL's online trainers pass every dataset column to the reward functions as keyword arguments, so a missing one
    surfaces as a bare ``TypeError`` inside the first reward computation, after the first generation. Reward models
    (``nn.Module``, model ids) and datasets without ``column_names`` are not checked.
    """
    from ..gvm import check_reward_columns

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for name, ds in _named(train_dataset, eval_dataset):
        columns = getattr(ds, "column_names", None)
        if columns is None or isinstance(columns, Mapping):
            continue
        why = f"{trainer} calls each reward function with the dataset's columns as keyword arguments"
        check_reward_columns(funcs, list(columns), dataset=name, why=why)
