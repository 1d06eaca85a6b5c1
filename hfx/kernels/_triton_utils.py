"""Shared bits of hfx's Triton kernels: interpreter detection, dot precision, and interpreter-safe math.

Under ``TRITON_INTERPRET=1`` (CPU-only CI) bf16 arithmetic and ``libdevice`` do not work (spec kernels_cce §7): the
kernels then upcast every loaded operand to float32 (``UPCAST``) and build ``tanh`` from ``exp``. The variable is
read once, when a kernel module is imported, because Triton decides at decoration time.
"""

from __future__ import annotations

import os
from typing import Any

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


try:  # raised before a kernel runs when its shared memory exceeds what the GPU gives a block
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older Triton

    class OutOfResources(Exception):  # noqa: N818 - Triton's name
        pass


# Stage counts found to fit, per (kernel, its constexprs, tensor dtypes, device): a GPU with less shared memory per
# block than the H100's 227 KiB (A10, L4, RTX 3090/4090: 99 KiB) gets fewer pipeline stages instead of a failed launch.
_FITTING_STAGES: dict[tuple, int] = {}


def launch(kernel: Any, grid: tuple, *args: Any, num_stages: int, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``num_stages`` software-pipeline stages, or the most that fit.

    The tile sizes are tuned for Hopper. Compiled for sm_86, the Bone path's bf16 kernel needs 128 KiB of shared
    memory at 3 stages and 64 KiB at 2 (tests/kernels/aot_compile.py), so it would not launch within those GPUs'
    99 KiB. Triton raises ``OutOfResources`` before anything runs; this retries with one stage fewer and remembers
    the count for the same kernel, configuration and device.
    """
    device = args[0].device if args and isinstance(args[0], torch.Tensor) else None
    key = (
        kernel.fn.__name__ if hasattr(kernel, "fn") else repr(kernel),
        tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper())),
        tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
        str(device),
    )
    stages = _FITTING_STAGES.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, num_stages=stages, **kwargs)
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        _FITTING_STAGES[key] = stages
        return


def device_supports(t: torch.Tensor) -> bool:
    """Whether ``t``'s GPU can run the kernels in ``t``'s dtype (always true off CUDA: the interpreter)."""
    if INTERPRET or not t.is_cuda:
        return True
    return dtype_runs_on(t.dtype, torch.cuda.get_device_capability(t.device))


def dtype_runs_on(dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """bf16 tensor-core dots need sm_80 (Ampere) or newer; fp16 and fp32 run on older GPUs too."""
    return dtype != torch.bfloat16 or tuple(capability) >= (8, 0)


def supported_dtype(dtype: torch.dtype) -> bool:
    """The dtypes the kernels take (float64 stays on the PyTorch reference)."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def tanh(x):
    """tanh from exp (no libdevice, so it also runs in the interpreter); exact at +-inf."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
