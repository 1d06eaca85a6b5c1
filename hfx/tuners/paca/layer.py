"""PaCA layers: partial connection adaptation (Woo et al., ICLR 2025, arXiv 2503.01905).

PaCA trains ``r`` whole input columns of a frozen weight ``W0`` (``out x in``): the effective weight is ``W0`` with
the columns ``idx`` replaced by ``s * P``. hfx computes it without ever writing into ``W0``::

    y = base_layer(x) + x[..., idx] @ (s * P - W0[:, idx])^T        (= x @ W_eff^T + b)

* ``base_layer(x)`` is the frozen layer's own forward, so DeepSpeed ZeRO-3 gathers ``W0`` through its hooks and
  quantized layers (bitsandbytes 4-bit: QPaCA) de-quantize as usual. A frozen-weight linear keeps no activation
  for backward (it needs no ``dW``; only its weight is referenced — checked in the tests with
  ``saved_tensors_hooks``), and neither does bitsandbytes' 4-bit matmul.
* The partial term is a custom ``torch.autograd.Function`` ([`PartialConnection`]) that keeps only
  ``x[..., idx]`` (``T x r``) for backward — PaCA's memory saving over LoRA, which keeps ``x`` (``T x in``).
* ``W0[:, idx]`` is a persistent ``paca_orig`` buffer (``out x r``, small), so the adapter term needs no access to
  the (possibly partitioned or quantized) base weight, and disable / unmerge give back the base exactly — unlike
  the reference, which writes ``s * P`` into the base weight on every other training forward (stale columns after
  an eval pass or under gradient checkpointing, wrong gradients under ZeRO-3, no way back to the base model).

(In code the update is ``s * (P - P0)`` with ``P0 = W0[:, idx] / s``, the initial ``P``: the same up to one rounding,
and exactly zero at init for any ``s``.)

Several active adapters add their column updates ``s_a * P_a - W0[:, idx_a]``; merging adds the same updates to
the weight, so a merged model equals the unmerged forward. For one adapter this is exactly the paper's column
replacement ``W[:, idx] = s * P``.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from peft.utils.integrations import gather_params_ctx
from torch import nn
from torch.autograd.function import once_differentiable

from ...kernels import adapter as fused
from .._compat import IndexedTunerLayer
from .._config import is_int
from .._mixed_batch import mixed_batch_forward, pop_adapter_names
from .._quantized import quantized_state, restore_quantized_state


def paca_column_indices(in_features: int, r: int, seed: int, layer_name: str) -> torch.Tensor:
    """The ``r`` input columns PaCA trains in layer ``layer_name``: sorted, unique, in ``[0, in_features)``.

    ``randperm(in_features)[:r]`` as in the paper, but drawn from a private CPU generator seeded from ``seed`` and
    the module name (SHA-256, so stable across processes and Python's hash randomisation). The global RNG is
    neither read nor advanced, so every rank of a distributed run picks the same columns without communication,
    whatever per-rank seeding the training script does (the reference draws from the global RNG, which gives
    different columns per rank under ``set_seed(device_specific=True)`` and silently wrong DDP averages).
    """
    if not 0 < r <= in_features:
        raise ValueError(f"need 0 < r <= in_features, got r={r}, in_features={in_features}")
    digest = hashlib.sha256(f"hfx.paca:{seed}:{layer_name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(in_features, generator=gen)[:r].sort().values


def _layer_generator(seed: int, layer_name: str) -> torch.Generator:
    digest = hashlib.sha256(f"hfx.paca.init:{seed}:{layer_name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _reference_p(orig: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``P0 = W0[:, idx] / s`` in ``dtype``: the initial ``P``, and the reference the update is measured from."""
    ref = orig.to(dtype)
    return ref if scaling == 1 else ref / scaling


def _column_delta(weight: torch.Tensor, orig: torch.Tensor, scaling: float) -> torch.Tensor:
    """The column update ``s * (P - P0)`` (= ``s * P - W0[:, idx]`` up to the rounding of ``W0 / s``), out x r.

    Measured from ``P0 = W0[:, idx] / s`` (recomputed, not stored) rather than as ``s * P - W0[:, idx]``: with
    ``P`` initialised to ``P0`` the update is then exactly zero for every ``s``, so the model is bit-for-bit the base
    model at init (``s * (W0 / s)`` is not always ``W0`` in floating point when ``s`` is not a power of two).
    """
    diff = weight - _reference_p(orig, scaling, weight.dtype)
    return diff if scaling == 1 else diff * scaling


class PartialConnection(torch.autograd.Function):
    """``x[..., idx] @ (s * P - W0[:, idx])^T`` keeping only ``x[..., idx]`` for backward.

    Inputs: ``x`` (``..., in``), ``weight`` = ``P`` (``out x r``, trainable), ``orig`` = ``W0[:, idx]`` (a buffer),
    ``indices`` (``r``, int64), ``scaling`` ``s``. Gradients (with ``g`` the output gradient)::

        dx[..., idx] = g @ (s * P - W0[:, idx])      (zero elsewhere; base_layer(x) adds g @ W0)
        dP           = s * g^T @ x[..., idx]          (= s * (dense dW)[:, idx], the chain rule through s * P)

    ``W0`` gets no gradient. The delta ``s * P - W0[:, idx]`` is rebuilt in backward, not saved.
    """

    @staticmethod
    def forward(ctx, x, weight, orig, indices, scaling):
        x_idx = x.index_select(-1, indices)
        delta = _column_delta(weight, orig, scaling)
        out = F.linear(x_idx.to(delta.dtype), delta)
        ctx.save_for_backward(x_idx, weight, orig, indices)  # weight/orig are the existing parameter and buffer
        ctx.scaling = scaling
        ctx.in_features = x.shape[-1]
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_idx, weight, orig, indices = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            delta = _column_delta(weight, orig, ctx.scaling)
            grad_cols = grad.to(delta.dtype) @ delta  # (..., r)
            grad_x = grad.new_zeros((*grad.shape[:-1], ctx.in_features), dtype=ctx.x_dtype)
            grad_x.index_copy_(-1, indices, grad_cols.to(ctx.x_dtype))
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            grad_w = g2.T @ x_idx.reshape(-1, x_idx.shape[-1]).to(weight.dtype)
            if ctx.scaling != 1:
                grad_w = grad_w * ctx.scaling
        return grad_x, grad_w, None, None, None


class PacaWeights(nn.ParameterDict):
    """The per-adapter ``P``; *called* to use them, so that DeepSpeed ZeRO-3's module hooks gather them.

    ZeRO-3 gathers a module's own parameters around that module's forward (and again before its backward). A plain
    ``ParameterDict`` is never called, so its partitioned parameters would stay empty; calling this one
    (``weights(fn, *args)`` runs ``fn(weights, *args)``) gives it a forward. State-dict keys are those of a
    ``ParameterDict``.
    """

    __call__ = nn.Module.__call__  # ParameterDict disables calling; restore Module's (hooks included)

    def forward(self, fn, *args: Any) -> torch.Tensor:
        return fn(self, *args)


class PacaLayer(IndexedTunerLayer):
    """Mixin holding the per-adapter PaCA state of one adapted layer."""

    method_name = "PaCA"
    index_sets = (("paca_indices", "paca_w", True),)

    adapter_layer_names = ("paca_w",)
    other_param_names = ("paca_indices", "paca_orig", "paca_r", "paca_alpha", "paca_scaling")

    def __init__(self, base_layer: nn.Module, layer_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.paca_r: dict[str, int] = {}
        self.paca_alpha: dict[str, float] = {}
        self.paca_scaling: dict[str, float] = {}
        self.paca_w = PacaWeights({})
        self.paca_indices = BufferDict({}, persistent=True)
        self.paca_orig = BufferDict({}, persistent=True)
        # what each merge overwrote (columns; on a quantized base, what re-quantizing replaces: see
        # `hfx.tuners._quantized.quantized_state`), so that unmerge restores it exactly
        self._paca_stash: dict[str, Any] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True
        self.layer_name = layer_name
        self.kwargs = kwargs
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"PaCA cannot adapt {layer_name or 'layer'} of type {type(base_layer).__name__}.")
        self.in_features, self.out_features = in_features, out_features
        self._check_indices_on_load()

    def index_space(self) -> int:
        return self.in_features  # the indices are input columns

    def _describe(self) -> str:
        return f"layer {self.layer_name!r} (in_features={self.in_features}, out_features={self.out_features})"

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        paca_alpha: float,
        init_weights: bool = True,
        seed: int = 0,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create adapter ``adapter_name``: choose its columns, keep ``W0[:, idx]``, set ``s * P = W0[:, idx]``."""
        if not is_int(r, 1):
            raise ValueError(f"`r` must be a positive integer, got {r!r}.")
        if r > self.in_features:
            raise ValueError(
                f"`r`={r} is larger than in_features of {self._describe()}: PaCA trains r of its {self.in_features} "
                f"input columns; choose 1 <= r <= {self.in_features} (or exclude this layer)."
            )
        if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
            raise TypeError(
                f"PaCA needs the columns W0[:, idx] of the base weight, but {self._describe()} of type "
                f"{type(self.get_base_layer()).__name__} is quantized with "
                f"{self.quantization_backend.backend_name!r}, which cannot be de-quantized. PaCA supports "
                "torch.nn.Linear and bitsandbytes (4-bit: QPaCA) layers."
            )
        scaling = paca_alpha / r
        indices = paca_column_indices(self.in_features, r, seed, self.layer_name)
        base = self.get_base_layer()
        with gather_params_ctx(base.weight, modifier_rank=None):  # ZeRO-3: W0 is partitioned at init
            weight = self.get_base_weight()
            orig = weight.index_select(1, indices.to(weight.device)).detach().clone()
        # P built in float32 (float64 on a float64 base); PacaModel._cast_adapter_dtype casts it to a half-precision
        # base's dtype under autocast_adapter_dtype=False. s * P = W0[:, idx]: the base model
        p = _reference_p(orig, scaling, torch.promote_types(orig.dtype, torch.float32)).clone()
        if init_weights is False:
            # Random non-identity columns (deterministic per layer), to test merging and saving; not for training.
            noise = torch.randn(p.shape, generator=_layer_generator(seed, self.layer_name))
            p = p + 0.1 * noise.to(device=p.device, dtype=p.dtype)

        self.paca_r[adapter_name] = r
        self.paca_alpha[adapter_name] = paca_alpha
        self.paca_scaling[adapter_name] = scaling
        self.paca_indices[adapter_name] = indices.to(orig.device)
        self.paca_orig[adapter_name] = orig
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # P is created after the move, which would cast it to a half-precision base's dtype.
        self.paca_w[adapter_name] = nn.Parameter(p.to(self.paca_orig[adapter_name].device))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("PaCA has no LoRA-style scaling of its update; scale_layer is ignored.", stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        return None


class PacaLinear(nn.Module, PacaLayer):
    """PaCA on an ``nn.Linear``, or on a bitsandbytes-quantized linear layer (QPaCA)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        paca_alpha: float = 8,
        init_weights: bool = True,
        seed: int = 0,
        layer_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        PacaLayer.__init__(self, base_layer, layer_name=layer_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, init_weights=init_weights, seed=seed)

    def _partial_term(self, weights: PacaWeights, adapter: str, x: torch.Tensor) -> torch.Tensor:
        return PartialConnection.apply(
            x, weights[adapter], self.paca_orig[adapter], self.paca_indices[adapter], self.paca_scaling[adapter]
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``dW`` of one adapter (out x in): ``s * P - W0[:, idx]`` on its columns, zero elsewhere."""
        p = self.paca_w[adapter]
        delta = torch.zeros(self.out_features, self.in_features, dtype=p.dtype, device=p.device)
        cols = _column_delta(p.detach(), self.paca_orig[adapter], self.paca_scaling[adapter])
        return delta.index_copy_(1, self.paca_indices[adapter], cols)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Additive, so PEFT's ``convert_to_lora`` can factor ``dW``: it lives on r columns, so rank r is exact."""
        return True

    def _merged_columns(self, adapter: str, current: torch.Tensor) -> torch.Tensor:
        """New values of the adapter's columns: ``current + s * (P - P0)``, computed in float32 or wider.

        Merged into the weight the adapter was created on, this is the paper's column replacement ``s * P``; with
        several adapters their updates add up, as in the unmerged forward.
        """
        work = torch.promote_types(current.dtype, torch.float32)
        p = self.paca_w[adapter].detach()
        delta = _column_delta(p, self.paca_orig[adapter], self.paca_scaling[adapter]).to(work)
        return current.to(work) + delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into the base weight: ``W[:, idx] += s * P - W0[:, idx]`` (= ``s * P`` for one).

        On a bitsandbytes 4-bit base the weight is de-quantized, its columns replaced and re-quantized (with a
        warning: the merged model then differs from the unmerged one by the 4-bit rounding of the new columns and
        their blocks); unmerge puts the original 4-bit weight back, bit for bit.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.paca_w:
                continue
            base = self.get_base_layer()
            indices = self.paca_indices[adapter]
            if self.quantization_backend is not None:
                stash = quantized_state(self)  # before de-quantizing may touch the storage
                weight = self.get_base_weight()
                new_cols = self._merged_columns(adapter, weight.index_select(1, indices))
                if safe_merge and not torch.isfinite(new_cols).all():
                    raise ValueError(f"Merging adapter {adapter!r} into {self._describe()} gives non-finite weights.")
                warnings.warn(
                    f"Merging PaCA adapter {adapter!r} into the {self.quantization_backend.backend_name}-quantized "
                    f"{self._describe()} re-quantizes the weight: the merged model differs from the unmerged one "
                    "by quantization rounding.",
                    stacklevel=2,
                )
                self._paca_stash[adapter] = stash
                merged = weight.clone().index_copy_(1, indices, new_cols.to(weight.dtype))
                self.set_base_weight(merged)
            else:
                weight = base.weight.data
                old_cols = weight.index_select(1, indices)
                new_cols = self._merged_columns(adapter, old_cols)
                if safe_merge and not torch.isfinite(new_cols).all():
                    raise ValueError(f"Merging adapter {adapter!r} into {self._describe()} gives non-finite weights.")
                self._paca_stash[adapter] = old_cols
                weight.index_copy_(1, indices, new_cols.to(weight.dtype))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo merges in reverse order, restoring exactly what each merge overwrote."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.paca_w:
                continue
            base = self.get_base_layer()
            indices = self.paca_indices[adapter]
            stash = self._paca_stash.pop(adapter, None)
            if stash is None:  # no record of the merge (should not happen): subtract the update instead
                weight = self.get_base_weight()
                current = weight.index_select(1, indices)
                merged = self._merged_columns(adapter, current)
                cols = (2 * current.to(merged.dtype) - merged).to(weight.dtype)
                self.set_base_weight(weight.clone().index_copy_(1, indices, cols))
            elif self.quantization_backend is not None:
                restore_quantized_state(self, stash)  # the original quantized weight, bit for bit
            else:
                base.weight.data.index_copy_(1, indices, stash)

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

        active = [a for a in self.active_adapters if a in self.paca_w]
        base = self.get_base_layer()
        if len(active) == 1 and not args and not kwargs and fused.eligible(x, base):
            # One Triton GEMM with s*P substituted into W0's columns as the tiles load (hfx.kernels.adapter).
            a = active[0]
            out = fused.fused_kernel().paca_linear(
                x, base.weight, base.bias, self.paca_w[a], self.paca_orig[a], self.paca_indices[a],
                self.paca_scaling[a],
            )  # fmt: skip
            return out
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype  # what the base layer gives (autocast's dtype under autocast), as LoRA returns
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in active:
            result = result + self.paca_w(self._partial_term, adapter, x).to(result.dtype)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "paca." + super().__repr__()
