"""Bone / BAT layers (arXiv 2409.15371).

Bone: ``y = base(x) + fold_r(x) @ B`` with ``B`` of shape ``(r, out)`` and ``fold_r`` the sum of the ``r``-wide
chunks of the zero-padded input; as a weight update ``dW = B^T [I_r I_r ... I_r][:, :in]`` — LoRA with a frozen,
tiled identity as ``A``. BAT: per row-block ``i`` and column-block ``j``, ``W'_ij = W_ij (I + B_i) + B_i``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from ...kernels import adapter as fused
from .._mixed_batch import mixed_batch_forward, pop_adapter_names
from .._quantized import QuantizedBaseMixin, quantized_state, restore_quantized_state
from .._sparse import compute_dtype


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def bone_fold(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum the ``r``-wide chunks of the last dimension of ``x`` (zero-padding a partial last chunk)."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)


def bone_delta_weight(block: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense Bone update ``dW`` (out x in) for a block ``B`` of shape (r, out)."""
    r = block.shape[0]
    return block.t().repeat(1, math.ceil(in_features / r))[:, :in_features]


def _bat_blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """View W (out x in) as blocks W_ij with shape (out/r, in/r, r, r)."""
    out_f, in_f = weight.shape
    return weight.reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)


def _bat_unblock(blocks: torch.Tensor) -> torch.Tensor:
    n_out, n_in, r, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(n_out * r, n_in * r)


