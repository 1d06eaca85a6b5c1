"""Checks on the datasets handed to hfx's trainers, made before TRL's own setup (which fails unclearly on them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_not_empty(train_dataset: Any = None, eval_dataset: Any = None) -> None:
    """Raise a ``ValueError`` naming the dataset when a map-style train/eval dataset has no rows (TRL's trainers
    then stop with a bare ``StopIteration`` while peeking at the first example)."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, Mapping):
        named += [(f"eval_dataset[{key!r}]", ds) for key, ds in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    for name, ds in named:
        if ds is not None and hasattr(ds, "__len__") and len(ds) == 0:
            raise ValueError(f"{name} is empty (0 rows): give it at least one example, or leave it None.")
