"""``hfx.use_cce(model)``: compute a causal LM's training loss with CCE, so the N×V logits are never built.

Mechanics. The underlying ``PreTrainedModel`` (unwrapped from PEFT) gets an instance ``forward`` that, when the model
is training and ``labels`` are given, runs the model's *own* forward with ``labels=None`` while a context is active;
the output-embedding module (``lm_head``) has an instance ``forward`` that, inside that context, returns the CCE loss
of its input hidden states instead of logits. The wrapper then returns ``loss`` = that value and ``logits=None``.

Why through ``lm_head``'s forward rather than reading ``lm_head.weight`` from outside: under DeepSpeed ZeRO-3 the
weight is partitioned and only gathered by the module's pre-forward hook, and its gradient reduction is armed by
the hooks on the module's outputs. Running the loss *inside* the head's forward gives both for free (the same holds
for tied embeddings, where the head's weight is the embedding's).

Everything else is left to the model's forward: the backbone call and its kwargs (padding-free / packing
``position_ids``, ``cu_seq_lens``), gradient checkpointing, PEFT adapters inside the backbone. Gemma-2 style
``final_logit_softcapping`` is passed to CCE (and switched off in the config for the duration of the call so the
model does not softcap the loss); a softcap the model keeps elsewhere is refused, and the first CCE forward of each
model checks that the model handed lm_head's output back unchanged (else: an error, not a silently changed loss).
accelerate's hook on ``lm_head`` (offload, ``device_map``) runs around the CCE call as around the head's forward.
Loss normalisation follows transformers' ``ForCausalLMLoss``: labels shifted by
one (or ``shift_labels`` used as given), ``ignore_index=-100``, mean over non-ignored tokens, or sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation). MoE models add
``router_aux_loss_coef · aux_loss`` like their own forward does.

Calls that keep the plain forward: eval mode, no ``labels``, a non-zero ``logits_to_keep``, and TRL's
``fused_lm_head=True`` (TRL ≥ 1.15 SFTTrainer/DPOTrainer already compute per-token log-probabilities in chunks through
their own fused LM head; those calls pass through untouched). TRL 1.10–1.14's SFTTrainer instead replaces the model's
forward with its own chunked loss (``loss_type="chunked_nll"``, the default); ``use_cce`` applied on top of that
leaves it in charge, with a warning, since that loss already never builds the logits and TRL reads extra outputs of
it (``num_valid_tokens``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["cce_enabled", "use_cce"]

_STATE_ATTR = "_hfx_cce_state"
_HEAD_ATTR = "_hfx_cce_head_forward"


@dataclass
class _Call:
    """What the patched ``lm_head`` needs for one CCE forward."""

    labels: torch.Tensor
    shift_labels: torch.Tensor | None
    num_items_in_batch: Any
    softcap: float | None
    heads: tuple[nn.Module, ...]
    options: dict[str, Any]
    loss: torch.Tensor | None = None


_ACTIVE: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("hfx_cce_call", default=None)


@dataclass
class _State:
    enabled: bool
    original_forward: Any
    options: dict[str, Any] = field(default_factory=dict)
    heads: list[nn.Module] = field(default_factory=list)
    patched_func: Any = None
    defer: bool = False  # the wrapped forward computes its own logits-free loss (TRL's chunked NLL): pass through
    checked: bool = False  # the first CCE forward found the loss returned unchanged by the model's forward


def _base_model(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under PEFT / DDP / DeepSpeed wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeedEngine
            model = model.module
        else:
            break
    if not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"use_cce needs a transformers causal LM (PreTrainedModel); got {type(model).__name__}")
    return model


def _is_trl_chunked_loss(forward: Any) -> bool:
    """Whether ``forward`` is TRL 1.10–1.14 SFTTrainer's patched forward (``loss_type="chunked_nll"``)."""
    func = getattr(forward, "__func__", forward)
    return str(getattr(func, "__module__", "")).startswith("trl.") and "_patch_chunked_ce_lm_head" in str(
        getattr(func, "__qualname__", "")
    )


