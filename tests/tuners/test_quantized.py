"""hfx/tuners/_quantized.py: a bitsandbytes 4-bit base survives merge -> unmerge bit for bit, also in the CPU layout
bitsandbytes >= 0.50 packs it into at an eval forward (undoing that layout to de-quantize is itself lossy)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hfx


def _q4_model() -> nn.Module:
    import bitsandbytes as bnb  # installed with the dev extra; a missing one must fail, not skip

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = dense.bias

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = q.to("cpu")  # quantizes

        def forward(self, x):
            return self.lin(x)

    return Q()


CONFIGS = {
    "bone": lambda: hfx.BoneConfig(r=8, target_modules=["lin"], init_weights=False),
    "bat": lambda: hfx.BoneConfig(r=8, target_modules=["lin"], init_weights="bat"),
    "paca": lambda: hfx.PacaConfig(r=8, target_modules=["lin"], init_weights=False),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merge_unmerge_restores_the_4bit_storage_bit_for_bit_after_an_eval_forward(method):
    """The stash used to be taken after de-quantizing had already undone bitsandbytes' CPU layout in place: the
    restored storage differed from the original by that lossy round trip (~2.3e-4 in the de-quantized weight)."""
    model = get_peft_model(_q4_model(), CONFIGS[method]()).eval()
    layer = model.base_model.model.lin
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x = torch.randn(4, 64)
    with torch.no_grad():
        with model.disable_adapter():
            base_out = model(x)  # an eval forward: bitsandbytes may pack the weight for the CPU here
        y = model(x)
        weight = layer.get_base_layer().weight
        data, state = weight.data.clone(), weight.quant_state
        packed = bool(getattr(state, "packing_format_for_cpu", False))
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        model.unmerge_adapter()
        weight = layer.get_base_layer().weight
        assert weight.quant_state is state
        assert bool(getattr(weight.quant_state, "packing_format_for_cpu", False)) == packed
        assert torch.equal(weight.data, data)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
