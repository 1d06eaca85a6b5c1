"""Constrained RLHF (Lagrange multipliers as reward weights) with hfx.ConstrainedGRPOTrainer; runs under ``accelerate
launch``.

By default it needs nothing from the Hub: the tiny Llama-style base pre-trained once on the built-in task's easy
arithmetic problems (cached in ~/.cache/hfx; ~1.5 min the first time) is trained with GRPO on ``medium`` problems with
three rewards: correctness (the task), format (last line ``#### <int>``), and brevity (``−tokens / 40``). Brevity is
a proxy that over-optimises: pushed by a fixed weight, the model drops its working lines, which the task needs. The
constrained run keeps it at a threshold instead (``--type le``: brevity ≤ θ, i.e. not shorter than ~40·|θ| tokens,
All-PPO; ``eq``: brevity = θ, ξ-PPO) and asks format ≥ 0.9 (μ-PPO), with multipliers updated every generation
batch from the gathered batch means. It prints the rewards, lengths and multipliers, and held-out accuracy before
and after (a few minutes on a 2-core CPU).

    python examples/constrained_grpo.py                          # constrained (brevity <= -0.5, format >= 0.9)
    python examples/constrained_grpo.py --fixed                  # fixed weights 1/1/1 (plain GRPO), for comparison
    python examples/constrained_grpo.py --type eq --brevity -0.5 # hold brevity at -0.5 (xi-PPO)
    python examples/constrained_grpo.py --search                 # NM-PPO: thresholds searched on held-out accuracy
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes <GPUs> \
        examples/constrained_grpo.py --model <path-or-id>
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
    refuse_unused,
    resume_checkpoint,
    run_args,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfx
from hfx.data import accuracy, correctness_reward, format_reward, prompt_dataset
from hfx.testing.pretrained import pretrained_base


def brevity_reward(completion_ids, **kwargs) -> list[float]:
    """``−tokens / 40``: the shorter the better, without a floor (a proxy that rewards dropping the working)."""
    return [-len(ids) / 40 for ids in completion_ids]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=model_ref, default=None, help="model path or id; default: the cached tiny base (built-in task)"
    )
    p.add_argument("--difficulty", type=difficulty, default="medium")
    p.add_argument("--fixed", action="store_true", help="fixed reward weights (plain GRPO) instead of constraints")
    p.add_argument(
        "--weights",
        type=float,
        nargs=3,
        default=[1.0, 1.0, 1.0],
        help="reward weights of correctness, format, brevity (fixed run; the task weight when constrained)",
    )
    p.add_argument("--type", default="le", choices=["le", "eq", "ge"], help="constraint type of the brevity reward")
    p.add_argument("--brevity", type=float, default=-0.5, help="threshold of the brevity reward (-tokens/40)")
    p.add_argument("--format", type=float, default=0.9, help="threshold of the format reward (>=)")
    p.add_argument("--lagrange-lr", type=float, default=3.0)
    p.add_argument(
        "--lagrange-init",
        type=float,
        nargs=2,
        default=[0.0, 2.0],
        help="initial raw multipliers (format, brevity); 2.0: sigma = 0.88, brevity weight 1 - 0.88",
    )
    p.add_argument("--parametrization", default="sigmoid", choices=["sigmoid", "projected"])
    p.add_argument(
        "--search",
        action="store_true",
        help="NM-PPO: search the thresholds with Nelder-Mead on held-out accuracy (phases of --phase-steps)",
    )
    p.add_argument("--phase-steps", type=positive_int, default=15, help="optimizer steps per threshold-search phase")
    p.add_argument("--n-train", type=positive_int, default=512)
    p.add_argument("--n-eval", type=positive_int, default=128)
    p.add_argument("--num-generations", type=positive_int, default=8)
    p.add_argument("--max-steps", type=positive_int, default=120)
    p.add_argument("--batch-size", type=positive_int, default=32, help="completions per optimizer step (global)")
    p.add_argument("--learning-rate", type=positive_float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (scaled by the task weight)")
    p.add_argument("--max-completion-length", type=positive_int, default=48)
    p.add_argument("--output-dir", default="outputs/constrained_grpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    fixed = (lambda a: a.fixed, "with --fixed (plain GRPO with fixed weights, no constraints)")
    rules = dict.fromkeys(
        ["type", "brevity", "format", "lagrange_lr", "lagrange_init", "parametrization", "search"], fixed
    )
    rules["phase_steps"] = (lambda a: not a.search, "without --search")
    refuse_unused(p, args, rules)
    return args


FLAGS = {
    **GRPO_FLAGS,
    "constraint_thresholds": "--format / --brevity",
    "constraint_types": "--type",
    "lagrange_lr": "--lagrange-lr",
    "lagrange_init": "--lagrange-init",
    "lagrange_parametrization": "--parametrization",
    "reward_weights": "--weights",
    "beta": "--beta",
}


def trainer_config(args: argparse.Namespace):
    """The run's GRPOConfig (``--fixed``) or ConstrainedGRPOConfig, built before any model is loaded."""
    state = launch_state()
    common = dict(
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
    if args.fixed:
        from trl import GRPOConfig

        return make_config(
            GRPOConfig, FLAGS, multi_objective_aggregation="normalize_then_sum", reward_weights=args.weights, **common
        )
    return make_config(
        hfx.ConstrainedGRPOConfig,
        FLAGS,
        constraint_rewards=["format_reward", "brevity_reward"],
        constraint_thresholds=[args.format, args.brevity],
        constraint_types=["ge", args.type],
        lagrange_lr=args.lagrange_lr,
        lagrange_init=args.lagrange_init,
        lagrange_parametrization=args.parametrization,
        reward_weights=args.weights,
        **common,
    )


def build(args: argparse.Namespace, model_path: str, config=None):
    """The run's trainer on ``model_path``: plain GRPO with ``--fixed``, else constrained (with the search)."""
    config = config if config is not None else trainer_config(args)
    rewards = [correctness_reward, format_reward, brevity_reward]
    train = prompt_dataset(args.n_train, args.difficulty, seed=args.seed, split="train")
    if args.fixed:
        from trl import GRPOTrainer

        return GRPOTrainer(model_path, reward_funcs=rewards, args=config, train_dataset=train)
    callbacks = []
    if args.search:
        held_out = max(16, args.n_eval // 4)

        def eval_fn(trainer) -> float:  # the held-out score each phase is judged by (higher is better)
            model = trainer.accelerator.unwrap_model(trainer.model)
            return evaluate(model, trainer.processing_class, held_out, args.difficulty)

        # format_reward is in [0, 1] and brevity (-tokens/40) <= 0: thresholds outside could never be met
        bounds = [(0.0, 1.0), (None, 0.0)]
        callbacks.append(
            hfx.ThresholdSearchCallback(eval_fn, phase_max_steps=args.phase_steps, initial_step=0.2, bounds=bounds)
        )
    return hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=rewards, args=config, train_dataset=train, callbacks=callbacks
    )


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
        acc = evaluate(base, tok, args.n_eval, args.difficulty)
        print(f"[constrained] base accuracy on held-out {args.difficulty}: {acc:.3f}")
    trainer = build(args, model_path, config)
    if resume:
        state.print(f"[constrained] resuming from {resume}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - start
    if state.is_main_process:
        print(
            f"[constrained] {'fixed weights' if args.fixed else 'constrained'}: {args.max_steps} steps, {elapsed:.0f}s"
        )
        names = {f"rewards/{r}/mean": r for r in ("correctness_reward", "format_reward", "brevity_reward")}
        names["completions/mean_length"] = "length"
        for k in trainer.state.log_history[0]:
            if k.startswith("constraint/") and k.endswith("/multiplier"):
                names[k] = f"multiplier({k.split('/')[1]})"
        for h in trainer.state.log_history:
            if "loss" in h:
                row = "  ".join(
                    f"{n}={h[k]:.1f}" if n == "length" else f"{n}={h[k]:+.3f}" for k, n in names.items() if k in h
                )
                print(f"[constrained] step {h['step']:>3}  {row}")
        search = getattr(trainer, "search_callback", None)
        if search is not None and search.search is not None:
            for point, value in search.search.history:  # the thresholds trained with: proposals clipped to bounds
                tried = [round(t, 3) for t in search.clip(point)]
                print(f"[constrained] threshold search: thresholds {tried} -> score {-value:.3f}")
            print(f"[constrained] thresholds now {[round(t, 3) for t in trainer.multipliers.thresholds]}")
        model = trainer.accelerator.unwrap_model(trainer.model)
        acc = evaluate(model, trainer.processing_class, args.n_eval, args.difficulty)
        print(f"[constrained] accuracy after training: {acc:.3f}")
        hist = [h for h in trainer.state.log_history if "loss" in h]
        tail = hist[-max(1, len(hist) // 4) :]
        result = {
            "args": vars(args),
            "after": {
                "accuracy": acc,
                "brevity_last_quarter": sum(h["rewards/brevity_reward/mean"] for h in tail) / len(tail),
                "format_last_quarter": sum(h["rewards/format_reward/mean"] for h in tail) / len(tail),
            },
            "seconds": elapsed,
        }
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "hfx_result.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
