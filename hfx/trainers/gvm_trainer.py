r"""GVM-GRPO and GVM-RAFT++ on TRL's GRPOTrainer (Yao et al., 2025, arXiv 2505.02391).

Design (TRL has fixed ``num_generations`` per group, and vLLM server mode de-duplicates prompts in blocks of
``num_generations``): prompt ``i`` with ``n_i`` allocated completions becomes ``n_i / num_generations`` consecutive
copies of itself, each an ordinary GRPO group. The trainer keeps a *plan*: the round's prompts in a seeded order, each
repeated ``n_i`` times, consumed ``generation_batch_size`` entries at a time (rank ``r`` takes its contiguous slice).
The dataloader's own rows are ignored in training: ``_generate_and_score_completions`` swaps them for the plan's
rows, so the plan can change between rounds without rebuilding the dataloader (use ``max_steps``).

Advantages:

- ``gvm_loss="grpo"`` (GVM-GRPO): rewards normalised over **all** samples of a prompt present in the generation
  batch (the verl fork groups by dataset index), not per copy; ``scale_rewards`` as in TRL (group / batch / none).
- ``gvm_loss="raft"`` (RAFT++, Eq. 8): advantage 1 on accepted samples (weighted reward ``>= gvm_accept_threshold``);
  rejected samples are masked out of the loss (a ``tool_mask`` entry, so attention is untouched) and the DAPO
  token normaliser counts accepted tokens only. TRL's clipped surrogate with ``epsilon``/``epsilon_high`` and k3 KL.

Where the allocation comes from: every ``gvm_refresh_steps`` optimizer steps (checked when a generation batch is due),
the next pool of prompts is drawn, piloted (TRL's own ``_generate`` and ``_calculate_rewards``, so vLLM, chat templates
and reward models work as in training), and allocated by :func:`hfx.gvm.allocate_samples`. Statistics are gathered
across ranks, so the plan is identical everywhere. The allocation (``p``, ``G``, ``n``, iteration, plan position,
sample counters) is saved in each checkpoint as ``gvm_state.json`` and restored on resume, with the settings it
depends on (``num_generations``, ``gvm``, the dataset length and a digest of its prompts, ``seed``): resuming under
different ones is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers.utils import logging
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from ..gvm import GVMAllocation, allocate_samples, pilot_statistics, sequence_grad_norms
from ..gvm import uniform_allocation as _uniform
from ._data import check_not_empty, check_prompt_column, check_reward_function_columns
from ._divergence import DivergenceCheckMixin
from ._state import JsonCheckpointStateMixin
from .gvm_config import GVMGRPOConfig, GVMRAFTConfig

__all__ = ["GVMGRPOTrainer", "GVMRAFTTrainer", "STATE_JSON"]

logger = logging.get_logger(__name__)

STATE_JSON = "gvm_state.json"


class GVMGRPOTrainer(DivergenceCheckMixin, JsonCheckpointStateMixin, GRPOTrainer):
    """:class:`trl.GRPOTrainer` whose per-prompt sample counts come from GVM's Proposition 1 (see the module doc).

    Takes the arguments of ``GRPOTrainer``; ``args`` is a :class:`hfx.GVMGRPOConfig`. The current allocation is
    :attr:`gvm_state` (a :class:`hfx.gvm.GVMAllocation`); its summary is logged under ``gvm/*``.
    """

    _tag_names = ["trl", "grpo", "hfx", "gvm"]
    _name = "GVM-GRPO"
    _config_class = GVMGRPOConfig
    _state_json = STATE_JSON

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self._config_class(f"{str(name).split('/')[-1]}-{self._name}")
        if not isinstance(args, GVMGRPOConfig):
            raise TypeError(f"{type(self).__name__} needs a GVMGRPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, train_dataset, *pargs, **kwargs)
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("GVM needs a map-style train_dataset (it indexes prompts to build its plan)")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("GVM supports multi_objective_aggregation='sum_then_normalize' only")
        check_not_empty(self.train_dataset, self.eval_dataset)
        check_prompt_column(self.train_dataset, self.eval_dataset, type(self).__name__)
        check_reward_function_columns(self.reward_funcs, self.train_dataset, self.eval_dataset, type(self).__name__)
        if args.gvm_pool_size is not None and args.gvm_pool_size > len(self.train_dataset):
            raise ValueError(
                f"gvm_pool_size={args.gvm_pool_size} is larger than the train dataset ({len(self.train_dataset)} "
                f"prompts): a round would hold a prompt twice. Use at most {len(self.train_dataset)}, or None (all)."
            )
        self.gvm_state: GVMAllocation | None = None
        self._gvm_cursor = 0  # plan entries consumed in the current round
        self._gvm_batch_start: int | None = None  # plan position of the latest generation batch
        self._gvm_counters = {"pilot_samples": 0, "train_samples": 0, "pilot_seconds": 0.0, "rounds_run_here": 0}
        self._gvm_batch_ids: list[int] | None = None
        self._gvm_rewards: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ plan
    def _pool_indices(self, iteration: int) -> list[int]:
        """Round ``iteration``'s prompts: the next ``P`` of a seeded permutation of the dataset, a new one each epoch
        of ``ceil(size / P)`` rounds; an epoch's last round wraps to that permutation's start, so that no round holds
        a prompt twice (its pilot statistics would be split between the copies)."""
        size = len(self.train_dataset)
        pool = self.args.gvm_pool_size or size
        epoch, chunk = divmod(iteration, -(-size // pool))
        perm = list(range(size))
        random.Random(f"hfx-gvm-pool|{self.args.seed}|{epoch}").shuffle(perm)
        return [perm[(chunk * pool + t) % size] for t in range(pool)]

    def _plan_pass(self, state: GVMAllocation, pass_index: int) -> list[int]:
        """One pass over the round's plan: prompts in a seeded order, each as ``n_i`` consecutive entries."""
        order = list(range(len(state.indices)))
        random.Random(f"hfx-gvm-plan|{self.args.seed}|{state.iteration}|{pass_index}").shuffle(order)
        return [state.indices[k] for k in order for _ in range(state.n[k])]

    def _plan_slice(self, start: int, length: int) -> list[int]:
        """Entries ``[start, start + length)`` of the endless plan stream (passes repeat with a new order)."""
        total = sum(self.gvm_state.n)
        out: list[int] = []
        pos = start
        while len(out) < length:
            pass_index, offset = divmod(pos, total)
            entries = self._plan_pass(self.gvm_state, pass_index)
            take = entries[offset : offset + length - len(out)]
            out.extend(take)
            pos += len(take)
        return out

    def _unit(self) -> int:
        return self.num_generations

    def _round_budget(self, pool: int) -> int:
        budget = self.args.gvm_budget or self.args.gvm_num_pilot * pool
        units = budget // self._unit()
        if units < 1:
            raise ValueError(f"gvm_budget ({budget}) is smaller than one group of num_generations={self._unit()}")
        return units

    def gvm_refresh(self) -> GVMAllocation:
        """Start a new allocation round now (all ranks must call it together). Returns the new :attr:`gvm_state`."""
        iteration = 0 if self.gvm_state is None else self.gvm_state.iteration + 1
        indices = self._pool_indices(iteration)
        units = self._round_budget(len(indices))
        unit = self._unit()
        min_units = -(-self.args.gvm_min_per_prompt // unit)
        info: dict[str, Any] = {}
        if self.args.gvm:
            start = time.perf_counter()
            p, G, info = self._gvm_pilot(indices)
            seconds = time.perf_counter() - start
            self._gvm_counters["pilot_samples"] += int(info["pilot_samples"])
            self._gvm_counters["pilot_seconds"] += seconds
            info["pilot_seconds"] = seconds
            if not all(math.isfinite(g) for g in G):  # the gradients blew up: say that, not "finite G_i" from allocate
                raise self.diverged_error("and the pilot samples' gradient norms G_i are not finite")
            try:
                copies = allocate_samples(p, G, units, self.args.gvm_alpha, self.args.gvm_beta, min_units)
                uniform = False
            except ValueError as err:
                if "nothing to allocate" not in str(err):
                    raise
                logger.warning("GVM: no pilot sample was accepted in this pool; falling back to a uniform allocation")
                copies, uniform = _uniform(len(indices), units), True
        else:
            p, G = [0.0] * len(indices), [0.0] * len(indices)
            copies, uniform = _uniform(len(indices), units), True
        self.gvm_state = GVMAllocation(
            indices=indices,
            p=p,
            G=G,
            n=[c * unit for c in copies],
            budget=units * unit,
            iteration=iteration,
            start_step=self.state.global_step,
            uniform=uniform,
            alpha=self.args.gvm_alpha,
            beta=self.args.gvm_beta,
            num_pilot=self.args.gvm_num_pilot if self.args.gvm else 0,
            extra=info,
        )
        self._gvm_cursor = 0
        self._gvm_counters["rounds_run_here"] += 1
        return self.gvm_state

    def _gvm_pilot(self, indices: list[int]) -> tuple[list[float], list[float], dict[str, float]]:
        """Alg. 2 with the trainer's own generation and reward paths; TRL's completion metrics and its count of
        tokens seen (``num_tokens``, ``state.num_input_tokens_seen``) are left untouched: pilot samples are not
        trained on."""
        mode = "train" if self.model.training else "eval"
        saved_metrics = {k: list(v) for k, v in self._metrics[mode].items()}
        tokens_seen = self.state.num_input_tokens_seen
        device = self.accelerator.device
        process = self.accelerator.process_index
        unwrapped = self.accelerator.unwrap_model(self.model)

        def generate_fn(rows):
            prompt_ids, completion_ids, _, completions, *_ = self._generate([r["prompt"] for r in rows])
            return prompt_ids, completion_ids, completions

        def score_fn(rows, completions, completion_ids):
            per_func = self._calculate_rewards(rows, [r["prompt"] for r in rows], completions, completion_ids)
            local = per_func[process * len(rows) : (process + 1) * len(rows)]
            total = (local * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
            total[torch.isnan(local).all(dim=1)] = torch.nan
            return total.cpu()

        def grad_fn(prompt_ids, completion_ids):
            return sequence_grad_norms(
                unwrapped, prompt_ids, completion_ids, self._tokenizer.pad_token_id, self.args.gvm_grad_batch_size
            )

        rows = [self.train_dataset[i] for i in indices]
        try:
            p, G, info = pilot_statistics(
                rows,
                indices,
                num_pilot=self.args.gvm_num_pilot,
                generate_fn=generate_fn,
                score_fn=score_fn,
                grad_fn=grad_fn,
                accept_threshold=self.args.gvm_accept_threshold,
                prompts_per_batch=self.args.gvm_pilot_batch_size,
                show_progress=not self.args.disable_tqdm,
                gather=lambda obj: gather_object([obj]),
            )
        finally:
            self.state.num_input_tokens_seen = tokens_seen
            self._metrics[mode].clear()
            self._metrics[mode].update(saved_metrics)
            self._pending_extra_logs.clear()  # reward functions' log_extra / log_metric calls on pilot samples
            self._pending_metrics.clear()
        return p, G, info

    # ------------------------------------------------------------------------------------------------ training
    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            self._gvm_batch_ids = None
            output = super()._generate_and_score_completions(inputs)
            if self.args.gvm_loss == "raft":  # evaluate the trained objective: accepted samples, advantage 1
                lo = self.accelerator.process_index * len(inputs)
                self._gvm_rewrite_advantages(output, lo, lo + len(inputs), mode="eval")
            return output
        local = len(inputs)
        world = self.accelerator.num_processes
        if self._take_replay() and self._gvm_batch_start is not None:
            # resumed inside a generation cycle: TRL regenerates the checkpointed batch, so take its plan entries
            # again (no refresh, no new samples counted) instead of moving on to the next ones
            state, start = self.gvm_state, self._gvm_batch_start
        else:
            state = self.gvm_state
            if state is None or self.state.global_step - state.start_step >= self.args.gvm_refresh_steps:
                state = self.gvm_refresh()
            start = self._gvm_cursor
            self._gvm_counters["train_samples"] += local * world
        batch_ids = self._plan_slice(start, local * world)
        self._gvm_batch_start = start
        self._gvm_cursor = start + local * world
        process = self.accelerator.process_index
        rows = [dict(self.train_dataset[i]) for i in batch_ids[process * local : (process + 1) * local]]
        self._gvm_batch_ids = batch_ids
        output = super()._generate_and_score_completions(rows)
        self._gvm_rewrite_advantages(output, process * local, (process + 1) * local)
        mode = "train"
        for key, value in state.summary().items():
            self._metrics[mode][f"gvm/{key}"].append(value)
        for key in ("pilot_samples", "train_samples", "pilot_seconds"):
            self._metrics[mode][f"gvm/{key}_total"] = [float(self._gvm_counters[key])]
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gvm_rewards = rewards_per_func  # gathered over processes, in rank order
        return rewards_per_func

    def _gvm_rewrite_advantages(self, output: dict[str, Any], lo: int, hi: int, mode: str = "train") -> None:
        """Replace TRL's advantages by RAFT++'s (1 on accepted samples, the rest masked out through ``tool_mask``)
        or by GRPO's normalised within each prompt's samples (a prompt's ``n_i`` copies form its group)."""
        device = self.accelerator.device
        per_func = self._gvm_rewards
        rewards = (per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        if self.args.gvm_loss == "raft":
            accepted = (rewards >= self.args.gvm_accept_threshold).float()  # NaN compares False: rejected
            advantages = accepted
            keep = accepted[lo:hi].unsqueeze(1)
            mask = output.get("tool_mask")
            mask = torch.ones_like(output["completion_mask"]) if mask is None else mask
            output["tool_mask"] = (mask * keep).to(output["completion_mask"].dtype)
            local_items = (output["completion_mask"] * output["tool_mask"]).sum()
            output["num_items_in_batch"] = self.accelerator.gather(local_items).sum()
            self._metrics[mode]["gvm/accepted_fraction"].append(accepted.mean().item())
        else:
            ids = torch.tensor(self._gvm_batch_ids, device=device)
            mean = torch.empty_like(rewards)
            std = torch.empty_like(rewards)
            for prompt in torch.unique(ids):
                sel = ids == prompt
                mean[sel] = torch.nanmean(rewards[sel])
                std[sel] = nanstd(rewards[sel]) if int(sel.sum()) > 1 else 0.0
            if self.scale_rewards == "batch":
                std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
            advantages = rewards - mean
            if self.scale_rewards != "none":
                advantages = advantages / (std + 1e-4)
            advantages = torch.nan_to_num(advantages, nan=0.0)
        output["advantages"] = advantages[lo:hi].to(output["advantages"].dtype)
        logged = self._logs["advantages"]
        if len(logged) >= len(advantages):  # replace the parent's per-copy advantages in the completions log
            for k, value in enumerate(advantages.tolist()):
                logged[len(logged) - len(advantages) + k] = value

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _run_settings(self) -> dict[str, Any]:
        """What the saved allocation and plan position depend on: the group size (every ``n_i`` is a multiple of it),
        pilot-based or uniform allocation, the prompt indices' range, and the seed of the pool and plan orders."""
        return {
            "num_generations": int(self.num_generations),
            "gvm": bool(self.args.gvm),
            "dataset_size": len(self.train_dataset),
            "prompt_digest": self._prompt_digest(),
            "seed": int(self.args.seed),
        }

    def _prompt_digest(self, samples: int = 64) -> str:
        """SHA-256 (first 16 hex digits) of the prompts at up to ``samples`` evenly spaced indices: catches a resume
        on another dataset of the same length (the allocation names prompt indices) in O(samples) reads."""
        size = len(self.train_dataset)
        picks = sorted({(k * (size - 1)) // max(samples - 1, 1) for k in range(min(samples, size))})
        digest = hashlib.sha256()
        for i in picks:
            row = self.train_dataset[i]
            prompt = row.get("prompt", row) if isinstance(row, Mapping) else row
            digest.update(json.dumps([i, prompt], sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    def method_state_dict(self) -> dict[str, Any]:
        return {
            "allocation": None if self.gvm_state is None else self.gvm_state.to_dict(),
            "cursor": self._gvm_cursor,
            "batch_start": self._gvm_batch_start,
            "counters": {k: v for k, v in self._gvm_counters.items() if k != "rounds_run_here"},
            "run": self._run_settings(),
        }

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the allocation, plan position and counters; ``ValueError`` if the run settings they depend on
        changed (state files written before hfx recorded them load unchecked)."""
        saved = state.get("run") or {}
        current = self._run_settings()
        changed = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
        if changed:
            listed = ", ".join(f"{k}={old!r} in the checkpoint but {new!r} now" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume the GVM allocation: {listed} (dataset_size is the train dataset's length, "
                "prompt_digest a hash of a sample of its prompts). The saved allocation, plan order and position "
                "refer to the checkpoint's prompts, group size and seed; resume "
                f"with the same settings and train_dataset, or delete {self._state_json} from the checkpoint to start "
                "a fresh allocation round."
            )
        alloc = state.get("allocation")
        self.gvm_state = None if alloc is None else GVMAllocation.from_dict(alloc)
        self._gvm_cursor = int(state.get("cursor", 0))
        self._gvm_batch_start = None if state.get("batch_start") is None else int(state["batch_start"])
        self._gvm_counters.update(state.get("counters", {}))


class GVMRAFTTrainer(GVMGRPOTrainer):
    """GVM-RAFT++: :class:`GVMGRPOTrainer` with :class:`hfx.GVMRAFTConfig` (RAFT++ loss on accepted samples).

    ``GVMRAFTConfig(gvm=False)`` is plain RAFT++ with a uniform allocation over the same prompt rounds.
    """

    _tag_names = ["trl", "raft", "hfx", "gvm"]
    _name = "GVM-RAFT"
    _config_class = GVMRAFTConfig
