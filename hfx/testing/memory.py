"""What autograd keeps for backward: the activation side of a method's memory claim, measured exactly."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor, distinct: bool = False) -> int:
    """Bytes of the tensors autograd saves for backward during ``model(*inputs)`` that are not the model's own
    parameters or buffers (i.e. activations; PaCA's claim is ``T × r`` of them where LoRA keeps ``T × in``).
    ``distinct=True`` counts each storage once, whole: what the saved tensors actually hold in memory when several
    ops save the same input."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key in owned or (distinct and key in seen):
            return t
        seen.add(key)
        total += t.untyped_storage().nbytes() if distinct else t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return total
