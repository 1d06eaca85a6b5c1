"""Dynamic reward weighting (Lu et al., 2025) with hfx.DynamicWeightGRPOTrainer; runs under ``accelerate launch``.

By default it needs nothing from the Hub: the tiny Llama-style base pre-trained once on the built-in task's easy
arithmetic problems (cached in ~/.cache/hfx; ~1.5 min the first time) is trained with GRPO on ``medium`` problems
against three objectives — correctness, format (``#### <int>`` last line) and a length penalty beyond
``--target-tokens`` (shorter than the base's usual solutions, so the objectives conflict). It prints the held-out
objective vector (greedy decoding) before and after, the reward weights (gradient method) or the hypervolume
meta-reward r_pareto (hypervolume method) as they evolve — a few minutes on a 2-core CPU.

    python examples/dynamic_weights_grpo.py                            # gradient-based weights (mirror descent)
    python examples/dynamic_weights_grpo.py --weighting hypervolume    # hypervolume-guided step size
    python examples/dynamic_weights_grpo.py --weighting fixed --weights 0.5 0.25 0.25   # TRL GRPO baseline
    python examples/dynamic_weights_grpo.py --estimator rloo
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes <GPUs> \
        examples/dynamic_weights_grpo.py --model <path>
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
    non_negative_int,
    per_device_batch,
    positive_float,
    positive_int,
    refuse_unused,
    resume_checkpoint,
    run_args,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import hfx
from hfx.data import correctness_reward, format_reward, make_length_reward, prompt_dataset
from hfx.data.metrics import generate_completions
from hfx.testing.pretrained import pretrained_base

OBJECTIVES = ("correctness", "format", "length")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=model_ref, default=None, help="model path or id; default: the cached tiny base (built-in task)"
    )
    p.add_argument("--weighting", default="gradient", choices=["gradient", "hypervolume", "fixed"])
    p.add_argument("--estimator", default="grpo", choices=["grpo", "rloo"])
    p.add_argument("--weights", type=float, nargs=3, default=None, help="initial / fixed weights (default 1/3 each)")
    p.add_argument("--weight-regularization", type=float, default=2e-3, help="mu: mirror step = lr / mu")
    p.add_argument("--target-tokens", type=int, default=12, help="length penalty beyond this many tokens")
    p.add_argument("--difficulty", type=difficulty, default="medium")
    p.add_argument("--n-train", type=positive_int, default=512)
    p.add_argument("--n-eval", type=positive_int, default=128)
    p.add_argument("--num-generations", type=positive_int, default=4)
    p.add_argument("--max-steps", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=32, help="completions per optimizer step (global)")
    p.add_argument("--learning-rate", type=positive_float, default=5e-5)
    p.add_argument("--max-completion-length", type=positive_int, default=32)
    p.add_argument(
        "--eval-every", type=non_negative_int, default=0, help="print the held-out objectives every N steps (0: off)"
    )
    p.add_argument("--output-dir", default="outputs/dynamic_weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    refuse_unused(
        p,
        args,
        {  # the mirror step size is the gradient method's alone
            "weight_regularization": (lambda a: a.weighting != "gradient", f"with --weighting {args.weighting}"),
        },
    )
    return args


def reward_funcs(target_tokens: int) -> list:
    def correctness(completions, answer, **kwargs):
        return correctness_reward(completions, answer=answer)

    def format(completions, **kwargs):  # noqa: A001 - the reward's logged name
        return format_reward(completions)

    return [correctness, format, make_length_reward(target_tokens=target_tokens, name="length")]


FLAGS = {
    **GRPO_FLAGS,
    "reward_weights": "--weights",
    "weight_regularization": "--weight-regularization",
}


def trainer_config(args: argparse.Namespace):
    """The run's config (TRL's own for ``--weighting fixed``), built before any model is loaded."""
    state = launch_state()
    common = dict(
        reward_weights=args.weights,
        num_generations=args.num_generations,
        max_steps=args.max_steps,
        per_device_train_batch_size=per_device_batch(args.batch_size, state),
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=0.0,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        logging_steps=1,
        **run_args(args),
        disable_tqdm=True,
    )
    if args.weighting == "fixed":
        import trl

        config_cls = trl.GRPOConfig if args.estimator == "grpo" else trl.RLOOConfig
        if common["reward_weights"] is None:
            common["reward_weights"] = [1 / 3] * 3
        return make_config(config_cls, FLAGS, **common)
    config_cls = hfx.DynamicWeightGRPOConfig if args.estimator == "grpo" else hfx.DynamicWeightRLOOConfig
    return make_config(
        config_cls, FLAGS, weighting=args.weighting, maximize=[True, True, True],
        weight_regularization=args.weight_regularization, **common,
    )  # fmt: skip


def build(args: argparse.Namespace, model_path: str, callbacks: list | None = None, config=None):
    """The run's trainer on ``model_path``: TRL's GRPO/RLOO with ``--weighting fixed``, else hfx's dynamic one."""
    import trl

    config = config if config is not None else trainer_config(args)
    if args.weighting == "fixed":
        trainer_cls = trl.GRPOTrainer if args.estimator == "grpo" else trl.RLOOTrainer
    else:
        trainer_cls = hfx.DynamicWeightGRPOTrainer if args.estimator == "grpo" else hfx.DynamicWeightRLOOTrainer
    train = prompt_dataset(args.n_train, args.difficulty, seed=args.seed, split="train")
    rewards = reward_funcs(args.target_tokens)
    return trainer_cls(model_path, reward_funcs=rewards, args=config, train_dataset=train, callbacks=callbacks)


