"""hfx: recent fine-tuning and alignment methods for the Hugging Face stack.

Importing hfx registers its tuners into PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
``PeftConfig.from_pretrained`` understand hfx adapters. Import hfx before loading a saved hfx adapter.
"""

from __future__ import annotations

import importlib
from typing import Any

from .tuners import BoneConfig, BoneModel

__version__ = "0.1.0.dev0"

__all__ = ["BoneConfig", "BoneModel", "__version__", "data", "testing"]

_LAZY_SUBMODULES = {"data", "testing"}


def __getattr__(name: str) -> Any:
    # `hfx.data` / `hfx.testing` import tokenizers and datasets; load them only when used.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hfx' has no attribute {name!r}")
