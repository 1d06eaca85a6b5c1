"""Masked Thought SFT (arXiv 2403.02178) with hfx.MaskedThoughtTrainer; runs under ``accelerate launch``.

By default it needs nothing from the Hub: the tiny Llama-style base pre-trained once on the built-in task's easy
arithmetic problems (cached in ~/.cache/hfx; ~1.5 min the first time) is fine-tuned on the hard ones (which add
multiplication), with part of each chain of thought masked in the inputs: every completion token is replaced by
``<mask>`` with probability p, p rising linearly from 0 to ``--mask-rate`` over the first 2/3 of training; the
labels stay the clean solution and the question is never masked. It prints the masking set-up, one masked training
example, the schedule as logged, and held-out accuracy before and after (a couple of minutes on a 2-core CPU).

    python examples/masked_thought.py                                  # p_max 0.2 with a <mask> token (paper)
    python examples/masked_thought.py --mask-token random --mask-rate 0.4   # the paper's GSM8K setting
    python examples/masked_thought.py --mask-scope think               # <think> traces, mask only inside them
    python examples/masked_thought.py --mask-rate 0                    # plain SFT, for comparison
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes <GPUs> \
        examples/masked_thought.py --model <path> --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import time

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
    refuse_unused,
    resume_checkpoint,
    run_args,
)
from datasets import concatenate_datasets
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfx
from hfx.data import accuracy, generate_problems, sft_dataset
from hfx.testing.pretrained import BaseRecipe, pretrained_base
from hfx.trainers import add_mask_token


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=model_ref, default=None, help="model path or id; default: the cached tiny base (built-in task)"
    )
    p.add_argument("--mask-rate", type=float, default=0.2, help="p_max, the final mask probability")
    p.add_argument("--mask-warmup-ratio", type=float, default=2 / 3, help="fraction of training p rises over")
    p.add_argument("--mask-token", default="<mask>", help="a token (added if missing), 'pad' or 'random'")
    p.add_argument("--mask-scope", default="completion", choices=["completion", "think"])
    p.add_argument("--think", action="store_true", help="train on <think> traces (implied by --mask-scope think)")
    p.add_argument("--peft", default="none", choices=["none", "lora", "bone"], help="'none' = full fine-tuning")
    p.add_argument(
        "--r", "--rank", dest="r", type=int, default=16, help="adapter rank / block size (--rank under torchrun)"
    )
    p.add_argument(
        "--difficulty", type=difficulty, default="hard", help="difficulty to fine-tune on: easy, medium, hard, expert"
    )
    p.add_argument(
        "--replay", type=non_negative_float, default=1.0, help="base-difficulty problems mixed in, per new one"
    )
    p.add_argument("--n-train", type=positive_int, default=4000)
    p.add_argument("--n-eval", type=positive_int, default=200, help="held-out problems per difficulty")
    p.add_argument("--max-steps", type=positive_int, default=300)
    p.add_argument("--learning-rate", type=positive_float, default=2e-3)
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch size")
    p.add_argument("--output-dir", default="outputs/masked_thought")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--logging-steps", type=positive_int, default=25)
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    refuse_unused(p, args, {"r": (lambda a: a.peft == "none", "with --peft none (full fine-tuning)")})
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    think = args.think or args.mask_scope == "think"
    state = launch_state()
    say = state.print
    t0 = time.time()
    resume = resume_checkpoint(args)
    flags = {
        "mask_rate": "--mask-rate",
        "mask_warmup_ratio": "--mask-warmup-ratio",
        "mask_token": "--mask-token",
        "mask_scope": "--mask-scope",
        "learning_rate": "--learning-rate",
    }
    config = make_config(
        hfx.MaskedThoughtConfig,
        flags,
        mask_rate=args.mask_rate,
        mask_warmup_ratio=args.mask_warmup_ratio,
        mask_token=args.mask_token,
        mask_scope=args.mask_scope,
        max_steps=args.max_steps,
        per_device_train_batch_size=per_device_batch(args.batch_size, state),
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=args.logging_steps,
        **run_args(args),
        dataloader_num_workers=0,
    )
    adapters = {
        "none": lambda: None,
        "lora": lambda: LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"),
        "bone": lambda: hfx.BoneConfig(r=args.r, target_modules="all-linear"),
    }
    peft_config = make_config(adapters[args.peft], {"r": "--r"}, what=f"--peft {args.peft}")

    base_recipe = BaseRecipe(seed=args.seed)
    model_path = args.model or pretrained_base(base_recipe, log=say)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    say(f"[hfx] base model: {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")
    if args.mask_token not in ("pad", "random"):
        # Before the trainer (and PEFT / DeepSpeed) wrap the model. The tiny tokenizer already has an unused <mask>
        # the base never read, so its row is re-initialised to the mean embedding like a freshly added one.
        mask_id = add_mask_token(model, tokenizer, args.mask_token, reinit=True)
        say(f"[hfx] mask token {args.mask_token!r} (id {mask_id}): embedding row set to the mean of the vocabulary's")

    eval_sets = {
        d: generate_problems(args.n_eval, d, seed=args.seed + 1, split="test") for d in ("easy", args.difficulty)
    }
    max_new = 96 if think else 64

    def evaluate(m) -> dict[str, float]:
        m.eval()
        return {d: accuracy(m, tokenizer, probs, max_new_tokens=max_new) for d, probs in eval_sets.items()}

    before = evaluate(model) if state.is_main_process else {}
    say("[hfx] accuracy before: " + ", ".join(f"{d} {a:.1%}" for d, a in before.items()))

    train = sft_dataset(args.n_train, args.difficulty, seed=args.seed, split="train", think=think)
    n_replay = int(args.replay * args.n_train)
    if n_replay:
        replay = sft_dataset(n_replay, base_recipe.difficulty, seed=args.seed + 7, think=think)
        train = concatenate_datasets([train, replay])
    train = train.shuffle(seed=args.seed)

    trainer = hfx.MaskedThoughtTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    say(
        f"[hfx] Masked Thought: p rises 0 -> {args.mask_rate} over {args.mask_warmup_ratio:.0%} of {args.max_steps} "
        f"steps, then stays; replacement {args.mask_token!r}; scope {args.mask_scope!r}; {args.peft} "
        f"({trainable:,} trainable parameters); {len(train)} problems ({args.difficulty}, {n_replay} replayed)"
    )
    # One training example as the model reads it at p = p_max (the labels stay the clean text).
    example = trainer.data_collator([trainer.train_dataset[0]])
    shown, _ = trainer.mask_batch(example, rate=args.mask_rate, generator=torch.Generator().manual_seed(args.seed))
    labels = example["labels"][0]
    say("[hfx] a training completion, clean:  " + json.dumps(tokenizer.decode(labels[labels != -100]))[:150])
    say("[hfx]              as the model reads it: " + json.dumps(tokenizer.decode(shown["input_ids"][0][labels != -100]))[:150])  # fmt: skip

    if resume:
        say(f"[hfx] resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    logs = [h for h in trainer.state.log_history if "masked_thought/mask_rate" in h and "loss" in h]
    say("[hfx] logged (step: scheduled p / masked fraction / loss): " + "; ".join(
        f"{h['step']}: {h['masked_thought/mask_rate']:.3f} / {h['masked_thought/masked_fraction']:.3f} / {h['loss']:.3f}"
        for h in logs
    ))  # fmt: skip

    result = {
        "mask_rate": args.mask_rate,
        "mask_token": args.mask_token,
        "mask_scope": args.mask_scope,
        "peft": args.peft,
        "before": before,
        "schedule": [(h["step"], h["masked_thought/mask_rate"], h["masked_thought/masked_fraction"]) for h in logs],
    }
    if state.is_main_process:
        result["after"] = evaluate(trainer.model)
        result["seconds"] = round(time.time() - t0, 1)
        for d in eval_sets:
            say(
                f"[hfx] accuracy {d:>7}: {before[d]:6.1%} -> {result['after'][d]:6.1%}  ({args.n_eval} held-out problems)"
            )
        with open(os.path.join(args.output_dir, "hfx_result.json"), "w") as f:
            json.dump(result, f, indent=2)
        say(f"[hfx] model saved to {os.path.abspath(args.output_dir)}; total time {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
