"""A reusable sparse weight delta: a 1-D fp32 ``values`` vector on a sorted flat index set into ``W.view(-1)``.

Used by LIFT (arXiv 2506.00772) and meant for DSEE's sparse part and SaRA. The delta is applied next to the base
layer (``y = base_layer(x) + x @ D^T`` with ``D = scatter(indices, values)``), never by writing into the base
weight, so DeepSpeed ZeRO-3's hooks still gather a partitioned base weight and a quantized (bitsandbytes 4-bit) base
keeps working. The dense ``D`` (and, in backward, the dense ``g^T x``) exist only transiently inside
[`SparseDeltaLinear`]: nothing of size ``m x n`` is kept for backward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn


def index_dtype(numel: int) -> torch.dtype:
    """Smallest index dtype for flat indices into a tensor of ``numel`` entries (int32 below 2**31)."""
    return torch.int32 if numel < 2**31 else torch.int64


def scatter_dense(
    shape: tuple[int, int],
    indices: torch.Tensor,
    values: torch.Tensor,
    extra: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Dense ``m x n`` tensor holding ``values`` at the flat ``indices`` (plus an optional second (indices, values)
    pair, added), zero elsewhere; dtype and device of ``values``."""
    dense = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    dense.index_add_(0, indices.to(values.device), values)
    if extra is not None and extra[0].numel():
        dense.index_add_(0, extra[0].to(values.device), extra[1].to(values.dtype))
    return dense.view(shape)


class SparseDeltaLinear(torch.autograd.Function):
    """``x @ D^T`` for ``D = scatter(indices, values) + scatter(frozen_indices, frozen_values)`` (shape ``m x n``).

    Forward and backward each build ``D`` transiently; only ``x`` (shared with the base layer's own saved input when
    the dtypes match), ``values`` and the index tensors are saved. Backward: ``dx = g @ D`` and
    ``dvalues = (g^T x).view(-1)[indices]``; the frozen part gets no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        frozen_indices: torch.Tensor,
        frozen_values: torch.Tensor,
        out_features: int,
        in_features: int,
    ) -> torch.Tensor:
        shape = (out_features, in_features)
        delta = scatter_dense(shape, indices, values.detach(), (frozen_indices, frozen_values))
        ctx.save_for_backward(x, values, indices, frozen_indices, frozen_values)
        ctx.shape = shape
        return x @ delta.to(x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, values, indices, frozen_indices, frozen_values = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            delta = scatter_dense(ctx.shape, indices, values.detach(), (frozen_indices, frozen_values))
            grad_x = grad @ delta.to(grad.dtype)
            del delta  # free the transient m x n before the second one (g^T x) below
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            dense = g2.t().to(values.dtype) @ x2.to(values.dtype)  # transient m x n
            grad_values = dense.view(-1)[indices.long()]
        return grad_x, grad_values, None, None, None, None, None


def sparse_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    frozen: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """``x @ D^T`` for the sparse delta ``D`` of ``shape`` (out x in); see [`SparseDeltaLinear`]."""
    if frozen is None:
        empty = indices.new_zeros(0)
        frozen = (empty, values.new_zeros(0))
    return SparseDeltaLinear.apply(x, values, indices, frozen[0], frozen[1].detach(), shape[0], shape[1])


def add_sparse_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
    """In place ``weight.view(-1)[indices] += alpha * values`` (no-op for empty indices)."""
    if indices.numel():
        weight.view(-1).index_add_(0, indices.to(weight.device), values.to(weight.device, weight.dtype), alpha=alpha)


def remap_positions(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted flat index sets ``old`` and ``new``: ``(kept, src)`` where ``kept[i]`` says whether ``new[i]`` is
    in ``old`` and ``src[i]`` is its position there (meaningful only where ``kept``)."""
    old_l, new_l = old.long(), new.long().to(old.device)
    if old_l.numel() == 0:
        return torch.zeros_like(new_l, dtype=torch.bool), torch.zeros_like(new_l)
    src = torch.searchsorted(old_l, new_l).clamp_(max=old_l.numel() - 1)
    return old_l[src] == new_l, src


@torch.no_grad()
def remap_optimizer_state(
    optimizer: torch.optim.Optimizer, param: nn.Parameter, old: torch.Tensor, new: torch.Tensor
) -> None:
    """Move a sparse ``param``'s per-entry optimizer state (``exp_avg``, ``exp_avg_sq``, ... — every state tensor
    shaped like ``param``) from index set ``old`` to ``new``: kept entries keep their moments at their new position,
    new entries start at 0. Scalar state such as ``step`` is left alone."""
    state = optimizer.state.get(param)
    if not state:
        return
    kept, src = remap_positions(old, new)
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape and value.dim() == 1:
            moved = torch.zeros_like(value)
            moved[kept.to(value.device)] = value[src[kept].to(value.device)]
            state[key] = moved


class SparseValues(nn.ParameterDict):
    """Per-adapter value vectors; *called* to use them, so that DeepSpeed ZeRO-3's module hooks gather them.

    ZeRO-3 gathers a module's own parameters around that module's forward; a plain ``ParameterDict`` is never
    called. ``values(fn, *args)`` runs ``fn(values, *args)``. State-dict keys are those of a ``ParameterDict``.
    """

    __call__ = nn.Module.__call__

    def forward(self, fn, *args: Any) -> torch.Tensor:
        return fn(self, *args)


class ResizableBufferDict(BufferDict):
    """A persistent ``BufferDict`` whose buffers take the shape of the tensors loaded into them.

    Index sets of variable length (e.g. LIFT's accumulated deltas after mask refreshes) are saved with the adapter;
    a freshly built adapter has other lengths, so loading resizes instead of failing with a size mismatch.
    """

    def __init__(self, buffers: Optional[dict[str, torch.Tensor]] = None) -> None:
        super().__init__(buffers, persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        for key, buf in list(self._buffers.items()):
            incoming = state_dict.get(prefix + key)
            if buf is not None and incoming is not None and incoming.shape != buf.shape:
                self._buffers[key] = torch.empty(incoming.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)
