"""Shared plumbing of the multi-objective trainers (constrained RLHF, dynamic reward weighting) on GRPO and RLOO.

Both methods change TRL's ``self.reward_weights`` (a float tensor, one weight per reward function) while training.
The one place to do it is ``_calculate_rewards``: TRL calls it once per generation batch, it returns the rewards
**gathered over all processes** (so anything computed from them is identical on every rank without communication),
and the parent aggregates them with ``self.reward_weights`` right after it returns — new weights act on the same batch.

:class:`MultiObjectiveMixin` provides: that hook (``update_reward_weights`` for subclasses, training mode only), the
local prompt/completion token ids of the batch (for methods that need gradients), ``reward_weights/<name>`` logging,
name → index resolution with clear errors, and JSON checkpoint state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging

from ._data import check_not_empty, check_prompt_column, check_reward_function_columns
from ._divergence import DivergenceCheckMixin
from ._state import JsonCheckpointStateMixin

logger = logging.get_logger(__name__)

__all__ = ["MultiObjectiveMixin", "resolve_reward_indices"]


def resolve_reward_indices(names: Sequence[str], available: Sequence[str], argument: str) -> list[int]:
    """Indices of ``names`` among the trainer's reward-function names; ``ValueError`` naming ``argument`` otherwise."""
    indices = []
    for name in names:
        if name not in available:
            raise ValueError(
                f"{argument}: unknown reward name {name!r}; the trainer's reward functions are {list(available)}"
            )
        indices.append(list(available).index(name))
    if len(set(indices)) != len(indices):
        raise ValueError(f"{argument}: a reward name is given twice ({list(names)})")
    return indices


