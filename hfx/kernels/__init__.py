"""Fused kernels for hfx.

* ``hfx.kernels.cce`` — the loss path without materialising logits (CCE): PyTorch reference + Triton kernels;
* ``hfx.kernels.adapter`` — fused PaCA / Bone layers (one GEMM with the adapter folded into the weight loads),
  opt-in with :func:`fused_adapters` / :func:`set_fused_adapters`.
"""

from .adapter import fused_adapters, fused_adapters_enabled, set_fused_adapters
from .cce import linear_cross_entropy, linear_log_probs
from .cce.integration import cce_enabled, use_cce

__all__ = [
    "cce_enabled",
    "fused_adapters",
    "fused_adapters_enabled",
    "linear_cross_entropy",
    "linear_log_probs",
    "set_fused_adapters",
    "use_cce",
]
