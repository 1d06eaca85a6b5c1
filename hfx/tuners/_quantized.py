"""Keeping a quantized base exactly through merge → unmerge (re-quantizing is lossy), for Bone/BAT and PaCA."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer


def quantized_state(layer: BaseTunerLayer) -> dict[str, Any]:
    """References to what ``set_base_weight`` replaces on a quantized base: the base module (HQQ builds a new one),
    its weight (bitsandbytes, torchao assign a new one) and bitsandbytes 8-bit's int8 data and scales, which move
    from the weight to ``state`` at the first forward and which re-quantizing resets (keeping only the weight left
    an 8-bit layer without its scales: a wrong base after unmerge)."""
    base = layer.get_base_layer()
    stash: dict[str, Any] = {"base_layer": layer.base_layer, "weight": getattr(base, "weight", None)}
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
    if "state" in stash:
        base.state.reset_grads()
        base.state.CB, base.state.SCB = stash["state"]
