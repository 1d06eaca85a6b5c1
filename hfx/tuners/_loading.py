"""transformers' own adapter loading for hfx adapters: ``model.load_adapter(folder)`` and
``AutoModelForCausalLM.from_pretrained(<adapter folder>)``.

transformers injects a fresh adapter, then compares each saved tensor's shape with the injected one before loading;
it does not go through ``load_state_dict``. A LIFT adapter after a mask refresh, or a SaRA adapter after its
progressive adjustment, saves index sets of other lengths than a fresh one has (their :class:`~._sparse.Resizable`
containers resize only inside ``load_state_dict``), so that load failed with a size mismatch while PEFT's
``PeftModel.from_pretrained`` loaded the same folder. Here each resizable tensor takes its saved shape right after
injection (:func:`resize_to_saved`, called by the tuners' ``inject_adapter``); the shapes come from the given state
dict or the adapter file's header (a local folder, or the Hub client's download, which transformers reads next),
read only when the injected adapter has such tensors. Saved DSEE pruning masks are re-applied after the load
(:func:`hfx.tuners.dsee.prune.apply_saved_pruning`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._sparse import Resizable

# while transformers' load_adapter runs: adapter name -> a function giving {saved key without the
# "base_model.model." prefix: shape}
_SAVED_SHAPES: contextvars.ContextVar[dict[str, Callable[[], dict[str, tuple[int, ...]]]] | None] = (
    contextvars.ContextVar("hfx_saved_adapter_shapes", default=None)
)
_PREFIX = "base_model.model."
HUB_KEYS = ("subfolder", "revision", "token", "cache_dir")


def _strip(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


def _shapes(tensors: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {_strip(k): tuple(v.shape) for k, v in tensors.items() if torch.is_tensor(v)}


def _read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {_strip(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return _shapes(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def saved_shapes(
    model_id: str | os.PathLike | None, state_dict: dict[str, torch.Tensor] | None, hub: dict[str, Any] | None = None
) -> dict[str, tuple[int, ...]]:
    """The saved tensors' shapes, from ``state_dict`` or from the adapter's weights file (a local folder, or a Hub
    repository through the Hub client's cache, which transformers reads next): the safetensors header, or a ``.bin``
    read with ``weights_only=True``. Empty where there is no such file."""
    if state_dict is not None:
        return _shapes(state_dict)
    if model_id is None:
        return {}
    hub = hub or {}
    names = ("adapter_model.safetensors", "adapter_model.bin")
    if os.path.isdir(str(model_id)):
        folder = os.path.join(str(model_id), hub.get("subfolder") or "")
        found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
        return _read_shapes(found[0]) if found else {}
    from huggingface_hub import hf_hub_download

    for name in names:
        try:
            return _read_shapes(hf_hub_download(str(model_id), name, **hub))
        except Exception:  # noqa: BLE001 - not there (or not reachable): transformers' own load reports it
            continue
    return {}


def resize_to_saved(model: nn.Module, adapter_name: str) -> None:
    """Give each resizable per-adapter tensor of ``adapter_name`` the shape saved for it, when transformers'
    ``load_adapter`` is loading that adapter (a no-op otherwise)."""
    source = (_SAVED_SHAPES.get() or {}).get(adapter_name)
    resizable = [(n, m) for n, m in model.named_modules() if isinstance(m, Resizable) and adapter_name in m.keys()]
    if source is None or not resizable:
        return
    shapes = source()
    for name, module in resizable:
        # PEFT saves "<container path>.<adapter>" as "<container path>" (the default adapter's name is dropped)
        shape = shapes.get(name, shapes.get(f"{name}.{adapter_name}"))
        current = module[adapter_name]
        if shape is not None and current is not None and tuple(current.shape) != shape:
            module.resize(adapter_name, shape)


def install_transformers_load_hook() -> None:
    """Wrap transformers' ``PeftAdapterMixin.load_adapter`` once: saved shapes in before it loads, saved DSEE pruning
    masks re-applied after; other adapters load as before."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - transformers without its PEFT integration
        return
    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_hfx_load_hook", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        adapter_name = bound.get("adapter_name") or "default"
        model_id = bound.get("peft_model_id")
        load_config = bound.get("load_config")
        extra = {
            **(getattr(load_config, "download_kwargs", None) or {}),
            **(bound.get("adapter_kwargs") or {}),
            **(bound.get("kwargs") or {}),
        }
        hub = {k: extra.get(k, bound.get(k)) for k in HUB_KEYS}
        hub = {k: v for k, v in hub.items() if v is not None}
        source = functools.partial(saved_shapes, model_id, bound.get("adapter_state_dict"), hub)
        token = _SAVED_SHAPES.set({adapter_name: source})
        try:
            result = original(self, *args, **kwargs)
        finally:
            _SAVED_SHAPES.reset(token)
        _reapply_dsee_pruning(self, model_id, adapter_name, hub)
        return result

    load_adapter._hfx_load_hook = True
    PeftAdapterMixin.load_adapter = load_adapter


def _reapply_dsee_pruning(model: nn.Module, model_id: Any, adapter_name: str, hub: dict[str, Any]) -> None:
    from .dsee.config import DseeConfig
    from .dsee.prune import MASKS_FILE, _is_pruned, apply_saved_pruning

    if model_id is not None:
        apply_saved_pruning(model, model_id, adapter_name, **hub)
        return
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if isinstance(config, DseeConfig) and config.pruned and not _is_pruned(model):
        warnings.warn(
            f"DSEE adapter {adapter_name!r} was loaded from a state dict, but it was saved from a pruned model and a "
            f"state dict carries no pruning masks: the model runs unpruned until you call "
            f"hfx.dsee.load_pruning(model, <folder with {MASKS_FILE}>).",
            stacklevel=3,
        )