def _head_linears(head: nn.Module) -> tuple[nn.Module, ...]:
    """The plain ``nn.Linear`` modules that can compute the logits behind ``get_output_embeddings()``.

    Raises for an active, unmerged PEFT adapter on ``lm_head`` (its delta would be silently ignored).
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        BaseTunerLayer = AuxiliaryTrainingWrapper = ()  # noqa: N806

    if isinstance(head, BaseTunerLayer):
        if not head.disable_adapters and not head.merged and head.active_adapters:
            raise NotImplementedError(
                f"use_cce: lm_head carries an active PEFT adapter ({type(head).__name__}, adapters "
                f"{head.active_adapters}); CCE reads the head's weight directly, so the adapter's delta would be "
                "ignored. Train lm_head fully with `modules_to_save=['lm_head']`, merge the adapter, or leave lm_head "
                "out of `target_modules`."
            )
        return _head_linears(head.get_base_layer())
    if type(head).__name__ == "TrainableTokensWrapper":  # its token rows live outside the weight CCE reads
        raise NotImplementedError(
            "use_cce: lm_head is wrapped by PEFT's trainable_token_indices (a tied lm_head shares the embedding's "
            "trainable tokens), whose rows CCE would not see. Untie the embeddings, train them with "
            "`modules_to_save=['embed_tokens', 'lm_head']`, or train without use_cce."
        )
    if isinstance(head, AuxiliaryTrainingWrapper):
        mods: list[nn.Module] = []
        if hasattr(head, "modules_to_save"):
            mods += list(head.modules_to_save.values())
        base = head.original_module
        if not isinstance(base, nn.Linear):
            raise NotImplementedError(
                f"use_cce: unsupported wrapper around lm_head ({type(head).__name__} over {type(base).__name__}); "
                "e.g. trainable_token_indices on a tied lm_head"
            )
        return (*mods, base)
    if isinstance(head, nn.Linear):
        return (head,)
    raise NotImplementedError(f"use_cce: lm_head of type {type(head).__name__} is not supported (expected nn.Linear)")


def _install_head(mod: nn.Module) -> None:
    """Give ``mod`` an instance ``forward`` that returns the CCE loss while a CCE call for it is active."""
    if getattr(mod, _HEAD_ATTR, None) is not None:
        return
    original = mod.forward
    own_forward = "forward" in vars(mod)  # an instance forward already (accelerate's hook), restored on uninstall

    def head_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        call = _ACTIVE.get()
        if call is None or call.loss is not None or not any(self is h for h in call.heads):
            return original(hidden)
        hook = getattr(self, "_hf_hook", None)  # accelerate (offload, device_map): load the weights, move inputs
        if hook is not None:
            (hidden,), _ = hook.pre_forward(self, hidden)
        loss = _head_loss(self, hidden, call)
        return loss if hook is None else hook.post_forward(self, loss)

    mod.forward = types.MethodType(head_forward, mod)
    setattr(mod, _HEAD_ATTR, (original, own_forward))


def _head_loss(head: nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    """The CCE loss of the hidden states reaching ``head`` (recorded in ``call.loss``)."""
    from . import linear_cross_entropy

    labels = call.shift_labels if call.shift_labels is not None else call.labels
    labels = labels.to(hidden.device)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"use_cce: labels {tuple(labels.shape)} do not match the hidden states {tuple(hidden.shape[:-1])} "
            "reaching lm_head (prompt-learning PEFT methods that add virtual tokens are not supported)"
        )
    call.loss = linear_cross_entropy(
        hidden,
        head.weight,
        labels,
        head.bias,
        shift=call.shift_labels is None,
        softcap=call.softcap,
        reduction="mean",
        num_items_in_batch=call.num_items_in_batch,
        **call.options,
    )
    return call.loss


def _uninstall_head(mod: nn.Module) -> None:
    saved = getattr(mod, _HEAD_ATTR, None)
    if saved is not None:
        original, own_forward = saved
        if own_forward:
            mod.forward = original  # e.g. accelerate's hooked forward (deleting it left the module unhooked)
        else:
            del mod.forward  # back to the class's forward
        delattr(mod, _HEAD_ATTR)


@contextlib.contextmanager
def _softcap_off(model: nn.Module):
    """Switch the model's own final-logit softcapping off for one call (CCE applies it instead)."""
    config = _text_config(model)
    value = getattr(config, "final_logit_softcapping", None)
    if value is None:
        yield None
        return
    _set_field(config, "final_logit_softcapping", None)
    try:
        yield float(value)
    finally:
        _set_field(config, "final_logit_softcapping", value)


def _set_field(config: Any, name: str, value: Any) -> None:
    """``setattr`` that also writes ``None`` into a strict-dataclass config field typed ``float`` (Gemma-3n), whose
    validation would refuse it."""
    try:
        setattr(config, name, value)
    except Exception:  # huggingface_hub's StrictDataclassFieldValidationError
        vars(config)[name] = value


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# the keyword options of hfx.linear_cross_entropy that use_cce forwards
_OPTIONS = (
    "impl",
    "chunk_bytes",
    "token_chunk",
    "vocab_chunk",
    "z_loss",
    "label_smoothing",
    "filter_eps",
    "sort_vocab",
)


