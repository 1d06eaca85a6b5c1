"""SaRA tuner model: injects [`SaraLinear`] / [`SaraConv2d`] layers (PEFT ``BaseTuner``); regulariser, adjustment."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .._lora_only import LoraOnlyMethodsMixin
from .._mixed_batch import MixedBatchTunerMixin
from .._targets import TargetHintMixin
from .config import SaraConfig
from .layer import SaraConv2d, SaraLayer, SaraLinear, check_sara_base

logger = logging.getLogger(__name__)


class SaraModel(TargetHintMixin, LoraOnlyMethodsMixin, MixedBatchTunerMixin, BaseTuner):
    """SaRA adapters (arXiv 2409.06633) as a PEFT tuner; build it with ``get_peft_model(model, SaraConfig())``.

    Training-time parts (nuclear-norm regulariser, progressive adjustment) run in [`hfx.SaraCallback`]; in a custom
    loop use [`sara_nuclear_norm`] (add ``weight * it`` to the loss) and [`adjust_sara_masks`].
    """

    prefix: str = "sara_"
    tuner_layer_cls = SaraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: torch.nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, then log the fraction of entries SaRA trains (it depends on the model's weight scale),
        and (once) add the load hook that warns when a loaded adapter's thresholds differ from the config's."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if getattr(self, "_sara_threshold_hook", None) is None:
            self._sara_threshold_hook = self.register_load_state_dict_post_hook(_warn_threshold_mismatch)
        layers = [m for m in model.modules() if isinstance(m, SaraLinear) and adapter_name in m.sara_values]
        selected = sum(m.sara_values[adapter_name].numel() for m in layers)
        total = sum(m.shape[0] * m.shape[1] for m in layers)
        config = self.peft_config[adapter_name]
        rule = f"|w| < {config.threshold:g}" if config.ratio is None else f"ratio {config.ratio:g}"
        logger.info(
            "SaRA adapter %r: %s selects %d of %d entries (%.2f%%) in %d layers.",
            adapter_name,
            rule,
            selected,
            total,
            100.0 * selected / max(total, 1),
            len(layers),
        )

    def _create_and_replace(
        self,
        sara_config: SaraConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        check_sara_base(base, current_key)
        kwargs = {"threshold": sara_config.threshold, "ratio": sara_config.ratio}
        if isinstance(target, SaraLayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            cls = SaraConv2d if isinstance(base, torch.nn.Conv2d) else SaraLinear
            new_module = cls(target, adapter_name, layer_name=current_key, **kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
            self._replace_module(parent, target_name, new_module, target)


def _warn_threshold_mismatch(module: torch.nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook on the SaRA model: one warning per adapter whose loaded thresholds (which the
    layers now use) differ from those the current config computes."""
    found: dict[str, list[tuple[str, float, float]]] = {}
    total: dict[str, int] = {}
    for layer in module.modules():
        if not isinstance(layer, SaraLayer):
            continue
        for adapter in layer.sara_threshold:
            total[adapter] = total.get(adapter, 0) + 1
        for adapter, (saved, computed) in layer.sara_threshold.mismatches.items():
            if adapter not in layer.sara_shape.mismatched:  # another shape: the load fails with that error instead
                found.setdefault(adapter, []).append((layer.layer_name, saved, computed))
        layer.sara_threshold.mismatches.clear()
        layer.sara_shape.mismatched.clear()
    configs = getattr(module, "peft_config", {})
    for adapter, rows in found.items():
        config = configs.get(adapter)
        rule = (
            f"threshold={config.threshold:g}"
            if config is not None and config.ratio is None
            else f"ratio={getattr(config, 'ratio', None)!r}"
        )
        name, saved, computed = rows[0]
        warnings.warn(
            f"SaRA adapter {adapter!r}: the loaded state dict's thresholds differ in {len(rows)} of "
            f"{total.get(adapter, len(rows))} layers from what the current config ({rule}) computes (e.g. {name!r}: "
            f"saved {saved:.6g}, config {computed:.6g}). Using the saved ones: the checkpoint's trainable set was "
            "selected with them, so the progressive adjustment continues as in the saved run. To apply the current "
            "config instead, start from a fresh adapter rather than loading this checkpoint.",
            UserWarning,
            stacklevel=2,
        )