def bat_delta_weight(block: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BAT update ``dW_ij = W_ij B_i + B_i`` for blocks ``B`` of shape (out/r, r, r); depends on ``W``."""
    bb = block[:, None]  # (out/r, 1, r, r), shared by every column block j of row block i
    return _bat_unblock(_bat_blocks(weight, block.shape[-1]) @ bb + bb)


class BatLinear(torch.autograd.Function):
    """``x @ dW^T`` for one BAT adapter (``dW_ij = W_ij B_i + B_i``), keeping neither ``dW`` nor a copy of ``W``
    for backward: autograd through [`bat_delta_weight`] and ``F.linear`` kept two fp32 tensors the size of the layer.

    ``dW`` is rebuilt in backward; the GEMMs with ``x`` run in [`hfx.tuners._sparse.compute_dtype`] (the model's
    16-bit dtype, autocast's, else fp32), ``dW`` itself in the block's dtype. ``dB_i = sum_j (W_ij^T G_ij + G_ij)``
    with ``G = g^T x``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        work = compute_dtype(x, block)
        delta = bat_delta_weight(block.detach(), weight.detach().to(block.dtype)).to(work)
        ctx.save_for_backward(x, block, weight)
        ctx.work = work
        return x.to(work) @ delta.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, block, weight = ctx.saved_tensors
        work = ctx.work
        m, n = weight.shape
        w = weight.detach().to(block.dtype)
        g2 = grad.reshape(-1, m).to(work)
        grad_x = grad_block = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ bat_delta_weight(block.detach(), w).to(work)).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            g_blocks = _bat_blocks((g2.t() @ x.reshape(-1, n).to(work)).to(block.dtype), block.shape[-1])
            grad_block = torch.einsum("ijba,ijbc->iac", _bat_blocks(w, block.shape[-1]), g_blocks) + g_blocks.sum(1)
        return grad_x, grad_block, None


def bat_invert(block: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Undo BAT: ``W_ij = (W'_ij - B_i)(I + B_i)^-1``, in float64 on CPU / float32 elsewhere."""
    work = torch.float64 if merged.device.type == "cpu" else torch.float32
    bb = block.to(work)[:, None]
    eye = torch.eye(bb.shape[-1], dtype=work, device=bb.device)
    # X (I + B) = W' - B  <=>  (I + B)^T X^T = (W' - B)^T
    rhs = (_bat_blocks(merged.to(work), bb.shape[-1]) - bb).transpose(-1, -2)
    lhs = (eye + bb).transpose(-1, -2).expand(rhs.shape)
    return _bat_unblock(torch.linalg.solve(lhs, rhs).transpose(-1, -2))


class BoneBlocks(nn.ParameterDict):
    """The per-adapter blocks; *called* to use them, so that DeepSpeed ZeRO-3's module hooks gather them.

    ZeRO-3 gathers a module's own parameters around that module's forward. A plain ``ParameterDict`` is never
    called, so its partitioned blocks would stay empty; calling this one (``blocks(fn, *args)`` runs
    ``fn(blocks, *args)``) gives it a forward. State-dict keys are those of a ``ParameterDict``.
    """

    __call__ = nn.Module.__call__  # ParameterDict disables calling; restore Module's (hooks included)

    def forward(self, fn, *args: Any) -> torch.Tensor:
        return fn(self, *args)


@contextmanager
def gathered_weight(layer: nn.Module) -> Iterator[torch.Tensor]:
    """The dense base weight of ``layer``, gathered first if DeepSpeed ZeRO-3 has partitioned it (a copy then)."""
    weight = layer.weight
    if hasattr(weight, "ds_id") and weight.numel() == 0:
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight.detach().clone()
    else:
        yield weight


class BoneLayer(QuantizedBaseMixin, BaseTunerLayer):
    """Mixin holding the per-adapter Bone/BAT state of one adapted layer."""

    adapter_layer_names = ("bone_block",)
    other_param_names = ("bone_r", "bone_init", "bone_dropout")

    def __init__(self, base_layer: nn.Module, layer_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.bone_r: dict[str, int] = {}
        self.bone_init: dict[str, bool | str] = {}
        self.bone_dropout = nn.ModuleDict({})
        self.bone_block = BoneBlocks({})
        # what each merge into a quantized base replaced (re-quantizing is lossy), so that unmerge restores it exactly
        self._bone_stash: dict[str, dict[str, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True
        self.layer_name = layer_name
        self.kwargs = kwargs
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Bone cannot adapt {layer_name or 'layer'} of type {type(base_layer).__name__}.")
        self.in_features, self.out_features = in_features, out_features

    def _describe(self) -> str:
        return f"layer {self.layer_name!r} (in_features={self.in_features}, out_features={self.out_features})"

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        init_weights: bool | str = True,
        bone_dropout: float = 0.0,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create adapter ``adapter_name`` on this layer, zero-initialised unless ``init_weights=False``."""
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r}.")
        if init_weights == "bat":
            if self.in_features % r or self.out_features % r:
                valid = sorted(set(_divisors(self.in_features)) & set(_divisors(self.out_features)))
                raise ValueError(
                    f"BAT (init_weights='bat') needs `r` to divide both dimensions of {self._describe()}, got r={r}. "
                    f"Valid r for this layer: {valid}; or use init_weights=True (Bone), which allows any r <= "
                    f"{self.in_features}."
                )
            if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
                raise ValueError(
                    f"BAT (init_weights='bat') needs the dense base weight in every forward, but {self._describe()} is "
                    f"quantized with {self.quantization_backend.backend_name!r}, which cannot be de-quantized. Use "
                    "init_weights=True (Bone, which never reads the base weight), or a bitsandbytes/HQQ/torchao "
                    "quantized model."
                )
            shape = (self.out_features // r, r, r)
        else:
            if r > self.in_features:
                raise ValueError(
                    f"`r`={r} is larger than in_features of {self._describe()}; choose r <= {self.in_features}."
                )
            shape = (r, self.out_features)

        self.bone_r[adapter_name] = r
        self.bone_init[adapter_name] = init_weights
        self.bone_dropout[adapter_name] = nn.Dropout(bone_dropout) if bone_dropout > 0 else nn.Identity()
        block = torch.zeros(shape)
        if init_weights is False:
            # Random non-zero blocks, to test merging and saving; not an initialisation to train from.
            nn.init.kaiming_uniform_(block.view(-1, shape[-1]), a=math.sqrt(5))
        self.bone_block[adapter_name] = nn.Parameter(block)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("Bone has no scaling factor; scale_layer is ignored.", stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        return None


class BoneLinear(nn.Module, BoneLayer):
    """Bone / BAT on an ``nn.Linear`` (optionally quantized through PEFT's generic quantization backends)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 64,
        init_weights: bool | str = True,
        bone_dropout: float = 0.0,
        layer_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        BoneLayer.__init__(self, base_layer, layer_name=layer_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, init_weights=init_weights, bone_dropout=bone_dropout)

    def _is_bat(self, adapter: str) -> bool:
        return self.bone_init[adapter] == "bat"

    def _delta(self, adapter: str, weight: torch.Tensor, block: Optional[torch.Tensor] = None) -> torch.Tensor:
        """dW of ``adapter`` applied on top of ``weight`` (BAT's update depends on the current weight)."""
        block = self.bone_block[adapter] if block is None else block
        if self._is_bat(adapter):
            return bat_delta_weight(block, weight.to(block.dtype))
        return bone_delta_weight(block, self.in_features)

    def _bone_term(self, blocks: BoneBlocks, adapter: str, x: torch.Tensor) -> torch.Tensor:
        block = blocks[adapter]
        return bone_fold(self._cast_input_dtype(x, block.dtype), self.bone_r[adapter]) @ block

    def _bat_term(self, blocks: BoneBlocks, adapter: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return BatLinear.apply(x, blocks[adapter], weight)

    def _composed_delta(self, blocks: BoneBlocks, adapters: list[str], weight: torch.Tensor) -> torch.Tensor:
        """Total dW of ``adapters`` applied in order, each on the weight the previous ones produced."""
        delta = None
        for adapter in adapters:
            current = weight if delta is None else weight.to(delta.dtype) + delta
            step = self._delta(adapter, current, blocks[adapter])
            delta = step if delta is None else delta.to(step.dtype) + step
        return delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``dW`` of one adapter with respect to the current base weight (out x in)."""
        return self._delta(adapter, self.get_base_weight())

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Additive, so PEFT's ``convert_to_lora`` can factor ``dW``: Bone is LoRA with A = tiled identity (rank r is
        exact); BAT's ``dW`` depends on W (full rank in general, so approximated) and is taken on the current base
        weight, which is the original one only while unmerged."""
        return not (self.merged and adapter_name in self.bone_block and self._is_bat(adapter_name))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into the base weight: ``W += dW`` for Bone, ``W <- W (I + B) + B`` for BAT.

        On a quantized base the weight is de-quantized, updated and re-quantized (with a warning: the merged model then
        differs from the unmerged one by quantization rounding); the original quantized weight is kept, so unmerge
        puts it back bit for bit (PaCA does the same).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.bone_block:
                continue
            # a quantized base is kept as it is now, before de-quantizing may touch its storage
            stash = quantized_state(self) if self.quantization_backend is not None else None
            weight = self.get_base_weight()
            orig_dtype = weight.dtype
            work = torch.float32 if orig_dtype in (torch.float16, torch.bfloat16) else orig_dtype
            block = self.bone_block[adapter].detach().to(work)
            w = weight.to(work)
            new = w + (bat_delta_weight(block, w) if self._is_bat(adapter) else bone_delta_weight(block, w.shape[1]))
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"Merging adapter {adapter!r} into {self._describe()} gives non-finite weights.")
            if self.quantization_backend is not None:
                warnings.warn(
                    f"Merging {'BAT' if self._is_bat(adapter) else 'Bone'} adapter {adapter!r} into the "
                    f"{self.quantization_backend.backend_name}-quantized {self._describe()} re-quantizes the weight: "
                    "the merged model differs from the unmerged one by quantization rounding. hfx keeps the original "
                    "quantized weight, so unmerge (and disable_adapter) put it back exactly.",
                    stacklevel=2,
                )
                self._bone_stash[adapter] = stash
            self.set_base_weight(new.to(orig_dtype))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo merges in reverse order: subtract (Bone) or invert (BAT, needs ``I + B_i`` invertible) the update; on a
        quantized base, restore the weight kept by ``merge`` instead (exact, where re-quantizing again would not be)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.bone_block:
                continue
            stash = self._bone_stash.pop(adapter, None)
            if stash is not None:  # a quantized base: the weight from before the merge, bit for bit
                restore_quantized_state(self, stash)
                continue
            weight = self.get_base_weight()
            block = self.bone_block[adapter].detach()
            if self._is_bat(adapter):
                try:
                    restored = bat_invert(block, weight)
                except torch.linalg.LinAlgError as err:
                    raise ValueError(
                        f"Cannot unmerge BAT adapter {adapter!r} from {self._describe()}: I + B is singular."
                    ) from err
                if not torch.isfinite(restored).all():
                    raise ValueError(
                        f"Unmerging BAT adapter {adapter!r} from {self._describe()} gives non-finite weights."
                    )
            else:
                work = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
                restored = weight.to(work) - bone_delta_weight(block.to(work), weight.shape[1])
            self.set_base_weight(restored.to(weight.dtype))

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

        active = [a for a in self.active_adapters if a in self.bone_block]
        base = self.get_base_layer()
        if (
            len(active) == 1
            and not self._is_bat(active[0])
            and isinstance(self.bone_dropout[active[0]], nn.Identity)
            and not args
            and not kwargs
            and fused.eligible(x, base)
        ):
            # One Triton GEMM with B added to W0's tiles as they load (hfx.kernels.adapter).
            out = fused.fused_kernel().bone_linear(x, base.weight, base.bias, self.bone_block[active[0]])
            return out
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype  # what the base layer gives (autocast's dtype under autocast), as LoRA returns
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        if any(self._is_bat(a) for a in active):
            # Compose in weight space in the order of the active adapters, exactly as merging them would.
            # Dropout of the first active adapter applies to the composed update (one weight, one input).
            xd = self.bone_dropout[active[0]](x)
            if self.quantization_backend is not None:
                weight_ctx = nullcontext(self.get_base_weight())
            else:
                weight_ctx = gathered_weight(self.get_base_layer())
            with weight_ctx as weight:
                if len(active) == 1:  # the common case: nothing layer-sized kept for backward
                    term = self.bone_block(self._bat_term, active[0], xd, weight.detach())
                else:
                    delta = self.bone_block(self._composed_delta, active, weight.detach())
                    term = F.linear(self._cast_input_dtype(xd, delta.dtype), delta)
            result = result + term.to(result.dtype)
        else:
            for adapter in active:
                xd = self.bone_dropout[adapter](x)
                result = result + self.bone_block(self._bone_term, adapter, xd)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "bone." + super().__repr__()
