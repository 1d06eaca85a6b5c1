"""A reusable sparse weight delta: a 1-D fp32 ``values`` vector on a sorted flat index set into ``W.view(-1)``.

Used by LIFT (arXiv 2506.00772), DSEE's sparse part and SaRA. The delta is applied next to the base
layer (``y = base_layer(x) + x @ D^T`` with ``D = scatter(indices, values)``), never by writing into the base
weight, so DeepSpeed ZeRO-3's hooks still gather a partitioned base weight and a quantized (bitsandbytes 4-bit) base
keeps working. The dense ``D`` (and, in backward, the dense ``g^T x``) exist only transiently inside
[`SparseDeltaLinear`]: nothing of size ``m x n`` is kept for backward. A delta on few rows and columns (DSEE's 64
entries) is applied through the dense block of just those rows and columns.
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


# The compact path multiplies by the dense block of D's touched rows x touched columns. It is taken when nnz**2, a
# bound on that block's size known without looking at the indices (so no GPU sync to decide), is at most this
# fraction of m x n: DSEE's 64-entry residual gets a <= 64 x 64 block instead of a 4096 x 4096 D; LIFT's and SaRA's
# masks (a few % of W) keep the full-size D.
COMPACT_MAX_FRACTION = 1 / 8


def _distinct(ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct values of ``ids`` (all in ``[0, size)``), padded with 0 to ``min(len(ids), size)`` entries, and
    each id's position among them; without a sort. The padded length depends on shapes only, so nothing waits for
    the GPU (``nonzero`` would) and ``torch.compile`` keeps the layer in one graph. Padded entries hold no id: the
    block's rows / columns there are zero, and [`_Plan.put`] adds them (zeros) into position 0."""
    seen = torch.zeros(size, dtype=torch.bool, device=ids.device)
    seen[ids] = True
    distinct = torch.nonzero_static(seen, size=min(ids.numel(), size), fill_value=0).view(-1)
    return distinct, (seen.cumsum(0) - 1)[ids]


