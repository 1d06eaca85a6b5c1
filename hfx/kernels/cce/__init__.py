"""CCE — cross-entropy (and label log-probabilities) of a linear layer without materialising the N×V logits.

Entry points: :func:`linear_cross_entropy`, :func:`linear_log_probs` and, for models, :func:`hfx.use_cce`.

Dispatch (``impl``):

* ``"reference"`` — :mod:`hfx.kernels.cce.reference`, pure PyTorch, chunked; runs on every device and is the ground
  truth the kernels are tested against;
* ``"triton"`` — :mod:`hfx.kernels.cce.triton_kernel` (needs ``triton``): used by ``"auto"`` for CUDA tensors in
  float32/float16/bfloat16; on CPU it runs only under ``TRITON_INTERPRET=1`` (how CI tests it).

``HFX_CCE_IMPL=reference`` (or ``triton``) in the environment overrides ``"auto"`` process-wide, e.g. to rule the kernel
out when debugging. ``filter_eps`` / ``sort_vocab`` are options of the Triton kernel's gradient filter (an approximation for speed);
the reference is always exact and ignores them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from . import reference
from .reference import DEFAULT_CHUNK_BYTES, ChunkPlan, plan_chunks

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ChunkPlan",
    "available_impls",
    "linear_cross_entropy",
    "linear_log_probs",
    "plan_chunks",
]

_IMPLS = ("auto", "reference", "triton")


@functools.lru_cache(maxsize=1)
def _triton_module() -> Any | None:
    """The Triton implementation module, or None when it (or triton) is not installed."""
    try:
        from . import triton_kernel as triton_impl
    except ImportError:  # triton not installed
        return None
    return triton_impl


def available_impls() -> list[str]:
    """Implementations usable in this environment (``"reference"`` always)."""
    triton_impl = _triton_module()
    usable = triton_impl is not None and (torch.cuda.is_available() or triton_impl.INTERPRET)
    return ["reference"] + (["triton"] if usable else [])


_KERNEL_ONLY = ("filter_eps", "sort_vocab", "_force_sparse")


def _select(impl: str, hidden: torch.Tensor, weight: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    if impl == "auto":
        impl = os.environ.get("HFX_CCE_IMPL", "auto")
        if impl not in _IMPLS:
            raise ValueError(f"$HFX_CCE_IMPL must be one of {_IMPLS}, got {impl!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    triton_impl = _triton_module()
    if impl == "triton":
        if triton_impl is None:
            raise NotImplementedError(
                "impl='triton' needs the `triton` package (pip install triton, on a CUDA machine); "
                "use impl='reference' or impl='auto'"
            )
        return triton_impl  # device/dtype errors come from the kernel, naming what would work
    if impl == "auto" and triton_impl is not None and hidden.is_cuda and triton_impl.supports(hidden, weight):
        return triton_impl
    reference.check_filter_eps(kwargs.get("filter_eps"))  # refused on CPU as on GPU, though unused here
    for key in _KERNEL_ONLY:
        kwargs.pop(key, None)
    return reference


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    **kwargs: Any,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` without the logits; see :func:`reference.linear_cross_entropy`."""
    return _select(impl, hidden, weight, kwargs).linear_cross_entropy(hidden, weight, labels, bias, **kwargs)


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    **kwargs: Any,
) -> torch.Tensor:
    """Per-token label log-probabilities without the logits; see :func:`reference.linear_log_probs`."""
    kwargs.pop("_force_sparse", None)
    return _select(impl, hidden, weight, kwargs).linear_log_probs(hidden, weight, labels, bias, **kwargs)


linear_cross_entropy.__doc__ = (
    (linear_cross_entropy.__doc__ or "") + "\n\n" + (reference.linear_cross_entropy.__doc__ or "")
)