def objectives(model, tokenizer, n_eval: int, difficulty: str, target_tokens: int) -> dict[str, float]:
    """Held-out objective vector (greedy decoding): mean correctness, format and length rewards, mean tokens."""
    test = prompt_dataset(n_eval, difficulty, split="test")
    outs = generate_completions(model, tokenizer, test["prompt"], max_new_tokens=64)
    ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in outs]
    correct, fmt, length = reward_funcs(target_tokens)
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    return {
        "correctness": mean(correct(outs, answer=test["answer"])),
        "format": mean(fmt(outs)),
        "length": mean(length(outs, completion_ids=ids)),
        "tokens": mean([len(i) for i in ids]),
    }


class EvalCallback(TrainerCallback):
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.points: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        a = self.args
        if a.eval_every and state.global_step % a.eval_every == 0 and state.is_world_process_zero:
            point = {
                "step": state.global_step,
                **objectives(model, processing_class, a.n_eval, a.difficulty, a.target_tokens),
            }
            self.points.append(point)
            print(f"[dynw] step {state.global_step}: {fmt(point)}", flush=True)


def fmt(point: dict[str, float]) -> str:
    return ", ".join(f"{k} {point[k]:.3f}" for k in (*OBJECTIVES, "tokens"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    resume = resume_checkpoint(args)
    config = trainer_config(args)
    model_path = args.model or pretrained_base()
    state = launch_state()
    result: dict = {"args": vars(args)}
    if state.is_main_process:
        base = AutoModelForCausalLM.from_pretrained(model_path)
        tok = AutoTokenizer.from_pretrained(model_path)
        result["before"] = objectives(base, tok, args.n_eval, args.difficulty, args.target_tokens)
        print(f"[dynw] held-out {args.difficulty} before training: {fmt(result['before'])}")
    callback = EvalCallback(args)
    trainer = build(args, model_path, callbacks=[callback], config=config)
    state.print(f"[dynw] {args.estimator.upper()} with weighting={args.weighting}; "
                f"initial weights {[round(w, 3) for w in trainer.reward_weights.tolist()]}")  # fmt: skip
    if resume:
        state.print(f"[dynw] resuming from {resume}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - start
    history = [h for h in trainer.state.log_history if "loss" in h]
    names = list(trainer.reward_func_names)
    if state.is_main_process:
        fixed = [float(w) for w in trainer.reward_weights.tolist()]  # TRL logs no weights: they never change
        for h in history:
            weights = [h.get(f"reward_weights/{n}", fixed[k]) for k, n in enumerate(names)]
            extra = f"r_pareto {h['dynamic_weights/r_pareto']:.3f}" if "dynamic_weights/r_pareto" in h else ""
            if f"dynamic_weights/influence/{names[0]}" in h:
                extra = "influence " + str([float(f"{h[f'dynamic_weights/influence/{n}']:.3g}") for n in names])
            rewards = " ".join(f"{n} {h[f'rewards/{n}/mean']:+.3f}" for n in names)
            print(
                f"[dynw] step {h['step']:3d}  batch rewards: {rewards}  weights {[round(w, 3) for w in weights]} {extra}"
            )
        model = trainer.accelerator.unwrap_model(trainer.model)
        result["after"] = objectives(model, trainer.processing_class, args.n_eval, args.difficulty, args.target_tokens)
        result["final_weights"] = trainer.reward_weights.tolist()
        result["curve"] = callback.points
        result["train_seconds"] = elapsed
        if hasattr(trainer, "hv_buffer"):
            result["hypervolume"] = trainer.hv_buffer.state_dict()
        print(f"[dynw] final reward weights: {dict(zip(names, [round(w, 3) for w in result['final_weights']]))}")
        if args.weighting == "hypervolume":
            hv = trainer.hv_buffer
            print(f"[dynw] hypervolume buffer: reference {hv.reference}, {len(hv.front)} front points, "
                  f"next r_pareto {hv.r_pareto:.3f}")  # fmt: skip
        print(
            f"[dynw] held-out {args.difficulty} after {args.max_steps} steps ({elapsed:.0f}s): {fmt(result['after'])}"
        )
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "hfx_result.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
