"""Tiny, seeded, randomly initialised models (Llama / Qwen2) built locally, and a helper to save them as a Hub-like
directory.

Why: TRL's own tests download ``trl-internal-testing/tiny-*`` models from the Hub. hfx builds the equivalent
offline: same tokenizer every time (:func:`hfx.testing.build_tokenizer`), same weights for the same arguments,
and :func:`save_tiny_model` gives a path usable wherever a model id is expected (``from_pretrained``, TRL
trainers that reload a reference model by name, other processes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .tokenizer import IM_END, build_tokenizer, tokenizer_fingerprint

__all__ = ["ARCHS", "save_tiny_model", "tiny_causal_lm", "tiny_config", "tiny_reward_model"]

ARCHS = ("llama", "qwen2")
KINDS = ("causal_lm", "reward")
MARKER_FILE = "hfx_tiny_model.json"
_FORMAT_VERSION = 1


def _classes(arch: str) -> tuple[type, type, type]:
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

        return LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

        return Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
    raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")


def _default_intermediate(hidden_size: int) -> int:
    # SwiGLU convention (~8/3 * hidden), rounded up to a multiple of 16.
    return -(-(8 * hidden_size) // 3 // 16) * 16


def tiny_config(
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_overrides: Any,
) -> PreTrainedConfig:
    """The ``LlamaConfig``/``Qwen2Config`` used by the tiny model factories (tied embeddings, 512 positions)."""
    config_cls, _, _ = _classes(arch)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer) if vocab_size is None else vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or _default_intermediate(hidden_size),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
    }
    kwargs.update(config_overrides)
    config = config_cls(**kwargs)
    config.dtype = dtype
    return config


def _build(head: str, arch: str, seed: int, dtype: torch.dtype, tokenizer, kwargs: dict[str, Any]) -> PreTrainedModel:
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = tiny_config(arch, dtype=dtype, tokenizer=tokenizer, **kwargs)
    _, lm_cls, seq_cls = _classes(arch)
    cls = lm_cls if head == "causal_lm" else seq_cls
    # Seed a forked RNG so that the caller's global torch RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(dtype)
    model.eval()
    if getattr(model, "generation_config", None) is not None:
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
        eos_ids = [tokenizer.eos_token_id] + ([im_end] if isinstance(im_end, int) and im_end >= 0 else [])
        model.generation_config.eos_token_id = eos_ids  # stop on <|endoftext|> and on ChatML's <|im_end|>
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = config.bos_token_id
    return model


def tiny_causal_lm(
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised ``LlamaForCausalLM``/``Qwen2ForCausalLM``; same weights for the same arguments.

    ``intermediate_size`` defaults to ~8/3 * ``hidden_size``; ``vocab_size`` to ``len(tokenizer)``; special token
    ids come from ``tokenizer`` (default: :func:`build_tokenizer`). Extra keyword arguments go to the config.
    The model is returned in eval mode; ``generation_config`` stops on ``<|endoftext|>`` and ``<|im_end|>``.
    """
    kwargs = dict(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        **config_overrides,
    )
    return _build("causal_lm", arch, seed, dtype, tokenizer, kwargs)


def tiny_reward_model(
    arch: str = "qwen2",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    num_labels: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised ``*ForSequenceClassification`` (reward model) with ``pad_token_id`` set.

    Sequence classification pools the last non-pad token, which needs ``config.pad_token_id`` on padded batches.
    """
    kwargs = dict(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        num_labels=num_labels,
        **config_overrides,
    )
    return _build("reward", arch, seed, dtype, tokenizer, kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _is_complete(path: str, fingerprint: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(path, MARKER_FILE), encoding="utf-8") as f:
            if json.load(f) != fingerprint:
                return False
    except (OSError, ValueError):
        return False
    return all(
        os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


def save_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    kind: str = "causal_lm",
    overwrite: bool = False,
    **model_kwargs: Any,
) -> str:
    """Build tokenizer + tiny model and ``save_pretrained`` both (safetensors) into ``path``; return ``path``.

    ``kind`` is ``"causal_lm"`` (:func:`tiny_causal_lm`) or ``"reward"`` (:func:`tiny_reward_model`);
    ``model_kwargs`` go to that factory. The result loads offline with ``AutoTokenizer`` /
    ``AutoModelForCausalLM`` (or ``AutoModelForSequenceClassification``) ``.from_pretrained(path)``.

    Idempotent and race-safe: if ``path`` already holds a complete model built from the same arguments (recorded in
    ``hfx_tiny_model.json``), nothing is written; otherwise the model is written to a temporary sibling directory
    and renamed into place. A directory built by this function for other arguments is replaced; any other existing
    non-empty directory raises ``FileExistsError`` unless ``overwrite=True``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {list(KINDS)}")
    _classes(arch)  # validate early
    if "tokenizer" in model_kwargs:
        raise ValueError("save_tiny_model always uses hfx.testing.build_tokenizer(); do not pass `tokenizer`")
    path = os.path.abspath(os.fspath(path))
    fingerprint = {
        "format": _FORMAT_VERSION,
        "arch": arch,
        "kind": kind,
        "kwargs": _jsonable(model_kwargs),
        "tokenizer": tokenizer_fingerprint(),
    }
    if _is_complete(path, fingerprint):
        return path
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        if not os.path.isfile(os.path.join(path, MARKER_FILE)):
            raise FileExistsError(f"{path} exists and was not written by save_tiny_model; pass overwrite=True")

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        tokenizer = build_tokenizer()
        factory = tiny_causal_lm if kind == "causal_lm" else tiny_reward_model
        model = factory(arch, tokenizer=tokenizer, **model_kwargs)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(fingerprint, f, indent=2, sort_keys=True)
        _publish(tmp, path, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _publish(tmp: str, path: str, fingerprint: dict[str, Any]) -> None:
    """Move the finished ``tmp`` directory to ``path`` atomically (a concurrent identical build may win)."""
    for _ in range(3):
        try:
            os.rename(tmp, path)  # atomic; fails if `path` is a non-empty directory
            return
        except OSError:
            if _is_complete(path, fingerprint):  # another process published the same model first
                return
        # `path` holds something else (stale build, other args, or an empty dir): move it aside, then retry.
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        try:
            os.rename(path, os.path.join(trash, "old"))
        except OSError:
            pass
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not publish the tiny model to {path}")
