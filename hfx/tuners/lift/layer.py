"""LIFT layers (arXiv 2506.00772): a sparse trainable delta on the "principal weights" of a linear layer.

``y = base(x) + x @ D^T`` with ``D = scatter(lift_indices, lift_values) + scatter(lift_past_indices,
lift_past_values)``. ``lift_indices`` (sorted flat indices into ``W.view(-1)``) are the ``k`` largest entries of
``|W_r|``, ``W_r`` the rank-``filter_rank`` SVD approximation of ``W``; ``lift_values`` is the trainable delta on
them (zero at init). ``lift_past_*`` hold, frozen, what earlier masks learnt on entries that a mask refresh dropped,
so that ``base + adapter`` always reproduces the trained model without touching the base weight.
"""

from __future__ import annotations

import warnings
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
    WeightShapes,
    add_sparse_,
    index_dtype,
    scatter_dense,
    sparse_delta_linear,
)


# ---- selection -----------------------------------------------------------------------------------------------
def low_rank_approximation(weight: torch.Tensor, rank: int, svd: str = "lowrank", niter: int = 4) -> torch.Tensor:
    """Rank-``rank`` SVD approximation ``U_f S_f V_f^T`` of ``weight`` (fp32 or wider), or ``weight`` itself when
    ``rank >= min(m, n)``. ``svd="lowrank"`` uses ``torch.svd_lowrank`` with a fixed seed (same result on every
    rank) and ``q = 2 * rank`` oversampling, as the paper's randomised variant does."""
    if rank >= min(weight.shape):
        return weight
    if svd == "full":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    q = min(2 * rank, min(weight.shape))
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(weight, q=q, niter=niter)
    return (u[:, :rank] * s[:rank]) @ v[:, :rank].t()


