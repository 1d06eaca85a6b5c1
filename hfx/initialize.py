"""``hfx.initialize``: the data-driven initialisation step of tuners such as EVA and LoRA-GA.

Those tuners need statistics from real batches (activations, gradients) before training, and before the optimizer
is built: the step changes the adapter's parameters (and their shapes, for EVA's rank redistribution), so an
optimizer made earlier would hold stale tensors. Each such tuner registers one function here; for every other
tuner ``initialize`` does nothing, so training scripts can call it unconditionally::

    model = get_peft_model(base, hfx.EvaConfig(...))
    hfx.initialize(model, train_dataloader)        # then build the optimizer / Trainer

Initialisation state. EVA and LoRA-GA configs are ``LoraConfig`` subclasses, so ``get_peft_model`` builds ordinary
LoRA layers that train (as a plain LoRA) whether or not the step ran. To make a forgotten ``hfx.initialize`` visible,
hfx records per adapter, on its config object (a plain attribute, never serialised), whether it was initialised:
by ``initialize`` (with batches or ``init_from``) or by loading the adapter's weights from a state dict of matching
shapes (``load_adapter``, a Trainer resume). PEFT has no plugin hook for LoRA-based configs, so hfx wraps
``LoraModel.inject_adapter`` (once, when the first initializer registers): after PEFT's own injection of an adapter
whose config has an initializer, it adds to the model

* a forward pre-hook that warns, on the first training-mode forward, about every such adapter never initialised,
  then removes itself (nothing runs on later forwards), and
* a ``load_state_dict`` pre-hook that, for an adapter never initialised, turns the size mismatch of a checkpoint
  written after the step (EVA's ranks, LoRA-GA's rank-2r export) into an error naming the call that rebuilds the
  training state, and otherwise marks the adapter initialised (its weights were loaded).

Adapters loaded with ``PeftModel.from_pretrained`` get a plain ``LoraConfig`` (that is what hfx saves), so none of
this applies to them.

One config object, one adapter. PEFT keeps the user's config object itself in ``peft_config``, and this state lives
on it, as do LoRA-GA's init factors and EVA's rewritten ``rank_pattern``. A config passed again (a second model, or
a second adapter, the same adapter added again after ``delete_adapter``, a config unpickled elsewhere) therefore
gets a fresh copy of the config as the user made it, instead of carrying the first adapter's run into it (a refused
``initialize``, a wrong LoRA-GA export).
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

# config class -> fn(peft_model, batches, adapter_name, **kwargs) -> summary dict
_INITIALIZERS: dict[type, Callable[..., dict[str, Any]]] = {}
# config class -> what to run before resuming a checkpoint written after the step (in the size-mismatch error)
_RESUME_HINTS: dict[type, str] = {}
# config class -> warning for weights that fit an adapter never initialised, when fitting does not make them valid
_FITTING_LOAD_WARNINGS: dict[type, str] = {}

_STATE = "_hfx_initialized"  # attribute on the adapter's config: True once initialised or loaded
_WARNED = "_hfx_init_warned"  # attribute on the adapter's config: the forgotten-initialize warning was given
_HOOK = "_hfx_init_forward_hook"  # attribute on the model: handle of the one-shot forward pre-hook
_LOAD_HOOK = "_hfx_init_load_hook"  # attribute on the model: handle of the load_state_dict pre-hook
_OWNER = "_hfx_owner"  # attribute on the adapter's config: set at its first injection (the model it was made for)
_PRISTINE = "_hfx_pristine"  # attribute on the adapter's config: a copy as it was before its first injection


def register_initializer(
    config_cls: type,
    fn: Callable[..., dict[str, Any]],
    *,
    resume_hint: str | None = None,
    fitting_load_warning: str | None = None,
) -> None:
    """Make ``initialize`` run ``fn(peft_model, batches, adapter_name, **options)`` for adapters of ``config_cls``;
    ``fn``'s keyword-only parameters are its options (``initialize`` refuses a keyword no initialiser takes).

    ``resume_hint``: the call that rebuilds an adapter's post-initialisation shapes before a checkpoint is loaded
    into it (shown when a checkpoint does not fit an adapter that was never initialised).
    ``fitting_load_warning``: warned (with ``{adapter}`` filled in) when weights that *do* fit are loaded into such an
    adapter, for methods where the initialisation also changes something the weights do not carry (LoRA-GA's
    offset base).
    """
    _INITIALIZERS[config_cls] = fn
    if resume_hint is not None:
        _RESUME_HINTS[config_cls] = resume_hint
    if fitting_load_warning is not None:
        _FITTING_LOAD_WARNINGS[config_cls] = fitting_load_warning
    _install_lora_inject_hook()


def _keywords(fn: Callable[..., Any]) -> set[str]:
    """The keyword-only options of an initialiser (after ``peft_model, batches, adapter_name``)."""
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def is_initialized(config: Any) -> bool:
    """Whether the adapter of ``config`` was initialised by ``hfx.initialize`` or loaded from a state dict."""
    return bool(getattr(config, _STATE, False))


def mark_initialized(config: Any) -> None:
    """Record that the adapter of ``config`` no longer needs ``hfx.initialize`` (the step ran, or weights loaded)."""
    setattr(config, _STATE, True)


def needs_initialization(peft_model: torch.nn.Module) -> bool:
    """Whether any adapter of ``peft_model`` has a data-driven initialisation step that has not run yet."""
    configs = getattr(peft_model, "peft_config", {}) or {}
    return any(type(cfg) in _INITIALIZERS and not is_initialized(cfg) for cfg in configs.values())


def initialize(
    peft_model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    adapter_names: list[str] | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Run the data-driven initialisation of every adapter that has one (EVA, LoRA-GA, ...); a no-op for others.

    ``batches`` is a DataLoader or any iterable of model-input dicts (``input_ids``, ``attention_mask``, ``labels``
    ...). Call it after ``get_peft_model`` and before the optimizer is built. Returns ``{adapter: summary}``.
    """
    configs = getattr(peft_model, "peft_config", None)
    if configs is None:
        raise TypeError(f"hfx.initialize expects a PEFT model (from get_peft_model), got {type(peft_model).__name__}.")
    known = set().union(*(_keywords(fn) for fn in _INITIALIZERS.values()))
    unknown = sorted(set(kwargs) - known)
    if unknown:  # a typo (init_form=...) would otherwise be dropped silently and run a fresh initialisation
        raise TypeError(
            f"hfx.initialize got unexpected keyword argument(s) {unknown}; the registered initialisers take "
            f"{sorted(known)}."
        )
    names = adapter_names if adapter_names is not None else list(configs)
    summaries: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in configs:
            raise ValueError(f"hfx.initialize: no adapter named {name!r}; the model has {list(configs)}.")
        fn = _INITIALIZERS.get(type(configs[name]))
        if fn is not None:
            _materialize_meta_adapter(peft_model, name)
            accepted = _keywords(fn)  # another tuner's option (e.g. for a second adapter) is not passed to this one
            summaries[name] = fn(peft_model, batches, name, **{k: v for k, v in kwargs.items() if k in accepted})
            mark_initialized(configs[name])
    return summaries


