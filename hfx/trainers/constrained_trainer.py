r"""Constrained RLHF on TRL's GRPO and RLOO trainers (Moskovitz et al., ICLR 2024, arXiv 2310.04373).

Once per generation batch, in training mode, the batch means ``J_i`` of the constrained rewards (gathered over
processes, so every rank computes the same step) update the Lagrange multipliers (:class:`hfx.trainers.lagrange.
LagrangeMultipliers`); the multipliers become TRL's ``reward_weights`` before TRL aggregates the same batch, and the
KL coefficient ``beta`` is scaled like the task reward (see :class:`hfx.ConstrainedGRPOConfig`). GRPO's advantages
then mix per-reward group-normalised rewards (``normalize_then_sum``, the paper's separately normalised component
advantages); RLOO's leave-one-out advantages are linear in the weights.

Logged per constraint: ``constraint/<name>/multiplier`` (``m_i``), ``…/value`` (``J_i``), ``…/threshold``, and
``constraint/task_weight``, ``constraint/beta``, ``reward_weights/<name>``. Multipliers, momentum buffer, thresholds
and the Nelder–Mead threshold search (:class:`hfx.ThresholdSearchCallback`) are saved in each checkpoint as
``constraint_state.json`` and restored on resume.

Differences from the paper, by construction of GRPO/RLOO: sequence-level rewards and Monte-Carlo batch means
instead of per-token returns and value heads; the KL "task reward" of μ-/ξ-PPO is the scaled KL term of the
estimator (GRPO: loss, RLOO: reward), not a normalised advantage. Without a task reward, the advantages are
scaled by the mean |weight| of the constraint rewards where the estimator's standardisation would cancel it
(:meth:`_ConstrainedMixin.advantage_scale`), so that a met constraint's push fades as in Eq. 4.4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging
from trl import GRPOTrainer, RLOOTrainer

from ._multi_objective import MultiObjectiveMixin, resolve_reward_indices
from .constrained_config import ConstrainedGRPOConfig, ConstrainedRLOOConfig
from .lagrange import LagrangeMultipliers
from .threshold_search import ThresholdSearchCallback

__all__ = ["ConstrainedGRPOTrainer", "ConstrainedRLOOTrainer"]

logger = logging.get_logger(__name__)


class _ConstrainedMixin(MultiObjectiveMixin):
    _state_json = "constraint_state.json"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        names = list(self.reward_func_names)
        if cfg.constraint_rewards is None:
            if len(cfg.constraint_thresholds) != len(names):
                raise ValueError(
                    f"constraint_thresholds has {len(cfg.constraint_thresholds)} values but there are {len(names)} "
                    f"reward functions {names}; give one threshold per reward function, or name the constrained "
                    "ones in constraint_rewards"
                )
            self.constraint_indices = list(range(len(names)))
        else:
            self.constraint_indices = resolve_reward_indices(cfg.constraint_rewards, names, "constraint_rewards")
        self.constraint_names = [names[i] for i in self.constraint_indices]
        kinds = list(cfg.constraint_types) * (len(self.constraint_indices) if len(cfg.constraint_types) == 1 else 1)
        self.multipliers = LagrangeMultipliers(
            kinds,
            cfg.constraint_thresholds,
            lr=cfg.lagrange_lr,
            momentum=cfg.lagrange_momentum,
            parametrization=cfg.lagrange_parametrization,
            init=cfg.lagrange_init,
            max_value=cfg.lagrange_max,
            max_grad_norm=cfg.lagrange_max_grad_norm,
        )
        self.base_reward_weights = self.reward_weights.tolist()  # α (TRL's reward_weights, default 1)
        self.base_beta = float(self.beta)
        task = [i for i in range(len(names)) if i not in self.constraint_indices]
        self._has_task_reward = bool(task)
        if not task and self.base_beta == 0.0 and any(k in ("ge", "eq") for k in kinds):
            logger.warning(
                "constrained training with no task reward and beta=0: the policy only follows the constraint "
                "rewards; set beta > 0 (the paper's KL task) or leave a reward out of constraint_rewards"
            )
        self.constraint_values: list[float] | None = None
        self.search_callback: ThresholdSearchCallback | None = None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ThresholdSearchCallback):
                callback.bind(self)
                self.search_callback = callback
        self._apply_multipliers()

    # ------------------------------------------------------------------------------------------------ weights
    def _apply_multipliers(self) -> None:
        self._set_reward_weights(self.multipliers.reward_weights(self.base_reward_weights, self.constraint_indices))
        if self.args.lagrange_scale_beta and self.base_beta != 0.0:
            # floor: GRPO decides whether to compute reference log-probs from beta != 0 before the update
            self.beta = self.base_beta * max(self.multipliers.task_weight(), 1e-8)

    def advantage_scale(self) -> float:
        """The factor the advantages get: 1, except with constraint rewards only (μ-/ξ-PPO, the KL as the task)
        under an estimator that standardises the weighted reward (GRPO, or RLOO with ``normalize_advantages`` and
        ``beta=0``).
        There ``w·z / std(w·z) = ±z``: the standardisation cancels the multipliers' size, so a met constraint
        (σ(μ) → 0) kept pushing its reward at full strength (Eq. 4.4 fades it). The mean |weight| of the
        constraint rewards puts that size back; with a task reward the weights sum to N and nothing changes."""
        if self._has_task_reward:
            return 1.0
        if isinstance(self, RLOOTrainer):
            # RLOO's KL is in the reward: with beta != 0 the standardised quantity is w·z − β·kl, whose sizes already
            # keep their ratio (scaling it would damp the KL task too)
            renormalised = bool(getattr(self, "normalize_advantages", False)) and float(self.beta) == 0.0
        else:
            aggregation = getattr(self, "multi_objective_aggregation", "sum_then_normalize")
            renormalised = aggregation == "normalize_then_sum" or self.scale_rewards != "none"
        if not renormalised:
            return 1.0
        weights = self.reward_weights.tolist()
        return sum(abs(weights[i]) for i in self.constraint_indices) / len(self.constraint_indices)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        scale = self.advantage_scale()
        if self.model.training:
            self._metrics["train"]["constraint/advantage_scale"].append(scale)
        if scale != 1.0:
            self._scale_advantages(output, len(inputs), scale)
        return output

    def set_constraint_thresholds(self, thresholds: Sequence[float]) -> None:
        """Replace the thresholds θ (e.g. from a threshold search); the multipliers keep their values."""
        if len(thresholds) != len(self.constraint_indices):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self.constraint_indices)} constraints")
        self.multipliers.thresholds = [float(t) for t in thresholds]

    def update_reward_weights(self, rewards_per_func: torch.Tensor) -> None:
        chosen = rewards_per_func[:, self.constraint_indices].float()
        values = torch.nanmean(chosen, dim=0).tolist()
        self.constraint_values = [float(v) for v in values]
        if any(math.isnan(v) for v in values):
            missing = [n for n, v in zip(self.constraint_names, values) if math.isnan(v)]
            logger.warning(f"no sample of this batch was scored by {missing}: their multipliers are not updated")
        self.multipliers.step(values)
        self._apply_multipliers()
        metrics = self._metrics["train"]
        for name, m, j, t in zip(
            self.constraint_names, self.multipliers.values(), values, self.multipliers.thresholds
        ):
            metrics[f"constraint/{name}/multiplier"].append(m)
            metrics[f"constraint/{name}/value"].append(j)
            metrics[f"constraint/{name}/threshold"].append(t)
        metrics["constraint/task_weight"].append(self.multipliers.task_weight())
        metrics["constraint/beta"].append(float(self.beta))

    # ------------------------------------------------------------------------------------------------ state
    def method_state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state.update(
            multipliers=self.multipliers.state_dict(),
            beta=float(self.beta),
            constraint_names=self.constraint_names,
            constraint_values=self.constraint_values,
            threshold_search=None if self.search_callback is None else self.search_callback.state_dict(),
        )
        return state

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        """Restore multipliers, thresholds and the threshold search. Changed constraint names, kinds or
        parametrization are errors (the saved multipliers would mean other reward weights); changed thresholds
        and a search left without its callback are warnings (see below)."""
        if state.get("constraint_names", self.constraint_names) != self.constraint_names:
            raise ValueError(
                f"the checkpoint constrains {state['constraint_names']}, this trainer {self.constraint_names}"
            )
        self._load_base_state(state)
        self.multipliers.load_state_dict(state["multipliers"])  # raises on changed constraint kinds/parametrization
        self.constraint_values = state.get("constraint_values")
        self._apply_multipliers()
        search = state.get("threshold_search")
        if search is not None and self.search_callback is not None:
            self.search_callback.load_state_dict(search)
        elif search is not None and not search.get("done", False):
            logger.warning(
                f"the checkpoint was saved during a threshold search ({search.get('phases', 0)} phases scored), "
                "but no ThresholdSearchCallback is attached: the search stops and training continues with the "
                f"checkpoint's thresholds {self.multipliers.thresholds}. Pass the same ThresholdSearchCallback in "
                "`callbacks` to continue the search."
            )
        configured = [float(t) for t in self.args.constraint_thresholds]
        if search is None and not all(
            math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(self.multipliers.thresholds, configured)
        ):
            # Warn, do not raise, and keep the checkpoint's values: what transformers does when resuming with changed
            # arguments that the checkpoint overrides (compare_trainer_and_checkpoint_args); the thresholds are part
            # of the saved state because a threshold search moves them. Without a search in the checkpoint they
            # should equal the config's, so a difference means the config was edited between the two runs.
            logger.warning(
                f"constraint_thresholds={configured} differ from the checkpoint's thresholds "
                f"{self.multipliers.thresholds}; resuming continues with the checkpoint's. To train with the new "
                "thresholds, edit multipliers.thresholds in the checkpoint's constraint_state.json, or start a new "
                "run from the checkpoint's model instead of resume_from_checkpoint."
            )


class ConstrainedGRPOTrainer(_ConstrainedMixin, GRPOTrainer):
    """:class:`trl.GRPOTrainer` whose reward weights (and KL coefficient) are Lagrange multipliers of constraints on
    some of its rewards; ``args`` is a :class:`hfx.ConstrainedGRPOConfig`. See :mod:`hfx.trainers.constrained_trainer`.

    The current multipliers are :attr:`multipliers` (:class:`hfx.trainers.lagrange.LagrangeMultipliers`); pass a
    :class:`hfx.ThresholdSearchCallback` in ``callbacks`` to search the thresholds with Nelder–Mead (NM-PPO).
    """

    _tag_names = ["trl", "grpo", "hfx", "constrained-rlhf"]
    _name = "Constrained-GRPO"
    _config_class = ConstrainedGRPOConfig


class ConstrainedRLOOTrainer(_ConstrainedMixin, RLOOTrainer):
    """:class:`trl.RLOOTrainer` with Lagrange-multiplier reward weights; ``args`` is a
    :class:`hfx.ConstrainedRLOOConfig`. See :class:`ConstrainedGRPOTrainer`."""

    _tag_names = ["trl", "rloo", "hfx", "constrained-rlhf"]
    _name = "Constrained-RLOO"
    _config_class = ConstrainedRLOOConfig
