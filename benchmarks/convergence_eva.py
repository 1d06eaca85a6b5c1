"""EVA vs plain LoRA at the same rank budget on the built-in task, and EVA init time: hfx vs PEFT's EVA.

Adapts the cached tiny base (``hfx.testing.pretrained``, trained on "easy") to ``--difficulty`` (default "hard") with
plain SFT on prompt+completion text (completion-only labels), same seed / data order / optimizer for every run, and
prints the training loss (mean of the last 10 steps) after K steps. Init time: ``hfx.initialize`` vs
``peft.initialize_lora_eva_weights`` on the same batches (their own convergence loops, tau 0.99).

    python benchmarks/convergence_eva.py --steps 150 --r 8
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfx
from hfx.data import sft_dataset
from hfx.testing.pretrained import pretrained_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batches(tok, rows, bsz: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(rows) - bsz + 1, bsz):
        chunk = rows[i : i + bsz]
        prompts = [tok(r["prompt"])["input_ids"] for r in chunk]
        full = [p + tok(r["completion"])["input_ids"] + [tok.eos_token_id] for p, r in zip(prompts, chunk)]
        width = max(map(len, full))
        ids = torch.full((bsz, width), tok.pad_token_id)
        am = torch.zeros((bsz, width), dtype=torch.long)
        labels = torch.full((bsz, width), -100)
        for j, (p, f) in enumerate(zip(prompts, full)):
            ids[j, : len(f)] = torch.tensor(f)
            am[j, : len(f)] = 1
            labels[j, len(p) : len(f)] = torch.tensor(f[len(p) :])
        out.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return out


def train(model, batches, steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bsz", type=int, default=16)
    p.add_argument("--difficulty", default="hard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    path = pretrained_base()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    rows = list(sft_dataset(args.steps * args.bsz, args.difficulty, seed=args.seed))
    batches = make_batches(tok, rows, args.bsz)
    lora_kw = dict(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)

    results = {}
    for name in ("lora", "eva"):
        torch.manual_seed(args.seed)
        cfg = LoraConfig(**lora_kw) if name == "lora" else hfx.EvaConfig(**lora_kw)
        model = get_peft_model(copy.deepcopy(base), cfg)
        t0 = time.perf_counter()
        summary = hfx.initialize(model, batches, show_progress=False).get("default")
        init_s = time.perf_counter() - t0
        losses = train(model, batches, args.steps, args.lr)
        results[name] = (losses, init_s, summary)
        print(f"{name}: init {init_s:.2f}s, loss@{args.steps} (mean of last 10) {sum(losses[-10:]) / 10:.4f}, "
              f"first {losses[0]:.4f}")  # fmt: skip
        if summary:
            print(f"  eva: {summary['iterations']} iterations, converged {summary['converged']}, "
                  f"ranks {sorted(summary['ranks'].values())}")  # fmt: skip
    for k in (25, 50, 100, args.steps):
        if k <= args.steps:
            row = "  ".join(f"{n} {sum(results[n][0][k - 10 : k]) / 10:.4f}" for n in results)
            print(f"step {k:4d}: {row}")

    # init time vs PEFT's EVA on the same batches
    from peft import EvaConfig as PeftEvaConfig
    from peft import initialize_lora_eva_weights

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(**lora_kw, init_lora_weights="eva", eva_config=PeftEvaConfig())
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    peft_s = time.perf_counter() - t0
    print(f"init time: hfx {results['eva'][1]:.2f}s, peft {peft_s:.2f}s; peft ranks "
          f"{sorted(model.peft_config['default'].rank_pattern.values())} (layers at r omitted)")  # fmt: skip


if __name__ == "__main__":
    main()
