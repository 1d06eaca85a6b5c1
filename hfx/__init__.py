"""hfx: recent fine-tuning and alignment methods for the Hugging Face stack.

Importing hfx registers its tuners into PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
``PeftConfig.from_pretrained`` understand hfx adapters. Import hfx before loading a saved hfx adapter.
"""

from __future__ import annotations

import importlib
from typing import Any

from .tuners import BoneConfig, BoneModel, LiftConfig, LiftModel, LiftRefreshCallback, PacaConfig, PacaModel

__version__ = "0.1.0.dev0"

__all__ = [
    "BVPOConfig",
    "BVPOTrainer",
    "BoneConfig",
    "BoneModel",
    "LiftConfig",
    "LiftModel",
    "LiftRefreshCallback",
    "PacaConfig",
    "PacaModel",
    "__version__",
    "data",
    "testing",
    "trainers",
]

_LAZY_SUBMODULES = {"data", "testing", "trainers"}
# Trainer classes import TRL (seconds): resolved from `hfx.trainers` on first use.
_LAZY_ATTRS = {"BVPOConfig": "trainers", "BVPOTrainer": "trainers"}


def __getattr__(name: str) -> Any:
    # `hfx.data` / `hfx.testing` import tokenizers and datasets; load them only when used.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
    raise AttributeError(f"module 'hfx' has no attribute {name!r}")
