"""Fused kernels for hfx. ``hfx.kernels.cce``: the loss path without materialising logits (CCE)."""

from .cce import linear_cross_entropy, linear_log_probs
from .cce.integration import cce_enabled, use_cce

__all__ = ["cce_enabled", "linear_cross_entropy", "linear_log_probs", "use_cce"]
