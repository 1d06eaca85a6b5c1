"""SaRA layers (arXiv 2409.06633): a sparse trainable delta on the smallest-magnitude entries of a linear layer.

``y = base(x) + x @ D^T`` with ``D = scatter(sara_indices, sara_values) + scatter(sara_frozen_indices,
sara_frozen_values)``:

- ``sara_indices`` (sorted flat indices into ``W.view(-1)``) are the entries with ``|W0| < threshold`` (the paper's
  sparse parameter set ``P_M``, Sec. 3.1) that still train; ``sara_values`` is their fp32 delta, **zero at init**, so
  the adapted model is bit-identical to the base at init (the reference code writes ``|w|`` instead of ``w`` and
  flips the sign of small negative weights; hfx does not).
- ``sara_frozen_*`` hold, frozen, the deltas of the entries that the progressive parameter adjustment (Sec. 3.3)
  dropped because their effective weight ``|W0 + d|`` grew past the threshold.

The delta goes through [`hfx.tuners._sparse.SparseDeltaLinear`]: the dense ``m x n`` delta and the dense ``g^T x``
exist only transiently in forward/backward and no ``.grad`` of ``W`` is ever allocated (the base weight is frozen).
That is what the paper's "unstructural backpropagation" (Sec. 3.4) achieves, here with ordinary ``nn.Parameter``s
(so DDP, DeepSpeed ZeRO-3 and gradient accumulation work, unlike the reference's optimizer-side tensor swapping).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .._compat import IndexedTunerLayer
from .._mixed_batch import mixed_batch_forward, pop_adapter_names
from .._sparse import (
    Resizable,
    ResizableBufferDict,
    SparseValues,
    WeightShapes,
    entry_index,
    index_dtype,
    scatter_dense,
    sparse_delta_linear,
)
from .._targets import target_hint


# ---- selection -----------------------------------------------------------------------------------------------
def sara_select(
    weight: torch.Tensor, threshold: Optional[float] = None, ratio: Optional[float] = None, layer_name: str = "layer"
) -> tuple[torch.Tensor, float]:
    """SaRA's trainable set of ``weight``: sorted flat indices and the threshold it corresponds to.

    ``threshold``: the entries with ``|w| < threshold`` (strict; the paper's Eq. for ``P_M``). ``ratio``: the
    ``round(ratio * m * n)`` entries with the smallest ``|w|`` (stable order on ties), and as threshold the
    smallest ``|w|`` left out. Computed in fp32 (float64 if given). Raises a ``ValueError`` naming the layer, its
    shape and the fraction when the set would be empty or the whole matrix.
    """
    if (threshold is None) == (ratio is None):
        raise ValueError("sara_select: give exactly one of `threshold` and `ratio`.")
    work = weight if weight.dtype == torch.float64 else weight.float()
    mag = work.abs().reshape(-1)
    numel = mag.numel()
    shape = "x".join(str(s) for s in weight.shape)
    if threshold is not None:
        idx = torch.nonzero(mag < threshold).view(-1)
        count = idx.numel()
        if count == 0 or count == numel:
            what = "no entries" if count == 0 else "all entries"
            fix = (
                f"a `threshold` above its smallest |w| ({mag.min().item():.3g})"
                if count == 0
                else f"a `threshold` at most its largest |w| ({mag.max().item():.3g})"
            )
            raise ValueError(
                f"SaRA threshold {threshold:g} selects {what} ({count} of {numel}, {count / numel:.1%}) of {layer_name} "
                f"(shape {shape}, out x in). Set {fix}, or use `ratio` (e.g. ratio=0.1 trains the 10% smallest entries of "
                "every matrix) instead; or exclude the layer."
            )
        return idx.to(index_dtype(numel)), float(threshold)
    k = round(float(ratio) * numel)
    if k <= 0 or k >= numel:
        what = "no entries" if k <= 0 else "all entries"
        # Enough significant digits that the printed bounds are accepted themselves (ratio * numel rounds to 1 and
        # numel - 1): with 3 digits a 64x64 layer's upper bound 4095/4096 printed as "1", which selects everything.
        digits = len(str(numel)) + 1
        raise ValueError(
            f"SaRA ratio {ratio!r} selects {what} ({max(k, 0)} of {numel}, {max(k, 0) / numel:.1%}) of {layer_name} "
            f"(shape {shape}): it trains round(ratio * {numel}) entries, which must be between 1 and {numel - 1}. "
            f"Set a `ratio` from {1 / numel:.{digits}g} to {(numel - 1) / numel:.{digits}g}, or exclude the layer."
        )
    order = torch.argsort(mag, stable=True)
    implied = mag[order[k]].item()
    return order[:k].sort().values.to(index_dtype(numel)), float(implied)


# ---- layers ----------------------------------------------------------------------------------------------------
class ResizableSparseValues(Resizable, SparseValues):
    """[`SparseValues`] whose parameters take the length of the tensors loaded into them.

    The progressive adjustment shrinks a layer's trainable set; a freshly built adapter (or a Trainer resuming from
    a checkpoint) has the longer initial set, so loading resizes the parameter in place (``param.data``; the
    ``nn.Parameter`` object, and so an optimizer's reference to it, stays the same).
    """

    def resize(self, key: str, shape: torch.Size | tuple[int, ...]) -> None:
        param = self._parameters[key]
        param.data = torch.empty(shape, dtype=param.dtype, device=param.device)


class SaraThresholds(BufferDict):
    """Per-adapter threshold of one SaRA layer, saved with the adapter (state-dict key ``sara_threshold``).

    The progressive adjustment freezes the entries with ``|W0 + d| >= threshold``, and with ``ratio`` the threshold
    is implied by the weights the trainable set was selected on. A run resumed from a checkpoint keeps that set
    (``sara_indices`` is loaded), so it must keep its threshold too, not recompute one from the current config.

    The value itself is a Python float per adapter (read without a device sync); the buffer mirrors it, shape (1,),
    float64 (float32 on MPS, which has no float64) on the layer's device, whatever casts the model gets
    (``model.half()``, PEFT's move to the base dtype, which reassigns the buffer): a rounded threshold would change
    which entries freeze.

    Loading: a state dict with the key replaces the value; when it differs from the value computed from the current
    config, the pair is kept in ``mismatches`` for [`SaraModel`]'s load hook, which warns once per load. A state dict
    without it (adapters saved before hfx stored thresholds) keeps the computed value and reports no missing key.
    """

    def __init__(self) -> None:
        super().__init__(persistent=True)
        self._values: dict[str, float] = {}
        self.mismatches: dict[str, tuple[float, float]] = {}  # adapter -> (saved, computed from the config)

    @staticmethod
    def _as_buffer(value: float, device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        return torch.tensor([value], dtype=dtype, device=device)

    def set(self, adapter: str, value: float, device: Optional[torch.device] = None) -> None:
        """Set ``adapter``'s threshold (buffer on ``device``, default: where it is now, else the CPU)."""
        if device is None:
            device = self._buffers[adapter].device if adapter in self._buffers else torch.device("cpu")
        self._values[adapter] = float(value)
        self[adapter] = self._as_buffer(float(value), device)

    def value(self, adapter: str) -> float:
        """``adapter``'s threshold, exactly (a Python float)."""
        return self._values[adapter]

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        # PEFT reassigns adapter buffers to move (and cast) them: keep the device, rebuild the exact value
        if key in self._values:
            buffer = self._as_buffer(self._values[key], buffer.device)
        super().__setitem__(key, buffer)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._values.pop(key, None)
        self.mismatches.pop(key, None)

    def clear(self) -> None:
        super().clear()
        self._values.clear()
        self.mismatches.clear()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for key, buf in list(self._buffers.items()):  # follow device moves, ignore dtype casts
            if buf is not None and key in self._values:
                self._buffers[key] = self._as_buffer(self._values[key], buf.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        for key in list(self._buffers):
            incoming = state_dict.get(prefix + key)
            if incoming is None:
                continue  # saved before thresholds were stored: keep the one computed from the current config
            if incoming.numel() != 1:
                errs.append(f"{prefix}{key}: a SaRA threshold is one number, got shape {tuple(incoming.shape)}.")
                continue
            saved = float(incoming.reshape(-1)[0].item())
            computed = self._values.get(key)
            if computed is not None and saved != computed:
                self.mismatches[key] = (saved, computed)
            self.set(key, saved)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in self)


def check_sara_base(base: nn.Module, layer_name: str) -> None:
    """Raise a ``TypeError`` unless ``base`` is a plain, unquantized ``nn.Linear``."""
    backend = resolve_quantization_backend(base)
    weight = getattr(base, "weight", None)
    if backend is not None or (isinstance(weight, torch.Tensor) and not weight.is_floating_point()):
        name = getattr(backend, "backend_name", None) or str(getattr(weight, "dtype", "?"))
        raise TypeError(
            f"SaRA cannot adapt {layer_name!r}: its base layer {type(base).__module__}.{type(base).__name__} is "
            f"quantized ({name}). SaRA trains the entries with |w| below a threshold (~1e-3); on quantized weights "
            "that mostly selects entries rounded to exactly 0, and deltas that small vanish when merged back "
            "(spec section 4e). Load the base model unquantized (bf16/fp32), or use LoRA-style adapters for QLoRA."
        )
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise TypeError(
            f"SaRA cannot adapt {layer_name!r} of type {type(base).__name__}: only torch.nn.Linear and "
            "torch.nn.Conv2d are supported. " + target_hint(base, "SaRA")
        )


class SaraLayer(IndexedTunerLayer):
    """Mixin holding the per-adapter SaRA state of one adapted linear layer."""

    method_name = "SaRA"
    index_sets = (("sara_indices", "sara_values", True), ("sara_frozen_indices", "sara_frozen_values", False))
    index_shape_attr = "sara_shape"
    adapter_layer_names = ("sara_values",)
    other_param_names = (
        "sara_indices",
        "sara_frozen_indices",
        "sara_frozen_values",
        "sara_threshold",
        "sara_shape",
    )

    def __init__(self, base_layer: nn.Module, layer_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        check_sara_base(self.get_base_layer(), layer_name or "layer")
        self.sara_values = ResizableSparseValues({})
        self.sara_indices = ResizableBufferDict({})
        self.sara_frozen_indices = ResizableBufferDict({})
        self.sara_frozen_values = ResizableBufferDict({})
        self.sara_threshold = SaraThresholds()
        self.sara_shape = WeightShapes()  # what sara_indices index into, checked on load
        self._sara_merge_backup: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True
        self.layer_name = layer_name
        self.kwargs = kwargs
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        self.in_features, self.out_features = in_features, out_features
        self._check_indices_on_load()

    def index_space(self) -> int:
        return self.shape[0] * self.shape[1]  # Conv2d: out x in*k*k

    def _describe(self) -> str:
        return f"layer {self.layer_name!r} (in_features={self.in_features}, out_features={self.out_features})"

    @torch.no_grad()
    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense fp32 (or float64) copy on its device, gathered under DeepSpeed ZeRO-3."""
        weight = self.get_base_layer().weight
        with gather_params_ctx(weight, modifier_rank=None):
            work = weight.detach()
            return (work if work.dtype == torch.float64 else work.float()).clone()

    @torch.no_grad()
    def selection_base_weight(self) -> torch.Tensor:
        """:meth:`dense_base_weight` with the entries of merged adapters put back from their merge backups: ``W0``
        exactly, the weight an unmerged layer selects on."""
        weight = self.dense_base_weight()
        for adapter in reversed(self.merged_adapters):
            backup = self._sara_merge_backup.get(adapter)
            if backup is not None:
                weight[backup[0]] = backup[1].to(weight)
        return weight

    def update_layer(
        self,
        adapter_name: str,
        threshold: Optional[float] = None,
        ratio: Optional[float] = None,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create adapter ``adapter_name``: select ``|W0| < threshold`` (or the smallest ``ratio``) on the base
        weight, zero delta. Selection is deterministic, so every rank of a distributed run selects the same set."""
        idx, thr = sara_select(self.selection_base_weight(), threshold, ratio, layer_name=f"layer {self.layer_name!r}")
        self.sara_threshold.set(adapter_name, thr, device=idx.device)
        self.sara_shape.set(adapter_name, self.shape, device=idx.device)
        self.sara_indices[adapter_name] = idx
        self.sara_frozen_indices[adapter_name] = idx.new_zeros(0)
        self.sara_frozen_values[adapter_name] = torch.zeros(0, device=idx.device)
        self.sara_values[adapter_name] = nn.Parameter(torch.zeros(idx.numel(), device=idx.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        # the frozen deltas stay fp32 like the trainable values (PEFT would cast them to the base dtype)
        frozen = self.sara_frozen_values[adapter_name] if adapter_name in self.sara_frozen_values else None
        if frozen is not None and frozen.dtype in (torch.float16, torch.bfloat16) and frozen.device.type != "meta":
            self.sara_frozen_values[adapter_name] = frozen.float()

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("SaRA has no scaling factor; scale_layer is ignored.", stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        return None


class SaraLinear(nn.Module, SaraLayer):
    """SaRA on an ``nn.Linear``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        threshold: Optional[float] = None,
        ratio: Optional[float] = None,
        layer_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SaraLayer.__init__(self, base_layer, layer_name=layer_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, threshold=threshold, ratio=ratio)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _frozen(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sara_frozen_indices[adapter], self.sara_frozen_values[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``dW`` (out x in, fp32) of one adapter: its trainable and frozen sparse deltas (detached)."""
        values = self.sara_values[adapter].detach()
        return scatter_dense(self.shape, self.sara_indices[adapter], values, self._frozen(adapter))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Additive, so PEFT's ``convert_to_lora`` can approximate the sparse ``dW`` by its top singular vectors."""
        return True

    @torch.no_grad()
    def selected_base_values(self, adapter: str) -> torch.Tensor:
        """``W0`` at the still-trained entries of ``adapter`` (fp32, or float64 for a float64 base), gathered under
        DeepSpeed ZeRO-3. Refused while merged, when the base weight holds ``W0 + d`` there."""
        if self.merged:
            raise ValueError(f"{self._describe()} is merged; unmerge it before reading W0 at its SaRA entries.")
        weight = self.get_base_layer().weight
        flat = (self.dense_base_weight() if hasattr(weight, "ds_id") else weight.detach()).reshape(-1)
        work = torch.float64 if flat.dtype == torch.float64 else torch.float32
        return flat[self.sara_indices[adapter].long().to(flat.device)].to(work)

    def selected_weight_matrix(self, adapter: str) -> torch.Tensor:
        """``M * W`` (out x in): the effective weights ``W0 + d`` at the entries ``M`` still trained by ``adapter``,
        zero elsewhere; differentiable in ``sara_values``. Entries frozen by the progressive adjustment are not in
        ``M`` (the reference's current mask)."""
        values = self.sara_values[adapter]
        base = self.selected_base_values(adapter).to(values.device)
        return scatter_dense(self.shape, self.sara_indices[adapter], base.to(values.dtype) + values)

    def nuclear_norm(self, adapter: str) -> torch.Tensor:
        """``||M * W||_*`` (sum of singular values) of the selected weights: the paper's low-rank loss on the sparse
        parameter matrix (Sec. 3.2; the reference's ``nuclear_norm(param * mask)``). It acts on the weights
        ``W0 + d``, not on the delta ``d`` alone: at init (``d = 0``) it is ``||M * W0||_*``, with gradient
        ``(U V^T)[M]`` on ``sara_values``. Computed in float32 at least (torch's SVD takes no 16-bit input)."""
        matrix = self.selected_weight_matrix(adapter)
        if matrix.dtype in (torch.float16, torch.bfloat16):
            matrix = matrix.float()
        return torch.linalg.matrix_norm(matrix, ord="nuc")

    # ---- merge (replacement of the selected entries) --------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write ``W0[idx] + d`` into the selected entries (SaRA's merge replaces the selected weights); only those
        entries change. The previous values are kept so that unmerge restores ``W0`` bit for bit."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            if adapter not in self.sara_values:
                continue
            idx = torch.cat([self.sara_indices[adapter], self.sara_frozen_indices[adapter]]).long().to(weight.device)
            delta = torch.cat([self.sara_values[adapter].detach(), self.sara_frozen_values[adapter].float()])
            entries = entry_index(weight, idx)  # the weight may be non-contiguous (no flat view)
            with torch.no_grad():
                old = weight.data[entries].clone()
                work = torch.float64 if weight.dtype == torch.float64 else torch.float32
                new = (old.to(work) + delta.to(weight.device, work)).to(weight.dtype)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"Merging adapter {adapter!r} into {self._describe()} gives non-finite weights.")
                weight.data[entries] = new
            self._sara_merge_backup[adapter] = (entries, old)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo merges in reverse order, restoring the saved entries of ``W0`` exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            backup = self._sara_merge_backup.pop(adapter, None)
            if backup is not None:
                with torch.no_grad():
                    weight.data[backup[0]] = backup[1]

    # ---- forward --------------------------------------------------------------------------------------------------
    def _sara_term(self, values: SparseValues, adapter: str, x: torch.Tensor) -> torch.Tensor:
        v = values[adapter]
        return sparse_delta_linear(x, v, self.sara_indices[adapter], self.shape, self._frozen(adapter))

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
        for adapter in self.active_adapters:
            if adapter in self.sara_values:
                result = result + self.sara_values(self._sara_term, adapter, x).to(result.dtype)
        return result.to(result_dtype)

    # ---- progressive parameter adjustment --------------------------------------------------------------------------
    @torch.no_grad()
    def progressive_adjust(self, adapter: str) -> torch.Tensor:
        """SaRA's progressive parameter adjustment (Sec. 3.3) for ``adapter``: entries whose effective weight
        ``|W0 + d|`` is no longer below the layer's threshold stop training; their learned delta moves, frozen, to
        ``sara_frozen_*`` (so the layer's function is unchanged), the rest keep training. The new set is a subset of
        the old one. ``sara_values`` is shrunk in place (same ``nn.Parameter`` object). Returns the boolean mask,
        over the old trainable entries, of those kept (the caller remaps the optimizer state with it)."""
        if self.merged:
            raise ValueError(f"Cannot adjust the SaRA mask of {self._describe()} while it is merged; unmerge first.")
        weight = self.get_base_layer().weight
        if hasattr(weight, "ds_id"):
            raise ValueError(
                "SaRA's progressive adjustment is not supported under DeepSpeed ZeRO-3; set progressive_fraction=None "
                "for a fixed mask."
            )
        param = self.sara_values[adapter]
        idx = self.sara_indices[adapter]
        base = self.selected_base_values(adapter)
        effective = base + param.detach().to(base.device, base.dtype)
        keep = (effective.abs() < self.sara_threshold.value(adapter)).to(idx.device)
        if bool(keep.all()):
            return keep
        dropped_idx = torch.cat([self.sara_frozen_indices[adapter], idx[~keep]])
        dropped_val = torch.cat([self.sara_frozen_values[adapter].float(), param.detach()[~keep].float()])
        order = torch.argsort(dropped_idx.long())
        self.sara_frozen_indices[adapter] = dropped_idx[order]
        self.sara_frozen_values[adapter] = dropped_val[order]
        self.sara_indices[adapter] = idx[keep]
        param.data = param.data[keep].clone()
        if param.grad is not None:
            param.grad = param.grad[keep].clone()
        return keep

    def __repr__(self) -> str:
        return "sara." + super().__repr__()


class SaraConv2d(SaraLinear):
    """SaRA on an ``nn.Conv2d`` (the paper's UNet conv kernels): the same selection, training, merge and
    adjustment on the kernel seen as the ``out x (in/groups · kh · kw)`` matrix (its flat indices are the kernel's
    own). Forward adds ``conv2d(x, D)`` with the dense delta kernel ``D`` (built per call, like the kernel itself);
    the nuclear-norm regulariser acts on that matrix view."""

    @property
    def shape(self) -> tuple[int, int]:
        weight = self.get_base_layer().weight
        return (weight.shape[0], math.prod(weight.shape[1:]))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``dW`` (the kernel's shape, fp32) of one adapter: its trainable and frozen sparse deltas."""
        return super().get_delta_weight(adapter).view(self.get_base_layer().weight.shape)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # PEFT's convert_to_lora takes 2-D deltas

    def _sara_term(self, values: SparseValues, adapter: str, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        delta = scatter_dense(self.shape, self.sara_indices[adapter], values[adapter], self._frozen(adapter))
        return base._conv_forward(x, delta.view(base.weight.shape).to(x.dtype), None)