# --------------------------------------------------------------------------------------------------------------------
# tracking: the forgotten-initialize warning and the resume check


def _pending(configs: dict[str, Any]) -> list[str]:
    """Adapters with an initializer that were neither initialised nor loaded, and not yet warned about."""
    return [
        n
        for n, c in configs.items()
        if type(c) in _INITIALIZERS and not is_initialized(c) and not getattr(c, _WARNED, False)
    ]


def _warn_if_uninitialized(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook: on the first training-mode forward, warn about adapters never initialised, then go away."""
    if not module.training:
        return  # eval passes (including hfx.initialize's own) neither warn nor use up the check
    configs = getattr(module, "peft_config", {}) or {}
    for name in _pending(configs):
        setattr(configs[name], _WARNED, True)
        warnings.warn(
            f"Adapter {name!r} ({type(configs[name]).__name__}) is training without its data-driven initialisation: "
            f"hfx.initialize(model, batches) was never called, so it trains as a plain LoRA with PEFT's default "
            "init (and saves as one). Call hfx.initialize(model, trainer.get_train_dataloader()) after get_peft_model "
            "and before the optimizer / trainer.train().",
            UserWarning,
            stacklevel=2,
        )
    handle = getattr(module, _HOOK, None)
    if handle is not None:
        handle.remove()
        setattr(module, _HOOK, None)


def _check_loaded_shapes(
    module: torch.nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook on the model: for each never-initialised adapter the state dict holds weights
    of, raise a clear error when their LoRA shapes do not fit (a checkpoint written after the step), else mark the
    adapter initialised (its weights are being loaded), with the method's warning where fitting is not enough."""
    from peft.tuners.lora import LoraLayer

    configs = getattr(module, "peft_config", {}) or {}
    waiting = {n: c for n, c in configs.items() if type(c) in _INITIALIZERS and not is_initialized(c)}
    if not waiting:
        return
    for adapter, config in waiting.items():
        found = False
        mismatch: list[str] = []
        absent: list[str] = []
        for name, layer in module.named_modules():
            if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
                continue
            layer_found = False
            for part in ("lora_A", "lora_B"):
                incoming = state_dict.get(f"{prefix}{name}.{part}.{adapter}.weight")
                if incoming is None:
                    continue
                found = layer_found = True
                here = getattr(layer, part)[adapter].weight
                if tuple(incoming.shape) != tuple(here.shape):
                    mismatch.append(
                        f"{name}.{part}: {tuple(incoming.shape)} in the state dict, {tuple(here.shape)} here"
                    )
            if not layer_found:
                absent.append(f"{name}: not in the state dict (e.g. a layer EVA gave rank 0)")
        if found and absent:
            mismatch.extend(absent)
        if mismatch:
            hint = _RESUME_HINTS.get(type(config), "hfx.initialize(model, batches)")
            raise RuntimeError(
                f"Cannot load the weights of adapter {adapter!r} ({type(config).__name__}): it was never initialised "
                f"with hfx.initialize, so its LoRA layers still have the shapes before the data-driven step, while "
                f"the state dict (e.g. a Trainer checkpoint) was saved after it; {len(mismatch)} tensors differ or are "
                f"missing, e.g. "
                f"{mismatch[0]}. Before loading or resuming, run {hint}. To use the saved adapter without training "
                "it further, load it with PeftModel.from_pretrained(base_model, <checkpoint>) (a plain LoRA)."
            )
        if found:
            if type(config) in _FITTING_LOAD_WARNINGS:
                warnings.warn(_FITTING_LOAD_WARNINGS[type(config)].format(adapter=adapter), UserWarning, stacklevel=2)
            mark_initialized(config)


def _track(model: torch.nn.Module) -> None:
    """Add the one-shot forward pre-hook and the load check to ``model`` (the transformers model PEFT wraps, which
    carries ``peft_config``; every PeftModel class calls it), unless they are already there."""
    if not _pending(getattr(model, "peft_config", {}) or {}):
        return
    if getattr(model, _HOOK, None) is None:
        setattr(model, _HOOK, model.register_forward_pre_hook(_warn_if_uninitialized))
    if getattr(model, _LOAD_HOOK, None) is None:
        setattr(model, _LOAD_HOOK, model.register_load_state_dict_pre_hook(_check_loaded_shapes))


def _install_lora_inject_hook() -> None:
    """Wrap PEFT's ``LoraModel.inject_adapter`` (idempotently) so that adapters of LoRA-based configs with an
    initializer get tracked as soon as ``get_peft_model`` / ``add_adapter`` builds them."""
    from peft.tuners.lora import LoraModel

    original = LoraModel.inject_adapter
    if getattr(original, "_hfx_tracks_initialization", False):
        return

    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        if type(self.peft_config.get(adapter_name)) in _INITIALIZERS:
            self.peft_config[adapter_name] = _owned_config(self.peft_config[adapter_name])
        out = original(self, model, adapter_name, *args, **kwargs)
        config = self.peft_config.get(adapter_name)
        if type(config) in _INITIALIZERS:
            if getattr(model, "peft_config", None) is None:
                model.peft_config = self.peft_config  # BaseTuner sets it right after the first injection
            _track(model)
        return out

    inject_adapter._hfx_tracks_initialization = True
    LoraModel.inject_adapter = inject_adapter


def _owned_config(config: Any) -> Any:
    """The config an adapter being injected gets: the user's object itself the first time it is injected, else a
    fresh copy of it as first passed (see the module docstring). ``get_peft_model`` has just written this model's
    ``base_model_name_or_path`` / ``revision`` onto the shared object: they go to the copy, and the first adapter's
    are put back."""
    first = getattr(config, _OWNER, None)
    if first is None:
        setattr(config, _PRISTINE, copy.deepcopy(config))
        setattr(config, _OWNER, _origin(config))
        return config
    fresh = copy.deepcopy(getattr(config, _PRISTINE))
    for name, value in _origin(config).items():
        setattr(fresh, name, value)
    for name, value in first.items():
        setattr(config, name, value)
    setattr(fresh, _PRISTINE, getattr(config, _PRISTINE))
    setattr(fresh, _OWNER, _origin(fresh))
    return fresh


def _origin(config: Any) -> dict[str, Any]:
    """What ``get_peft_model`` writes onto a config about the model it wraps."""
    return {name: getattr(config, name, None) for name in ("base_model_name_or_path", "revision")}


def _materialize_meta_adapter(peft_model: torch.nn.Module, adapter_name: str) -> None:
    """Put LoRA weights still on the meta device (``get_peft_model(..., low_cpu_mem_usage=True)``) on their base
    layer's device, zero-filled, so that the initialiser can write them (a copy onto meta does nothing)."""
    from peft.tuners.lora import LoraLayer

    for layer in peft_model.modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        device = layer.get_base_layer().weight.device
        for part in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            if any(p.is_meta for p in part.parameters()):
                part.to_empty(device=device)
                with torch.no_grad():
                    for p in part.parameters():
                        p.zero_()
