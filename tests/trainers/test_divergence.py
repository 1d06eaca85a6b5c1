"""hfx/trainers/_divergence.py: a run whose loss turns NaN stops with an error that says so, in every hfx trainer.
Before, the Trainer logged the NaN as 0.0 and trained on with NaN weights (and saved them); the GRPO-style
trainers failed later inside torch.multinomial, and GVM with "finite G_i ... got nan".

The runs diverge by a NaN written into one weight after the first optimizer step (``PoisonAfterFirstStep``). A huge
learning rate did it until transformers 5.25, whose tiny Llama then settled on finite, all-zero logits instead."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import hfx
from hfx.data import preference_dataset, prompt_dataset, sft_dataset
from hfx.testing import save_tiny_model
from hfx.trainers._divergence import DivergenceCheckMixin

DIVERGE = dict(use_cpu=True, report_to="none", learning_rate=1e-3, per_device_train_batch_size=4)


class PoisonAfterFirstStep(TrainerCallback):
    """Write NaN into the first trainable weight right after the first optimizer step: what an overflow does."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            param = next(p for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                param.view(-1)[0] = float("nan")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden_size=32)


def _assert_no_nan_checkpoint(out) -> None:
    for name in os.listdir(out) if os.path.isdir(out) else []:
        for file in ("model.safetensors", "adapter_model.safetensors"):
            path = os.path.join(out, name, file)
            if os.path.exists(path):
                assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_bvpo_stops_before_saving_nan_weights(model_path, tmp_path):
    args = hfx.BVPOConfig(output_dir=str(tmp_path), max_steps=6, logging_steps=2, save_steps=1, **DIVERGE)
    trainer = hfx.BVPOTrainer(model_path, args=args, train_dataset=preference_dataset(32, think=True))
    trainer.add_callback(PoisonAfterFirstStep())
    with pytest.raises(FloatingPointError, match=r"Training diverged.*learning_rate \(now 0\.001\)"):
        trainer.train()
    assert trainer.state.global_step < 6
    _assert_no_nan_checkpoint(tmp_path)  # the checkpoint check runs before saving NaN weights


def test_masked_thought_stops(model_path, tmp_path):
    args = hfx.MaskedThoughtConfig(output_dir=str(tmp_path), max_steps=8, logging_steps=4, **DIVERGE)
    trainer = hfx.MaskedThoughtTrainer(model_path, args=args, train_dataset=sft_dataset(64))
    trainer.add_callback(PoisonAfterFirstStep())
    with pytest.raises(FloatingPointError, match="Training diverged"):
        trainer.train()
    assert trainer.state.global_step < 8


GRPO_LIKE = dict(num_generations=2, max_completion_length=8, logging_steps=10, max_steps=6, **DIVERGE)


@pytest.mark.parametrize(
    "make",
    [
        lambda out: (hfx.ConstrainedGRPOTrainer, hfx.ConstrainedGRPOConfig(output_dir=out, **GRPO_LIKE,
                                                                         constraint_thresholds=[0.5])),
        lambda out: (hfx.DynamicWeightGRPOTrainer, hfx.DynamicWeightGRPOConfig(output_dir=out, **GRPO_LIKE)),
        lambda out: (hfx.GVMRAFTTrainer, hfx.GVMRAFTConfig(output_dir=out, **GRPO_LIKE, gvm_num_pilot=2,
                                                           gvm_pool_size=4, gvm_refresh_steps=1)),
    ],
    ids=["constrained", "dynamic", "gvm"],
)  # fmt: skip
def test_grpo_style_trainers_stop_before_sampling_from_nan_weights(make, model_path, tmp_path):
    cls, args = make(str(tmp_path))

    def reward(completions, **kwargs):  # varies (0/1, as GVM needs), so that the advantages and the update are not 0
        return [float(len(c) % 2) for c in completions]

    trainer = cls(model_path, reward_funcs=[reward], args=args, train_dataset=prompt_dataset(32))
    trainer.add_callback(PoisonAfterFirstStep())
    with pytest.raises(FloatingPointError, match=r"Training diverged: after step \d+ the (trainable weights|largest)"):
        trainer.train()
    assert trainer.state.global_step < 6


def _fake(flag, fp16=False, processes=1):
    fake = DivergenceCheckMixin()
    fake._hfx_nonfinite = flag
    fake.args = SimpleNamespace(fp16=fp16, learning_rate=1e-3, max_grad_norm=1.0)
    fake.accelerator = SimpleNamespace(num_processes=processes)
    fake.state = SimpleNamespace(global_step=3)
    return lambda **kw: fake.check_finite_loss("in a test", **kw)


def test_a_nan_micro_step_is_not_forgotten_by_a_finite_one():
    """Under gradient accumulation a NaN loss in one micro-step followed by a finite one still stops the run."""

    class Base:
        def training_step(self, model, inputs):
            return inputs

    class Trainer(DivergenceCheckMixin, Base):
        pass

    trainer = Trainer()
    trainer.training_step(None, torch.tensor(float("nan")))
    trainer.training_step(None, torch.tensor(1.0))
    assert bool(trainer._hfx_nonfinite)
    with pytest.raises(FloatingPointError, match="by step 3"):
        _fake(trainer._hfx_nonfinite)()


def test_check_finite_loss_rules():
    _fake(None)()  # nothing trained yet
    _fake(torch.tensor(False))(grad_norm=1.5)
    with pytest.raises(FloatingPointError, match="by step 3"):
        _fake(torch.tensor(True))()
    with pytest.raises(FloatingPointError):
        _fake(None)(grad_norm=float("nan"))
    _fake(None, fp16=True)(grad_norm=float("inf"))  # fp16 loss scaling skips such steps on purpose
