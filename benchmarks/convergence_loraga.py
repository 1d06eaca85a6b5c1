"""LoRA vs LoRA-GA at the same budget on the built-in task, and LoRA-GA init time vs PEFT's implementation.

The cached tiny base (``hfx.testing.pretrained``, trained on easy arithmetic) is adapted to ``--difficulty`` (hard)
with TRL's SFTTrainer, as ``examples/sft.py`` does. Same rank, targets, data order, schedule and steps for every
run; LoRA-GA is initialised with ``hfx.initialize(model, trainer.get_train_dataloader())`` before ``train()``.
Reports the train loss after K steps (mean of the last 5 logged) and the init time of hfx's and PEFT's LoRA-GA on
the same batches. CPU-sized: ``python benchmarks/convergence_loraga.py --max-steps 60``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch

import hfx
from hfx.compat import activation_checkpointing
from hfx.data import sft_dataset
from hfx.testing.pretrained import pretrained_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(kind: str, base, tokenizer, train, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(args.seed)
    if kind == "lora":
        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, use_rslora=True, target_modules=TARGETS)
    else:
        cfg = hfx.LoraGAConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS, iters=args.ga_batches)
    model = get_peft_model(copy.deepcopy(base), cfg)
    lr = args.lr if kind == "lora" else args.ga_lr
    sft = SFTConfig(
        output_dir="/tmp/hfx-bench-loraga",
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        **activation_checkpointing(False),
    )
    trainer = SFTTrainer(model=model, args=sft, train_dataset=train, processing_class=tokenizer)
    init_s = 0.0
    if kind == "lora_ga":
        t = time.perf_counter()
        hfx.initialize(trainer.model, trainer.get_train_dataloader(), show_progress=False)
        init_s = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "kind": kind,
        "lr": lr,
        "init_s": init_s,
        "train_s": time.perf_counter() - t,
        "loss_first": losses[0],
        "loss_at_K": sum(losses[-5:]) / len(losses[-5:]),
        "curve": [round(x, 3) for x in losses[:: max(1, len(losses) // 6)]],
    }


def init_times(base, tokenizer, train, args) -> dict:
    """hfx vs PEFT LoRA-GA init on the same batches (the Trainer's collator), both on this CPU."""
    from peft import LoraConfig, get_peft_model
    from peft import LoraGAConfig as PeftLoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga
    from trl import SFTConfig, SFTTrainer

    sft = SFTConfig(
        output_dir="/tmp/hfx-bench-loraga",
        per_device_train_batch_size=args.batch_size,
        report_to="none",
        use_cpu=True,
        seed=args.seed,
    )
    trainer = SFTTrainer(model=copy.deepcopy(base), args=sft, train_dataset=train, processing_class=tokenizer)
    batches = list(itertools.islice(trainer.get_train_dataloader(), args.ga_batches))

    model = get_peft_model(
        copy.deepcopy(base), hfx.LoraGAConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS)
    )
    t = time.perf_counter()
    hfx.initialize(model, batches, show_progress=False)
    hfx_s = time.perf_counter() - t

    peft_model = copy.deepcopy(base)
    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        use_rslora=True,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=PeftLoraGAConfig(),
    )

    def step():
        for b in batches:
            peft_model(**b).loss.backward()

    t = time.perf_counter()
    preprocess_loraga(peft_model, cfg, step)
    get_peft_model(peft_model, cfg)
    peft_s = time.perf_counter() - t
    return {"batches": len(batches), "hfx_s": hfx_s, "peft_s": peft_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--difficulty", default="hard")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    p.add_argument("--ga-lr", type=float, default=None, help="LoRA-GA learning rate (default: --lr)")
    p.add_argument("--ga-batches", type=int, default=8, help="batches for LoRA-GA's gradient estimate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.ga_lr = args.ga_lr or args.lr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pretrained_base()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train = sft_dataset(args.n_train, args.difficulty, seed=args.seed, split="train")
    results = [run(kind, base, tokenizer, train, args) for kind in ("lora", "lora_ga")]
    times = init_times(base, tokenizer, train, args)
    print(
        f"\n{args.max_steps} steps, batch {args.batch_size}, r={args.r}, alpha={args.alpha}, rsLoRA, {args.difficulty}"
    )
    for r in results:
        print(
            f"{r['kind']:8s} lr {r['lr']:.0e}: loss step1 {r['loss_first']:.3f} -> K {r['loss_at_K']:.3f}  "
            f"(train {r['train_s']:.1f}s, init {r['init_s']:.1f}s) curve {r['curve']}"
        )
    print(f"LoRA-GA init on {times['batches']} batches: hfx {times['hfx_s']:.2f}s, PEFT {times['peft_s']:.2f}s")


if __name__ == "__main__":
    main()
