"""Trainer state that must survive a checkpoint (multipliers, reward weights, allocations), saved as JSON.

TRL/transformers save the model, optimizer, scheduler and RNG states in ``checkpoint-N``; method state that lives on
the trainer would be lost on resume. :class:`JsonCheckpointStateMixin` writes ``state_dict()`` of the method to one
JSON file beside them (rank 0 only, as the Trainer's own files) and reads it back when the Trainer loads the
optimizer — the one hook every resume path runs, before the first step.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)


class JsonCheckpointStateMixin:
    """Mixin for a :class:`transformers.Trainer` subclass; set ``_state_json`` and implement the two methods."""

    _state_json: str = "hfx_state.json"

    def method_state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, self._state_json), "w", encoding="utf-8") as f:
            json.dump(self.method_state_dict(), f, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self._state_json)
        if not os.path.isfile(path):
            logger.warning(
                f"no {self._state_json} in {checkpoint}: {type(self).__name__} starts from its initial state"
            )
            return
        with open(path, encoding="utf-8") as f:
            self.load_method_state_dict(json.load(f))