def _unwrap_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    while optimizer is not None and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def sara_layers(model: torch.nn.Module, adapter_name: Optional[str] = None) -> tuple[list[SaraLinear], str]:
    """The SaRA layers of ``model`` holding ``adapter_name`` (default: the single active adapter), and that name."""
    layers = [m for m in model.modules() if isinstance(m, SaraLinear)]
    if not layers:
        raise ValueError("The model has no SaRA layers.")
    if adapter_name is None:
        active = layers[0].active_adapters
        if len(active) != 1:
            raise ValueError(f"Pass `adapter_name`: {len(active)} SaRA adapters are active.")
        adapter_name = active[0]
    return [m for m in layers if adapter_name in m.sara_values], adapter_name


def sara_nuclear_norm(
    model: torch.nn.Module, adapter_name: Optional[str] = None, layers: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """``sum_l ||M_l * W_l||_*`` over the SaRA layers of ``adapter_name`` (or the layers at positions ``layers`` of
    that list): the paper's low-rank loss on the selected weights ``W0 + delta`` at the trained entries (Sec. 3.2),
    differentiable in the trainable values.

    Custom training loops add ``nuclear_norm_weight * sara_nuclear_norm(model)`` to their loss; with the HF/TRL
    ``Trainer`` [`hfx.SaraCallback`] does the equivalent once per optimizer step.
    """
    found, adapter_name = sara_layers(model, adapter_name)
    chosen = found if layers is None else [found[i] for i in layers]
    if not chosen:
        return torch.zeros(())
    norms = [m.nuclear_norm(adapter_name) for m in chosen]
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms]).sum()


@torch.no_grad()
def adjust_sara_masks(
    model: torch.nn.Module,
    optimizer: Optional[Any] = None,
    adapter_name: Optional[str] = None,
    reset_optimizer_state: bool = True,
) -> dict[str, float]:
    """SaRA's progressive parameter adjustment (Sec. 3.3) on every layer of ``adapter_name``.

    Entries whose effective weight reached the threshold stop training, frozen at their learned value (the model's
    function is unchanged); the remaining set is a subset of the old one. Optimizer state of each shrunk value
    vector: ``reset_optimizer_state=True`` (default, as the reference code does) drops it, so the optimizer starts
    the remaining entries afresh (zero moments, ``step`` 0); ``False`` keeps the moments of the kept entries.
    Returns the fraction of trainable entries kept and the number of frozen entries.

    The value vectors shrink in place (the optimizer keeps the same parameters), so in a custom loop call it when no
    autograd graph of an earlier step is alive (``del loss`` first): autograd reuses a leaf's gradient node while a
    graph holds it, with the old size, and the next backward then fails ("invalid gradient ... expected shape
    compatible with [n]"). [`hfx.SaraCallback`] runs it where the Trainer holds none.
    """
    optimizer = _unwrap_optimizer(optimizer)
    layers, adapter_name = sara_layers(model, adapter_name)
    before = after = frozen = 0
    for layer in layers:
        param = layer.sara_values[adapter_name]
        old_len = param.numel()
        keep = layer.progressive_adjust(adapter_name)
        before += old_len
        after += param.numel()
        frozen += layer.sara_frozen_indices[adapter_name].numel()
        if optimizer is None or param not in optimizer.state:
            continue
        if reset_optimizer_state:
            del optimizer.state[param]
            continue
        state = optimizer.state[param]
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == old_len:
                state[key] = value[keep.to(value.device)].clone()
    return {
        "kept_fraction": after / max(before, 1),
        "trainable_entries": float(after),
        "frozen_entries": float(frozen),
    }
