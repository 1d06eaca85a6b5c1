r"""Dynamic reward weighting on TRL's GRPO and RLOO trainers (Lu et al., 2025, arXiv 2509.11452).

Two methods, chosen by ``weighting`` in :class:`hfx.DynamicWeightGRPOConfig` / :class:`hfx.DynamicWeightRLOOConfig`:

- ``"hypervolume"`` (Alg. 1): weights fixed; the hypervolume contribution of each new objective vector gives the
  meta-reward ``r_pareto ∈ [0.5, 2)``, applied to the **advantages** (an adaptive step size). The authors multiply
  the scalar reward instead, which GRPO's per-group std normalisation (and REINFORCE++ whitening) cancels exactly;
  on advantages it takes effect under every estimator and aggregation.
- ``"gradient"`` (Alg. 2): per-objective advantages → per-objective policy-gradient losses → their gradients w.r.t.
  the weights of selected ``nn.Linear`` layers, taken from **activations** (forward hooks record x and y,
  ``δ_k = ∂L_k/∂y``, ``∇W_k = Σ δ_kᵀx`` — exact, no parameter ``.grad`` touched, so DDP's reducer and gradient
  buffers are never involved); summed over processes layer by layer, Gram ``G_kj = ⟨g_k, g_j⟩``, mirror-descent
  step on the simplex. Under DeepSpeed ZeRO-3 the trainer refuses ``"gradient"`` with a clear error: back-propagating
  to activations outside the engine still runs through partitioned (released) weights, and
  ``deepspeed.zero.GatheredParameters`` does not keep them (measured on CPU, tests/dist/test_trainers_zero3.py);
  ZeRO-2/DDP and ``"hypervolume"`` work. The extra forward runs on the unwrapped model in eval mode (no dropout, no
  gradient checkpointing), once per generation batch, on at most ``weight_grad_max_samples`` completions per process.

Omitted from the paper's gradient method: the KL term of the loss (the per-objective gradients are those of the
policy-gradient surrogate at ratio 1, ``L_k = −mean_i(A_k,i · mean_t log π_i,t)``), the actor's gradient-norm
clipping (the authors read clipped gradients), and averaging over ``weight_accumulation_steps`` (their default is 1).

State (reward weights, log-weights, hypervolume buffer, current r_pareto) is identical on every rank (it is computed
from gathered rewards and all-reduced gradients), logged (``reward_weights/<name>``, ``dynamic_weights/*``), saved in
each checkpoint as ``dynamic_weight_state.json`` and restored on resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.utils import logging
from trl import GRPOTrainer, RLOOTrainer
from trl.trainer.utils import nanstd, selective_log_softmax

from ._multi_objective import MultiObjectiveMixin, resolve_reward_indices
from .dynamic_weight_config import DynamicWeightGRPOConfig, DynamicWeightRLOOConfig
from .dynamic_weight_utils import (
    ActivationGradientCapture,
    HypervolumeBuffer,
    gram_from_activations,
    mirror_descent_step,
    select_linear_modules,
)

__all__ = ["DynamicWeightGRPOTrainer", "DynamicWeightRLOOTrainer"]

logger = logging.get_logger(__name__)


def _zero3(trainer) -> bool:
    """Whether the trainer runs under DeepSpeed ZeRO stage 3."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin is not None and int(plugin.zero_stage) == 3


