"""CCE — cross-entropy (and label log-probabilities) of a linear layer without materialising the N×V logits.

Entry points: :func:`linear_cross_entropy`, :func:`linear_log_probs` and, for models, :func:`hfx.use_cce`.

Dispatch (``impl``):

* ``"reference"`` — :mod:`hfx.kernels.cce.reference`, pure PyTorch, chunked; runs on every device and is the ground
  truth the kernels are tested against;
* ``"triton"`` — a Triton kernel, used by ``"auto"`` for CUDA tensors when ``hfx.kernels.cce.triton`` is importable
  (it is not shipped yet: ``"auto"`` falls back to the reference, ``"triton"`` raises).
"""

from __future__ import annotations

import functools
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
        from . import triton as triton_impl  # noqa: F401  (not shipped yet: the GPU kernel is a separate issue)
    except ImportError:
        return None
    return triton_impl


def available_impls() -> list[str]:
    """Implementations usable in this environment (``"reference"`` always)."""
    return ["reference"] + (["triton"] if _triton_module() is not None and torch.cuda.is_available() else [])


def _select(impl: str, hidden: torch.Tensor) -> Any:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "reference":
        return reference
    triton_impl = _triton_module()
    if impl == "triton":
        if triton_impl is None:
            raise NotImplementedError(
                "the Triton CCE kernel is not available in this version of hfx; use impl='reference'"
            )
        if not hidden.is_cuda:
            raise ValueError("impl='triton' needs CUDA tensors")
        return triton_impl
    return triton_impl if (triton_impl is not None and hidden.is_cuda) else reference


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
    return _select(impl, hidden).linear_cross_entropy(hidden, weight, labels, bias, **kwargs)


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
    return _select(impl, hidden).linear_log_probs(hidden, weight, labels, bias, **kwargs)


linear_cross_entropy.__doc__ = (
    (linear_cross_entropy.__doc__ or "") + "\n\n" + (reference.linear_cross_entropy.__doc__ or "")
)
