"""Stop a run whose loss is no longer finite, with an error that says so.

transformers' Trainer leaves a NaN loss out of the logged average (``logging_nan_inf_filter``) and trains on: the
log shows ``loss 0.0`` while every weight is NaN, checkpoints save those weights, and GRPO-style trainers fail later
inside sampling (``probability tensor contains either inf, nan``). :class:`DivergenceCheckMixin` records, without a
device sync, whether any micro-step's loss was non-finite, and checks it where the Trainer synchronises anyway: at
each log, before each checkpoint (where it also looks at the weights, which the last step may have made NaN from a
finite loss) and before each training generation batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class DivergenceCheckMixin:
    """Mixin placed before a :class:`transformers.Trainer` subclass (TRL's DPO, SFT, GRPO, RLOO trainers)."""

    _hfx_nonfinite: torch.Tensor | None = None

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()
            self._hfx_nonfinite = bad if self._hfx_nonfinite is None else self._hfx_nonfinite | bad
        return loss

    def check_finite_loss(self, when: str, grad_norm: Any = None) -> None:
        """Raise ``FloatingPointError`` if a training loss since the start was NaN/inf (collective across processes:
        every rank raises together). ``grad_norm``: the logged norm, checked too unless fp16 loss scaling may skip
        steps with inf gradients on purpose."""
        flag = self._hfx_nonfinite
        bad = flag is not None and bool(flag)
        if grad_norm is not None and not getattr(self.args, "fp16", False):
            bad = bad or not math.isfinite(float(grad_norm))
        if not self._any_rank(bad):
            return
        raise FloatingPointError(
            f"Training diverged: a non-finite loss (or gradient norm) by step {self.state.global_step}, noticed {when}. "
            "The weights are no longer finite, so the run stops here instead of training on, logging the NaN as 0.0 "
            f"and saving NaN weights. {self._advice()}"
        )

    def _any_rank(self, bad: bool) -> bool:
        """``bad`` on any process (a sum over the processes; every rank must call it)."""
        if getattr(self.accelerator, "num_processes", 1) <= 1:
            return bad
        flag = torch.tensor(float(bad), device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) > 0

    def _advice(self) -> str:
        return (
            f"Lower learning_rate (now {self.args.learning_rate:g}), keep max_grad_norm set (now "
            f"{self.args.max_grad_norm}), check the data and reward functions for NaN/inf, and resume from the last "
            "checkpoint saved before this step."
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs or "grad_norm" in logs:  # a training log (evaluation logs carry eval_loss)
            self.check_finite_loss("at the training log", grad_norm=logs.get("grad_norm"))
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self.check_finite_loss("before saving a checkpoint")
        # the step just taken can make the weights NaN while its loss was finite: look at them (a pass over the
        # parameters, small beside writing them; collective, so that every rank raises together under ZeRO-3)
        if self._any_rank(bool(self._nonfinite_parameters(limit=1))):
            raise self.diverged_error("so no checkpoint is saved")
        return super()._save_checkpoint(model, trial)

    def _generate(self, *args, **kwargs):
        # GRPO/RLOO-style trainers only (the others never call it). An update can make the weights NaN while the loss
        # it came from was finite; sampling from them then fails in torch.multinomial, which is translated here.
        if self.model.training:
            self.check_finite_loss("before generating completions")
        try:
            return super()._generate(*args, **kwargs)
        except RuntimeError as err:
            if "probability tensor contains" in str(err):
                self.raise_if_weights_diverged("so sampling completions failed", err)
            raise

    def raise_if_weights_diverged(self, consequence: str, cause: BaseException | None = None) -> None:
        """Raise :meth:`diverged_error` if some trainable weights are not finite (else nothing)."""
        if self._nonfinite_parameters():
            raise self.diverged_error(consequence, cause) from cause

    def diverged_error(self, consequence: str, cause: BaseException | None = None) -> FloatingPointError:
        """The error for numbers that blew up after training steps: which weights are NaN/inf, or how large they got."""
        bad = self._nonfinite_parameters()
        if bad:
            state = f"the trainable weights {bad} are not finite"
        else:
            largest = max(
                (p.detach().abs().max().item() for p in self.model.parameters() if p.requires_grad and p.numel()),
                default=0.0,
            )
            state = f"the largest trainable weight is {largest:.3g}"
        return FloatingPointError(
            f"Training diverged: after step {self.state.global_step} {state}, {consequence}"
            f"{f' ({cause})' if cause is not None else ''}. {self._advice()}"
        )

    def _nonfinite_parameters(self, limit: int = 3) -> list[str]:
        """Names of (up to ``limit``) trainable parameters holding NaN/inf (this process's shards under ZeRO-3)."""
        found = []
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.numel() and not torch.isfinite(param.detach()).all():
                found.append(name)
                if len(found) == limit:
                    break
        return found