class MultiObjectiveMixin(DivergenceCheckMixin, JsonCheckpointStateMixin):
    """Mixin placed before ``GRPOTrainer``/``RLOOTrainer``; subclasses implement :meth:`update_reward_weights`.

    ``_config_class`` is the config class the trainer requires (a ``TypeError`` names it otherwise).
    """

    _config_class: type

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self._config_class(f"{str(name).split('/')[-1]}-{self._name}")
        if not isinstance(args, self._config_class):
            raise TypeError(f"{type(self).__name__} needs a {self._config_class.__name__}, got {type(args).__name__}")
        eval_dataset = pargs[0] if pargs else kwargs.get("eval_dataset")  # GRPO/RLOO take it after train_dataset
        check_not_empty(train_dataset, eval_dataset)  # TRL would "train" 0 steps on an empty one, with a warning
        check_prompt_column(train_dataset, eval_dataset, type(self).__name__)
        check_reward_function_columns(reward_funcs, train_dataset, eval_dataset, type(self).__name__)
        super().__init__(model, reward_funcs, args, train_dataset, *pargs, **kwargs)
        names = list(self.reward_func_names)
        shared = sorted({n for n in names if names.count(n) > 1})
        if shared:  # constraint_rewards / objectives used to bind such a name to the first function, silently
            raise ValueError(
                f"{type(self).__name__}: reward functions share the name(s) {shared} ({names}). Their weights, logs "
                "(reward_weights/<name>), checkpoints and constraint_rewards / objectives go by name: give each a "
                "distinct one, e.g. make_length_reward(..., name='short_length'), or a differently named function."
            )
        self._mo_prompt_ids: list[list[int]] | None = None
        self._mo_completion_ids: list[list[int]] | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def update_reward_weights(self, rewards_per_func: torch.Tensor) -> None:
        """Called once per training generation batch with the gathered ``(B_global, K)`` rewards (NaN = not scored).

        Set ``self.reward_weights`` (and anything else) here; the parent aggregates with it right after. Not called
        for the batch TRL regenerates when resuming from a checkpoint saved inside a generation cycle: the saved state
        already includes that batch's update (see :mod:`hfx.trainers._state`).
        """
        raise NotImplementedError

    def _generate(self, prompts):
        result = super()._generate(prompts)
        self._mo_prompt_ids = [list(p) for p in result[0]]  # local, unpadded (GRPO and RLOO return it first)
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._check_finite_rewards(rewards_per_func)
        self._mo_completion_ids = [list(c) for c in completion_ids_list]
        mode = "train" if self.model.training else "eval"
        # a batch regenerated after resuming inside a generation cycle: its update is already in the checkpoint
        if mode == "train" and not self._take_replay():
            self.update_reward_weights(rewards_per_func)
        for name, weight in zip(self.reward_func_names, self.reward_weights.tolist(), strict=True):
            self._metrics[mode][f"reward_weights/{name}"].append(weight)
        return rewards_per_func

    # ------------------------------------------------------------------------------------------------ helpers
    def _check_finite_rewards(self, rewards: torch.Tensor) -> None:
        """Refuse a ±inf reward where it appears, naming its function: it would make the batch's advantages NaN and
        enter the multipliers / hypervolume front (saved as ``Infinity`` in checkpoints), and the run would stop later
        as a "diverged" loss blaming the learning rate. NaN (a sample a function does not score) stays allowed."""
        infinite = torch.isinf(rewards)
        if not infinite.any():
            return
        column = int(infinite.any(dim=0).nonzero()[0])
        value = rewards[:, column][infinite[:, column]][0].item()
        raise ValueError(
            f"{type(self).__name__}: the reward function {self.reward_func_names[column]!r} returned {value} for "
            f"{int(infinite[:, column].sum())} of this batch's {rewards.shape[0]} samples: rewards must be finite "
            "(NaN, i.e. no score for a sample, is skipped); make it return finite values, e.g. clip them."
        )

    def _scale_advantages(self, output: dict[str, Any], local_samples: int, factor: float) -> None:
        """Multiply this generation batch's advantages by ``factor``, and its entries in TRL's completions log (the
        last ``local_samples × processes`` logged values, gathered over processes)."""
        output["advantages"] = output["advantages"] * factor
        logged = self._logs["advantages"]
        n = local_samples * self.accelerator.num_processes
        for k in range(max(0, len(logged) - n), len(logged)):
            logged[k] = logged[k] * factor

    def _set_reward_weights(self, weights: Sequence[float] | torch.Tensor) -> None:
        self.reward_weights = torch.as_tensor(weights, dtype=torch.float32).detach().cpu().clone()

    def _configured_reward_weights(self) -> list[float] | None:
        weights = getattr(self.args, "reward_weights", None)
        return None if weights is None else [float(w) for w in weights]

    def _base_state(self) -> dict[str, Any]:
        return {
            "reward_weights": self.reward_weights.tolist(),
            "reward_names": list(self.reward_func_names),
            "configured_reward_weights": self._configured_reward_weights(),  # to notice an edited config on resume
        }

    def _load_base_state(self, state: dict[str, Any]) -> None:
        names = state.get("reward_names")
        if names is not None and list(names) != list(self.reward_func_names):
            raise ValueError(
                f"the checkpoint's reward functions {names} differ from this trainer's {list(self.reward_func_names)}; "
                "resume with the same reward_funcs in the same order"
            )
        if "reward_weights" in state:
            weights = state["reward_weights"]
            if len(weights) != len(self.reward_func_names) or not all(
                isinstance(w, (int, float)) and math.isfinite(w) for w in weights
            ):
                raise ValueError(
                    f"the checkpoint's reward_weights {weights} are not {len(self.reward_func_names)} finite numbers "
                    f"(one per reward function {list(self.reward_func_names)}); the state file was edited or is damaged"
                )
            self._set_reward_weights(weights)
        if "configured_reward_weights" in state and state["configured_reward_weights"] != (
            configured := self._configured_reward_weights()
        ):
            # as for changed constraint_thresholds: warn and continue with the checkpoint's state (a resumed run
            # used to drop an edited reward_weights silently)
            logger.warning(
                f"reward_weights={configured} differ from those of the run that saved this checkpoint "
                f"({state['configured_reward_weights']}); resuming continues with the checkpoint's weights "
                f"{[round(w, 6) for w in self.reward_weights.tolist()]}. To train with the new weights, start a new run "
                "from the checkpoint's model instead of resume_from_checkpoint."
            )
