"""Fused adapter paths (PaCA, Bone) — opt-in: ``hfx.kernels.fused_adapters()`` or ``set_fused_adapters(True)``.

When on, an adapted PaCA / Bone layer runs as one Triton GEMM with the adapter folded into the weight-tile loads
(:mod:`hfx.kernels.adapter.triton_kernel`) wherever that is exact; everywhere else it keeps its own path:
several active adapters, BAT, dropout, a merged or disabled adapter, a quantized or ZeRO-3-partitioned base, a
trainable base weight, CPU tensors (unless ``TRITON_INTERPRET=1``), float64. Off by default until the GPU numbers
in ``benchmarks/RESULTS.md`` show it faster.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import reference

__all__ = ["fused_adapters", "fused_adapters_enabled", "fused_kernel", "reference", "set_fused_adapters"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _from_environment() -> bool:
    """``$HFX_FUSED_ADAPTERS`` at start-up: 1/true/yes/on or 0/false/no/off (any case); anything else is an error."""
    value = os.environ.get("HFX_FUSED_ADAPTERS", "0").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"$HFX_FUSED_ADAPTERS must be 1/true/yes/on or 0/false/no/off, got {value!r}")
    return value in _TRUE


_ENABLED = _from_environment()


def set_fused_adapters(enabled: bool = True) -> None:
    """Switch the fused PaCA/Bone paths on or off for the whole process (``HFX_FUSED_ADAPTERS=1`` at start-up)."""
    global _ENABLED
    if not isinstance(enabled, bool):  # bool("false") is True
        raise TypeError(f"set_fused_adapters(enabled) takes True or False, got {enabled!r}")
    _ENABLED = enabled


def fused_adapters_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def fused_adapters(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_fused_adapters`."""
    previous = _ENABLED
    set_fused_adapters(enabled)
    try:
        yield
    finally:
        set_fused_adapters(previous)


@functools.lru_cache(maxsize=1)
def fused_kernel() -> Any | None:
    """The Triton module, or None when ``triton`` is not installed."""
    try:
        from . import triton_kernel
    except ImportError:
        return None
    return triton_kernel


def eligible(x: torch.Tensor, base: nn.Module) -> bool:
    """Whether a plain, dense, frozen ``nn.Linear`` base and input ``x`` can take the fused path."""
    if not _ENABLED or type(base) is not nn.Linear:
        return False
    kernel = fused_kernel()
    if kernel is None:
        return False
    w = base.weight
    if hasattr(w, "ds_id") or w.requires_grad or w.stride(1) != 1:  # ZeRO-3 partitioned / trainable base
        return False
    from .._triton_utils import INTERPRET, device_supports, supported_dtype

    on_device = x.is_cuda or (INTERPRET and x.device.type == "cpu")
    dtypes_ok = supported_dtype(w.dtype) and supported_dtype(x.dtype) and device_supports(x)
    return on_device and x.device == w.device and dtypes_ok
