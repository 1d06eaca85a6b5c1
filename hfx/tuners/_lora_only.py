"""``BaseTuner`` mixin naming the ``LoraModel``-only methods users reach for on an hfx adapter (PEFT's lookup fell
through to the transformers model: "'LlamaForCausalLM' object has no attribute 'add_weighted_adapter'")."""

from __future__ import annotations

from typing import Any


class LoraOnlyMethodsMixin:
    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        method = type(self).__name__.removesuffix("Model")
        raise NotImplementedError(
            f"{method} adapters have no add_weighted_adapter: PEFT combines LoRA adapters only. Convert each adapter "
            "to a LoRA first (peft.convert_to_lora or peft.save_as_lora: exact for Bone and PaCA, approximated for "
            "BAT, LIFT, SaRA and DSEE, not available for a pruned DSEE model), then call add_weighted_adapter on the "
            "LoRA model."
        )
