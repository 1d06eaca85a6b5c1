"""Quantized bases for hfx tuners: bitsandbytes' CPU layout before de-quantizing, and keeping a quantized base exactly
through merge → unmerge (re-quantizing is lossy), for Bone/BAT and PaCA."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def restore_bnb_cpu_layout(base: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight, in place. bitsandbytes >= 0.50 rewrites a ``Linear4bit``
    weight into an AVX512-BF16 layout at its first eval-mode forward on such a CPU (``packing_format_for_cpu``);
    de-quantizing that layout (PEFT's ``get_base_weight``) gives wrong values, so a merge or BAT's forward would use
    a garbage base. This applies bitsandbytes' own inverse, as it does itself before ``.cuda()`` or ``state_dict``;
    its next eval forward packs the weight again."""
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


class QuantizedBaseMixin:
    """``get_base_weight`` that first restores bitsandbytes' standard 4-bit layout ([`restore_bnb_cpu_layout`])."""

    def get_base_weight(self) -> torch.Tensor:
        restore_bnb_cpu_layout(self.get_base_layer())
        return super().get_base_weight()

    def set_base_weight(self, weight_data: torch.Tensor) -> None:
        """Write an unquantized base weight in place where it fits: a merge under ``torch.inference_mode()`` would
        otherwise rebind the weight to an inference tensor, and the next training backward fail on it."""
        weight = getattr(self.get_base_layer(), "weight", None)
        fits = (
            getattr(self, "quantization_backend", None) is None
            and isinstance(weight, torch.Tensor)
            and (weight.shape, weight.dtype, weight.device)
            == (weight_data.shape, weight_data.dtype, weight_data.device)
            and not weight.is_inference()
        )
        if not fits:
            super().set_base_weight(weight_data)
            return
        with torch.no_grad():
            weight.data.copy_(weight_data)


def quantized_state(layer: BaseTunerLayer) -> dict[str, Any]:
    """Call before de-quantizing the base for a merge. References to what ``set_base_weight`` replaces on a quantized base: the base module (HQQ builds a new one),
    its weight (bitsandbytes, torchao assign a new one) and bitsandbytes 8-bit's int8 data and scales, which move
    from the weight to ``state`` at the first forward and which re-quantizing resets (keeping only the weight left
    an 8-bit layer without its scales: a wrong base after unmerge)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    stash: dict[str, Any] = {"base_layer": layer.base_layer, "weight": weight}
    if weight is not None and hasattr(weight, "quant_state"):
        # bitsandbytes 4-bit: its storage and quant state as they are now, possibly in the CPU layout that
        # restore_bnb_cpu_layout undoes in place, lossily; so take this before de-quantizing for the merge
        # (bitsandbytes' inverse also rewrites the QuantState's fields in place: keep their values too)
        quant_state = weight.quant_state
        fields = dict(vars(quant_state)) if hasattr(quant_state, "__dict__") else None
        stash["data"], stash["quant_state"] = weight.data, (quant_state, fields)
    state = getattr(base, "state", None)
    if state is not None and hasattr(state, "SCB") and hasattr(state, "CB"):
        stash["state"] = (state.CB, state.SCB)
    return stash


def restore_quantized_state(layer: BaseTunerLayer, stash: dict[str, Any]) -> None:
    """Put back what [`quantized_state`] recorded: the quantized base exactly as it was before the merge."""
    layer.base_layer = stash["base_layer"]
    base = layer.get_base_layer()
    if stash["weight"] is not None:
        base.weight = stash["weight"]
    if "data" in stash:
        quant_state, fields = stash["quant_state"]
        if fields is not None:
            vars(quant_state).clear()
            vars(quant_state).update(fields)
        base.weight.data, base.weight.quant_state = stash["data"], quant_state
    if "state" in stash:
        base.state.reset_grads()
        base.state.CB, base.state.SCB = stash["state"]
