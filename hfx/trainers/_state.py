"""Trainer state that must survive a checkpoint (multipliers, reward weights, allocations), saved as JSON.

TRL/transformers save the model, optimizer, scheduler and RNG states in ``checkpoint-N``; method state that lives on
the trainer would be lost on resume. :class:`JsonCheckpointStateMixin` writes ``state_dict()`` of the method to one
JSON file beside them (rank 0 only, as the Trainer's own files) and reads it back when the Trainer loads the
optimizer — the one hook every resume path runs, before the first step.

Checkpoints inside a generation batch. TRL's GRPO/RLOO generate once every ``steps_per_generation × num_iterations``
micro-steps and keep the batch in memory, not in the checkpoint. Resumed from a checkpoint saved inside such a cycle
(``steps_per_generation > gradient_accumulation_steps``, or ``num_iterations > 1``), TRL regenerates the batch for the
same prompts with its micro-step counter back at 0: the hfx method state (updated once per generation batch) would
take one extra update, and TRL's cycle would be shifted against the dataloader's for the rest of the run. So the JSON
also records the micro-step (``generation_cycle``); on resume the mixin restores TRL's counter (the regeneration then
fills the right buffer slice and later generations fall where they would have) and flags the regenerated batch as a
*replay* (:meth:`JsonCheckpointStateMixin._take_replay`), for which the trainers keep their state as saved — it
already holds that batch's update. What stays different from an uninterrupted run are the completions of the rest of
that batch (new samples), which a warning says, with how to avoid it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)


def _damaged(path: str, err: Exception) -> ValueError:
    return ValueError(
        f"{path} is damaged ({type(err).__name__}: {err}), so the method state cannot be restored from it. Restore "
        "the file from a copy of the checkpoint, resume from another checkpoint, or delete the file to resume with "
        "the method state at its initial values (the model, optimizer and scheduler still resume)."
    )


def read_state_json(path: str) -> dict[str, Any]:
    """The JSON method state at ``path``; a damaged file is a ``ValueError`` naming it and what to do."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, err) from err
    if not isinstance(state, dict):
        raise _damaged(path, TypeError(f"expected a JSON object, got {type(state).__name__}"))
    return state


def write_state_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` unless it holds them already, through a temporary file and ``os.replace``: the
    state is written again after transformers started a background Hub upload of the folder, which must not read a
    truncated file (the bytes are the same then, so nothing is rewritten)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_state_json(path: str, state: dict[str, Any]) -> None:
    write_state_file(path, json.dumps(state, indent=2).encode("utf-8"))


def read_state_tensors(path: str) -> dict[str, Any]:
    """The safetensors method state at ``path``; a damaged file is a ``ValueError`` naming it and what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise _damaged(path, err) from err


class JsonCheckpointStateMixin:
    """Mixin for a :class:`transformers.Trainer` subclass; set ``_state_json`` and implement the two methods."""

    _state_json: str = "hfx_state.json"
    _replay_generation: bool = False  # the next training generation batch regenerates a checkpointed one

    def method_state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self._save_method_state(
                os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            )

    def _push_from_checkpoint(self, checkpoint_folder):
        # transformers pushes from inside _save_checkpoint (hub_strategy="checkpoint"/"all_checkpoints"), in a
        # background upload: the state must be in the folder before it starts, or the Hub copy resumes without it
        if self.args.should_save:
            self._save_method_state(checkpoint_folder)
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_method_state(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        state = self.method_state_dict()
        cycle = self._generation_cycle_state()
        if cycle is not None:
            state["generation_cycle"] = cycle
        write_state_json(os.path.join(folder, self._state_json), state)

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
        state = read_state_json(path)
        self.load_method_state_dict(state)
        self._restore_generation_cycle(state.get("generation_cycle"), checkpoint)

    def _load_best_model(self):
        """With ``load_best_model_at_end``, transformers loads the best checkpoint's weights; the method state saved
        with them (multipliers and reward weights, allocations) comes back too, so that a later ``evaluate()`` scores
        that model as it was scored (it used to keep the last step's state)."""
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        path = os.path.join(best, self._state_json) if best else None
        if path is not None and os.path.isfile(path):
            self.load_method_state_dict(read_state_json(path))

    # ------------------------------------------------------------------------------------------------ generation cycle
    def _generate_every(self) -> int | None:
        """TRL's generation period in micro-steps, or ``None`` for a trainer without one (not GRPO/RLOO-like)."""
        if not hasattr(self, "_step") or getattr(self.args, "steps_per_generation", None) is None:
            return None
        return int(self.args.steps_per_generation) * int(getattr(self, "num_iterations", 1))

    def _generation_cycle_state(self) -> dict[str, int] | None:
        every = self._generate_every()
        return None if every is None else {"micro_step": int(self._step), "generate_every": every}

    def _restore_generation_cycle(self, saved: dict[str, Any] | None, checkpoint: str) -> None:
        """Put TRL's micro-step counter back where the checkpoint left it and flag the batch TRL will regenerate
        (see the module doc); warn when the checkpoint is inside a generation batch."""
        self._replay_generation = False
        every = self._generate_every()
        if every is None or self.args.ignore_data_skip:  # no cycle, or the data is not replayed
            return
        fix = (
            "To resume exactly, save at generation boundaries: make save_steps × gradient_accumulation_steps "
            f"({self.args.save_steps} × {self.args.gradient_accumulation_steps}) a multiple of steps_per_generation "
            f"× num_iterations ({every})."
        )
        if saved is None:  # a state file of an older hfx: estimate the position from the checkpoint's step
            micro, saved_every = (
                _checkpoint_step(checkpoint, self.state.global_step) * self.args.gradient_accumulation_steps,
                every,
            )
        else:
            micro, saved_every = int(saved["micro_step"]), int(saved["generate_every"])
        if saved is not None and saved_every == every:
            # TRL restarts it at 0; continuing it keeps its cycle aligned with the dataloader's, and the next
            # checkpoint records the run's position (with a period of 1 it used to record the steps since the resume)
            self._step = micro
        position = micro % saved_every
        if position == 0:
            return
        if saved is None or saved_every != every:
            # the position is not recorded, or the generation period changed: the replay cannot be matched up
            logger.warning(
                f"{checkpoint} was saved inside a generation batch (after micro-step {position} of {saved_every}), and "
                + ("its position is not recorded" if saved is None else f"the generation period is now {every}")
                + f": TRL regenerates that batch, so the {type(self).__name__} state (updated once per generation "
                f"batch) takes one extra update. {fix}"
            )
            return
        self._replay_generation = True
        logger.warning(
            f"{checkpoint} was saved inside a generation batch (after micro-step {position} of {every}). TRL does "
            "not checkpoint generated completions, so it regenerates that batch for the same prompts; the "
            f"{type(self).__name__} state keeps its saved value for it (no second update), but the rest of the "
            f"batch ({every - position} of its {every} micro-steps) trains on new completions, unlike an "
            "uninterrupted run. " + fix
        )

    def _take_replay(self) -> bool:
        """Whether the current training generation batch replays the checkpointed one (True once, then False)."""
        replay, self._replay_generation = self._replay_generation, False
        return replay


def _checkpoint_step(checkpoint: str, default: int) -> int:
    """The optimizer step a checkpoint was saved at, from its ``trainer_state.json`` (older transformers load that
    file only after the optimizer, when ``self.state.global_step`` is still 0)."""
    path = os.path.join(checkpoint, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, KeyError, ValueError, TypeError):
        return default