def lift_select(weight: torch.Tensor, k: int, filter_rank: int, svd: str = "lowrank", niter: int = 4) -> torch.Tensor:
    """Sorted flat indices of the ``k`` **largest** entries of ``|W_r|`` (LIFT's principal weights; the reference
    code's ``lift_sparse`` picks the smallest — spec REF-BUG 1). Computed in fp32 (or float64 if given) on the
    weight's device; all entries when ``k >= m * n``."""
    m, n = weight.shape
    dtype = index_dtype(m * n)
    if k >= m * n:
        return torch.arange(m * n, dtype=dtype, device=weight.device)
    work = weight if weight.dtype == torch.float64 else weight.float()
    score = low_rank_approximation(work, filter_rank, svd, niter).abs().reshape(-1)  # W itself at full rank
    idx = torch.topk(score, k, largest=True, sorted=False).indices
    return idx.sort().values.to(dtype)


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` from rank 0 when ``torch.distributed`` is initialised with more than one rank, else unchanged."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    work = tensor.contiguous()
    if dist.get_backend() == "nccl" and work.device.type != "cuda":
        work = work.to(torch.device("cuda", torch.cuda.current_device()))
    dist.broadcast(work, src=0)
    return work.to(tensor.device)


# ---- layers ----------------------------------------------------------------------------------------------------
class LiftLayer(IndexedTunerLayer):
    """Mixin holding the per-adapter LIFT state of one adapted layer."""

    method_name = "LIFT"
    index_sets = (("lift_indices", "lift_values", True), ("lift_past_indices", "lift_past_values", False))
    index_shape_attr = "lift_shape"
    adapter_layer_names = ("lift_values",)
    other_param_names = (
        "lift_indices",
        "lift_past_indices",
        "lift_past_values",
        "lift_k",
        "lift_selection",
        "lift_shape",
    )

    def __init__(self, base_layer: nn.Module, layer_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.lift_values = SparseValues({})
        self.lift_indices = ResizableBufferDict({})
        self.lift_past_indices = ResizableBufferDict({})
        self.lift_past_values = ResizableBufferDict({})
        self.lift_shape = WeightShapes()  # what lift_indices index into, checked on load
        self.lift_k: dict[str, int] = {}
        self.lift_selection: dict[str, dict[str, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True
        self.layer_name = layer_name
        self.kwargs = kwargs
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"LIFT cannot adapt {layer_name or 'layer'} of type {type(base_layer).__name__}.")
        self.in_features, self.out_features = in_features, out_features
        self._check_indices_on_load()

    def select(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Indices of adapter ``adapter_name`` selected on ``weight`` (broadcast from rank 0 if so configured)."""
        sel = self.lift_selection[adapter_name]
        idx = lift_select(weight, self.lift_k[adapter_name], sel["filter_rank"], sel["svd"], sel["niter"])
        if sel["sync_indices"]:
            idx = broadcast_from_rank0(idx)
        return idx

    def update_layer(
        self,
        adapter_name: str,
        k: int,
        filter_rank: int = 128,
        svd: str = "lowrank",
        niter: int = 4,
        sync_indices: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create adapter ``adapter_name``: select its ``k`` entries on the base weight, zero delta."""
        if k <= 0:
            raise ValueError(f"LIFT budget must be positive for {self._describe()}, got k={k}.")
        self.lift_k[adapter_name] = k
        self.lift_selection[adapter_name] = {
            "filter_rank": filter_rank,
            "svd": svd,
            "niter": niter,
            "sync_indices": sync_indices,
        }
        idx = self.select(adapter_name, self.selection_base_weight())
        self.lift_indices[adapter_name] = idx
        self.lift_shape.set(adapter_name, (self.out_features, self.in_features), device=idx.device)
        self.lift_past_indices[adapter_name] = idx.new_zeros(0)
        self.lift_past_values[adapter_name] = torch.zeros(0, device=idx.device)
        self.lift_values[adapter_name] = nn.Parameter(torch.zeros(k, device=idx.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        # the frozen accumulated delta stays fp32 like the trainable values (PEFT would cast it to the base dtype)
        past = self.lift_past_values[adapter_name] if adapter_name in self.lift_past_values else None
        if past is not None and past.dtype in (torch.float16, torch.bfloat16) and past.device.type != "meta":
            self.lift_past_values[adapter_name] = past.float()

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("LIFT has no scaling factor; scale_layer is ignored.", stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        return None


class LiftLinear(nn.Module, LiftLayer):
    """LIFT on an ``nn.Linear`` (or a de-quantizable quantized linear, forward only)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, k: int, layer_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        selection = {key: kwargs.pop(key) for key in ("filter_rank", "svd", "niter", "sync_indices") if key in kwargs}
        LiftLayer.__init__(self, base_layer, layer_name=layer_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, k, **selection)

    def _past(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lift_past_indices[adapter], self.lift_past_values[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``dW`` (out x in, fp32) of one adapter: its current and accumulated sparse deltas."""
        values = self.lift_values[adapter].detach()
        return scatter_dense(
            (self.out_features, self.in_features), self.lift_indices[adapter], values, self._past(adapter)
        )

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Additive, so PEFT's ``convert_to_lora`` can approximate the sparse ``dW`` by its top singular vectors."""
        return True

    def _check_mergeable(self, what: str) -> None:
        if self.quantization_backend is not None:
            raise ValueError(
                f"Cannot {what} LIFT into {self._describe()}: its base weight is quantized "
                f"({self.quantization_backend.backend_name!r}) and LIFT's small sparse deltas would be rounded away "
                "by re-quantization. Keep the adapter unmerged, or load the base model unquantized to merge."
            )

    def _apply_delta(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        weight = self.get_base_weight()
        work = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        new = weight.to(work, copy=True)
        add_sparse_(new, self.lift_indices[adapter], self.lift_values[adapter].detach(), alpha=sign)
        past_idx, past_v = self._past(adapter)
        add_sparse_(new, past_idx, past_v, alpha=sign)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"Merging adapter {adapter!r} into {self._describe()} gives non-finite weights.")
        self.set_base_weight(new.to(weight.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into the base weight: ``W.view(-1).index_add_(0, idx, v)``."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lift_values:
                continue
            self._check_mergeable("merge")
            self._apply_delta(adapter, 1.0, safe_merge=safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo merges in reverse order (subtract the same sparse deltas)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lift_values:
                self._apply_delta(adapter, -1.0)

    def _lift_term(self, values: SparseValues, adapter: str, x: torch.Tensor) -> torch.Tensor:
        v = values[adapter]
        shape = (self.out_features, self.in_features)
        return sparse_delta_linear(x, v, self.lift_indices[adapter], shape, self._past(adapter))

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
            if adapter in self.lift_values:
                result = result + self.lift_values(self._lift_term, adapter, x).to(result.dtype)
        return result.to(result_dtype)

    @torch.no_grad()
    def refresh(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-select the mask of ``adapter`` on the current effective weight ``W0 + D`` (LIFT's dynamic mask).

        The effective weight is unchanged: entries of the new mask take their current delta ``D[idx_new]`` as
        trainable values (kept entries keep their values; newly selected ones start at zero delta with respect to
        the merged weight, as in the paper), and what ``D`` holds outside the new mask moves, frozen, to
        ``lift_past_*``. The base weight is never written. Returns ``(old_indices, new_indices)``.
        """
        if self.merged:
            raise ValueError(f"Cannot refresh the LIFT mask of {self._describe()} while it is merged; unmerge first.")
        if self.quantization_backend is not None:
            raise ValueError(
                f"LIFT mask refresh is not supported on the quantized {self._describe()}; set update_interval=None "
                "for a static mask."
            )
        weight = self.get_base_layer().weight
        if hasattr(weight, "ds_id"):
            raise ValueError(
                "LIFT mask refresh is not supported under DeepSpeed ZeRO-3; set update_interval=None for a static mask."
            )
        values = self.lift_values[adapter]
        old = self.lift_indices[adapter]
        delta = self.get_delta_weight(adapter).view(-1)
        new = self.select(adapter, weight.detach().float().reshape(-1).add(delta).view(weight.shape))
        new_long = new.long()
        values.copy_(delta[new_long].to(values.dtype))
        delta[new_long] = 0
        past = torch.nonzero(delta).view(-1)
        self.lift_indices[adapter] = new.to(old.device)
        self.lift_past_indices[adapter] = past.to(old.dtype)
        self.lift_past_values[adapter] = delta[past].float()
        return old, self.lift_indices[adapter]

    def __repr__(self) -> str:
        return "lift." + super().__repr__()
