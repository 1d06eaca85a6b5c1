"""Shared bits of hfx's Triton kernels: interpreter detection, dot precision, and interpreter-safe math.

Under ``TRITON_INTERPRET=1`` (CPU-only CI) bf16 arithmetic and ``libdevice`` do not work (spec kernels_cce §7): the
kernels then upcast every loaded operand to float32 (``UPCAST``) and build ``tanh`` from ``exp``. The variable is
read once, when a kernel module is imported, because Triton decides at decoration time.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Triton runs kernels in its interpreter (numpy on CPU tensors); set before the kernels are decorated.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``; anything else is an error."""
    for t in tensors:
        if t is None:
            continue
        if t.is_cuda:
            continue
        if INTERPRET and t.device.type == "cpu":
            continue
        raise ValueError(
            f"hfx's Triton kernels need CUDA tensors (got a {t.device.type} tensor); on CPU set TRITON_INTERPRET=1 "
            "before importing hfx to run them in Triton's interpreter, or use the PyTorch reference path"
        )


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision: float32 operands use TF32 only where PyTorch's own matmuls allow it; half
    operands keep Triton's default (None). The interpreter upcasts every operand to float32 and multiplies exactly."""
    if INTERPRET:
        return "ieee"
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def supported_dtype(dtype: torch.dtype) -> bool:
    """The dtypes the kernels take (float64 stays on the PyTorch reference)."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def tanh(x):
    """tanh from exp (no libdevice, so it also runs in the interpreter); exact at +-inf."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
