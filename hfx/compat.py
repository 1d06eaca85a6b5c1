"""What differs between the transformers releases hfx supports (5.0 and later), in one place."""

from __future__ import annotations

from transformers import TrainingArguments


def activation_checkpointing(enabled: bool) -> dict[str, bool]:
    """The ``TrainingArguments`` keyword that turns activation checkpointing on or off, for the installed release.

    transformers 5.23 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns there);
    earlier releases reject the new one. TRL's configs turn it on by default, so tiny CPU runs turn it off with
    ``SFTConfig(..., **activation_checkpointing(False))``.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be True or False, got {enabled!r}.")
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": enabled}
    return {"gradient_checkpointing": enabled}
