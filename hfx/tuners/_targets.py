"""The hint hfx's tuners give with an unsupported ``target_modules`` layer, and their injection that leaves the model
as it was when it fails."""

from __future__ import annotations

import copy
import re

from torch import nn

from ._loading import resize_to_saved


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
    """``BaseTuner`` mixin for injection. When ``target_modules`` matches nothing, PEFT's error also lists the model's
    linear layer names, so the fix is in the message (``'q_prj'`` → the names this model has). When injection fails
    part-way (a layer the method cannot handle, found after others were wrapped), the wrapped layers are put back:
    the model used to stay half-wrapped, and retrying ``get_peft_model`` on it trained every base weight. After a
    successful injection, index sets take their saved lengths when transformers' ``load_adapter`` is loading
    (:func:`~._loading.resize_to_saved`), and the model is tagged with hfx and the method."""

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        children = {(id(parent), name): child for parent in model.modules() for name, child in parent.named_children()}
        had_adapter = {id(m) for m in model.modules() if _holds(m, adapter_name)}
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            resize_to_saved(model, adapter_name)  # transformers' load_adapter: the saved index sets' lengths
            _tag(model, self.peft_config.get(adapter_name))
        except Exception as err:
            _roll_back(model, children, adapter_name, had_adapter)
            if not isinstance(err, ValueError) or "not found in the base model" not in str(err):
                raise
            config = self.peft_config.get(adapter_name)
            layers_hint = _layers_hint(model, config)
            if layers_hint:
                raise type(err)(f"{err} {layers_hint}") from err
            names = linear_layer_names(model)
            shown = ", ".join(repr(n) for n in names[:24]) + (", ..." if len(names) > 24 else "")
            targets = getattr(config, "target_modules", None)
            regex = ""
            if isinstance(targets, str) and targets in names:  # PEFT full-matches a string against the whole name
                regex = f" A string is a regex matched against the full module name; did you mean [{targets!r}]?"
            raise type(err)(
                f"{err} The linear layers of this model are named {shown}: list some of them in `target_modules` "
                f"(or use 'all-linear').{regex}"
            ) from err


def _tag(model: nn.Module, config) -> None:
    """Tag the model ``hfx`` and the method (``bone``, ...), as TRL's trainers tag the models they train: the
    adapter's model card (PEFT's ``save_pretrained`` / ``push_to_hub``) then names hfx, which loading it needs. Like
    TRL's, the tags stay on the model after ``merge_and_unload`` (they record how it was made)."""
    add_tags = getattr(model, "add_model_tags", None)
    peft_type = getattr(config, "peft_type", None)
    if callable(add_tags) and peft_type is not None:
        add_tags(["hfx", str(getattr(peft_type, "value", peft_type)).lower()])


def _layers_hint(model: nn.Module, config) -> str:
    """When ``target_modules`` does match but ``layers_to_transform`` keeps none of those modules, say which layer
    indices they sit in (the generic 'the linear layers are named ...' would send the user after the wrong field)."""
    if getattr(config, "layers_to_transform", None) is None:
        return ""
    from peft.tuners.tuners_utils import check_target_module_exists

    unrestricted = copy.copy(config)
    unrestricted.layers_to_transform = None
    matched = [n for n, _ in model.named_modules() if n and check_target_module_exists(unrestricted, n)]
    if not matched:
        return ""
    patterns = config.layers_pattern or []
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    regexes = [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns] or [r".*?\.[^.]*\.(\d+)\."]  # PEFT's own
    indices = set()
    for name in matched:
        found = (re.match(rx, name) for rx in regexes)
        match = next((m for m in found if m), None)
        if match:
            indices.add(int(match.group(1)))
    where = (
        f"they sit in layers {_ranges(sorted(indices))}"
        if indices
        else "no layer index could be read from their names" + (" with that `layers_pattern`" if patterns else "")
    )
    return (
        f"The `target_modules` match {len(matched)} modules, but `layers_to_transform`="
        f"{config.layers_to_transform!r} keeps none of them: {where}."
    )


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``'0-2, 5'``."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _roll_back(model: nn.Module, children: dict, adapter_name: str, had_adapter: set[int]) -> None:
    """Undo a failed injection: every module slot gets its child from before back, and a tuner layer that existed
    before and received ``adapter_name`` loses it again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            original = children.get((id(parent), name))
            if original is not None and original is not child:
                setattr(parent, name, original)
    for module in model.modules():
        if id(module) not in had_adapter and _holds(module, adapter_name):
            module.delete_adapter(adapter_name)


def _holds(module: nn.Module, adapter_name: str) -> bool:
    """Whether ``module`` is a PEFT tuner layer with weights of adapter ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return False
    return any(adapter_name in getattr(module, attr, {}) for attr in module.adapter_layer_names)
