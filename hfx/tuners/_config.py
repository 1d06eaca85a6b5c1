"""Checks shared by the hfx tuner configs: PEFT's handling of the target fields, and number tests that refuse bools
(``True`` is an ``int`` to Python, never a rank or a rate to a user)."""

from __future__ import annotations

from typing import Any


def is_int(value: Any, minimum: int | None = None) -> bool:
    """``value`` is an int (not a bool), at least ``minimum`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_real(value: Any) -> bool:
    """``value`` is an int or a float (not a bool); NaN and infinities pass, range checks are the caller's."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_peft_fields(config: Any, bias_only: str) -> None:
    """The fields every hfx tuner shares with PEFT's: lists of module names become sets (as in PEFT's configs),
    ``layers_to_transform`` / ``layers_pattern`` need module names, not a regex ``target_modules`` (PEFT applies them
    to names only), and ``bias`` is ``'none'``, ``'all'`` or the method's own ``bias_only`` (e.g. ``'bone_only'``)."""
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
    if isinstance(config.target_modules, str) and (config.layers_to_transform is not None or config.layers_pattern):
        raise ValueError(
            "`layers_to_transform` and `layers_pattern` cannot be used with a regex `target_modules`; pass a list "
            "of module names instead."
        )
    if config.bias not in ("none", "all", bias_only):
        raise ValueError(f"`bias` must be 'none', 'all' or '{bias_only}', got {config.bias!r}.")


def refuse_target_parameters(config: Any, method: str) -> None:
    """EVA and LoRA-GA initialise LoRA on Linear/Conv1D layers from their inputs or gradients; PEFT's
    ``target_parameters`` (LoRA on a bare ``nn.Parameter``, e.g. fused MoE experts) has no such layer."""
    if getattr(config, "target_parameters", None):
        raise ValueError(
            f"{method}: `target_parameters` ({config.target_parameters!r}) is not supported: {method}'s initialisation "
            "reads the inputs of Linear/Conv1D layers, and a targeted nn.Parameter (e.g. fused MoE experts) has none. "
            "Adapt those with PEFT's LoraConfig, and keep target_modules for this config."
        )
