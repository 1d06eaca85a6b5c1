"""Bone tuner model: injects [`BoneLinear`] layers into a model (PEFT ``BaseTuner``)."""

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
from .config import BoneConfig
from .layer import BoneLayer, BoneLinear


def _supports(base: torch.nn.Module) -> bool:
    if isinstance(base, torch.nn.Linear):
        return True
    backend = resolve_quantization_backend(base)
    return backend is not None and backend.layer_type == "linear"


class BoneModel(TargetHintMixin, LoraOnlyMethodsMixin, MixedBatchTunerMixin, BaseTuner):
    """Bone / BAT adapters (arXiv 2409.15371) as a PEFT tuner; build it with ``get_peft_model(model, BoneConfig())``."""

    prefix: str = "bone_"
    tuner_layer_cls = BoneLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        bone_config: BoneConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        kwargs = {
            "r": bone_config.r,
            "init_weights": bone_config.init_weights,
            "bone_dropout": bone_config.bone_dropout,
            "layer_name": current_key,
            **get_quantization_kwargs(self),
        }
        if isinstance(target, BoneLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(bone_config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(bone_config: BoneConfig, adapter_name: str, target: torch.nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _supports(base):
            raise TypeError(
                f"Bone cannot adapt {kwargs.get('layer_name') or 'module'!r} of type {type(base).__name__}: only "
                "torch.nn.Linear (optionally quantized with bitsandbytes, HQQ, torchao, GPTQ, AWQ, ...) is supported. "
                + target_hint(base, "Bone")
            )
        return BoneLinear(target, adapter_name, **kwargs)
