"""What autograd keeps for backward: the activation side of a method's memory claim, measured exactly."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during ``model(*inputs)`` that are not the model's own
    parameters or buffers (i.e. activations; PaCA's claim is ``T × r`` of them where LoRA keeps ``T × in``)."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in owned:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return total
