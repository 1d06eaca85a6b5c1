"""Worker for tests/dist/test_trainers_zero3.py: hfx's trainers under real DeepSpeed ZeRO-3.

Launched by ``hfx.testing.run_distributed`` on 2 CPU processes (gloo) with a ZeRO-3 config that partitions even a
tiny model (``zero3_test_config``). Cases: constrained GRPO, hypervolume-weighted GRPO and BVPO with
``bvpo_alpha="auto"`` (full fine-tuning, and LoRA probing an early layer) train 3 steps; the gradient-weighted trainer
must refuse ZeRO-3 with a clear error. Each rank writes ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

from hfx.compat import activation_checkpointing


def short(completions, **kwargs):
    return [-len(c) / 30 for c in completions]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from hfx.testing.dist import deepspeed_cpu_state

    state = deepspeed_cpu_state()  # gloo, set up once, for DeepSpeed; the Trainer reuses it
    from accelerate.state import AcceleratorState
    from peft import LoraConfig

    import hfx
    from hfx.data import format_reward, preference_dataset, prompt_dataset
    from hfx.testing.dist import zero3_test_config

    common = dict(
        max_steps=3, per_device_train_batch_size=4, num_generations=2, max_completion_length=6, learning_rate=1e-2,
        logging_steps=1, report_to="none", bf16=False, **activation_checkpointing(False), save_strategy="no", seed=0,
        disable_tqdm=True, deepspeed=zero3_test_config(), accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    rewards = [format_reward, short]
    result = {}
    cases = {
        "constrained": lambda out: hfx.ConstrainedGRPOTrainer(
            args.base, reward_funcs=rewards, train_dataset=prompt_dataset(16),
            args=hfx.ConstrainedGRPOConfig(output_dir=out, constraint_rewards=["short"], constraint_thresholds=[-0.1],
                                           lagrange_lr=1.0, beta=0.05, **common),
        ),
        "hypervolume": lambda out: hfx.DynamicWeightGRPOTrainer(
            args.base, reward_funcs=rewards, train_dataset=prompt_dataset(16),
            args=hfx.DynamicWeightGRPOConfig(output_dir=out, weighting="hypervolume", **common),
        ),
    }  # fmt: skip
    bvpo = dict(
        bvpo_alpha="auto", bvpo_alpha_warmup_steps=1, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to="none", bf16=False, **activation_checkpointing(False), save_strategy="no", seed=0,
        disable_tqdm=True, deepspeed=zero3_test_config(), accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    cases["bvpo_full"] = lambda out: hfx.BVPOTrainer(
        args.base, args=hfx.BVPOConfig(output_dir=out, **bvpo), train_dataset=preference_dataset(32, think=True)
    )
    cases["bvpo_lora"] = lambda out: hfx.BVPOTrainer(
        args.base, args=hfx.BVPOConfig(output_dir=out, bvpo_alpha_modules=["layers.0.self_attn.q_proj"], **bvpo),
        train_dataset=preference_dataset(32, think=True), peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )  # fmt: skip
    for name, build in cases.items():
        trainer = build(os.path.join(args.out, name))
        trainer.train()
        partitioned = sum(1 for p in trainer.model.parameters() if hasattr(p, "ds_id") and p.numel() == 0)
        result[name] = {
            "engine": type(trainer.model_wrapped).__name__,
            "partitioned": partitioned,
            "state": trainer.method_state_dict() if hasattr(trainer, "method_state_dict") else None,
            "history": [h for h in trainer.state.log_history if "loss" in h],
        }
        AcceleratorState._reset_state(reset_partial_state=False)
    try:
        hfx.DynamicWeightGRPOTrainer(
            args.base, reward_funcs=rewards, train_dataset=prompt_dataset(16),
            args=hfx.DynamicWeightGRPOConfig(output_dir=os.path.join(args.out, "gradient"), weighting="gradient",
                                             **common),
        )  # fmt: skip
        result["gradient_error"] = None
    except ValueError as err:
        result["gradient_error"] = str(err)
    with open(os.path.join(args.out, f"rank{state.process_index}.json"), "w") as f:
        json.dump(result, f)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
