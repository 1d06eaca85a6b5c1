"""The README's Python snippets run as written, on a tiny saved model, with only their sizes shrunk.

Each test takes one ``python`` block of README.md by a phrase in it and replaces the model id and the step/sample
counts. A replacement whose text is no longer in the block fails the test: when a snippet changes, this test is
updated with it, so the README cannot drift from the API.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TINY = "save_tiny_model('tiny', hidden_size=32)"  # a path usable wherever the README writes "path/to/model"


def _block(phrase: str) -> str:
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    found = [b for b in blocks if phrase in b]
    assert len(found) == 1, f"{len(found)} python blocks of README.md contain {phrase!r}"
    return found[0]


def run_block(phrase: str, replacements: list[tuple[str, str]], prelude: str = "") -> dict:
    """Run the README block containing ``phrase`` after ``replacements`` (each must apply); its namespace."""
    code = _block(phrase)
    for old, new in replacements:
        assert old in code, f"README block with {phrase!r} no longer contains {old!r}: update this test with it"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(prelude + "\n" + code, f"README.md block ({phrase})", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets write their output_dir / save_pretrained folders relative to here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


MODEL = [('"path/to/model"', "MODEL")]
PRELUDE_MODEL = f"from hfx.testing import save_tiny_model\nMODEL = {TINY}"
# TRL's configs default to bf16, which needs a GPU (the README says so): on CPU the snippets need use_cpu=True
SMALL = 'per_device_train_batch_size=4, report_to="none", use_cpu=True'
SMALL_GRPO = f"{SMALL}, max_completion_length=8"


def test_peft_tuner_snippet():
    ns = run_block("hfx.BoneConfig(r=16", [])
    assert type(ns["merged"]).__name__ == "LlamaForCausalLM"  # merge_and_unload gave the plain model back
    with open("bone-adapter/adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "BONE"


def test_bvpo_snippet():
    ns = run_block(
        "hfx.BVPOConfig(",
        [*MODEL, ("bvpo_alpha=0.5)", f"bvpo_alpha=0.5, max_steps=2, {SMALL})"),
         ("preference_dataset(1000", "preference_dataset(16")],
        PRELUDE_MODEL,
    )  # fmt: skip
    assert ns["trainer"].state.global_step == 2
    assert any("bvpo/alpha" in h for h in ns["trainer"].state.log_history)


def test_masked_thought_snippet():
    ns = run_block(
        "hfx.MaskedThoughtConfig(",
        [*MODEL, ("mask_warmup_ratio=2 / 3)", f"mask_warmup_ratio=2 / 3, max_steps=2, {SMALL})"),
         ("sft_dataset(1000)", "sft_dataset(16)")],
        PRELUDE_MODEL,
    )  # fmt: skip
    assert ns["trainer"].state.global_step == 2
    assert any("masked_thought/mask_rate" in h for h in ns["trainer"].state.log_history)


def test_gvm_snippet():
    ns = run_block(
        "hfx.GVMRAFTConfig(",
        [*MODEL, ("max_steps=100", "max_steps=2"), ("gvm_pool_size=256", "gvm_pool_size=4"),
         ("gvm_refresh_steps=10", f"gvm_refresh_steps=10, {SMALL_GRPO}"),
         ('prompt_dataset(5000, "medium")', 'prompt_dataset(16, "medium")')],
        PRELUDE_MODEL,
    )  # fmt: skip
    assert ns["trainer"].state.global_step == 2
    assert any("gvm/mean_p" in h for h in ns["trainer"].state.log_history)


@pytest.mark.parametrize(
    "phrase, logged",
    [("hfx.ConstrainedGRPOConfig(", "constraint/brevity_reward/multiplier"),
     ("hfx.DynamicWeightGRPOConfig(", "dynamic_weights/influence/correctness_reward")],
)  # fmt: skip
def test_multi_reward_grpo_snippets(phrase, logged):
    ns = run_block(
        phrase,
        [*MODEL, ("num_generations=8,", f"num_generations=4, {SMALL_GRPO},"),
         (re.search(r"max_steps=\d+", _block(phrase)).group(0), "max_steps=2"),
         ('prompt_dataset(512, "medium")', 'prompt_dataset(16, "medium")')],
        PRELUDE_MODEL,
    )  # fmt: skip
    assert ns["trainer"].state.global_step == 2
    assert any(logged in h for h in ns["trainer"].state.log_history)


def test_eva_snippet():
    prelude = """
import torch
from transformers import Trainer, TrainingArguments
from hfx.testing import tiny_causal_lm

base = tiny_causal_lm(hidden_size=32)
gen = torch.Generator().manual_seed(0)
train = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, base.config.vocab_size, (16, 12), generator=gen)]
args = TrainingArguments("eva", max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True)
collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
"""
    ns = run_block("hfx.EvaConfig(", [], prelude)
    assert ns["trainer"].state.global_step == 2
    with open("out/adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["rank_pattern"]  # a plain LoRA with EVA's ranks


def test_cce_snippet():
    prelude = """
import torch
from hfx.testing import tiny_causal_lm

gen = torch.Generator().manual_seed(0)
hidden = torch.randn(2, 6, 16, generator=gen, requires_grad=True)
lm_head = torch.nn.Linear(16, 50, bias=False)
W, bias = lm_head.weight, torch.randn(50, generator=gen)
labels = torch.randint(0, 50, (2, 6), generator=gen)
model = tiny_causal_lm(hidden_size=32)
"""
    ns = run_block(
        "hfx.linear_cross_entropy(hidden, lm_head.weight, labels)",
        [("loss = hfx.linear_cross_entropy(hidden, W, labels, bias", "loss2 = hfx.linear_cross_entropy(hidden, W, labels, bias")],
        prelude,
    )  # fmt: skip
    hidden, w, labels = ns["hidden"], ns["W"], ns["labels"]
    # the comment's claim: the same value as cross-entropy over the materialised logits
    expected = F.cross_entropy((hidden @ w.T).reshape(-1, 50), labels.reshape(-1))
    torch.testing.assert_close(ns["loss"], expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ns["loss2"])
    logps = ns["logps"]  # shaped like labels; with shift=True the last position has no next token and is 0
    assert logps.shape == (2, 6) and (logps[:, -1] == 0).all() and (logps[:, :-1] < 0).all()


def test_fused_adapters_snippet():
    import hfx
    from hfx.kernels.adapter import fused_adapters_enabled

    try:
        run_block("hfx.set_fused_adapters(True)", [], "import hfx")
        assert fused_adapters_enabled()
    finally:
        hfx.set_fused_adapters(False)
