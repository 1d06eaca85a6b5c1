"""GVM-RAFT++ (variance-minimising per-prompt sample allocation) with hfx.GVMRAFTTrainer; runs under ``accelerate launch``.

By default it needs nothing from the Hub: the tiny Llama-style base pre-trained once on the built-in task's easy
arithmetic problems (cached in ~/.cache/hfx; ~1.5 min the first time) is trained with RAFT++ on ``medium`` problems
(2-3 steps, which the base solves only sometimes). Every ``--refresh-steps`` optimizer steps a pool of prompts is
piloted (``--num-pilot`` samples each), each prompt's acceptance rate p_i and gradient norm G_i are estimated, and the
budget of completions is split by Proposition 1 (n_i ∝ G_i / √(p_i + α/p_i)); prompts never solved get nothing. It
prints the allocation summary and held-out accuracy before and after (a few minutes on a 2-core CPU).

    python examples/gvm_raft.py                       # GVM-RAFT++
    python examples/gvm_raft.py --uniform             # plain RAFT++ (same budget, uniform allocation)
    python examples/gvm_raft.py --loss grpo           # GVM-GRPO
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes <GPUs> \
        examples/gvm_raft.py --model <path-or-id> --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _launch import (
    GRPO_FLAGS,
    add_checkpoint_args,
    difficulty,
    launch_state,
    make_config,
    model_ref,
    per_device_batch,
    positive_float,
    positive_int,
    resume_checkpoint,
    run_args,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfx
from hfx.data import accuracy, correctness_reward, prompt_dataset
from hfx.testing.pretrained import pretrained_base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=model_ref, default=None, help="model path or id; default: the cached tiny base (built-in task)"
    )
    p.add_argument("--difficulty", type=difficulty, default="medium")
    p.add_argument("--loss", default="raft", choices=["raft", "grpo"])
    p.add_argument("--uniform", action="store_true", help="plain RAFT++/GRPO: uniform allocation, no pilot")
    p.add_argument("--n-train", type=positive_int, default=256)
    p.add_argument("--n-eval", type=positive_int, default=128)
    p.add_argument("--pool-size", type=int, default=32, help="prompts per allocation round")
    p.add_argument("--num-pilot", type=int, default=8, help="N', pilot samples per prompt")
    p.add_argument("--budget", type=int, default=None, help="completions per round (default N' x pool)")
    p.add_argument("--refresh-steps", type=int, default=4)
    p.add_argument(
        "--num-generations", type=positive_int, default=4, help="completions per GRPO group (allocation unit)"
    )
    p.add_argument("--max-steps", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=32, help="completions per optimizer step (global)")
    p.add_argument("--learning-rate", type=positive_float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient")
    p.add_argument("--max-completion-length", type=positive_int, default=48)
    p.add_argument("--output-dir", default="outputs/gvm_raft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    add_checkpoint_args(p)
    return p.parse_args(argv)


FLAGS = {
    **GRPO_FLAGS,
    "gvm_num_pilot": "--num-pilot",
    "gvm_budget": "--budget",
    "gvm_pool_size": "--pool-size",
    "gvm_refresh_steps": "--refresh-steps",
    "beta": "--beta",
}


def trainer_config(args: argparse.Namespace) -> hfx.GVMGRPOConfig:
    """The run's GVM config (``--uniform``: its allocation off), built before any model is loaded."""
    state = launch_state()
    cls = hfx.GVMRAFTConfig if args.loss == "raft" else hfx.GVMGRPOConfig
    return make_config(
        cls,
        FLAGS,
        gvm=not args.uniform,
        gvm_loss=args.loss,
        gvm_num_pilot=args.num_pilot,
        gvm_budget=args.budget,
        gvm_pool_size=args.pool_size,
        gvm_refresh_steps=args.refresh_steps,
        num_generations=args.num_generations,
        max_steps=args.max_steps,
        per_device_train_batch_size=per_device_batch(args.batch_size, state),
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=args.beta,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        logging_steps=1,
        **run_args(args),
        disable_tqdm=True,
    )


def build(args: argparse.Namespace, model_path: str, config: hfx.GVMGRPOConfig | None = None) -> hfx.GVMGRPOTrainer:
    """The run's trainer on ``model_path``."""
    config = config if config is not None else trainer_config(args)
    train = prompt_dataset(args.n_train, args.difficulty, seed=args.seed, split="train")
    return hfx.GVMRAFTTrainer(model_path, reward_funcs=correctness_reward, args=config, train_dataset=train)


def evaluate(model, tokenizer, n_eval: int, difficulty: str) -> float:
    test = prompt_dataset(n_eval, difficulty, split="test")
    model.eval()
    acc = accuracy(model, tokenizer, test, max_new_tokens=48)
    model.train()
    return acc


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resume = resume_checkpoint(args)
    config = trainer_config(args)
    model_path = args.model or pretrained_base()
    state = launch_state()
    if state.is_main_process:
        base = AutoModelForCausalLM.from_pretrained(model_path)
        tok = AutoTokenizer.from_pretrained(model_path)
        print(
            f"[gvm] base accuracy on held-out {args.difficulty}: {evaluate(base, tok, args.n_eval, args.difficulty):.3f}"
        )
    trainer = build(args, model_path, config)
    if resume:
        state.print(f"[gvm] resuming from {resume}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - start
    if state.is_main_process:
        alloc = trainer.gvm_state
        summary = {k: round(v, 3) for k, v in alloc.summary().items()}
        counters = trainer._gvm_counters
        print(f"[gvm] last allocation (round {alloc.iteration}): {summary}")
        print(f"[gvm] n_i = {alloc.n}")
        print(
            f"[gvm] sampled completions: {counters['train_samples']} for training + {counters['pilot_samples']} pilot; "
            f"pilot time {counters['pilot_seconds']:.1f}s of {elapsed:.1f}s"
        )
        model = trainer.accelerator.unwrap_model(trainer.model)
        acc = evaluate(model, trainer.processing_class, args.n_eval, args.difficulty)
        print(f"[gvm] accuracy after training: {acc:.3f}")
        result = {
            "args": vars(args),
            "after": {"accuracy": acc, "sampled_completions": counters["train_samples"] + counters["pilot_samples"]},
            "seconds": elapsed,
        }
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "hfx_result.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
