"""[`SaraCallback`]: SaRA's nuclear-norm regulariser and progressive adjustment (arXiv 2409.06633) for a Trainer."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from .model import adjust_sara_masks, sara_layers

logger = logging.getLogger(__name__)


class SaraCallback(TrainerCallback):
    """The training-time half of SaRA for ``transformers.Trainer`` and every TRL trainer built on it.

    **Nuclear-norm regulariser** (the paper's low-rank sparse training, Sec. 3.2). The objective is
    ``L_task + lambda * sum_l ||M_l * W_l||_*``, the nuclear norm of each layer's selected weights ``W0 + d`` at the
    trained entries ``M_l`` (the reference's ``nuclear_norm(param * mask)``; not of the delta ``d`` alone). A callback
    cannot change the loss a trainer computes, so this one adds the regulariser's gradient to the trainable values'
    ``.grad`` in ``on_pre_optimizer_step``, once per optimizer step: the same update as adding the term to that step's
    loss, whatever the trainer's loss is (SFT, DPO, GRPO, ... — no labels needed, unlike a hook on ``outputs.loss``),
    independent of gradient accumulation and of how the trainer scales its loss for it. Caveats: it is added after
    gradient clipping (so it is not clipped), and with fp16 mixed precision and ``max_grad_norm=0`` the gradients
    are still loss-scaled at that point (use bf16, or clipping). ``nuclear_norm_layers`` layers (config) are drawn
    per step with a generator seeded by ``(args.seed, global_step)``: the same on every rank and on resume. The mean
    regulariser value since the last log is logged as ``sara_nuclear_norm``.

    **Weight decay on the weights, not the delta.** The reference's AdamW decays the trainable absolute values
    ``W0 + d``; a stock AdamW over the delta ``d`` decays ``d`` toward 0 instead (no decay at all at init). With
    ``weight_decay > 0`` in a torch ``AdamW`` (or ``Adam(decoupled_weight_decay=True)``) param group, this callback
    adds the missing ``-lr * weight_decay * W0`` to the trained values in ``on_optimizer_step``, so the step equals the
    reference's ``(W0 + d) * (1 - lr * weight_decay) - lr * adam``. Other optimizers, DeepSpeed and FSDP get a
    warning that their decay acts on the delta. Entries frozen by the adjustment are not decayed.

    **Progressive parameter adjustment** (Sec. 3.3). In ``on_step_end`` of optimizer step
    ``P = max(1, round(progressive_fraction * state.max_steps))`` (reference: step 2500 of 5005) it calls
    [`adjust_sara_masks`]: entries whose effective weight ``|W0 + d|`` reached the threshold are frozen at their
    learned value, the rest keep training with fresh optimizer state. Unlike the reference, the batch of step ``P``
    is not dropped (the adjustment runs after its update). It runs before the Trainer saves a checkpoint at that
    step, so checkpoints hold the adjusted mask and optimizer state, and resuming after it is exact.

    Both need ordinary gradients and the plain torch optimizer: under DeepSpeed ZeRO or FSDP the callback refuses
    (set ``progressive_fraction=None`` and ``nuclear_norm_weight=0`` there for plain sparse training with a fixed
    mask, which works; or add ``sara_nuclear_norm`` to the loss yourself).

    Args:
        adapter_name: the adapter to act on (default: the single active one).
        adjust_step: optimizer step of the adjustment, overriding the config's ``progressive_fraction``.
        reset_optimizer_state: drop the optimizer state of the shrunk value vectors at the adjustment (default, as
            the reference); ``False`` keeps the moments of the entries that keep training.
    """

    def __init__(
        self,
        adapter_name: Optional[str] = None,
        adjust_step: Optional[int] = None,
        reset_optimizer_state: bool = True,
    ) -> None:
        if adjust_step is not None and (not isinstance(adjust_step, int) or adjust_step <= 0):
            raise ValueError(f"`adjust_step` must be a positive integer or None, got {adjust_step!r}.")
        self.adapter_name = adapter_name
        self.adjust_step = adjust_step
        self.reset_optimizer_state = reset_optimizer_state
        self.history: list[tuple[int, dict[str, float]]] = []
        self._pending: list[float] = []
        self._decay_checked = False

    # ---- helpers ----------------------------------------------------------------------------------------------------
    def _config(self, model: torch.nn.Module) -> Any:
        configs = getattr(model, "peft_config", {})
        adapter = self.adapter_name or next(iter(getattr(model, "active_adapters", []) or []), None)
        return configs.get(adapter) if adapter is not None else None

    def _adjust_at(self, model: torch.nn.Module, state: Any) -> Optional[int]:
        if self.adjust_step is not None:
            return self.adjust_step
        fraction = getattr(self._config(model), "progressive_fraction", None)
        if fraction is None or not getattr(state, "max_steps", 0):
            return None
        return max(1, round(fraction * state.max_steps))

    @staticmethod
    def _sharding(args: Any, optimizer: Any) -> Optional[str]:
        """``"DeepSpeed ZeRO"`` or ``"FSDP"`` when the run shards parameters or optimizer state, else None."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        if (
            getattr(args, "deepspeed", None)
            or is_deepspeed_zero3_enabled()
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            or "deepspeed" in type(optimizer).__module__.lower()
        ):
            return "DeepSpeed ZeRO"
        if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            return "FSDP"
        return None

    def _check_supported(self, args: Any, model: torch.nn.Module, optimizer: Any) -> None:
        config = self._config(model)
        wants = []
        if self.adjust_step is not None or getattr(config, "progressive_fraction", None) is not None:
            wants.append("progressive_fraction=None")
        if getattr(config, "nuclear_norm_weight", 0):
            wants.append("nuclear_norm_weight=0")
        if not wants:
            return
        hint = f"set {' and '.join(wants)} for plain sparse training with a fixed mask"
        sharding = self._sharding(args, optimizer)
        if sharding == "DeepSpeed ZeRO":
            raise ValueError(
                "SaraCallback (progressive adjustment, nuclear-norm regulariser) needs the plain torch optimizer and "
                f"gradients; it is not supported under DeepSpeed ZeRO. {hint}."
            )
        if sharding == "FSDP":
            raise ValueError(f"SaraCallback is not supported under FSDP; {hint}.")

    def _decays_weights(self, args: Any, optimizer: Any) -> bool:
        """Whether ``on_optimizer_step`` can turn the optimizer's decay of ``d`` into decay of ``W0 + d`` (decoupled
        torch Adam/AdamW, unsharded); warns once when a nonzero decay stays on the delta."""
        inner = getattr(optimizer, "optimizer", optimizer)
        decay = any(float(g.get("weight_decay", 0) or 0) > 0 for g in getattr(inner, "param_groups", []))
        if not decay:
            return False
        sharding = self._sharding(args, optimizer)
        decoupled = isinstance(inner, torch.optim.AdamW) or (
            isinstance(inner, torch.optim.Adam) and bool(inner.defaults.get("decoupled_weight_decay"))
        )
        if sharding is None and decoupled:
            return True
        if not self._decay_checked:
            where = f"under {sharding}" if sharding else f"with {type(inner).__name__}"
            logger.warning(
                "SaRA: weight decay %s acts on the trained delta d (pulling W0 + d toward W0), not on the weights "
                "W0 + d as in the reference; SaraCallback corrects it only for an unsharded torch AdamW. Set "
                "weight_decay=0, or use optim='adamw_torch' without DeepSpeed/FSDP.",
                where,
            )
        return False

    # ---- events -----------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None:
            sara_layers(model, self.adapter_name)  # raises if the model has no SaRA layers
            self._check_supported(args, model, optimizer)
            at = self._adjust_at(model, state)
            if at is not None and getattr(state, "max_steps", 0) and at > state.max_steps:
                logger.warning(
                    "SaraCallback: adjust_step=%d is after this run's max_steps=%d, so the progressive adjustment "
                    "never happens; lower adjust_step, or leave it None to place it at progressive_fraction of the run.",
                    at, state.max_steps,
                )  # fmt: skip

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        config = self._config(model) if model is not None else None
        weight = float(getattr(config, "nuclear_norm_weight", 0) or 0)
        if not weight:
            return
        layers, adapter = sara_layers(model, self.adapter_name)
        layers = [m for m in layers if m.sara_values[adapter].requires_grad]
        if not layers:
            return
        count = getattr(config, "nuclear_norm_layers", None)
        if count is not None and count < len(layers):
            gen = torch.Generator().manual_seed(int(getattr(args, "seed", 0)) * 1_000_003 + int(state.global_step))
            picked = sorted(torch.randperm(len(layers), generator=gen)[:count].tolist())
            layers = [layers[i] for i in picked]
        total = 0.0
        with torch.enable_grad():
            for layer in layers:
                norm = layer.nuclear_norm(adapter)
                (weight * norm).backward()
                total += float(norm.detach())
        self._pending.append(total)

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None or getattr(optimizer, "step_was_skipped", False):
            return
        emulate = self._decays_weights(args, optimizer)
        self._decay_checked = True
        if not emulate:
            return
        groups = {id(p): g for g in getattr(optimizer, "optimizer", optimizer).param_groups for p in g["params"]}
        layers, adapter = sara_layers(model, self.adapter_name)
        for layer in layers:
            param = layer.sara_values[adapter]
            group = groups.get(id(param))
            if group is None or not group.get("weight_decay"):
                continue
            step = float(group["lr"]) * float(group["weight_decay"])
            param.sub_(layer.selected_base_values(adapter).to(param.device, param.dtype), alpha=step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        at = self._adjust_at(model, state) if model is not None else None
        if at is None or state.global_step != at:
            return
        stats = adjust_sara_masks(model, optimizer, self.adapter_name, self.reset_optimizer_state)
        self.history.append((state.global_step, stats))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return
        value = sum(self._pending) / len(self._pending)
        self._pending.clear()
        logs["sara_nuclear_norm"] = value
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sara_nuclear_norm"] = value
