"""Mixed-adapter batches on a causal LM: forward, ``generate`` with beams, and ``modules_to_save``.

The per-tuner checks on a small MLP are in ``test_matrix.py``; this adds what only a transformers model exercises.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_matrix import randomise

import hfx
from hfx.testing import tiny_causal_lm

TUNERS = [
    pytest.param(hfx.BoneConfig, {"r": 4, "init_weights": False}, id="bone"),
    pytest.param(hfx.PacaConfig, {"r": 4, "init_weights": False}, id="paca"),
    pytest.param(hfx.LiftConfig, {"r": 1, "filter_rank": 4}, id="lift"),
    pytest.param(hfx.SaraConfig, {"ratio": 0.25}, id="sara"),
    pytest.param(hfx.DseeConfig, {"r": 2, "num_sparse": 8}, id="dsee"),
]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(cfg_cls, kw, tie_word_embeddings=True, **extra):
    base = tiny_causal_lm(
        "llama", hidden_size=32, num_layers=2, seed=0, initializer_range=0.2, tie_word_embeddings=tie_word_embeddings
    )
    model = get_peft_model(base, cfg_cls(target_modules=TARGETS, **kw, **extra))
    model.add_adapter("other", cfg_cls(target_modules=TARGETS, **kw, **extra))
    randomise(model, "default", seed=1)
    randomise(model, "other", seed=2)
    return model.eval()


def _per_adapter(model, fn):
    """``fn()`` under each adapter and under the base model."""
    out = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        out[name] = fn()
    with model.disable_adapter():
        out["__base__"] = fn()
    model.set_adapter("default")
    return out


@pytest.mark.parametrize("cfg_cls,kw", TUNERS)
def test_causal_lm_forward_and_beam_generate(cfg_cls, kw):
    model = _model(cfg_cls, kw)
    ids = torch.randint(3, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["other", "__base__", "default"]
    logits = _per_adapter(model, lambda: model(input_ids=ids).logits)
    assert not torch.allclose(logits["default"], logits["other"], atol=1e-3)
    out = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(out[row], logits[name][row], rtol=1e-5, atol=1e-5)

    gen = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    per = _per_adapter(model, lambda: model.generate(input_ids=ids, **gen))
    mixed = model.generate(input_ids=ids, adapter_names=names, **gen)
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], per[name][row]), name


def test_modules_to_save_follow_adapter_names():
    model = _model(
        hfx.BoneConfig, {"r": 4, "init_weights": False}, tie_word_embeddings=False, modules_to_save=["lm_head"]
    )
    with torch.no_grad():  # give each adapter's copy of lm_head its own weights
        for name, scale in (("default", 1.5), ("other", 0.5)):
            model.base_model.model.lm_head.modules_to_save[name].weight.mul_(scale)
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    logits = _per_adapter(model, lambda: model(input_ids=ids).logits)
    out = model(input_ids=ids, adapter_names=["other", "default"]).logits
    torch.testing.assert_close(out[0], logits["other"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], logits["default"][1], rtol=1e-5, atol=1e-5)
