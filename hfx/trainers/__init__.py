"""TRL trainers for recent alignment methods, subclassing TRL's own so they run (and log, save, resume) like them.

- :class:`BVPOTrainer` / :class:`BVPOConfig`: bias–variance optimised preference optimisation for reasoning models
  (arXiv 2510.05095); :func:`make_bvpo_pairs` builds its data from a policy and a reward function.
"""

from .bvpo_config import DEFAULT_EMPTY_THINK, BVPOConfig
from .bvpo_data import make_bvpo_pairs
from .bvpo_trainer import AlphaEstimator, BVPODataCollator, BVPOTrainer, closed_form_alpha

__all__ = [
    "DEFAULT_EMPTY_THINK",
    "AlphaEstimator",
    "BVPOConfig",
    "BVPODataCollator",
    "BVPOTrainer",
    "closed_form_alpha",
    "make_bvpo_pairs",
]
