"""TRL trainers for recent alignment methods, subclassing TRL's own so they run (and log, save, resume) like them.

- :class:`BVPOTrainer` / :class:`BVPOConfig`: bias–variance optimised preference optimisation for reasoning models
  (arXiv 2510.05095); :func:`make_bvpo_pairs` builds its data from a policy and a reward function.
- :class:`ConstrainedGRPOTrainer` / :class:`ConstrainedGRPOConfig` (and the RLOO pair): constrained RLHF, Lagrange
  multipliers as reward weights (arXiv 2310.04373); :class:`ThresholdSearchCallback` searches thresholds (NM-PPO).
- :class:`DynamicWeightGRPOTrainer` / :class:`DynamicWeightGRPOConfig` (and the RLOO pair): dynamic reward weighting
  (arXiv 2509.11452), hypervolume-guided step size or gradient-based mirror descent on the reward weights.
- :class:`GVMRAFTTrainer` / :class:`GVMRAFTConfig` and :class:`GVMGRPOTrainer` / :class:`GVMGRPOConfig`: RAFT++ and
  GRPO with GVM's variance-minimising per-prompt sample allocation (arXiv 2505.02391), see :mod:`hfx.gvm`.
- :class:`MaskedThoughtTrainer` / :class:`MaskedThoughtConfig`: Masked Thought SFT (arXiv 2403.02178), part of the
  chain of thought masked in the inputs; :func:`add_mask_token` adds a mean-initialised ``<mask>`` token.
"""

from .bvpo_config import DEFAULT_EMPTY_THINK, BVPOConfig
from .bvpo_data import make_bvpo_pairs
from .bvpo_trainer import AlphaEstimator, BVPODataCollator, BVPOTrainer, closed_form_alpha
from .constrained_config import ConstrainedGRPOConfig, ConstrainedRLOOConfig
from .constrained_trainer import ConstrainedGRPOTrainer, ConstrainedRLOOTrainer
from .dynamic_weight_config import DynamicWeightGRPOConfig, DynamicWeightRLOOConfig
from .dynamic_weight_trainer import DynamicWeightGRPOTrainer, DynamicWeightRLOOTrainer
from .gvm_config import GVMGRPOConfig, GVMRAFTConfig
from .gvm_trainer import GVMGRPOTrainer, GVMRAFTTrainer
from .masked_thought_config import MaskedThoughtConfig
from .masked_thought_trainer import MaskedThoughtTrainer, add_mask_token, mask_rate_at
from .threshold_search import NelderMead, ThresholdSearchCallback

__all__ = [
    "DEFAULT_EMPTY_THINK",
    "AlphaEstimator",
    "BVPOConfig",
    "BVPODataCollator",
    "BVPOTrainer",
    "ConstrainedGRPOConfig",
    "ConstrainedGRPOTrainer",
    "ConstrainedRLOOConfig",
    "ConstrainedRLOOTrainer",
    "DynamicWeightGRPOConfig",
    "DynamicWeightGRPOTrainer",
    "DynamicWeightRLOOConfig",
    "DynamicWeightRLOOTrainer",
    "GVMGRPOConfig",
    "GVMGRPOTrainer",
    "GVMRAFTConfig",
    "GVMRAFTTrainer",
    "MaskedThoughtConfig",
    "MaskedThoughtTrainer",
    "NelderMead",
    "ThresholdSearchCallback",
    "add_mask_token",
    "closed_form_alpha",
    "make_bvpo_pairs",
    "mask_rate_at",
]