def _check_supported(model: nn.Module) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(
            f"use_cce: {type(model).__name__} is an encoder-decoder model, whose labels are aligned with the decoder "
            "inputs (no shift) and whose decoder output may be rescaled before lm_head (T5); the CCE path scores "
            "decoder-only causal LMs (AutoModelForCausalLM). Train it without use_cce."
        )
    config = _text_config(model)
    # Bamba: mean logsumexp² over every position, weighted by the model's own copy of the config value (taken at init)
    z_coef = getattr(model, "z_loss_coefficient", getattr(config, "z_loss_coefficient", None))
    if z_coef:
        raise NotImplementedError(
            f"use_cce: {type(model).__name__} adds a z-loss over all its logits (z_loss_coefficient={z_coef}), which "
            "the CCE path does not compute. Set `model.z_loss_coefficient = 0.0` (the model keeps its own copy of "
            "the config's value) and pass `use_cce(model, z_loss=...)` for CCE's z-loss over the labelled tokens, "
            "or train it without use_cce."
        )
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"use_cce: {type(model).__name__} rescales its logits ({name}={getattr(config, name)}), "
                "which the CCE path does not reproduce yet"
            )
    for name in ("logits_soft_cap", "output_logit_soft_cap"):  # RecurrentGemma, xLSTM
        if getattr(config, name, None) is not None:
            raise NotImplementedError(
                f"use_cce: {type(model).__name__} softcaps its logits ({name}={getattr(config, name)}) under a name "
                "the CCE path does not switch off (only `final_logit_softcapping`); it would softcap the loss instead"
            )
    if getattr(model, "final_logit_softcapping", None) is not None:  # Mistral-Large-4: read from the model, always
        raise NotImplementedError(
            f"use_cce: {type(model).__name__} keeps its logit softcap on the model (final_logit_softcapping="
            f"{model.final_logit_softcapping}, read at init and applied unconditionally), which the CCE path cannot "
            "switch off; it would softcap the loss instead. Train it without use_cce."
        )


def _make_forward(model: nn.Module, state: _State):
    original = state.original_forward

    @functools.wraps(type(model).forward)  # keep the signature: Trainer / generate inspect it
    def cce_forward(self, *args, labels=None, **kwargs):
        logits_to_keep = kwargs.get("logits_to_keep", 0)
        plain = (
            not state.enabled
            or state.defer
            or not self.training
            or labels is None
            or kwargs.get("fused_lm_head", False)
            or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
        )
        if plain:
            if labels is not None:
                kwargs["labels"] = labels
            return original(*args, **kwargs)

        heads = _head_linears(self.get_output_embeddings())
        for head in heads:
            if head not in state.heads:
                _install_head(head)
                state.heads.append(head)
        shift_labels = kwargs.pop("shift_labels", None)
        with _softcap_off(self) as softcap:
            call = _Call(
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
                softcap=softcap,
                heads=heads,
                options=state.options,
            )
            token = _ACTIVE.set(call)
            try:
                outputs = original(*args, **kwargs)
            except (IndexError, TypeError, RuntimeError) as err:
                if call.loss is None:  # failed before lm_head: not ours to explain
                    raise
                raise RuntimeError(
                    f"use_cce: {type(self).__name__}.forward failed after lm_head, treating its output (here the "
                    f"0-dim CCE loss) as logits ({type(err).__name__}: {err}); this architecture post-processes the "
                    "logits (e.g. slices the vocabulary or masks tokens), which the CCE path does not support: train "
                    "it without use_cce."
                ) from err
            finally:
                _ACTIVE.reset(token)
        if call.loss is None:
            raise RuntimeError(
                f"use_cce: {type(self).__name__}.forward did not call its output embeddings module; "
                "this architecture is not supported by the CCE path"
            )
        # Take the loss as it came out of the model (through lm_head's module output), not ``call.loss``: hooks on
        # module outputs (DeepSpeed ZeRO-3's pre-backward gather of lm_head's weight) wrap the returned tensor.
        loss = outputs[0] if isinstance(outputs, tuple) else outputs["logits"]
        if not (torch.is_tensor(loss) and loss.dim() == 0):
            raise RuntimeError(
                f"use_cce: {type(self).__name__}.forward post-processes lm_head's output in a way the CCE path does "
                "not support"
            )
        if not state.checked:  # once per model: its forward hands lm_head's output back unchanged
            came_back = loss.detach().to(call.loss.device, call.loss.dtype)
            if not torch.allclose(came_back, call.loss.detach(), rtol=0.0, atol=0.0, equal_nan=True):
                raise RuntimeError(
                    f"use_cce: {type(self).__name__}.forward transforms lm_head's output (a logit softcap or scale "
                    "kept outside `final_logit_softcapping`, e.g. in a module or cached at init), so it changed the "
                    f"CCE loss ({float(call.loss.detach()):.6g} -> {float(loss.detach()):.6g}); this architecture "
                    "is not supported by the CCE path: train it without use_cce."
                )
            state.checked = True
        aux_loss = getattr(outputs, "aux_loss", None)
        # MoE router loss weight: ``router_aux_loss_coef`` (Mixtral, Qwen-MoE, ...) or JetMoE's ``aux_loss_coef``
        coef = getattr(self, "router_aux_loss_coef", None) or getattr(self, "aux_loss_coef", None)
        if aux_loss is not None and coef:
            loss = loss + coef * aux_loss.to(loss.device)
        if isinstance(outputs, tuple):  # return_dict=False: (logits, ...) where "logits" is the loss
            return (loss, *outputs[1:])
        fields = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
        return type(outputs)(loss=loss, **fields)

    return cce_forward


