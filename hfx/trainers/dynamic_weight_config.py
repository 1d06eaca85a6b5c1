"""Configurations of :class:`hfx.DynamicWeightGRPOTrainer` and :class:`hfx.DynamicWeightRLOOTrainer` (arXiv 2509.11452)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig, RLOOConfig

from ._checks import check_fields

__all__ = ["DynamicWeightGRPOConfig", "DynamicWeightRLOOConfig", "HV_SOURCES", "WEIGHTINGS"]

WEIGHTINGS = ("hypervolume", "gradient")
HV_SOURCES = ("train", "eval")


@dataclass
class _DynamicWeightArguments:
    r"""Dynamic reward weighting arguments shared by the GRPO and RLOO configs (Lu et al., 2025).

    ``weighting="hypervolume"`` (Alg. 1): the reward weights stay fixed; a buffer B of objective vectors (B[0] = the
    reference, the performance before training) rewards each new vector v by its hypervolume contribution ΔHV and
    the meta-reward ``r_pareto = 0.5 + 1.5·tanh(ΔHV)`` (1 at the start) multiplies the **advantages** of the following
    generation batches — an adaptive step size that acts under every estimator (the authors scale the scalar reward,
    which GRPO's per-group std normalisation cancels). v is the vector of per-objective means:

    - ``hv_source="train"`` (default, free): the means of each training generation batch's gathered rewards; the
      first batch is the reference, and the r_pareto computed from batch t scales batch t+1 (so the step size does
      not depend on the very samples it scales).
    - ``hv_source="eval"``: the means of the rewards of each ``trainer.evaluate()`` run (the ``eval_rewards/<name>/mean``
      it logs); set ``eval_strategy``/``eval_steps`` and ``eval_on_start=True`` so the reference is measured before
      training (otherwise the first evaluation is the reference). r_pareto changes after each evaluation.

    ``weighting="gradient"`` (Alg. 2): once per generation batch, per-objective advantages (each reward alone through
    the trainer's estimator) give per-objective policy-gradient losses ``L_k = −mean_i(A_k,i · mean_t log π)``; their
    gradients w.r.t. the weights of selected ``nn.Linear`` layers (taken from activations: exact; DDP and ZeRO-2,
    refused under ZeRO-3) give the Gram matrix ``G``, and the weights take a mirror-descent step on the simplex
    ``log w ← log w + (η_t/μ)·G·1``, ``w = softmax(log w)``, with η_t the current policy learning rate and
    μ = ``weight_regularization``. The new weights act on the same batch.

    Parameters:
        weighting (`str`, defaults to `"hypervolume"`):
            ``"hypervolume"`` or ``"gradient"``.
        objectives (`list[str]` or `None`, defaults to `None`):
            Hypervolume: names of the reward functions forming the objective vector (default: all of them).
        maximize (`list[bool]` or `None`, defaults to `None`):
            Hypervolume: per objective, whether larger is better (default: all ``True``); one entry per objective.
        hv_source (`str`, defaults to `"train"`):
            Hypervolume: ``"train"`` (training batch means) or ``"eval"`` (evaluation means), see above.
        weight_regularization (`float`, defaults to `1e-5`):
            Gradient: μ, the step is η_t/μ (the paper: 1e-5 for Qwen3-8B, 1e-4 for DeepSeek-7B).
        weight_grad_layers (`list[int]` or `None`, defaults to `None`):
            Gradient: decoder-layer indices whose Linear layers enter the Gram matrix (default: the middle half).
        weight_grad_modules (`list[str]` or `None`, defaults to `None`):
            Gradient: regular expressions narrowing the Linear layers by name (e.g. ``["mlp"]``).
        weight_grad_max_samples (`int` or `None`, defaults to `16`):
            Gradient: at most this many completions per process enter the gradient forward (``None``: all).

    ``reward_weights`` defaults to uniform ``1/K`` here (not TRL's ones); the gradient method needs them non-negative
    and summing to 1.
    """

    weighting: str = field(default="hypervolume", metadata={"help": "'hypervolume' or 'gradient'."})
    objectives: list[str] | None = field(
        default=None, metadata={"help": "Hypervolume: reward names forming the objective vector (default: all)."}
    )
    maximize: list[bool] | None = field(
        default=None, metadata={"help": "Hypervolume: per objective, larger is better (default: all True)."}
    )
    hv_source: str = field(default="train", metadata={"help": "Hypervolume: 'train' or 'eval' means."})
    weight_regularization: float = field(default=1e-5, metadata={"help": "Gradient: mu, step = lr / mu."})
    weight_grad_layers: list[int] | None = field(
        default=None, metadata={"help": "Gradient: decoder-layer ids (default: the middle half)."}
    )
    weight_grad_modules: list[str] | None = field(
        default=None, metadata={"help": "Gradient: regexes narrowing the Linear layers by name."}
    )
    weight_grad_max_samples: int | None = field(
        default=16, metadata={"help": "Gradient: completions per process in the gradient forward (None: all)."}
    )

    def __post_init__(self):
        check_fields(self, {
            "weighting": "str", "objectives": "list[str]?", "maximize": "list[bool]?", "hv_source": "str",
            "weight_regularization": "number", "weight_grad_layers": "list[int]?", "weight_grad_modules": "list[str]?",
            "weight_grad_max_samples": "int?",
        }, scalar_ok=("objectives", "weight_grad_layers", "weight_grad_modules"))  # fmt: skip
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if self.hv_source not in HV_SOURCES:
            raise ValueError(f"hv_source must be one of {list(HV_SOURCES)}, got {self.hv_source!r}")
        if self.objectives is not None and self.maximize is not None and len(self.maximize) != len(self.objectives):
            raise ValueError(
                f"maximize has {len(self.maximize)} entries but objectives names {len(self.objectives)}; "
                "give one bool per objective"
            )
        if not 0 < self.weight_regularization < math.inf:
            raise ValueError(f"weight_regularization must be > 0, got {self.weight_regularization}")
        if self.weight_grad_max_samples is not None and self.weight_grad_max_samples < 1:
            raise ValueError(f"weight_grad_max_samples must be >= 1 or None, got {self.weight_grad_max_samples}")
        if self.weighting == "gradient" and self.reward_weights is not None:
            w = [float(x) for x in self.reward_weights]
            if any(x < 0 or math.isnan(x) for x in w) or abs(sum(w) - 1.0) > 1e-6 or not any(x > 0 for x in w):
                raise ValueError(
                    f"weighting='gradient' moves the reward weights on the simplex: reward_weights must be non-negative "
                    f"and sum to 1, got {w} (leave it None for uniform 1/K)"
                )
        super().__post_init__()


@dataclass
class DynamicWeightGRPOConfig(_DynamicWeightArguments, GRPOConfig):
    r"""Configuration for :class:`hfx.DynamicWeightGRPOTrainer`: every :class:`trl.GRPOConfig` argument plus the
    dynamic-weighting ones (see ``_DynamicWeightArguments`` above). With ``weighting="gradient"`` the per-objective
    advantages are each reward through the advantage estimator alone: group-centred and scaled as ``scale_rewards``
    says, or, with ``multi_objective_aggregation="normalize_then_sum"``, z-scored within its group and standardised
    over the batch as TRL does there; completions that ``mask_truncated_completions`` drops from the loss give no
    gradient.
    """


DynamicWeightGRPOConfig.__doc__ += "\n    Parameters:" + _DynamicWeightArguments.__doc__.split("Parameters:", 1)[1]


@dataclass
class DynamicWeightRLOOConfig(_DynamicWeightArguments, RLOOConfig):
    r"""Configuration for :class:`hfx.DynamicWeightRLOOTrainer`: every :class:`trl.RLOOConfig` argument plus the
    dynamic-weighting ones (see ``_DynamicWeightArguments``). With ``weighting="gradient"`` the per-objective
    advantages are each reward's leave-one-out advantages (normalised if ``normalize_advantages``), without the KL
    term.
    """


DynamicWeightRLOOConfig.__doc__ += "\n    Parameters:" + _DynamicWeightArguments.__doc__.split("Parameters:", 1)[1]
