"""Configurations of :class:`hfx.GVMGRPOTrainer` and :class:`hfx.GVMRAFTTrainer` (GVM, arXiv 2505.02391)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from ..gvm import DEFAULT_ALPHA, DEFAULT_BETA
from ._checks import check_fields

__all__ = ["GVM_LOSSES", "GVMGRPOConfig", "GVMRAFTConfig"]

GVM_LOSSES = ("grpo", "raft")


@dataclass
class GVMGRPOConfig(GRPOConfig):
    r"""Configuration for :class:`hfx.GVMGRPOTrainer`: every :class:`trl.GRPOConfig` argument plus the ones below.

    Every ``gvm_refresh_steps`` optimizer steps the trainer takes the next pool of ``gvm_pool_size`` prompts, draws
    ``gvm_num_pilot`` pilot completions per prompt, estimates the acceptance rate ``p_i`` and gradient norm ``G_i``
    (Alg. 2) and allocates ``gvm_budget`` completions by Proposition 1 (see :mod:`hfx.gvm`). Prompt ``i`` then appears
    as ``n_i / num_generations`` copies, each one GRPO group; advantages are normalised over **all** samples of the
    prompt in the generation batch (GVM-GRPO) or, with ``gvm_loss="raft"``, RAFT++ trains on accepted samples only.
    Train with ``max_steps``: the number of samples per round is set by the budget, not by the dataset's length.

    Parameters:
        gvm (`bool`, defaults to `True`):
            ``False`` gives the same pool schedule with a uniform allocation (plain GRPO / RAFT++), for comparison.
        gvm_loss (`str`, defaults to `"grpo"`):
            ``"grpo"``: group-normalised advantages over all samples of a prompt. ``"raft"``: RAFT++ (Eq. 8), the
            clipped surrogate with advantage 1 on accepted samples, rejected samples masked out of the loss.
        gvm_num_pilot (`int`, defaults to `8`):
            ``N'``, pilot completions per prompt (the paper uses 8 and 32).
        gvm_budget (`int` or `None`, defaults to `None`):
            ``N``, completions allocated per round; ``None``: ``gvm_num_pilot × pool size`` (the paper's ``N = N'·n``).
            Rounded down to a multiple of ``num_generations`` (allocations are made in whole groups).
        gvm_pool_size (`int` or `None`, defaults to `None`):
            Prompts per round (at most the dataset's size), taken in order from a seeded permutation of the dataset,
            a new one each epoch (an epoch's last round wraps to its start: no round holds a prompt twice); ``None``:
            all.
        gvm_refresh_steps (`int`, defaults to `10`):
            Optimizer steps between allocation rounds (the paper: ~10 M-steps per EM iteration).
        gvm_alpha (`float`, defaults to `1e-3`), gvm_beta (`float`, defaults to `2.0`):
            The regulariser ``α/p^β`` of Eq. 7 / Proposition 1.
        gvm_min_per_prompt (`int`, defaults to `0`):
            Minimum completions for every prompt with ``p_i > 0`` (rounded up to whole groups); an error if the
            budget cannot give it to all of them.
        gvm_accept_threshold (`float`, defaults to `1.0`):
            A sample is accepted (counts for ``p_i``, and is trained on by RAFT++) when its weighted reward is ``>=``
            this (1.0: a binary verifier's "correct").
        gvm_pilot_batch_size (`int`, defaults to `4`):
            Prompts per pilot generation call per process (each gives ``gvm_num_pilot`` completions).
        gvm_grad_batch_size (`int`, defaults to `8`):
            Sequences per forward/backward when computing the gradient norms.
    """

    gvm: bool = field(default=True, metadata={"help": "Allocate samples by GVM (False: uniform allocation)."})
    gvm_loss: str = field(default="grpo", metadata={"help": "'grpo' (group-normalised) or 'raft' (RAFT++)."})
    gvm_num_pilot: int = field(default=8, metadata={"help": "Pilot completions per prompt (N')."})
    gvm_budget: int | None = field(default=None, metadata={"help": "Completions per round (default N' x pool)."})
    gvm_pool_size: int | None = field(default=None, metadata={"help": "Prompts per round (default: the dataset)."})
    gvm_refresh_steps: int = field(default=10, metadata={"help": "Optimizer steps between allocation rounds."})
    gvm_alpha: float = field(default=DEFAULT_ALPHA, metadata={"help": "alpha of Eq. 7 / Proposition 1."})
    gvm_beta: float = field(default=DEFAULT_BETA, metadata={"help": "beta of Eq. 7 / Proposition 1."})
    gvm_min_per_prompt: int = field(default=0, metadata={"help": "Minimum completions per prompt with p > 0."})
    gvm_accept_threshold: float = field(default=1.0, metadata={"help": "Accept a sample when reward >= this."})
    gvm_pilot_batch_size: int = field(default=4, metadata={"help": "Prompts per pilot generation call."})
    gvm_grad_batch_size: int = field(default=8, metadata={"help": "Sequences per gradient-norm forward."})

    def __post_init__(self):
        check_fields(self, {
            "gvm": "bool", "gvm_loss": "str", "gvm_num_pilot": "int", "gvm_budget": "int?", "gvm_pool_size": "int?",
            "gvm_refresh_steps": "int", "gvm_alpha": "number", "gvm_beta": "number", "gvm_min_per_prompt": "int",
            "gvm_accept_threshold": "number", "gvm_pilot_batch_size": "int", "gvm_grad_batch_size": "int",
        })  # fmt: skip
        if self.gvm_loss not in GVM_LOSSES:
            raise ValueError(f"gvm_loss must be one of {list(GVM_LOSSES)}, got {self.gvm_loss!r}")
        for name in ("gvm_num_pilot", "gvm_refresh_steps", "gvm_pilot_batch_size", "gvm_grad_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gvm_budget is not None and self.gvm_budget < 1:
            raise ValueError(f"gvm_budget must be >= 1 or None, got {self.gvm_budget}")
        if self.gvm_pool_size is not None and self.gvm_pool_size < 1:
            raise ValueError(f"gvm_pool_size must be >= 1 or None, got {self.gvm_pool_size}")
        if self.gvm_min_per_prompt < 0:
            raise ValueError(f"gvm_min_per_prompt must be >= 0, got {self.gvm_min_per_prompt}")
        for name in ("gvm_alpha", "gvm_beta"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if math.isnan(self.gvm_accept_threshold):
            raise ValueError("gvm_accept_threshold must be a number (-inf accepts every sample), got nan")
        super().__post_init__()


@dataclass
class GVMRAFTConfig(GVMGRPOConfig):
    r"""Configuration for :class:`hfx.GVMRAFTTrainer`: :class:`GVMGRPOConfig` with RAFT++ defaults.

    RAFT++ (Eq. 8) is PPO's clipped surrogate on **accepted** samples only (advantage 1), with clip-higher
    (``epsilon`` = ε_low = 0.2, ``epsilon_high`` = 0.3 as in the authors' script; the paper reports 0.28–0.4) and a
    k3 ("low-var") KL penalty to the initial model with ``beta = 0.001``; ``loss_type="dapo"`` averages over all
    accepted tokens of the generation batch (verl's token-mean). ``gvm=False`` is plain RAFT++ (uniform allocation).
    The learning-rate schedule stays TRL's (``lr_scheduler_type="linear"``); the paper trains at a constant 1e-6:
    pass ``lr_scheduler_type="constant"`` to match.
    """

    gvm_loss: str = field(default="raft", metadata={"help": "'raft' (RAFT++) or 'grpo'."})
    epsilon_high: float | None = field(default=0.3, metadata={"help": "Upper clip epsilon (clip-higher)."})
    beta: float = field(default=0.001, metadata={"help": "KL coefficient (k3 estimator) to the reference model."})