def use_cce(model: nn.Module, enabled: bool = True, **options: Any) -> nn.Module:
    """Turn the CCE loss path on (or off with ``enabled=False``) for a causal LM; returns ``model``.

    ``model`` may be a ``PreTrainedModel`` or a PEFT / DDP / DeepSpeed wrapper of one; the patch goes on the
    underlying ``PreTrainedModel``. While training with ``labels``, ``outputs.loss`` comes from
    :func:`hfx.linear_cross_entropy` and ``outputs.logits`` is ``None``; otherwise the model behaves as before.
    ``options`` are passed to :func:`hfx.linear_cross_entropy` (``impl``, ``chunk_bytes``, ``z_loss``,
    ``label_smoothing``, ...). Calling ``use_cce`` again updates the options.
    """
    base = _base_model(model)
    state: _State | None = getattr(base, _STATE_ATTR, None)
    if not enabled:
        if state is not None:
            state.enabled = False
            for head in state.heads:
                _uninstall_head(head)
            state.heads.clear()
            # Restore the forward only if ours is still the outermost one (a later wrapper, e.g. TRL's fused LM head,
            # may have captured it: then the disabled flag makes ours a pass-through).
            if getattr(base.forward, "__func__", None) is state.patched_func:
                if "forward" in vars(base):
                    del base.forward
                if state.original_forward is not None and getattr(state.original_forward, "__self__", None) is base:
                    if getattr(state.original_forward, "__func__", None) is not type(base).forward:
                        base.forward = state.original_forward
            delattr(base, _STATE_ATTR)
        return model

    _check_supported(base)
    bad = set(options) - set(_OPTIONS)
    if bad:
        raise TypeError(f"use_cce: unsupported option(s) {sorted(bad)}; it takes {list(_OPTIONS)}")
    from . import _IMPLS

    impl = options.get("impl", "auto")
    if impl not in _IMPLS:  # checked here, not at the first training forward
        raise ValueError(f"use_cce: impl must be one of {list(_IMPLS)}, got {impl!r}")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise TypeError(
            f"use_cce: {type(base).__name__} has no output embedding (lm_head), so there is no token loss to compute; "
            "use_cce applies to causal language models (e.g. AutoModelForCausalLM), not to reward or "
            "classification models."
        )
    _head_linears(head)  # fail early on a LoRA'd lm_head
    if state is not None:
        state.enabled = True
        state.options = dict(options)
        return model
    state = _State(enabled=True, original_forward=base.forward, options=dict(options))
    if _is_trl_chunked_loss(base.forward):
        state.defer = True
        warnings.warn(
            "use_cce: this model's forward is TRL SFTTrainer's chunked loss (loss_type='chunked_nll'), which already "
            "never builds the logits and whose extra outputs (num_valid_tokens, entropy_sum) TRL reads; it stays in "
            "charge and hfx's CCE is not used. TRL >= 1.15 scores tokens through a fused LM head instead, which "
            "use_cce also leaves as it is.",
            stacklevel=2,
        )
    func = _make_forward(base, state)
    state.patched_func = func
    base.forward = types.MethodType(func, base)
    setattr(base, _STATE_ATTR, state)
    return model


def cce_enabled(model: nn.Module) -> bool:
    """Whether :func:`use_cce` is active on ``model``."""
    state = getattr(_base_model(model), _STATE_ATTR, None)
    return bool(state is not None and state.enabled)
