"""Tiny model factories and save_tiny_model: determinism, both architectures, reward head, offline reload."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hfx.testing import ARCHS, build_tokenizer, save_tiny_model, tiny_causal_lm, tiny_reward_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    except (ImportError, AttributeError):
        pass


def _batch(tok):
    tok.padding_side = "right"
    return tok(["Question: Mia has 7 apples.\nAnswer:\n", "7 + 5 = 12\n#### 12"], padding=True, return_tensors="pt")


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_and_deterministic(arch):
    state = torch.random.get_rng_state()
    a = tiny_causal_lm(arch, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    assert _same_weights(a, tiny_causal_lm(arch, seed=0))
    assert not _same_weights(a, tiny_causal_lm(arch, seed=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_and_forward_backward(arch):
    tok = build_tokenizer()
    model = tiny_causal_lm(arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg = model.config
    assert cfg.model_type == arch
    assert cfg.vocab_size == len(tok)
    assert cfg.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert cfg.max_position_embeddings == 512
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id

    batch = _batch(tok)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_options():
    m = tiny_causal_lm("qwen2", hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=3, dtype=torch.bfloat16)
    assert m.config.num_hidden_layers == 3 and m.config.num_key_value_heads == 3
    assert m.dtype == torch.bfloat16
    assert m.config.intermediate_size >= 2 * 48
    m = tiny_causal_lm(vocab_size=1000, intermediate_size=100, rms_norm_eps=1e-5)
    assert (m.config.vocab_size, m.config.intermediate_size, m.config.rms_norm_eps) == (1000, 100, 1e-5)


def test_unknown_arch():
    with pytest.raises(ValueError, match="llama.*qwen2"):
        tiny_causal_lm("gpt2")
    with pytest.raises(ValueError, match="llama.*qwen2"):
        save_tiny_model("/nonexistent/never-written", arch="mistral")


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_model_on_padded_batch(arch):
    tok = build_tokenizer()
    rm = tiny_reward_model(arch, num_labels=1)
    assert rm.config.pad_token_id == tok.pad_token_id
    batch = _batch(tok)
    scores = rm(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    # The score of a padded row equals the score of the same row alone (pooling uses pad_token_id).
    alone = rm(**tok(["7 + 5 = 12\n#### 12"], return_tensors="pt")).logits
    torch.testing.assert_close(scores[1:], alone)


def test_save_tiny_model_reload_identical(tmp_path):
    path = save_tiny_model(tmp_path / "tiny", arch="qwen2", hidden_size=32)
    assert path == str(tmp_path / "tiny")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ref = tiny_causal_lm("qwen2", hidden_size=32)
    batch = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, rtol=0, atol=0)
    assert tok.chat_template is not None and len(tok) == model.config.vocab_size

    rm_path = save_tiny_model(tmp_path / "rm", arch="qwen2", kind="reward", hidden_size=32)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id


def test_save_tiny_model_idempotent_and_replaces(tmp_path):
    path = save_tiny_model(tmp_path / "m", hidden_size=32)
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert save_tiny_model(tmp_path / "m", hidden_size=32) == path
    assert os.stat(weights).st_mtime_ns == stamp  # not rewritten

    save_tiny_model(tmp_path / "m", hidden_size=16)  # other args: rebuilt in place
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 16
    with open(os.path.join(path, "hfx_tiny_model.json")) as f:
        assert json.load(f)["kwargs"] == {"hidden_size": 16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    save_tiny_model(foreign, overwrite=True)
    assert not (foreign / "notes.txt").exists()


def test_save_tiny_model_concurrent(tmp_path):
    errors: list[BaseException] = []

    def build():
        try:
            save_tiny_model(tmp_path / "race", hidden_size=16, num_layers=1)
        except BaseException as e:  # surface any failure to the main thread
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "race")).config.num_hidden_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race"]
