"""DSEE layers (arXiv 2111.00160): ``y = base(x) + s * B A x + s * S x`` on an ``nn.Linear``.

``S`` is sparse: ``dsee_s_values`` (1-D fp32, zero at init) on ``dsee_s_indices`` (sorted flat indices into
``W.view(-1)``, persistent), applied with the sparse-delta primitive of [`hfx.tuners._sparse`], which builds only
the small block of rows and columns its few entries touch. After [`hfx.tuners.dsee.prune`] a layer also holds a
keep-mask ``M`` of its base weight (``dsee_prune_mask``, a non-persistent buffer: pruning is a property of the base
weights, saved beside the adapter by every ``save_pretrained`` of a pruned model); its update is then
``s * (B A + S) * M`` so that ``W0 * M + dW * M`` is exactly zero at every pruned entry, during retraining and after
merging.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from .._compat import IndexedTunerLayer
from .._mixed_batch import mixed_batch_forward, pop_adapter_names
from .._sparse import (
    ResizableBufferDict,
    SparseValues,
    compute_dtype,
    index_dtype,
    scatter_dense,
    sparse_delta_linear,
)
from ..lift.layer import broadcast_from_rank0, low_rank_approximation


class MaskedLowRankLinear(torch.autograd.Function):
    """``x @ ((B A) * M)^T`` for a pruned DSEE layer, without keeping anything of size ``m x n`` for backward.

    Autograd through ``F.linear(x, (B @ A) * M)`` would save the dense masked product (an fp32 copy of the layer's
    weight per adapted layer) and an fp32 copy of ``x``. Here the product is built transiently in the compute dtype
    of [`hfx.tuners._sparse.compute_dtype`], in forward and again in backward, and the caller's ``x`` is saved.
    Backward: ``dx = g (B A * M)``, ``G = (g^T x) * M``, ``dB = G A^T``, ``dA = B^T G``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        work = compute_dtype(x, a)
        out = x.to(work) @ _masked_product(a, b, mask, work).t()
        ctx.save_for_backward(x, a, b, mask)
        ctx.work = work
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, a, b, mask = ctx.saved_tensors
        work = ctx.work
        m, n = b.shape[0], a.shape[1]
        g2 = grad.reshape(-1, m).to(work)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ _masked_product(a, b, mask, work)).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw = (g2.t() @ x.reshape(-1, n).to(work)).mul_(mask.to(work))  # transient m x n
            if ctx.needs_input_grad[1]:
                grad_a = (b.to(work).t() @ dw).to(a.dtype)
            if ctx.needs_input_grad[2]:
                grad_b = (dw @ a.to(work).t()).to(b.dtype)
        return grad_x, grad_a, grad_b, None


