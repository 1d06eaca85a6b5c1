"""[`LiftRefreshCallback`]: LIFT's dynamic mask (arXiv 2506.00772) for the HF Trainer."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from .model import refresh_lift_masks

logger = logging.getLogger(__name__)


class LiftRefreshCallback(TrainerCallback):
    """Re-select LIFT's principal weights every ``update_interval`` optimizer steps, as the paper does.

    Timing: the refresh runs in ``on_step_end`` of the optimizer step that brings ``state.global_step`` to a
    multiple of ``update_interval`` — the 0-based step ``t`` with ``(t + 1) % update_interval == 0`` of the paper's
    code (interval 400: after the 400th, 800th, ... optimizer step; gradient accumulation counts as one step).
    The refresh runs before the Trainer saves a checkpoint at that step, so checkpoints hold the refreshed adapter
    (indices, values, accumulated past deltas) and the remapped optimizer state, and resuming is exact.

    A refresh keeps the model's function unchanged; it remaps AdamW's ``exp_avg``/``exp_avg_sq`` (kept entries keep
    them, new entries start at 0; ``step`` is not reset; ``k`` is unchanged). It needs the plain torch optimizer and
    the full, unquantized base weights, so it refuses DeepSpeed ZeRO, FSDP and quantized bases. Under
    ``torch.compile`` each refresh recompiles (the frozen past deltas grow), and after dynamo's ``recompile_limit``
    (8) refreshes the model runs eagerly: results stay exact; raise the limit for long compiled runs.

    Args:
        update_interval: overrides the adapter config's ``update_interval`` (``None``: use the config's).
        adapter_name: the adapter to refresh (default: the single active one).
        show_progress: progress bar over layers during a refresh (rank 0).
    """

    def __init__(
        self, update_interval: Optional[int] = None, adapter_name: Optional[str] = None, show_progress: bool = True
    ) -> None:
        if update_interval is not None and (not isinstance(update_interval, int) or update_interval <= 0):
            raise ValueError(f"`update_interval` must be a positive integer or None, got {update_interval!r}.")
        self.update_interval = update_interval
        self.adapter_name = adapter_name
        self.show_progress = show_progress
        self.history: list[tuple[int, dict[str, float]]] = []

    def _interval(self, model: torch.nn.Module) -> Optional[int]:
        if self.update_interval is not None:
            return self.update_interval
        configs = getattr(model, "peft_config", {})
        adapter = self.adapter_name or next(iter(getattr(model, "active_adapters", []) or []), None)
        config = configs.get(adapter) if adapter is not None else None
        return getattr(config, "update_interval", None)

    @staticmethod
    def _check_supported(args: Any, model: torch.nn.Module, optimizer: Any) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        from .layer import LiftLayer

        hint = "set update_interval=None for a static mask"
        if (
            getattr(args, "deepspeed", None)
            or is_deepspeed_zero3_enabled()
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            or "deepspeed" in type(optimizer).__module__.lower()
        ):
            raise ValueError(f"LIFT mask refresh is not supported under DeepSpeed ZeRO (sharded optimizer); {hint}.")
        if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError(f"LIFT mask refresh is not supported under FSDP; {hint}.")
        layers = [m for m in model.modules() if isinstance(m, LiftLayer)]
        if not layers:
            raise ValueError("LiftRefreshCallback: the model has no LIFT layers.")
        quantized = next((m for m in layers if m.quantization_backend is not None), None)
        if quantized is not None:
            raise ValueError(
                f"LIFT mask refresh is not supported with a quantized base ({quantized._describe()} is "
                f"{quantized.quantization_backend.backend_name!r}); {hint}."
            )

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        interval = self._interval(model) if model is not None else None
        if interval is None:
            return
        self._check_supported(args, model, optimizer)
        first = (state.global_step // interval + 1) * interval
        if getattr(state, "max_steps", 0) and first > state.max_steps:
            logger.warning(
                "LiftRefreshCallback: the first mask refresh falls at step %d, after this run's max_steps=%d, so the "
                "mask stays static; lower update_interval (now %d) for the paper's dynamic mask.",
                first, state.max_steps, interval,
            )  # fmt: skip

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        interval = self._interval(model) if model is not None else None
        if interval is None or state.global_step == 0 or state.global_step % interval:
            return
        stats = refresh_lift_masks(model, optimizer, self.adapter_name, show_progress=self.show_progress)
        self.history.append((state.global_step, stats))
