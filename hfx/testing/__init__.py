"""Offline test fixtures: a tiny deterministic tokenizer and tiny seeded models (no Hub access needed).

Usable from hfx's own tests and by users who want small, fast, reproducible models for their own tests::

    from hfx.testing import build_tokenizer, save_tiny_model, tiny_causal_lm

    path = save_tiny_model("/tmp/tiny-llama")  # then pass `path` wherever a model id is expected
"""

from .hub import as_hub_cache
from .memory import saved_activation_bytes
from .models import ARCHS, save_tiny_model, tiny_causal_lm, tiny_config, tiny_reward_model
from .tokenizer import CHAT_TEMPLATE, build_tokenizer, tokenizer_fingerprint

__all__ = [
    "ARCHS",
    "as_hub_cache",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "saved_activation_bytes",
    "save_tiny_model",
    "tiny_causal_lm",
    "tiny_config",
    "tiny_reward_model",
    "tokenizer_fingerprint",
]
