"""``hfx.initialize``: the data-driven initialisation step of tuners such as EVA and LoRA-GA.

Those tuners need statistics from real batches (activations, gradients) before training, and before the optimizer
is built: the step changes the adapter's parameters (and their shapes, for EVA's rank redistribution), so an
optimizer made earlier would hold stale tensors. Each such tuner registers one function here; for every other
tuner ``initialize`` does nothing, so training scripts can call it unconditionally::

    model = get_peft_model(base, hfx.EvaConfig(...))
    hfx.initialize(model, train_dataloader)        # then build the optimizer / Trainer
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# config class -> fn(peft_model, batches, adapter_name, **kwargs) -> summary dict
_INITIALIZERS: dict[type, Callable[..., dict[str, Any]]] = {}


def register_initializer(config_cls: type, fn: Callable[..., dict[str, Any]]) -> None:
    """Make ``initialize`` run ``fn(peft_model, batches, adapter_name, **kwargs)`` for adapters of ``config_cls``."""
    _INITIALIZERS[config_cls] = fn


def needs_initialization(peft_model: torch.nn.Module) -> bool:
    """Whether any adapter of ``peft_model`` has a data-driven initialisation step."""
    configs = getattr(peft_model, "peft_config", {}) or {}
    return any(type(cfg) in _INITIALIZERS for cfg in configs.values())


def initialize(
    peft_model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    adapter_names: list[str] | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Run the data-driven initialisation of every adapter that has one (EVA, LoRA-GA, ...); a no-op for others.

    ``batches`` is a DataLoader or any iterable of model-input dicts (``input_ids``, ``attention_mask``, ``labels``
    ...). Call it after ``get_peft_model`` and before the optimizer is built. Returns ``{adapter: summary}``.
    """
    configs = getattr(peft_model, "peft_config", None)
    if configs is None:
        raise TypeError(f"hfx.initialize expects a PEFT model (from get_peft_model), got {type(peft_model).__name__}.")
    names = adapter_names if adapter_names is not None else list(configs)
    summaries: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in configs:
            raise ValueError(f"hfx.initialize: no adapter named {name!r}; the model has {list(configs)}.")
        fn = _INITIALIZERS.get(type(configs[name]))
        if fn is not None:
            summaries[name] = fn(peft_model, batches, name, **kwargs)
    return summaries
