"""Pure-PyTorch ground truth of the fused adapter paths: the adapted layer as one dense effective weight.

``y = x @ (W0 + ΔW)ᵀ + b`` with ΔW built densely from the adapter's formula — independent of the tuner layers'
own (unfused) code and of the Triton kernels, so tests can hold both against it:

* PaCA: ``ΔW[:, idx] = s·P − W0[:, idx]`` (measured as ``s·(P − W0[:, idx]/s)``, exactly zero at init), zero
  elsewhere — the paper's column replacement ``W[:, idx] = s·P``;
* Bone: ``ΔW[o, i] = B[i mod r, o]`` — LoRA with a tiled identity as A (``fold_r(x) @ B``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bone_delta", "bone_linear", "paca_delta", "paca_linear"]


def paca_delta(weight: torch.Tensor, p: torch.Tensor, orig: torch.Tensor, indices: torch.Tensor, scaling: float):
    """Dense PaCA update (out × in), differentiable in ``p``."""
    cols = (p - orig.to(p.dtype) / scaling) * scaling if scaling != 1 else p - orig.to(p.dtype)
    delta = torch.zeros(weight.shape, dtype=p.dtype, device=p.device)
    return delta.index_copy(1, indices, cols)


def bone_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Dense Bone update (out × in) for a block ``B`` (r × out), differentiable in ``block``."""
    out_f, in_f = weight.shape
    r = block.shape[0]
    cols = torch.arange(in_f, device=block.device) % r
    return block.index_select(0, cols).T  # ΔW[o, i] = B[i mod r, o]


def paca_linear(x, weight, bias, p, orig, indices, scaling):
    """``x @ (W0 + ΔW_paca)ᵀ + b`` in the promoted dtype of ``x`` and ``p``."""
    dtype = torch.promote_types(x.dtype, p.dtype)
    w_eff = weight.detach().to(dtype) + paca_delta(weight, p, orig, indices, scaling).to(dtype)
    return F.linear(x.to(dtype), w_eff, None if bias is None else bias.to(dtype))


def bone_linear(x, weight, bias, block):
    """``x @ (W0 + ΔW_bone)ᵀ + b`` in the promoted dtype of ``x`` and ``block``."""
    dtype = torch.promote_types(x.dtype, block.dtype)
    w_eff = weight.detach().to(dtype) + bone_delta(weight, block).to(dtype)
    return F.linear(x.to(dtype), w_eff, None if bias is None else bias.to(dtype))
