"""LIFT tuner model: injects [`LiftLinear`] layers into a model (PEFT ``BaseTuner``), plus the mask refresh."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from tqdm.auto import tqdm

from .._lora_only import LoraOnlyMethodsMixin
from .._mixed_batch import MixedBatchTunerMixin
from .._sparse import check_remappable_optimizer_state, remap_optimizer_state
from .._targets import TargetHintMixin, target_hint
from .config import LiftConfig
from .layer import LiftLayer, LiftLinear


def _supports(base: torch.nn.Module) -> bool:
    if isinstance(base, torch.nn.Linear):
        return True
    backend = resolve_quantization_backend(base)
    return backend is not None and backend.layer_type == "linear"


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class LiftModel(TargetHintMixin, LoraOnlyMethodsMixin, MixedBatchTunerMixin, BaseTuner):
    """LIFT adapters (arXiv 2506.00772) as a PEFT tuner; build it with ``get_peft_model(model, LiftConfig())``."""

    prefix: str = "lift_"
    tuner_layer_cls = LiftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: torch.nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, with a progress bar over the layers whose entries are being selected."""
        config = self.peft_config[adapter_name]
        show = getattr(config, "show_progress", True) and _is_rank0()
        with tqdm(desc=f"LIFT: selecting principal weights ({adapter_name})", unit="layer", disable=not show) as bar:
            self._lift_progress = bar
            try:
                super().inject_adapter(model, adapter_name, *args, **kwargs)
            finally:
                self._lift_progress = None

    def _create_and_replace(
        self,
        lift_config: LiftConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _supports(base):
            raise TypeError(
                f"LIFT cannot adapt {current_key!r} of type {type(base).__name__}: only torch.nn.Linear (optionally "
                "quantized with bitsandbytes, ...) is supported. " + target_hint(base, "LIFT")
            )
        in_features, out_features = _get_in_out_features(base)
        kwargs = {
            "k": lift_config.budget(out_features, in_features),
            "filter_rank": lift_config.filter_rank,
            "svd": lift_config.svd,
            "niter": lift_config.niter,
            "sync_indices": lift_config.sync_indices,
            "layer_name": current_key,
            **get_quantization_kwargs(self),
        }
        if isinstance(target, LiftLayer):
            target.update_layer(adapter_name, **{k: v for k, v in kwargs.items() if k != "layer_name"})
        else:
            new_module = LiftLinear(target, adapter_name, **kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
            self._replace_module(parent, target_name, new_module, target)
        bar = getattr(self, "_lift_progress", None)
        if bar is not None:
            bar.update(1)


def _unwrap_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    while optimizer is not None and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def refresh_lift_masks(
    model: torch.nn.Module,
    optimizer: Optional[Any] = None,
    adapter_name: Optional[str] = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Re-select every LIFT mask of ``adapter_name`` (default: the active adapter) on the current effective weight
    and remap the optimizer's per-entry state (``exp_avg``, ``exp_avg_sq``; kept entries keep theirs, new ones start
    at 0, ``step`` untouched). The model's function is unchanged. Returns summary statistics (the fraction of
    entries that stayed selected, the accumulated frozen entries)."""
    optimizer = _unwrap_optimizer(optimizer)
    layers = [m for m in model.modules() if isinstance(m, LiftLinear)]
    if not layers:
        raise ValueError("refresh_lift_masks: the model has no LIFT layers.")
    if adapter_name is None:
        active = layers[0].active_adapters
        if len(active) != 1:
            raise ValueError(f"refresh_lift_masks: pass `adapter_name`; {len(active)} adapters are active.")
        adapter_name = active[0]
    if optimizer is not None:
        params = [layer.lift_values[adapter_name] for layer in layers if adapter_name in layer.lift_values]
        check_remappable_optimizer_state(optimizer, params, "refresh_lift_masks")
    kept = total = past = 0
    for layer in tqdm(
        layers, desc="LIFT: refreshing masks", unit="layer", disable=not (show_progress and _is_rank0())
    ):
        if adapter_name not in layer.lift_values:
            continue
        old, new = layer.refresh(adapter_name)
        if optimizer is not None:
            remap_optimizer_state(optimizer, layer.lift_values[adapter_name], old, new)
        kept += int(torch.isin(new.long(), old.long()).sum())
        total += new.numel()
        past += layer.lift_past_indices[adapter_name].numel()
    return {"kept_fraction": kept / max(total, 1), "past_entries": float(past)}
