"""The hint hfx's tuners give with an unsupported ``target_modules`` layer."""

from __future__ import annotations

from torch import nn


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style: a linear layer with its weight stored transposed, in x out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def target_hint(base: nn.Module, method: str) -> str:
    """How to fix an unsupported target. On GPT-2 style models 'all-linear' selects the same Conv1D layers (PEFT
    counts them as linear), so suggesting it would fail the same way; LoRA handles Conv1D."""
    if is_transformers_conv1d(base):
        return (
            f"It is transformers' Conv1D (GPT-2 style, weight stored in x out), which {method} does not support; "
            "'all-linear' selects the same Conv1D layers on such models. Use LoRA instead (peft.LoraConfig, or "
            "hfx.EvaConfig / hfx.LoraGAConfig, which support Conv1D), or target other, nn.Linear layers."
        )
    return "Choose linear layers in `target_modules` (e.g. 'q_proj', 'v_proj' or 'all-linear')."


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last name segments of the model's linear layers (what ``target_modules`` usually lists)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    return sorted(names)


class TargetHintMixin:
    """``BaseTuner`` mixin: when ``target_modules`` matches nothing, PEFT's error also lists the model's linear layer
    names, so the fix is in the message (``'q_prj'`` → the names this model has)."""

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as err:
            if "not found in the base model" not in str(err):
                raise
            names = linear_layer_names(model)
            shown = ", ".join(repr(n) for n in names[:24]) + (", ..." if len(names) > 24 else "")
            raise type(err)(
                f"{err} The linear layers of this model are named {shown}: list some of them in `target_modules` "
                "(or use 'all-linear')."
            ) from err