class _DynamicWeightMixin(MultiObjectiveMixin):
    _state_json = "dynamic_weight_state.json"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        names = list(self.reward_func_names)
        K = len(names)
        if cfg.reward_weights is None:
            self._set_reward_weights([1.0 / K] * K)
        self.weighting = cfg.weighting
        # hypervolume
        self.objective_names = list(cfg.objectives) if cfg.objectives is not None else names
        self.objective_indices = resolve_reward_indices(self.objective_names, names, "objectives")
        maximize = list(cfg.maximize) if cfg.maximize is not None else [True] * len(self.objective_indices)
        if len(maximize) != len(self.objective_indices):
            raise ValueError(
                f"maximize has {len(maximize)} entries but there are {len(self.objective_indices)} objectives "
                f"{self.objective_names}; give one bool per objective"
            )
        self.hv_buffer = HypervolumeBuffer([bool(m) for m in maximize])
        self._batch_r_pareto = 1.0  # the r_pareto applied to the current generation batch
        self._eval_stash: list[torch.Tensor] | None = None
        # (global step, how many evaluations fed the buffer at it): a resumed run re-evaluates at the checkpoint's
        # step (eval_on_start), which the checkpoint's buffer already holds; _hv_eval_replay skips those again
        self._hv_eval_at: tuple[int, int] | None = None
        self._hv_eval_replay: tuple[int, int] | None = None
        if self.weighting == "hypervolume" and cfg.hv_source == "eval" and self.eval_dataset is None:
            logger.warning(
                "hv_source='eval' without an eval_dataset: r_pareto changes only when trainer.evaluate() runs "
                "with an eval dataset"
            )
        # gradient
        self.log_weights = torch.log(self.reward_weights.double())
        self.last_influence: list[float] | None = None
        self.weight_grad_module_names: list[str] = []
        if self.weighting == "gradient" and (self.reward_weights == 0).any():
            zero = [n for n, w in zip(names, self.reward_weights.tolist()) if w == 0]
            logger.warning(
                f"weighting='gradient' with reward_weights {self.reward_weights.tolist()}: the mirror-descent step "
                f"multiplies the weights, so {zero} stay at 0 for the whole run. Give them a small positive weight to "
                "let them move, or leave the reward out."
            )
        if self.weighting == "gradient":
            if _zero3(self):
                raise ValueError(
                    "weighting='gradient' does not run under DeepSpeed ZeRO-3: with partitioned parameters the extra "
                    "per-objective backward pass (outside the DeepSpeed engine) finds released weights, even through "
                    "activation gradients and deepspeed.zero.GatheredParameters. Use ZeRO-2 or DDP (same memory for "
                    "the optimizer states with ZeRO-2), or weighting='hypervolume', which needs no gradients"
                )
            model = self.accelerator.unwrap_model(self.model)
            selected = select_linear_modules(model, cfg.weight_grad_layers, cfg.weight_grad_modules)
            self.weight_grad_module_names = [n for n, _ in selected]

    # ------------------------------------------------------------------------------------------------ weights
    def update_reward_weights(self, rewards_per_func: torch.Tensor) -> None:
        metrics = self._metrics["train"]
        if self.weighting == "hypervolume":
            self._batch_r_pareto = self.hv_buffer.r_pareto
            if self.args.hv_source == "train":
                self._hv_update(rewards_per_func)
            metrics["dynamic_weights/r_pareto"].append(self._batch_r_pareto)
        else:
            self._gradient_step(rewards_per_func)

    def _hv_update(self, rewards: torch.Tensor, mode: str = "train") -> None:
        """Add the batch's mean objective rewards to the hypervolume buffer; its metrics are logged under ``mode``
        (``"eval"`` with ``hv_source="eval"``: they come from evaluation rewards, so they log as ``eval_...``)."""
        chosen = rewards[:, self.objective_indices].float()
        v = torch.nanmean(chosen, dim=0).tolist()
        if any(math.isnan(x) for x in v):
            missing = [n for n, x in zip(self.objective_names, v) if math.isnan(x)]
            logger.warning(f"no sample was scored by {missing}: the hypervolume buffer is not updated")
        self.hv_buffer.update(v)
        metrics = self._metrics[mode]
        metrics["dynamic_weights/delta_hv"].append(self.hv_buffer.last_delta)
        metrics["dynamic_weights/hypervolume"].append(self.hv_buffer.hypervolume())
        metrics["dynamic_weights/front_size"].append(float(len(self.hv_buffer.front)))

    def _objective_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Each reward through the trainer's estimator alone: ``(B_global, K)`` advantages, NaN → 0."""
        G = self.num_generations
        K = rewards.shape[1]
        grouped = rewards.float().view(-1, G, K)
        if isinstance(self, RLOOTrainer):
            counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
            baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
            adv = (grouped - baseline).view(-1, K)
            if self.normalize_advantages:
                adv = (adv - torch.nanmean(adv, dim=0)) / (nanstd(adv, dim=0) + 1e-4)
        elif getattr(self, "multi_objective_aggregation", "sum_then_normalize") == "normalize_then_sum":
            # TRL's GDPO path: each reward z-scored within its group, then standardised over the batch (scale_rewards
            # is not used there), so a reward's scale does not set its weight's step
            z = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
            # a scored sample alone in its group has no group std: TRL's nansum makes it 0 and keeps it in the batch
            z = torch.where(torch.isnan(z) & ~torch.isnan(grouped), 0.0, z).view(-1, K)
            adv = (z - torch.nanmean(z, dim=0)) / (nanstd(z, dim=0) + 1e-4)
        else:
            adv = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1, K)
            if self.scale_rewards == "group":
                adv = adv / (nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1, K) + 1e-4)
            elif self.scale_rewards == "batch":
                adv = adv / (nanstd(rewards.float(), dim=0) + 1e-4)
        return torch.nan_to_num(adv, nan=0.0)

    def _current_lr(self) -> float:
        if getattr(self, "lr_scheduler", None) is None:
            return float(self.args.learning_rate)
        return float(self._get_learning_rate())

    def _gradient_step(self, rewards_per_func: torch.Tensor) -> None:
        gram = self.objective_gram(rewards_per_func)
        step = self._current_lr() / self.args.weight_regularization
        new = mirror_descent_step(self.log_weights, gram, step)
        metrics = self._metrics["train"]
        if not torch.isfinite(new[torch.isfinite(self.log_weights)]).all():
            logger.warning(
                "dynamic weights: non-finite mirror-descent step (Gram %s); weights unchanged", gram.tolist()
            )
        else:
            self.log_weights = new
            self._set_reward_weights(torch.exp(new))
        influence = gram.sum(dim=1).tolist()
        self.last_influence = influence
        for name, value, g in zip(self.reward_func_names, influence, torch.diagonal(gram).tolist()):
            metrics[f"dynamic_weights/influence/{name}"].append(value)
            metrics[f"dynamic_weights/grad_sq_norm/{name}"].append(g)
        metrics["dynamic_weights/step_size"].append(step)

    def objective_gram(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """The ``(K, K)`` Gram matrix of the per-objective policy gradients of this batch (all ranks call it)."""
        acc = self.accelerator
        adv = self._objective_advantages(rewards_per_func)
        local = len(self._mo_completion_ids)
        rank = acc.process_index
        adv = adv[rank * local : (rank + 1) * local]
        rows = list(range(local))
        limit = self.args.weight_grad_max_samples
        if limit is not None and local > limit:
            gen = torch.Generator().manual_seed(hash((self.args.seed, self.state.global_step, rank)) % (2**31))
            rows = sorted(torch.randperm(local, generator=gen)[:limit].tolist())
        count = torch.tensor(float(len(rows)), device=acc.device)
        total = acc.reduce(count, reduction="sum").item() if acc.num_processes > 1 else count.item()
        model = acc.unwrap_model(self.model)
        modules = dict(model.named_modules())
        selected = [(n, modules[n]) for n in self.weight_grad_module_names]
        prompt = [self._mo_prompt_ids[i] for i in rows]
        completion = [self._mo_completion_ids[i] for i in rows]
        pad = self._tokenizer.pad_token_id
        # mask_truncated_completions: TRL drops completions that did not end in EOS (or pad) from the loss, so they
        # carry no gradient here either
        ends = {*(getattr(self, "eos_token_ids", None) or [self._tokenizer.eos_token_id]), pad}
        dropped = [bool(self.mask_truncated_completions) and len(c) > 0 and int(c[-1]) not in ends for c in completion]
        P = max(len(p) for p in prompt)
        C = max(1, max(len(c) for c in completion))
        ids = torch.full((len(rows), P + C), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        cmask = torch.zeros(len(rows), C)
        for b, (p, c) in enumerate(zip(prompt, completion)):
            ids[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
            ids[b, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[b, P - len(p) : P + len(c)] = 1
            cmask[b, : len(c)] = 0 if dropped[b] else 1
        device = acc.device
        ids, attn, cmask = ids.to(device), attn.to(device), cmask.to(device)
        adv = adv[rows].to(device)
        was_training = model.training
        model.eval()  # no dropout, and no gradient checkpointing (its recomputation would re-run the hooks)
        try:
            with torch.enable_grad(), ActivationGradientCapture(selected) as capture:
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                capture.stop()
                logits = logits[:, P - 1 : -1, :].float() / self.temperature
                logps = selective_log_softmax(logits, ids[:, P:])
                seq = (logps * cmask).sum(1) / cmask.sum(1).clamp(min=1.0)
                losses = [-(adv[:, k].to(seq.dtype) * seq).sum() / total for k in range(adv.shape[1])]
                reduce = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
                gram = gram_from_activations(losses, capture.records, all_reduce=reduce)
        finally:
            model.train(was_training)
        return gram

    # ------------------------------------------------------------------------------------------------ hypervolume
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.weighting == "hypervolume" and self.model.training and self._batch_r_pareto != 1.0:
            self._scale_advantages(output, len(inputs), self._batch_r_pareto)
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._eval_stash is not None and not self.model.training:
            self._eval_stash.append(rewards.detach().cpu())
        return rewards

    def evaluation_loop(self, *args, **kwargs):
        # The buffer update runs here, between the loop and evaluate()'s self.log(metrics), so that the next r_pareto
        # is logged (state.log_history, report_to) with the eval metrics, not only returned by evaluate().
        use = self.weighting == "hypervolume" and self.args.hv_source == "eval"
        self._eval_stash = [] if use else None
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            stash, self._eval_stash = self._eval_stash, None
        if not stash:
            return output
        rewards = torch.cat(stash)
        dataloader = args[0] if args else kwargs.get("dataloader")
        per_prompt = getattr(self, "num_generations_eval", None) or self.num_generations
        try:  # TRL's eval sampler yields each prompt num_generations_eval times
            real = len(dataloader.dataset) * per_prompt
        except (AttributeError, TypeError):  # an iterable dataset: no length, and accelerate does not even it out
            real = None
        if real is not None and rewards.shape[0] > real:
            # the gathered batches end with the samples accelerate repeats to give every process a full last batch;
            # counted, they made the buffer depend on the number of processes (accelerate's remainder counts prompts,
            # not samples, so gather_for_metrics keeps them too)
            rewards = rewards[:real]
        step = self.state.global_step
        replay = self._hv_eval_replay
        if replay is not None and replay[0] == step and replay[1] > 0:
            self._hv_eval_replay = (step, replay[1] - 1)
            logger.info(
                f"hv_source='eval': the checkpoint's hypervolume buffer already holds the evaluation at step {step} "
                "(eval_on_start after a resume); it is not added again"
            )
            return output
        self._hv_update(rewards, mode="eval")
        self._metrics["eval"]["dynamic_weights/next_r_pareto"].append(self.hv_buffer.r_pareto)
        at = self._hv_eval_at
        self._hv_eval_at = (step, at[1] + 1 if at is not None and at[0] == step else 1)
        return output

    # ------------------------------------------------------------------------------------------------ state
    def method_state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state.update(
            weighting=self.weighting,
            log_weights=self.log_weights.tolist(),
            hypervolume=self.hv_buffer.state_dict(),
            objective_names=self.objective_names,
            batch_r_pareto=self._batch_r_pareto,
            last_influence=self.last_influence,
            hv_eval_at=list(self._hv_eval_at) if self._hv_eval_at is not None else None,
        )
        return state

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("weighting", self.weighting) != self.weighting:
            raise ValueError(f"the checkpoint used weighting={state['weighting']!r}, this trainer {self.weighting!r}")
        if state.get("objective_names", self.objective_names) != self.objective_names:
            raise ValueError(
                f"the checkpoint's objectives {state['objective_names']} differ from {self.objective_names}"
            )
        self._load_base_state(state)
        if "log_weights" in state:
            self.log_weights = torch.tensor(state["log_weights"], dtype=torch.float64)
        self.hv_buffer.load_state_dict(state["hypervolume"])
        self._batch_r_pareto = float(state.get("batch_r_pareto", 1.0))
        self.last_influence = state.get("last_influence")
        at = state.get("hv_eval_at")
        self._hv_eval_at = self._hv_eval_replay = (int(at[0]), int(at[1])) if at else None


class DynamicWeightGRPOTrainer(_DynamicWeightMixin, GRPOTrainer):
    """:class:`trl.GRPOTrainer` with dynamic reward weighting; ``args`` is a :class:`hfx.DynamicWeightGRPOConfig`.
    See :mod:`hfx.trainers.dynamic_weight_trainer`.

    Current state: :attr:`reward_weights`, :attr:`hv_buffer` (:class:`hfx.trainers.dynamic_weight_utils.
    HypervolumeBuffer`, with ``r_pareto``), :attr:`log_weights`, :attr:`last_influence`.
    """

    _tag_names = ["trl", "grpo", "hfx", "dynamic-reward-weighting"]
    _name = "DynamicWeight-GRPO"
    _config_class = DynamicWeightGRPOConfig


class DynamicWeightRLOOTrainer(_DynamicWeightMixin, RLOOTrainer):
    """:class:`trl.RLOOTrainer` with dynamic reward weighting; ``args`` is a :class:`hfx.DynamicWeightRLOOConfig`.
    See :class:`DynamicWeightGRPOTrainer`."""

    _tag_names = ["trl", "rloo", "hfx", "dynamic-reward-weighting"]
    _name = "DynamicWeight-RLOO"
    _config_class = DynamicWeightRLOOConfig
