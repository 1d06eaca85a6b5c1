"""Supervised fine-tuning with an hfx (or PEFT) adapter through TRL's SFTTrainer; runs under ``accelerate launch``.

By default it needs nothing from the Hub: a tiny Llama-style model pre-trained once on the built-in task's easy
arithmetic problems (addition and subtraction; cached in ~/.cache/hfx) is adapted with Bone to the hard ones, which
add multiplication ("gets 3 times as many"), on the CPU, in a few minutes (about one once the base is cached).
Easy problems are replayed alongside so that the base skill is kept. It prints the trainable parameters, the loss,
held-out accuracy before and after, and where the adapter went.

    python examples/sft.py                                   # Bone on the tiny default
    python examples/sft.py --peft bat --r 8                  # BAT variant
    python examples/sft.py --peft lora --r 16                # PEFT LoRA, for comparison
    torchrun --nproc_per_node 2 examples/sft.py              # two CPU processes (gloo DDP), same global batch
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes <GPUs> \
        examples/sft.py --model <path-or-id> --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from _launch import (
    add_checkpoint_args,
    difficulty,
    launch_state,
    make_config,
    model_ref,
    non_negative_float,
    per_device_batch,
    positive_float,
    positive_int,
    resume_checkpoint,
    run_args,
)
from datasets import concatenate_datasets
from peft import LoraConfig, PeftConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import hfx
from hfx.data import accuracy, generate_problems, sft_dataset
from hfx.testing.pretrained import BaseRecipe, pretrained_base


def _targets(args: argparse.Namespace) -> str | list[str]:
    return "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")


def _alpha(a) -> float:
    """--lora-alpha, or 2r when it is not given."""
    return 2 * a.r if a.lora_alpha is None else a.lora_alpha


# One line per method: how to build its config from the command line.
PEFT_METHODS: dict[str, Callable[[argparse.Namespace], PeftConfig | None]] = {
    "bone": lambda a: hfx.BoneConfig(r=a.r, target_modules=_targets(a), bone_dropout=a.dropout),
    "bat": lambda a: hfx.BoneConfig(r=a.r, target_modules=_targets(a), init_weights="bat", bone_dropout=a.dropout),
    "dsee": lambda a: hfx.DseeConfig(r=a.r, lora_alpha=_alpha(a), target_modules=_targets(a), lora_dropout=a.dropout),
    "lift": lambda a: hfx.LiftConfig(r=a.r, filter_rank=a.r, target_modules=_targets(a), update_interval=100),
    "paca": lambda a: hfx.PacaConfig(r=a.r, paca_alpha=_alpha(a), target_modules=_targets(a)),
    "sara": lambda a: hfx.SaraConfig(target_modules=_targets(a)),  # the paper's |w| < 2e-3
    "lora": lambda a: LoraConfig(r=a.r, lora_alpha=_alpha(a), target_modules=_targets(a), lora_dropout=a.dropout),
    "none": lambda a: None,  # full fine-tuning
}
# The methods each adapter option reaches; giving it to another method is an error, not silently ignored.
OPTION_METHODS: dict[str, set[str]] = {
    "r": set(PEFT_METHODS) - {"sara", "none"},
    "target_modules": set(PEFT_METHODS) - {"none"},
    "lora_alpha": {"dsee", "paca", "lora"},
    "dropout": {"bone", "bat", "dsee", "lora"},
}
DEFAULT_R = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peft", default="bone", choices=sorted(PEFT_METHODS), help="adapter method ('none' = full FT)")
    p.add_argument(
        "--r",
        "--rank",
        dest="r",
        type=int,
        default=None,
        help=f"rank / block size of the adapter (default {DEFAULT_R}; --rank under torchrun)",
    )
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA / PaCA alpha (default 2*r)")
    p.add_argument("--dropout", type=float, default=None, help="adapter dropout (bone, bat, dsee, lora; default 0)")
    p.add_argument("--target-modules", default=None, help="comma-separated module names or 'all-linear' (the default)")
    p.add_argument(
        "--model", type=model_ref, default=None, help="model path or id; default: the cached tiny base (built-in task)"
    )
    p.add_argument(
        "--difficulty", type=difficulty, default="hard", help="difficulty to adapt to: easy, medium, hard, expert"
    )
    p.add_argument(
        "--replay", type=non_negative_float, default=1.0, help="base-difficulty problems mixed in, per new one"
    )
    p.add_argument("--n-train", type=positive_int, default=4000)
    p.add_argument("--n-eval", type=positive_int, default=200, help="held-out problems per difficulty")
    p.add_argument("--max-steps", type=positive_int, default=350)
    p.add_argument("--learning-rate", type=positive_float, default=5e-3)
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch size")
    p.add_argument(
        "--base-steps", type=positive_int, default=BaseRecipe.max_steps, help="steps to pre-train the tiny base"
    )
    p.add_argument("--output-dir", default="outputs/sft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--logging-steps", type=positive_int, default=25)
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    for option, methods in OPTION_METHODS.items():
        if getattr(args, option) is not None and args.peft not in methods:
            flag = "--" + option.replace("_", "-")
            p.error(f"{flag} does not apply to --peft {args.peft}; it is used by: {', '.join(sorted(methods))}")
    if args.model is not None and args.base_steps != p.get_default("base_steps"):
        p.error("--base-steps does nothing with --model: it sets the pre-training of the built-in tiny base")
    args.r = DEFAULT_R if args.r is None else args.r
    args.target_modules = args.target_modules or "all-linear"
    args.dropout = 0.0 if args.dropout is None else args.dropout
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    state = launch_state()
    say = state.print
    t0 = time.time()
    resume = resume_checkpoint(args)
    config = make_config(
        SFTConfig,
        {"max_steps": "--max-steps", "learning_rate": "--learning-rate", "logging_steps": "--logging-steps"},
        max_steps=args.max_steps,
        per_device_train_batch_size=per_device_batch(args.batch_size, state),
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=args.logging_steps,
        **run_args(args),
        dataloader_num_workers=0,
    )
    adapter_flags = {"r": "--r", "target_modules": "--target-modules", "filter_rank": "--r"}
    adapter_flags.update(dict.fromkeys(["lora_alpha", "paca_alpha"], "--lora-alpha"))
    adapter_flags.update(dict.fromkeys(["bone_dropout", "lora_dropout"], "--dropout"))
    peft_config = make_config(PEFT_METHODS[args.peft], adapter_flags, args, what=f"--peft {args.peft}")

    base_recipe = BaseRecipe(max_steps=args.base_steps, seed=args.seed)
    model_path = args.model or pretrained_base(base_recipe, log=say)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    say(f"[hfx] base model: {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")

    eval_sets = {
        d: generate_problems(args.n_eval, d, seed=args.seed + 1, split="test") for d in ("easy", args.difficulty)
    }

    def evaluate(m) -> dict[str, float]:
        m.eval()
        return {d: accuracy(m, tokenizer, probs) for d, probs in eval_sets.items()}

    before = evaluate(model) if state.is_main_process else {}
    say("[hfx] accuracy before adaptation: " + ", ".join(f"{d} {a:.1%}" for d, a in before.items()))

    train = sft_dataset(args.n_train, args.difficulty, seed=args.seed, split="train")
    n_replay = int(args.replay * args.n_train)
    if n_replay:
        train = concatenate_datasets([train, sft_dataset(n_replay, base_recipe.difficulty, seed=args.seed + 7)])
    train = train.shuffle(seed=args.seed)

    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    if isinstance(peft_config, hfx.LiftConfig):  # LIFT's dynamic mask: re-select every update_interval steps
        trainer.add_callback(hfx.LiftRefreshCallback(show_progress=False))
    if isinstance(peft_config, hfx.SaraConfig):  # SaRA's nuclear-norm regulariser and progressive adjustment
        trainer.add_callback(hfx.SaraCallback())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    what = f"r={args.r}, " if args.peft in OPTION_METHODS["r"] else ""
    what = "full fine-tuning" if peft_config is None else f"{what}targets={args.target_modules}"
    say(
        f"[hfx] method: {args.peft} ({what}); trainable parameters: "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    )
    say(
        f"[hfx] adapting on {len(train)} problems ({args.difficulty}, {n_replay} {base_recipe.difficulty} replayed) "
        f"for {args.max_steps} steps"
    )
    if resume:
        say(f"[hfx] resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)

    result = {"method": args.peft, "trainable_params": trainable, "before": before}
    if state.is_main_process:
        result["after"] = evaluate(trainer.model)
        result["seconds"] = round(time.time() - t0, 1)
        say("[hfx] accuracy after adaptation:  " + ", ".join(f"{d} {a:.1%}" for d, a in result["after"].items()))
        for d in eval_sets:
            say(f"[hfx]   {d:>7}: {before[d]:6.1%} -> {result['after'][d]:6.1%}  ({args.n_eval} held-out problems)")
        with open(os.path.join(args.output_dir, "hfx_result.json"), "w") as f:
            json.dump(result, f, indent=2)
        how = "PeftModel.from_pretrained after `import hfx`" if peft_config is not None else "from_pretrained"
        say(
            f"[hfx] {'adapter' if peft_config is not None else 'model'} saved to {os.path.abspath(args.output_dir)} "
            f"(load it with {how}); total time {result['seconds']:.0f} s"
        )
    return result


if __name__ == "__main__":
    main()
