"""The batch check shared by the data-driven inits (EVA, LoRA-GA): dicts of model inputs, and what to do instead."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODEL_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "x")

# A GRPO/RLOO dataloader yields the dataset rows (prompts); a DPO one yields chosen/rejected pairs without LM labels.
BUILD_BATCHES = (
    "A GRPO/RLOO trainer's dataloader yields raw prompt rows and a DPO one has no language-model labels, so for "
    "those trainers build the batches yourself: tokenise prompt + response (e.g. the chosen one) into dicts "
    "{'input_ids', 'attention_mask', 'labels'}, with labels = input_ids and the prompt and padding tokens set to -100."
)


# EVA needs no labels (with them it keeps the labelled tokens only), so a DPO batch does; a GRPO/RLOO one does not.
BUILD_UNLABELLED_BATCHES = (
    "A GRPO/RLOO trainer's dataloader yields raw prompt rows, so for those trainers build the batches yourself: "
    "tokenise the prompts into dicts {'input_ids', 'attention_mask'} (with 'labels', only labelled tokens count)."
)


def check_batch(
    batch: Any, forward_params: set[str] | None, method: str, inputs_hint: str, build_hint: str = BUILD_BATCHES
) -> Mapping[str, Any]:
    """``batch`` if it is a dict holding at least one model input; else a named error saying what to pass."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{method} expects batches that are dicts of model inputs (input_ids, attention_mask, labels, ...); got "
            f"{type(batch).__name__}. {build_hint}"
        )
    inputs = set(batch) & (forward_params or set(MODEL_INPUT_NAMES)) - {"labels", "attention_mask"}
    if not inputs:
        raise ValueError(f"{method}: a batch has no model inputs (keys {sorted(batch)}); expected e.g. {inputs_hint}.")
    return batch
