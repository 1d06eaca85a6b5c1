"""Worker for tests/dist/test_trainers_distributed.py: train each hfx trainer in CASES a few steps on N processes.

Launched by ``hfx.testing.run_distributed`` (torchrun, gloo DDP on CPU). For every case each rank writes
``<out>/<case>/rank<r>.safetensors`` (the trained parameters) and ``rank<r>.json`` (world size, hashes of the batches
it saw, the logged history and any trainer state the case reports, e.g. BVPO's α).

A new trainer adds one line to CASES: name -> a function ``(base_path, output_dir) -> trainer``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

import torch
from safetensors.torch import save_file

from hfx.compat import activation_checkpointing

COMMON = dict(
    max_steps=3,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    bf16=False,
    **activation_checkpointing(False),
    seed=0,
    disable_tqdm=True,
)


def bvpo(base: str, output_dir: str):
    import hfx
    from hfx.data import preference_dataset

    config = hfx.BVPOConfig(output_dir=output_dir, bvpo_alpha="auto", bvpo_alpha_warmup_steps=1, **COMMON)
    return hfx.BVPOTrainer(base, args=config, train_dataset=preference_dataset(32, think=True))


def masked_thought(base: str, output_dir: str):
    import hfx
    from hfx.data import sft_dataset

    config = hfx.MaskedThoughtConfig(output_dir=output_dir, mask_rate=0.4, mask_warmup_ratio=0.5, **COMMON)
    return hfx.MaskedThoughtTrainer(base, args=config, train_dataset=sft_dataset(32, think=True))


def gvm_raft(base: str, output_dir: str):
    import hashlib as _hashlib

    import hfx
    from hfx.data import prompt_dataset

    def hash_reward(completions, **kwargs):  # deterministic pseudo-verifier: accepts ~1/3 of a random model's samples
        return [1.0 if int(_hashlib.sha1(c.encode()).hexdigest(), 16) % 3 == 0 else 0.0 for c in completions]

    config = hfx.GVMRAFTConfig(
        output_dir=output_dir, num_generations=2, max_completion_length=6, gvm_num_pilot=4, gvm_pool_size=6,
        gvm_refresh_steps=2, beta=0.0, **COMMON,
    )  # fmt: skip
    return hfx.GVMRAFTTrainer(base, reward_funcs=hash_reward, args=config, train_dataset=prompt_dataset(16))


def constrained_grpo(base: str, output_dir: str):
    import hfx
    from hfx.data import format_reward, prompt_dataset

    def short(completions, **kwargs):
        return [-len(c) / 30 for c in completions]

    config = hfx.ConstrainedGRPOConfig(
        output_dir=output_dir, num_generations=2, max_completion_length=6, beta=0.05,
        constraint_rewards=["short"], constraint_thresholds=[-0.1], lagrange_lr=1.0, **COMMON,
    )  # fmt: skip
    return hfx.ConstrainedGRPOTrainer(base, reward_funcs=[format_reward, short], args=config,
                                      train_dataset=prompt_dataset(16))  # fmt: skip


def dynamic_weights(base: str, output_dir: str, weighting: str = "gradient", rloo: bool = False):
    import hfx
    from hfx.data import format_reward, prompt_dataset

    def short(completions, **kwargs):
        return [-len(c) / 30 for c in completions]

    def odd(completions, **kwargs):
        return [float(len(c) % 2) for c in completions]

    cls = (hfx.DynamicWeightRLOOConfig, hfx.DynamicWeightRLOOTrainer) if rloo else (
        hfx.DynamicWeightGRPOConfig, hfx.DynamicWeightGRPOTrainer)  # fmt: skip
    config = cls[0](
        output_dir=output_dir, num_generations=2, max_completion_length=6, beta=0.0, weighting=weighting,
        weight_regularization=1.0, weight_grad_max_samples=3, **COMMON,
    )  # fmt: skip
    return cls[1](base, reward_funcs=[format_reward, short, odd], args=config, train_dataset=prompt_dataset(16))


def prompt_score(prompts, **kwargs):
    """Depends on the prompt only, so the true mean over an eval set is known without generating."""
    return [int(hashlib.sha1(str(p).encode()).hexdigest(), 16) % 101 / 100 for p in prompts]


HV_EVAL_PROMPTS = 3  # x 2 generations on 2 ranks x 2 per device: accelerate repeats 2 samples to even the last batch


def dynamic_hypervolume_eval(base: str, output_dir: str):
    import hfx
    from hfx.data import prompt_dataset

    def short(completions, **kwargs):
        return [-len(c) / 30 for c in completions]

    config = hfx.DynamicWeightGRPOConfig(
        output_dir=output_dir, num_generations=2, max_completion_length=6, beta=0.0, weighting="hypervolume",
        hv_source="eval", eval_on_start=True, per_device_eval_batch_size=2, **{**COMMON, "max_steps": 1},
    )  # fmt: skip
    return hfx.DynamicWeightGRPOTrainer(
        base, reward_funcs=[prompt_score, short], args=config, train_dataset=prompt_dataset(16),
        eval_dataset=prompt_dataset(HV_EVAL_PROMPTS, seed=7),
    )  # fmt: skip


def bvpo_uneven_epoch(base: str, output_dir: str):
    import hfx
    from hfx.data import preference_dataset

    # 17 rows, 8 per step: the third step is the epoch's last batch with 1 real row (accelerate pads the rest)
    config = hfx.BVPOConfig(output_dir=output_dir, bvpo_alpha=0.5, **COMMON)
    return hfx.BVPOTrainer(base, args=config, train_dataset=preference_dataset(17, think=True))


CASES = {
    "bvpo": bvpo,
    "masked_thought": masked_thought,
    "gvm_raft": gvm_raft,
    "constrained_grpo": constrained_grpo,
    "dynamic_gradient_grpo": dynamic_weights,
    "dynamic_hypervolume_rloo": lambda base, out: dynamic_weights(base, out, "hypervolume", rloo=True),
    "dynamic_hypervolume_eval": dynamic_hypervolume_eval,
    "bvpo_uneven_epoch": bvpo_uneven_epoch,
}


def first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for value in batch.values():
            found = first_tensor(value)
            if found is not None:
                return found
    return None


def trainer_state(trainer) -> dict[str, Any]:
    """Method-specific state every rank must agree on."""
    state = {}
    if hasattr(trainer, "alpha"):
        state["alpha"] = trainer.alpha
    if hasattr(trainer, "mask_rate"):
        state["mask_rate"] = trainer.mask_rate
    from hfx.trainers._multi_objective import MultiObjectiveMixin

    if isinstance(trainer, MultiObjectiveMixin):  # multipliers, reward weights, search state, ...
        state["method"] = trainer.method_state_dict()
    if getattr(trainer, "gvm_state", None) is not None:  # GVM: the allocation (p, G, n) must be the same plan
        state["gvm"] = trainer.gvm_state.to_dict() | {"extra": None}
    return state


def run_case(name: str, args: argparse.Namespace) -> None:
    out = os.path.join(args.out, name)
    trainer = CASES[name](args.base, os.path.join(out, "trainer"))
    seen: list[str] = []
    collate = trainer.data_collator

    def recording_collator(features):
        batch = collate(features)
        tensor = first_tensor(batch)
        raw = tensor.numpy().tobytes() if tensor is not None else repr(batch).encode()  # GRPO: rows are dicts
        seen.append(hashlib.sha1(raw).hexdigest())
        return batch

    trainer.data_collator = recording_collator
    evaluate = trainer.evaluate

    def training_batches_only(*args, **kwargs):  # the eval loader shares the collator (GRPO): keep its batches out
        seen_before = len(seen)
        try:
            return evaluate(*args, **kwargs)
        finally:
            del seen[seen_before:]

    trainer.evaluate = training_batches_only
    view_losses: dict[str, list[float]] = {}
    if hasattr(trainer, "_view_loss"):  # BVPO: this rank's own loss of each view, to check the logged global mean
        original = trainer._view_loss

        def recording_view_loss(model, inputs, view, *rest):
            loss, outputs = original(model, inputs, view, *rest)
            view_losses.setdefault(view, []).append(loss.item())
            return loss, outputs

        trainer._view_loss = recording_view_loss
    trainer.train()
    rank = trainer.args.process_index
    info = {
        "world_size": trainer.args.world_size,
        "batches": seen,
        "wrapped": type(trainer.model_wrapped).__name__,
        "history": [h for h in trainer.state.log_history if "loss" in h],
        "state": trainer_state(trainer),
        "view_losses": view_losses,
    }
    params = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    os.makedirs(out, exist_ok=True)
    save_file(params, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="directory of the tiny base model (save_tiny_model)")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    from accelerate.state import AcceleratorState

    for name in args.cases.split(","):
        run_case(name, args)
        AcceleratorState._reset_state(reset_partial_state=False)


if __name__ == "__main__":
    main()
