"""The task's SFT views train with TRL's SFTTrainer on a tiny model saved by save_tiny_model (CPU, offline)."""

from __future__ import annotations

import math

import pytest
import trl

from hfx.compat import activation_checkpointing
from hfx.data import sft_dataset
from hfx.testing import save_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", hidden_size=32)


def _config(tmp_path, **kwargs):
    # TRL defaults to activation checkpointing, which only slows a tiny CPU run
    kwargs.update(activation_checkpointing(False))
    return trl.SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        dataloader_num_workers=0,
        **kwargs,
    )


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_prompt_completion(tmp_path, model_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    trainer = trl.SFTTrainer(
        model=model_path, args=_config(tmp_path), train_dataset=sft_dataset(16, "easy"), processing_class=tok
    )
    # Completion-only loss by default: the unmasked labels are exactly the completion + EOS.
    row = trainer.train_dataset[0]
    kept = [t for t in row["labels"] if t != -100]
    assert tok.decode(kept) == sft_dataset(1, "easy")[0]["completion"] + tok.eos_token
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_sft_conversational_assistant_only_loss(tmp_path, model_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    dataset = sft_dataset(16, "hard", format="messages", think=True)
    trainer = trl.SFTTrainer(
        model=model_path,
        args=_config(tmp_path, assistant_only_loss=True),
        train_dataset=dataset,
        processing_class=tok,
    )
    row = trainer.train_dataset[0]
    kept = [t for t in row["labels"] if t != -100]
    # Only the assistant turn (with its end-of-turn token) is trained on.
    assert tok.decode(kept) == dataset[0]["messages"][1]["content"] + "<|im_end|>"
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
