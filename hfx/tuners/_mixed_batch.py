"""Mixed-adapter batches (``model(x, adapter_names=[...])``) for every hfx tuner, as PEFT LoRA offers them.

Each row of a batch runs through the adapter named for it (``"__base__"``: the base model). PEFT drops the argument
silently for a tuner without support, which would give every row the active adapter; hfx tuners honour it instead.
Inference only, like LoRA: training mode, merged adapters, unknown names and a wrong length are errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

BASE = "__base__"


def _inject(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def adapter_names_of(layer: BaseTunerLayer) -> set[str]:
    """The adapters ``layer`` holds (the keys of its first adapter container)."""
    return set(getattr(layer, layer.adapter_layer_names[0]).keys())


class MixedBatchTunerMixin:
    """``BaseTuner`` mixin: routes ``adapter_names`` (and its beam-search expansion) to every hfx layer."""

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode: mixed-adapter batches are for "
                "inference; call `model.eval()` first."
            )
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"`adapter_names` must be a list of adapter names (str), got {adapter_names!r}.")
        layers = [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]
        known = set().union(*(adapter_names_of(layer) for layer in layers))
        unknown = {n for n in adapter_names if n != BASE} - known
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}; this model has "
                f"{', '.join(sorted(known)) or 'none'} (and {BASE!r} for the base model)."
            )
        names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        beams = isinstance(num_beams, int) and num_beams > 1
        if beams:  # generate() repeats each input num_beams times
            names = [n for n in names for _ in range(num_beams)]
        targets = layers + [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        handles = [
            m.register_forward_pre_hook(partial(_inject, adapter_names=names), with_kwargs=True) for m in targets
        ]
        encoder = self.model.get_encoder() if beams and hasattr(self.model, "get_encoder") else None
        if isinstance(encoder, nn.Module) and encoder is not self.model:
            # An encoder-decoder's encoder sees each input once; only the decoder sees the beams (hooks run in order).
            in_encoder = {id(m) for m in encoder.modules()}
            handles += [
                m.register_forward_pre_hook(partial(_inject, adapter_names=list(adapter_names)), with_kwargs=True)
                for m in targets
                if id(m) in in_encoder
            ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def pop_adapter_names(layer: BaseTunerLayer, x: torch.Tensor, kwargs: dict) -> Optional[list[str]]:
    """Take ``adapter_names`` out of a layer's forward kwargs and check it against the input and the layer's state."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    if len(names) != len(x):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(names)} and {len(x)} respectively."
        )
    if layer.merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )
    return list(names)


def mixed_batch_forward(layer: BaseTunerLayer, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any):
    """Run each group of rows through ``layer`` with only its adapter active (the base layer for ``"__base__"`` or an
    adapter this layer does not hold), and put the rows back in order."""
    held = adapter_names_of(layer)
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name if name in held else BASE, []).append(row)
    if len(groups) == 1:
        (name,) = groups
        return layer.base_layer(x, *args, **kwargs) if name == BASE else _only(layer, name, x, *args, **kwargs)
    out = None
    for name, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        sub = x.index_select(0, index)
        y = layer.base_layer(sub, *args, **kwargs) if name == BASE else _only(layer, name, sub, *args, **kwargs)
        if out is None:
            out = y.new_empty((len(x), *y.shape[1:]))
        out.index_copy_(0, index, y.to(out.dtype))
    return out


def _only(layer: BaseTunerLayer, adapter: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    saved = layer._active_adapter
    layer._active_adapter = [adapter]
    try:
        return layer.forward(x, *args, **kwargs)
    finally:
        layer._active_adapter = saved