def _masked_product(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B A) * M`` in ``dtype`` (the product of the small factors in their own precision, rounded once)."""
    prod = b.detach() @ a.detach()
    return prod.mul_(mask.to(prod.device, prod.dtype)).to(dtype)


# ---- selection of the sparse positions ---------------------------------------------------------------------------
def grebsmo(
    weight: torch.Tensor,
    rank: int,
    max_iters: int = 100,
    rank_step: int = 5,
    threshold: float = 0.5,
    inner_iters: int = 2,
    seed: int = 0,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """GreBsmo-style decomposition ``W ~ U V + S`` (Zhou & Tao 2013, as used by DSEE's Eq. 3-4).

    Greedy bilateral smoothing: ``V`` starts as one seeded Gaussian row; each outer iteration runs ``inner_iters``
    bilateral steps ``U = qr((W - S) V^T).Q``, ``V = U^T (W - S)``, ``S = hard_threshold(W - U V, tau)`` with
    ``tau = threshold * RMS(W)``, then, while the rank is below ``rank``, appends ``rank_step`` rows spanning the
    dominant row space of the residual ``E = W - U V - S`` (a seeded Gaussian sketch ``G E``; the reference appends the
    first rows of ``qr(E).R``). Stops after ``max_iters`` outer iterations, or once the rank is reached and
    ``||E||_F`` changes by less than ``tol`` (relative). Returns ``(L = U V, S, history of ||E||_F)``.
    """
    work = weight if weight.dtype == torch.float64 else weight.float()
    m, n = work.shape
    rank = max(1, min(rank, m, n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(1, n, generator=gen, dtype=work.dtype).to(work.device)
    tau = float(threshold) * float(work.pow(2).mean().sqrt())
    sparse = torch.zeros_like(work)
    low = torch.zeros_like(work)
    history: list[float] = []
    for _ in range(max_iters):
        for _ in range(inner_iters):
            target = work - sparse
            u = torch.linalg.qr(target @ v.T).Q
            v = u.T @ target
            low = u @ v
            resid = work - low
            sparse = resid * (resid.abs() >= tau)
        err = work - low - sparse
        history.append(float(err.norm()))
        if v.shape[0] < rank:
            k = min(rank_step, rank - v.shape[0])
            sketch = torch.randn(k, m, generator=gen, dtype=work.dtype).to(work.device)
            v = torch.cat([v, sketch @ err], dim=0)
        elif len(history) > 1 and abs(history[-2] - history[-1]) <= tol * max(history[-2], 1e-30):
            break
    return low, sparse, history


def _layer_seed(seed: int, layer_name: str) -> int:
    """A seed per layer, stable across processes (unlike ``hash``), so ``"random"`` picks differ between layers."""
    return (int(seed) * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**63)


def dsee_select(
    weight: torch.Tensor,
    num_sparse: int,
    method: str,
    sparse_rank: int = 8,
    seed: int = 0,
    layer_name: str = "",
    grebsmo_max_iters: int = 100,
    grebsmo_rank_step: int = 5,
    grebsmo_threshold: float = 0.5,
) -> torch.Tensor:
    """Sorted flat indices of the ``num_sparse`` sparse positions ``Omega`` of ``weight`` (exactly that many).

    Scores: ``grebsmo`` -> ``|W - U V|`` of [`grebsmo`] (its top-N equals the top-N of GreBsmo's thresholded ``|S|``
    whenever ``S`` has at least N non-zeros, and still gives exactly N otherwise, where the reference's
    ``|S| >= kthvalue`` selects every zero: spec REF-BUG); ``svd_residual`` -> ``|W - W_K|``; ``magnitude`` -> ``|W|``;
    ``random`` -> a seeded permutation. Computed in fp32 (float64 if given); ``topk`` picks exactly N even on ties.
    """
    m, n = weight.shape
    if not 0 < num_sparse <= m * n:
        raise ValueError(f"num_sparse must be in [1, {m * n}] for a {m}x{n} weight, got {num_sparse}.")
    dtype = index_dtype(m * n)
    if num_sparse == m * n:
        return torch.arange(m * n, dtype=dtype, device=weight.device)
    work = weight if weight.dtype == torch.float64 else weight.float()
    if method == "random":
        gen = torch.Generator(device="cpu").manual_seed(_layer_seed(seed, layer_name))
        idx = torch.randperm(m * n, generator=gen)[:num_sparse].to(weight.device)
        return idx.sort().values.to(dtype)
    if method == "magnitude":
        score = work.abs()
    elif method == "svd_residual":
        svd = "full" if min(m, n) <= 1024 else "lowrank"
        score = (work - low_rank_approximation(work, sparse_rank, svd=svd, niter=4)).abs()
    elif method == "grebsmo":
        low, _, _ = grebsmo(
            work, sparse_rank, grebsmo_max_iters, grebsmo_rank_step, grebsmo_threshold, seed=_layer_seed(seed, "")
        )
        score = (work - low).abs()
    else:
        raise ValueError(f"Unknown DSEE sparse_method {method!r}.")
    idx = torch.topk(score.reshape(-1), num_sparse, largest=True, sorted=False).indices
    return idx.sort().values.to(dtype)


# ---- layers ------------------------------------------------------------------------------------------------------
class DseeLayer(IndexedTunerLayer):
    """Mixin holding the per-adapter DSEE state of one adapted layer."""

    method_name = "DSEE"
    index_sets = (("dsee_s_indices", "dsee_s_values", True),)
    adapter_layer_names = ("dsee_A", "dsee_B", "dsee_s_values")
    other_param_names = ("dsee_s_indices", "dsee_r", "dsee_alpha", "dsee_scaling", "dsee_dropout", "dsee_selection")

    def __init__(self, base_layer: nn.Module, layer_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.dsee_A = nn.ModuleDict({})
        self.dsee_B = nn.ModuleDict({})
        self.dsee_s_values = SparseValues({})
        self.dsee_s_indices = ResizableBufferDict({})
        self.dsee_dropout = nn.ModuleDict({})
        self.dsee_r: dict[str, int] = {}
        self.dsee_alpha: dict[str, float] = {}
        self.dsee_scaling: dict[str, float] = {}
        self.dsee_selection: dict[str, dict[str, Any]] = {}
        self.register_buffer("dsee_prune_mask", None, persistent=False)
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True
        self.layer_name = layer_name
        self.kwargs = kwargs
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"DSEE cannot adapt {layer_name or 'layer'} of type {type(base_layer).__name__}.")
        self.in_features, self.out_features = in_features, out_features
        self._check_indices_on_load()

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        num_sparse: int,
        sparse_method: str = "grebsmo",
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        selection: Optional[dict[str, Any]] = None,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create adapter ``adapter_name``: LoRA ``A``/``B`` and ``num_sparse`` zero sparse values on ``Omega``."""
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r}.")
        total = self.out_features * self.in_features
        if not 0 < num_sparse <= total:
            raise ValueError(
                f"DSEE `num_sparse`={num_sparse} is out of range for {self._describe()}: it must be between 1 and "
                f"m * n = {total}."
            )
        selection = dict(selection or {})
        self.dsee_r[adapter_name] = r
        self.dsee_alpha[adapter_name] = lora_alpha
        self.dsee_scaling[adapter_name] = lora_alpha / r
        self.dsee_selection[adapter_name] = {"method": sparse_method, "num_sparse": num_sparse, **selection}
        self.dsee_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.dsee_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.dsee_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        with torch.no_grad():
            if init_lora_weights == "kaiming":
                nn.init.kaiming_uniform_(self.dsee_A[adapter_name].weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.dsee_A[adapter_name].weight, mean=0.0, std=0.02)
            if init_lora_weights is False:  # random B: a non-identity adapter, for tests only
                nn.init.normal_(self.dsee_B[adapter_name].weight, mean=0.0, std=0.02)
            else:
                nn.init.zeros_(self.dsee_B[adapter_name].weight)
        sync = selection.pop("sync_indices", True)
        idx = dsee_select(
            self.selection_base_weight(), num_sparse, sparse_method, layer_name=self.layer_name, **selection
        )
        if sync:
            idx = broadcast_from_rank0(idx)
        self.dsee_s_indices[adapter_name] = idx
        self.dsee_s_values[adapter_name] = nn.Parameter(torch.zeros(num_sparse, device=idx.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def scale_layer(self, scale: float) -> None:
        for adapter in self.active_adapters:
            if adapter in self.dsee_A:
                self.dsee_scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for adapter in self.active_adapters:
            if adapter not in self.dsee_A:
                continue
            if scale is None:
                self.dsee_scaling[adapter] = self.dsee_alpha[adapter] / self.dsee_r[adapter]
            else:
                self.dsee_scaling[adapter] /= scale


class DseeLinear(nn.Module, DseeLayer):
    """DSEE on an ``nn.Linear`` (or a de-quantizable quantized linear, unmerged and unpruned)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, layer_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        keys = ("r", "lora_alpha", "num_sparse", "sparse_method", "lora_dropout", "init_lora_weights", "selection")
        layer_kwargs = {key: kwargs.pop(key) for key in keys if key in kwargs}
        DseeLayer.__init__(self, base_layer, layer_name=layer_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **layer_kwargs)

    @property
    def pruned(self) -> bool:
        return self.dsee_prune_mask is not None

    def get_delta_weight(self, adapter: str, masked: bool = True) -> torch.Tensor:
        """Dense ``dW = s * (B A + S)`` (out x in, fp32 or wider) of one adapter, times the prune mask if any."""
        a = self.dsee_A[adapter].weight.detach()
        b = self.dsee_B[adapter].weight.detach()
        work = torch.promote_types(a.dtype, torch.float32)
        values = self.dsee_s_values[adapter].detach().to(work)
        sparse = scatter_dense((self.out_features, self.in_features), self.dsee_s_indices[adapter], values)
        delta = self.dsee_scaling[adapter] * (b.to(work) @ a.to(work) + sparse)
        if masked and self.pruned:
            delta = delta * self.dsee_prune_mask.to(delta.device)
        return delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Additive while unpruned (``dW = s (B A + S)``, rank <= r + nnz), so PEFT's ``convert_to_lora`` can factor it;
        a pruned model's point is its sparse merged weight, which no LoRA on the dense base reproduces (a warning says
        why, since PEFT's own error only lists the module type)."""
        if self.pruned:
            warnings.warn(
                "A pruned DSEE model cannot be converted to LoRA (peft.save_as_lora / convert_to_lora): its merged "
                "weight is sparse (pruned entries exactly zero), which no low-rank update of the dense base "
                "reproduces. Save the DSEE adapter (save_pretrained writes its masks) or merge_and_unload() for the "
                "sparse model; convert before hfx.dsee.prune if you need a LoRA.",
                UserWarning,
                stacklevel=2,
            )
            return False
        return True

    def _check_mergeable(self) -> None:
        if self.quantization_backend is not None:
            raise ValueError(
                f"Cannot merge DSEE into {self._describe()}: its base weight is quantized "
                f"({self.quantization_backend.backend_name!r}) and the small sparse deltas would be rounded away by "
                "re-quantization. Keep the adapter unmerged, or load the base model unquantized to merge."
            )

    def _apply_delta(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        weight = self.get_base_weight()
        work = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        new = weight.to(work, copy=True) + sign * self.get_delta_weight(adapter).to(work)
        if self.pruned:  # exact zeros at pruned entries (W0 * M was zeroed in place; dW * M is zero there)
            new = new * self.dsee_prune_mask.to(new.device)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"Merging adapter {adapter!r} into {self._describe()} gives non-finite weights.")
        self.set_base_weight(new.to(weight.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into the base weight: ``W <- W + s (B A + S)`` (times the prune mask if pruned)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.dsee_A:
                continue
            self._check_mergeable()
            self._apply_delta(adapter, 1.0, safe_merge=safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo merges in reverse order (subtract the same updates)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.dsee_A:
                self._apply_delta(adapter, -1.0)

    def _sparse_term(self, values: SparseValues, adapter: str, x: torch.Tensor) -> torch.Tensor:
        v = values[adapter]
        idx = self.dsee_s_indices[adapter]
        if self.pruned:
            v = v * self.dsee_prune_mask.view(-1)[idx.long()].to(v.dtype)
        return sparse_delta_linear(x, v, idx, (self.out_features, self.in_features))

    def _lora_term(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.dsee_A[adapter], self.dsee_B[adapter]
        x = self.dsee_dropout[adapter](x)
        if not self.pruned:
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
            return lora_b(lora_a(x))
        # pruned: (B A) * M, so that pruned entries stay exactly zero during retraining
        if hasattr(lora_a.weight, "ds_id"):
            raise NotImplementedError(
                f"DSEE: retraining a pruned model under DeepSpeed ZeRO-3 is not supported ({self._describe()} holds "
                "partitioned A/B, which the masked product needs whole). Retrain the pruned model with DDP or DeepSpeed "
                "ZeRO-1/2 (pruning itself is single-process)."
            )
        return MaskedLowRankLinear.apply(x, lora_a.weight, lora_b.weight, self.dsee_prune_mask)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = pop_adapter_names(self, x, kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return mixed_batch_forward(self, x, adapter_names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype  # what the base layer gives (autocast's dtype under autocast), as LoRA returns
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in self.active_adapters:
            if adapter not in self.dsee_A:
                continue
            scaling = self.dsee_scaling[adapter]
            update = self._lora_term(adapter, x) + self.dsee_s_values(self._sparse_term, adapter, x)
            result = result + (scaling * update).to(result.dtype)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "dsee." + super().__repr__()
