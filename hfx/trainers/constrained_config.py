"""Configurations of :class:`hfx.ConstrainedGRPOTrainer` and :class:`hfx.ConstrainedRLOOTrainer` (arXiv 2310.04373)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig, RLOOConfig

from ._checks import check_fields

__all__ = ["CONSTRAINT_TYPES", "ConstrainedGRPOConfig", "ConstrainedRLOOConfig", "PARAMETRIZATIONS"]

CONSTRAINT_TYPES = ("ge", "le", "eq")
PARAMETRIZATIONS = ("sigmoid", "projected")


@dataclass
class _ConstraintArguments:
    r"""Constrained-RLHF arguments shared by the GRPO and RLOO configs.

    Reward functions named in ``constraint_rewards`` (default: all of them) are **constraints** with thresholds
    θ_i (their "proxy points"); the others are the **task** reward, weighted by TRL's ``reward_weights`` (α). Each
    constraint has a Lagrange multiplier updated once per generation batch from the batch mean ``J_i`` of its reward
    (gathered over processes, so identical on every rank), and the multipliers are the reward weights:

    - ``"ge"`` (μ-PPO, ``J_i >= θ_i``): weight ``m_i``; ``"le"`` (All-PPO, ``J_i <= θ_i``): weight ``α_i − m_i``;
      ``"eq"`` (ξ-PPO, ``J_i = θ_i``): weight ``m_i ∈ (−1, 1)``.
    - ``lagrange_parametrization="sigmoid"`` (the paper's Eq. 4.4): ``m_i = σ(μ_i)`` (``tanh(μ_i)`` for ``eq``),
      the task reward weighted ``α·(N − Σ|m_i|)`` over the ``N`` ``ge``/``eq`` constraints (a convex mix of
      advantages; ``1`` without such constraints), and SGD with momentum on ``Σ_i s_i·m_i·(J_i − θ_i)``
      (``s_i = −1`` for ``le``). ``"projected"``: the classic Lagrangian, ``m_i = μ_i`` kept in ``[0, lagrange_max]``
      (``[−lagrange_max, lagrange_max]`` for ``eq``) by projected gradient ascent on the violation; task weight ``α``.
    - With ``lagrange_scale_beta`` the KL coefficient is scaled like the task reward (``β·(N − Σ|m_i|)``): the
      paper's μ-/ξ-PPO make the KL to the initial model the task ("stay close while the rewards hit their proxy
      points"). GRPO puts ``beta·KL`` in the loss, RLOO subtracts it from the reward.

    Parameters:
        constraint_thresholds (`list[float]`):
            θ, one per constrained reward (in ``constraint_rewards`` order, or reward-function order).
        constraint_rewards (`list[str]` or `None`, defaults to `None`):
            Names of the constrained reward functions (their ``__name__``, or the reward model's name as TRL logs
            it); ``None``: every reward function is a constraint.
        constraint_types (`list[str]`, defaults to `["ge"]`):
            ``"ge"``, ``"le"`` or ``"eq"``, one for all constraints or one per constraint.
        lagrange_parametrization (`str`, defaults to `"sigmoid"`):
            ``"sigmoid"`` (bounded multipliers, Eq. 4.4) or ``"projected"`` (unbounded, clipped to the bounds).
        lagrange_lr (`float`, defaults to `0.1`), lagrange_momentum (`float`, defaults to `0.1`):
            SGD on the multiplier loss, one step per generation batch (the paper: 0.1 / 0.1; its PPO code takes one
            step per minibatch, so scale ``lagrange_lr`` up when comparing step counts).
        lagrange_init (`list[float]` or `None`, defaults to `None`):
            Initial raw multipliers μ (``None``: 0, i.e. σ = 0.5 for sigmoid, 0 for projected/tanh).
        lagrange_max (`float`, defaults to `10.0`):
            Upper bound of projected multipliers.
        lagrange_max_grad_norm (`float` or `None`, defaults to `None`):
            Clip the multiplier gradient to this norm before the step. The authors clip it at the policy's
            ``max_grad_norm``; ``None`` does not clip (with sigmoid multipliers the gradient σ'(μ)·(J − θ) is at
            most |J − θ|/4 per constraint), ``1.0`` matches their setting with TrainingArguments' default.
        lagrange_scale_beta (`bool`, defaults to `True`):
            Scale ``beta`` by the task weight (see above). Has no effect when ``beta`` is 0.
    """

    constraint_thresholds: list[float] | None = field(
        default=None, metadata={"help": "Threshold (proxy point) of each constrained reward."}
    )
    constraint_rewards: list[str] | None = field(
        default=None, metadata={"help": "Names of the constrained reward functions (default: all)."}
    )
    constraint_types: list[str] = field(
        default_factory=lambda: ["ge"], metadata={"help": "'ge', 'le' or 'eq': one, or one per constraint."}
    )
    lagrange_parametrization: str = field(default="sigmoid", metadata={"help": "'sigmoid' or 'projected'."})
    lagrange_lr: float = field(default=0.1, metadata={"help": "Learning rate of the multiplier update."})
    lagrange_momentum: float = field(default=0.1, metadata={"help": "SGD momentum of the multiplier update."})
    lagrange_init: list[float] | None = field(default=None, metadata={"help": "Initial raw multipliers (default 0)."})
    lagrange_max: float = field(default=10.0, metadata={"help": "Upper bound of projected multipliers."})
    lagrange_max_grad_norm: float | None = field(default=None, metadata={"help": "Clip the multiplier gradient."})
    lagrange_scale_beta: bool = field(default=True, metadata={"help": "Scale beta by the task weight."})

    def __post_init__(self):
        check_fields(self, {
            "constraint_thresholds": "list[number]?", "constraint_rewards": "list[str]?", "constraint_types": "list[str]",
            "lagrange_parametrization": "str", "lagrange_lr": "number", "lagrange_momentum": "number",
            "lagrange_init": "list[number]?", "lagrange_max": "number", "lagrange_max_grad_norm": "number?",
            "lagrange_scale_beta": "bool",
        }, scalar_ok=("constraint_thresholds", "constraint_rewards", "constraint_types", "lagrange_init"))  # fmt: skip
        if not self.constraint_thresholds:
            raise ValueError(
                "constraint_thresholds is required: one threshold per constrained reward, e.g. [0.8, -0.1]"
            )
        n = len(self.constraint_thresholds)
        for name in ("constraint_thresholds", "lagrange_init"):
            bad = [v for v in getattr(self, name) or [] if not math.isfinite(float(v))]
            if bad:
                raise ValueError(f"{name} must be finite numbers, got {getattr(self, name)}")
        if self.constraint_rewards is not None and len(self.constraint_rewards) != n:
            raise ValueError(
                f"constraint_rewards names {len(self.constraint_rewards)} rewards but constraint_thresholds has {n} "
                "values; give one threshold per constrained reward"
            )
        if isinstance(self.constraint_types, str):
            self.constraint_types = [self.constraint_types]
        if len(self.constraint_types) not in (1, n):
            raise ValueError(f"constraint_types must have 1 or {n} entries, got {len(self.constraint_types)}")
        for kind in self.constraint_types:
            if kind not in CONSTRAINT_TYPES:
                raise ValueError(f"constraint_types: {kind!r} is not one of {list(CONSTRAINT_TYPES)}")
        if self.lagrange_parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"lagrange_parametrization must be one of {list(PARAMETRIZATIONS)}, got {self.lagrange_parametrization!r}"
            )
        if self.lagrange_init is not None and len(self.lagrange_init) != n:
            raise ValueError(f"lagrange_init must have {n} values (one per constraint), got {len(self.lagrange_init)}")
        # chained comparisons are False for NaN, so NaN fails too
        if not (
            0 < self.lagrange_lr < math.inf and 0 <= self.lagrange_momentum < 1 and 0 < self.lagrange_max < math.inf
        ):
            raise ValueError(
                "need finite lagrange_lr > 0, 0 <= lagrange_momentum < 1 and finite lagrange_max > 0; got "
                f"lagrange_lr={self.lagrange_lr}, lagrange_momentum={self.lagrange_momentum}, "
                f"lagrange_max={self.lagrange_max}"
            )
        if self.lagrange_max_grad_norm is not None and not 0 < self.lagrange_max_grad_norm < math.inf:
            raise ValueError(
                f"lagrange_max_grad_norm must be a finite number > 0 or None, got {self.lagrange_max_grad_norm}"
            )
        super().__post_init__()


@dataclass
class ConstrainedGRPOConfig(_ConstraintArguments, GRPOConfig):
    r"""Configuration for :class:`hfx.ConstrainedGRPOTrainer`: every :class:`trl.GRPOConfig` argument plus the
    constrained-RLHF ones (see ``_ConstraintArguments`` above for the rule).

    ``multi_objective_aggregation`` defaults to ``"normalize_then_sum"``: each reward is normalised within its group
    before the weights mix them, which is the paper's "normalise each component advantage separately".
    """

    multi_objective_aggregation: str = field(
        default="normalize_then_sum",
        metadata={"help": "'normalize_then_sum' (per-reward group normalisation, default) or 'sum_then_normalize'."},
    )


ConstrainedGRPOConfig.__doc__ += "\n    Parameters:" + _ConstraintArguments.__doc__.split("Parameters:", 1)[1]


@dataclass
class ConstrainedRLOOConfig(_ConstraintArguments, RLOOConfig):
    r"""Configuration for :class:`hfx.ConstrainedRLOOTrainer`: every :class:`trl.RLOOConfig` argument plus the
    constrained-RLHF ones (see ``_ConstraintArguments``). RLOO is linear in the reward, so a weight change acts on the
    leave-one-out advantages exactly; the sequence KL is part of the reward (scaled with ``lagrange_scale_beta``).
    """


ConstrainedRLOOConfig.__doc__ += "\n    Parameters:" + _ConstraintArguments.__doc__.split("Parameters:", 1)[1]
