"""TRL trainers for recent alignment methods, subclassing TRL's own so they run (and log, save, resume) like them.

- :class:`BVPOTrainer` / :class:`BVPOConfig`: bias–variance optimised preference optimisation for reasoning models
  (arXiv 2510.05095); :func:`make_bvpo_pairs` builds its data from a policy and a reward function.
- :class:`MaskedThoughtTrainer` / :class:`MaskedThoughtConfig`: Masked Thought SFT (arXiv 2403.02178), part of the
  chain of thought masked in the inputs; :func:`add_mask_token` adds a mean-initialised ``<mask>`` token.
"""

from .bvpo_config import DEFAULT_EMPTY_THINK, BVPOConfig
from .bvpo_data import make_bvpo_pairs
from .bvpo_trainer import AlphaEstimator, BVPODataCollator, BVPOTrainer, closed_form_alpha
from .masked_thought_config import MaskedThoughtConfig
from .masked_thought_trainer import MaskedThoughtTrainer, add_mask_token, mask_rate_at

__all__ = [
    "DEFAULT_EMPTY_THINK",
    "AlphaEstimator",
    "BVPOConfig",
    "BVPODataCollator",
    "BVPOTrainer",
    "MaskedThoughtConfig",
    "MaskedThoughtTrainer",
    "add_mask_token",
    "closed_form_alpha",
    "make_bvpo_pairs",
    "mask_rate_at",
]
