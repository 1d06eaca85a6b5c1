"""hfx: recent fine-tuning and alignment methods for the Hugging Face stack.

Importing hfx registers its tuners into PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
``PeftConfig.from_pretrained`` understand hfx adapters. Import hfx before loading a saved hfx adapter.
"""

from __future__ import annotations

import importlib
from typing import Any

from .initialize import initialize, needs_initialization, register_initializer
from .tuners import (
    BoneConfig,
    BoneModel,
    DseeConfig,
    DseeModel,
    EvaConfig,
    LiftConfig,
    LiftModel,
    LiftRefreshCallback,
    LoraGAConfig,
    PacaConfig,
    PacaModel,
    SaraCallback,
    SaraConfig,
    SaraModel,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "initialize",
    "needs_initialization",
    "register_initializer",
    "BVPOConfig",
    "BVPOTrainer",
    "BoneConfig",
    "BoneModel",
    "ConstrainedGRPOConfig",
    "ConstrainedGRPOTrainer",
    "ConstrainedRLOOConfig",
    "ConstrainedRLOOTrainer",
    "DseeConfig",
    "DseeModel",
    "DynamicWeightGRPOConfig",
    "DynamicWeightGRPOTrainer",
    "DynamicWeightRLOOConfig",
    "DynamicWeightRLOOTrainer",
    "EvaConfig",
    "GVMGRPOConfig",
    "GVMGRPOTrainer",
    "GVMRAFTConfig",
    "GVMRAFTTrainer",
    "LiftConfig",
    "LiftModel",
    "LiftRefreshCallback",
    "LoraGAConfig",
    "MaskedThoughtConfig",
    "MaskedThoughtTrainer",
    "PacaConfig",
    "PacaModel",
    "SaraCallback",
    "SaraConfig",
    "SaraModel",
    "ThresholdSearchCallback",
    "__version__",
    "cce_enabled",
    "data",
    "dsee",
    "fused_adapters",
    "gvm",
    "kernels",
    "linear_cross_entropy",
    "linear_log_probs",
    "set_fused_adapters",
    "testing",
    "trainers",
    "use_cce",
]

_LAZY_SUBMODULES = {"data", "dsee", "gvm", "kernels", "testing", "trainers"}
# Trainer classes import TRL (seconds): resolved from `hfx.trainers` on first use.
_LAZY_ATTRS = {
    "BVPOConfig": "trainers",
    "BVPOTrainer": "trainers",
    "ConstrainedGRPOConfig": "trainers",
    "ConstrainedGRPOTrainer": "trainers",
    "ConstrainedRLOOConfig": "trainers",
    "ConstrainedRLOOTrainer": "trainers",
    "DynamicWeightGRPOConfig": "trainers",
    "DynamicWeightGRPOTrainer": "trainers",
    "DynamicWeightRLOOConfig": "trainers",
    "DynamicWeightRLOOTrainer": "trainers",
    "GVMGRPOConfig": "trainers",
    "GVMGRPOTrainer": "trainers",
    "GVMRAFTConfig": "trainers",
    "GVMRAFTTrainer": "trainers",
    "MaskedThoughtConfig": "trainers",
    "MaskedThoughtTrainer": "trainers",
    "ThresholdSearchCallback": "trainers",
    # CCE loss path (hfx.kernels.cce)
    "cce_enabled": "kernels",
    "linear_cross_entropy": "kernels",
    "linear_log_probs": "kernels",
    "use_cce": "kernels",
    # fused PaCA / Bone layers (hfx.kernels.adapter)
    "fused_adapters": "kernels",
    "set_fused_adapters": "kernels",
}


def __getattr__(name: str) -> Any:
    # `hfx.data` / `hfx.testing` import tokenizers and datasets; load them only when used.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
    raise AttributeError(f"module 'hfx' has no attribute {name!r}")
