"""PaCA tuner model: injects [`PacaLinear`] layers into a model (PEFT ``BaseTuner``)."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)

from .._lora_only import LoraOnlyMethodsMixin
from .._mixed_batch import MixedBatchTunerMixin
from .._targets import TargetHintMixin, target_hint
from .config import PacaConfig
from .layer import PacaLayer, PacaLinear


def _supports(base: torch.nn.Module) -> bool:
    if isinstance(base, torch.nn.Linear):
        return True
    backend = resolve_quantization_backend(base)
    return backend is not None and backend.layer_type == "linear"


class PacaModel(TargetHintMixin, LoraOnlyMethodsMixin, MixedBatchTunerMixin, BaseTuner):
    """PaCA adapters (arXiv 2503.01905) as a PEFT tuner; build it with ``get_peft_model(model, PacaConfig())``."""

    prefix: str = "paca_"
    tuner_layer_cls = PacaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        paca_config: PacaConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        kwargs = {
            "r": paca_config.r,
            "paca_alpha": paca_config.paca_alpha,
            "init_weights": paca_config.init_weights,
            "seed": paca_config.seed,
            "layer_name": current_key,
            **get_quantization_kwargs(self),
        }
        if isinstance(target, PacaLayer):
            target.update_layer(adapter_name, **{k: v for k, v in kwargs.items() if k != "layer_name"})
            return
        new_module = self._create_new_module(paca_config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's rule for ``autocast_adapter_dtype``: ``True`` (default) keeps a half-precision base's adapter in
        float32, ``False`` in the base's dtype. P is built in float32 (so ``True`` costs no rounding), so ``False``
        casts it down here, as LoRA's weights follow the base. The init stays exact: ``_column_delta`` measures P
        from ``W0[:, idx] / s`` computed in P's dtype, and rounding P0 from float32 gives that same value."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, PacaLayer) or adapter_name not in module.paca_w:
                continue
            dtype = module.get_base_layer().weight.dtype
            weight = module.paca_w[adapter_name]
            if dtype in (torch.float16, torch.bfloat16) and weight.dtype != dtype:
                module.paca_w[adapter_name] = torch.nn.Parameter(weight.detach().to(dtype), weight.requires_grad)

    @staticmethod
    def _create_new_module(paca_config: PacaConfig, adapter_name: str, target: torch.nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _supports(base):
            raise TypeError(
                f"PaCA cannot adapt {kwargs.get('layer_name') or 'module'!r} of type {type(base).__name__}: only "
                "torch.nn.Linear (optionally quantized with bitsandbytes: QPaCA) is supported. "
                + target_hint(base, "PaCA")
            )
        return PacaLinear(target, adapter_name, **kwargs)