class _Plan:
    """How to multiply by ``D``: full size (``rows is None``), or on the dense block of its distinct touched rows x
    columns, with ``indices`` / ``frozen_indices`` renumbered as flat positions in that block."""

    def __init__(self, indices: torch.Tensor, frozen_indices: torch.Tensor, shape: tuple[int, int]) -> None:
        m, n = shape
        self.shape, self.indices, self.frozen_indices = shape, indices, frozen_indices
        self.rows = self.cols = None
        nnz = indices.numel() + frozen_indices.numel()
        if nnz == 0 or nnz**2 > COMPACT_MAX_FRACTION * m * n:
            return
        flat = torch.cat([indices.long(), frozen_indices.long().to(indices.device)])
        self.rows, r_pos = _distinct(flat // n, m)
        self.cols, c_pos = _distinct(flat % n, n)
        self.shape = (self.rows.numel(), self.cols.numel())
        local = r_pos * self.cols.numel() + c_pos
        self.indices, self.frozen_indices = local[: indices.numel()], local[indices.numel() :]

    def delta(self, values: torch.Tensor, frozen_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``D`` (or its block), built directly in ``dtype`` (each position holds at most one trainable and one
        frozen entry, so a 16-bit ``D`` is deterministic and within one rounding of the fp32 one)."""
        extra = (self.frozen_indices, frozen_values.to(dtype))
        return scatter_dense(self.shape, self.indices, values.detach().to(dtype), extra)

    def take(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """``t[..., rows]`` / ``t[..., cols]`` on the compact path, ``t`` itself otherwise."""
        sel = self.rows if which == "rows" else self.cols
        return t if sel is None else t.index_select(-1, sel.to(t.device))

    def put(self, part: torch.Tensor, which: str, size: int) -> torch.Tensor:
        """Inverse of [`take`]: ``part`` added into zeros of last dimension ``size``. Each real position is hit
        once; the padding of [`_distinct`] adds exact zeros into position 0, so the sum is exact in any order."""
        sel = self.rows if which == "rows" else self.cols
        if sel is None:
            return part
        return part.new_zeros(*part.shape[:-1], size).index_add_(-1, sel.to(part.device), part)


def compute_dtype(x: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    """The dtype of the layer-sized GEMMs of hfx's transient dense adapter terms (this sparse delta, DSEE's masked
    low-rank product, BAT): autocast's, else the input's if it is 16-bit, else ``values``' (fp32).

    A bf16 model with fp32 ``values`` computes in bf16 with fp32 accumulation: three layer-sized fp32 GEMMs would
    run ~15x slower than bf16 on a tensor-core GPU (H100: 67 vs 989 dense TFLOP/s). Rounding ``D`` to bf16 is a
    relative 2^-9 of the delta term, no more than the bf16 output's own rounding; ``dvalues`` come out of a bf16
    GEMM, as weight gradients do under autocast. fp32 and fp64 inputs compute in full precision.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.dtype
    return torch.promote_types(x.dtype, values.dtype)


class SparseDeltaLinear(torch.autograd.Function):
    """``x @ D^T`` for ``D = scatter(indices, values) + scatter(frozen_indices, frozen_values)`` (shape ``m x n``).

    Forward and backward each build ``D`` transiently, in the compute dtype of [`compute_dtype`] (the 16-bit dtype
    of a bf16/fp16 model or of autocast, else ``values``' dtype), and cast ``x`` to it only transiently: the saved
    ``x`` is the caller's, which the base layer saves too. When D touches few rows and columns
    (``COMPACT_MAX_FRACTION``), only the dense block ``D[rows][:, cols]`` is built, and multiplied with
    ``x[..., cols]``. Backward: ``dx = g @ D`` and ``dvalues = (g^T x).view(-1)[indices]``, on the same block and in
    the same dtype as forward (autocast is off in backward); the frozen part gets no gradient.
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
        plan = _Plan(indices, frozen_indices, (out_features, in_features))
        work = compute_dtype(x, values)
        part = plan.take(x, "cols").to(work) @ plan.delta(values, frozen_values, work).t()
        ctx.save_for_backward(x, values, frozen_values)
        ctx.plan, ctx.work = plan, work
        return plan.put(part, "rows", out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, values, frozen_values = ctx.saved_tensors
        plan: _Plan = ctx.plan
        m, n = grad.shape[-1], x.shape[-1]
        work = ctx.work
        g2 = plan.take(grad.reshape(-1, m), "rows").to(work)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            delta = plan.delta(values, frozen_values, work)
            grad_x = plan.put(g2 @ delta, "cols", n).to(x.dtype).view(x.shape)
            del delta  # free the transient D before the second one (g^T x) below
        if ctx.needs_input_grad[1]:
            x2 = plan.take(x.reshape(-1, n), "cols").to(work)
            grad_values = (g2.t() @ x2).view(-1)[plan.indices.long()].to(values.dtype)  # transient m x n (or block)
        return grad_x, grad_values, None, None, None, None, None


def sparse_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    frozen: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """``x @ D^T`` for the sparse delta ``D`` of ``shape`` (out x in), in the dtype of [`compute_dtype`]; see
    [`SparseDeltaLinear`]. Pass ``x`` uncast: it is saved for backward as given."""
    if frozen is None:
        empty = indices.new_zeros(0)
        frozen = (empty, values.new_zeros(0))
    return SparseDeltaLinear.apply(x, values, indices, frozen[0], frozen[1].detach(), shape[0], shape[1])


def add_sparse_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
    """In place ``weight.view(-1)[indices] += alpha * values`` (no-op for empty indices); any memory layout."""
    if not indices.numel():
        return
    values = values.to(weight.device, weight.dtype)
    if weight.is_contiguous():
        weight.view(-1).index_add_(0, indices.to(weight.device), values, alpha=alpha)
    else:
        weight.index_put_(entry_index(weight, indices), values if alpha == 1 else alpha * values, accumulate=True)


def entry_index(weight: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-dimension indices of flat (row-major) ``indices`` into ``weight`` (2-D, or a conv kernel): index
    ``weight`` in place in any memory layout, where ``weight.view(-1)`` needs a contiguous one (e.g. not a transposed
    checkpoint tensor)."""
    return torch.unravel_index(indices.to(weight.device).long(), weight.shape)


def remap_positions(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted flat index sets ``old`` and ``new``: ``(kept, src)`` where ``kept[i]`` says whether ``new[i]`` is
    in ``old`` and ``src[i]`` is its position there (meaningful only where ``kept``)."""
    old_l, new_l = old.long(), new.long().to(old.device)
    if old_l.numel() == 0:
        return torch.zeros_like(new_l, dtype=torch.bool), torch.zeros_like(new_l)
    src = torch.searchsorted(old_l, new_l).clamp_(max=old_l.numel() - 1)
    return old_l[src] == new_l, src


def check_remappable_optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], who: str) -> None:
    """Refuse, before anything changes, an optimizer whose per-entry state cannot be moved entry by entry: a
    quantized state (bitsandbytes' 8-bit optimizers keep uint8 codes with per-block scales) would be remapped
    without its scales, silently giving the moved entries wrong moments."""
    for param in params:
        for key, value in (optimizer.state.get(param) or {}).items():
            if torch.is_tensor(value) and value.shape == param.shape and not value.is_floating_point():
                raise ValueError(
                    f"{who}: {type(optimizer).__name__} keeps its state {key!r} quantized ({value.dtype}, with scales "
                    "per block), which cannot be moved entry by entry when the mask changes. Use a 32-bit optimizer "
                    "(e.g. optim='adamw_torch'), or a fixed mask (update_interval=None). Nothing was changed."
                )


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


class Resizable:
    """Mixin for per-adapter containers whose tensors take the shape of the tensors loaded into them: through
    ``load_state_dict`` (PEFT's loaders, Trainer resume) each is resized to the incoming one; transformers' own
    ``load_adapter`` checks shapes before loading, so :mod:`hfx.tuners._loading` resizes from the saved file first."""

    def resize(self, key: str, shape: torch.Size | tuple[int, ...]) -> None:
        """Give adapter ``key``'s tensor ``shape`` (new, uninitialised storage; same dtype and device)."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        for key in list(self.keys()):
            incoming, current = state_dict.get(prefix + key), self[key]
            if incoming is not None and current is not None and incoming.shape != current.shape:
                self.resize(key, incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)


class ResizableBufferDict(Resizable, BufferDict):
    """A persistent ``BufferDict`` whose buffers take the shape of the tensors loaded into them.

    Index sets of variable length (e.g. LIFT's accumulated deltas after mask refreshes) are saved with the adapter;
    a freshly built adapter has other lengths, so loading resizes instead of failing with a size mismatch.
    """

    def __init__(self, buffers: Optional[dict[str, torch.Tensor]] = None) -> None:
        super().__init__(buffers, persistent=True)

    def resize(self, key: str, shape: torch.Size | tuple[int, ...]) -> None:
        buf = self._buffers[key]
        self._buffers[key] = torch.empty(shape, dtype=buf.dtype, device=buf.device)


def check_index_sets(
    state_dict: dict[str, Any],
    prefix: str,
    sets: tuple[tuple[str, str, bool], ...],
    size: int,
    where: str,
    error_msgs: list[str],
    shape_attr: Optional[str] = None,
) -> None:
    """``load_state_dict`` pre-hook body: each incoming adapter's flat indices (``sets``: index key, value key,
    whether sorted and unique) have one value each and lie in ``[0, size)`` (or in the incoming ``shape_attr``'s
    ``out * in``, which :class:`WeightShapes` compares with the layer's); else a load error naming the layer.

    A damaged or edited adapter file used to load, then fail in the first forward with a bare ``IndexError`` (on a
    GPU, a device-side assert), or, for a negative index, apply its value to the last entry silently. The file's own
    pairs are checked, not the layer's: a values vector sized by another config is torch's size-mismatch error."""
    for index_attr, value_attr, ordered in sets:
        head = f"{prefix}{index_attr}."
        for key in [k for k in state_dict if k.startswith(head)]:
            adapter = key[len(head) :]
            idx, vals = state_dict[key], state_dict.get(f"{prefix}{value_attr}.{adapter}")
            if vals is None or "meta" in (idx.device.type, vals.device.type):
                continue
            shape = state_dict.get(f"{prefix}{shape_attr}.{adapter}") if shape_attr else None
            bound = int(shape.prod()) if shape is not None and shape.numel() == 2 else size
            count = int(vals.shape[-1]) if vals.dim() else 1
            problem = None
            if idx.dim() != 1 or idx.numel() != count:
                problem = f"{idx.numel()} indices for {count} values"
            elif idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
                problem = f"indices from {int(idx.min())} to {int(idx.max())}, outside [0, {bound})"
            elif ordered and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                problem = "indices not sorted and unique"
            if problem is not None:
                error_msgs.append(
                    f"{where}, adapter {adapter!r}: {key} and {value_attr}.{adapter} do not fit ({problem}); the "
                    "adapter file is damaged or was edited. Load an adapter saved by hfx for this base model."
                )


class WeightShapes(BufferDict):
    """Per-adapter ``(out_features, in_features)`` of the weight an adapter's flat indices point into, saved with it.

    Flat indices and value vectors carry no shape of their own, and their lengths follow the data (thresholds,
    refreshes), so an adapter loaded onto a base of another shape used to load without complaint and train or apply
    other entries than it was made for (or fail deep inside the first forward). Loading compares the saved shape
    with the layer's and reports a mismatch as a load error, as a size mismatch of a LoRA matrix is. An adapter saved
    before hfx stored shapes has no key: it loads unchecked, with no missing-key warning.
    """

    def __init__(self) -> None:
        super().__init__(persistent=True)
        self._shapes: dict[str, tuple[int, int]] = {}
        self.mismatched: set[str] = set()  # adapters whose last load had another shape (read by load hooks)

    def set(self, adapter: str, shape: tuple[int, int], device: Optional[torch.device] = None) -> None:
        self._shapes[adapter] = (int(shape[0]), int(shape[1]))
        self[adapter] = torch.tensor(self._shapes[adapter], dtype=torch.int64, device=device)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._shapes.pop(key, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        for key in list(self._buffers):
            incoming = state_dict.get(prefix + key)
            if incoming is None:
                continue  # saved before hfx stored shapes
            saved = tuple(int(v) for v in incoming.reshape(-1).tolist())
            expected = self._shapes.get(key)
            if expected is not None and saved != expected:
                self.mismatched.add(key)
                errs.append(
                    f"size mismatch for {prefix}{key}: the adapter was saved for a weight of shape {saved} "
                    f"(out_features, in_features), the layer here has {expected}. Load it onto the base model it was "
                    "trained on."
                )
            elif expected is not None and self._buffers[key].device.type == "meta":
                self.set(key, expected, device=incoming.device)  # built on the meta device (low_cpu_mem_usage)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in self)
