"""The offline test tokenizer: determinism, task coverage, digits, special tokens, chat template, save/load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from hfx.data import DIFFICULTIES, generate_problems
from hfx.data.arithmetic import ITEMS, NAMES
from hfx.testing import CHAT_TEMPLATE, build_tokenizer, tokenizer_fingerprint

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<mask>"]
MESSAGES = [
    {"role": "user", "content": "Mia has 7 apples. How many apples does Mia have now?"},
    {"role": "assistant", "content": "7 + 0 = 7\n#### 7"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_deterministic_within_process(tok):
    other = build_tokenizer()
    assert other.get_vocab() == tok.get_vocab()
    assert other.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert other is not tok  # fresh wrapper each call, so callers may mutate it
    other.padding_side = "left"
    assert build_tokenizer().padding_side == "right"


def test_deterministic_across_processes():
    # A different hash seed must not change the trained vocabulary or merges. The child process stubs the hfx
    # packages so that it only imports the tokenizer module (and `tokenizers`), which keeps this test fast.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import os, sys, types\n"
        "for name in ('hfx', 'hfx.data', 'hfx.testing'):\n"
        "    m = types.ModuleType(name); m.__path__ = [os.path.join(sys.argv[1], *name.split('.'))]\n"
        "    sys.modules[name] = m\n"
        "from hfx.testing.tokenizer import tokenizer_fingerprint\n"
        "print(tokenizer_fingerprint())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, root], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tokenizer_fingerprint()


def test_vocab_size(tok):
    assert 512 <= len(tok) <= 1024


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_round_trips_task_text(tok, difficulty):
    for p in generate_problems(20, difficulty, seed=7):
        for think in (False, True):
            text = p.prompt + p.solution(think=think) + tok.eos_token
            ids = tok(text)["input_ids"]
            assert tok.decode(ids) == text


def test_task_words_are_single_tokens(tok):
    words = [*NAMES, *ITEMS, *(i + "s" for i in ITEMS), "has", "more", "gives", "How", "many", "does", "Then"]
    for word in words:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for text in ("Question", "Answer", "####"):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text


def test_digits_are_split_individually(tok):
    ids = tok("12 + 345 = 357", add_special_tokens=False)["input_ids"]
    tokens = [tok.decode([i]) for i in ids]
    digit_tokens = [t.strip() for t in tokens if t.strip().isdigit()]
    assert digit_tokens == list("12345357")
    assert all(len(t) == 1 for t in digit_tokens)
    assert [tok.decode([i]) for i in tok("2024", add_special_tokens=False)["input_ids"]] == list("2024")


def test_special_tokens_are_single_ids(tok):
    ids = {s: tok(s, add_special_tokens=False)["input_ids"] for s in SPECIAL}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == len(SPECIAL)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.mask_token == "<mask>" and tok.mask_token_id == ids["<mask>"][0]
    assert tok.convert_tokens_to_ids("<|im_end|>") == ids["<|im_end|>"][0]
    # No BOS or other token is added implicitly.
    assert tok("7 apples")["input_ids"] == tok("7 apples", add_special_tokens=False)["input_ids"]


def test_think_tags_survive_skip_special_tokens(tok):
    ids = tok("<think>\n1 + 1 = 2\n</think>\n#### 2<|im_end|><|endoftext|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n1 + 1 = 2\n</think>\n#### 2"


def test_chat_template_renders_chatml(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|im_start|>user\nMia has 7 apples. How many apples does Mia have now?<|im_end|>\n"
        "<|im_start|>assistant\n7 + 0 = 7\n#### 7<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith(prompt)  # prefix-preserving, as TRL's prompt-completion tokenisation needs


def test_enable_thinking(tok):
    base = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off == base + "<think>\n\n</think>\n\n"
    assert on == base
    # Without a generation prompt, enable_thinking changes nothing.
    assert tok.apply_chat_template(MESSAGES, tokenize=False, enable_thinking=False) == tok.apply_chat_template(
        MESSAGES, tokenize=False
    )


def test_generation_markers_give_assistant_mask(tok):
    out = tok.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    masked = [i for i, m in zip(ids, mask) if m]
    # Exactly the assistant content and its end-of-turn token (so the model learns to stop).
    assert tok.decode(masked) == "7 + 0 = 7\n#### 7<|im_end|>"
    first = mask.index(1)
    assert all(mask[first : first + len(masked)])  # one contiguous span


def test_save_and_reload_offline(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = build_tokenizer(save_dir=str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = generate_problems(1, "hard")[0].prompt + "<think>\n</think><|im_end|>"
    assert loaded(text)["input_ids"] == saved(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == tok.apply_chat_template(MESSAGES, tokenize=False)
    assert (loaded.eos_token, loaded.pad_token, loaded.mask_token) == ("<|endoftext|>", "<|endoftext|>", "<mask>")
    assert len(loaded) == len(tok)
