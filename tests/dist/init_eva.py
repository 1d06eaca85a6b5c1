"""Worker for tests/dist/test_eva_distributed.py: EVA's hfx.initialize on 2 processes.

``--backend gloo``: each rank initialises from its own batches (per-batch all-reduce of counts, sums and scatter
matrices) and writes ``rank<r>.safetensors`` (every LoRA layer's A) and ``rank<r>.json`` (the summary). The test
compares them with a single-process init whose batch i is the concatenation of both ranks' batch i.

``--backend zero3``: DeepSpeed ZeRO-3 that really partitions the base; ``hfx.initialize(model,
trainer.get_train_dataloader())`` then a few Trainer steps; each rank writes its losses, partition counts and probe
logits, rank 0 the adapter saved by ``trainer.save_model``; then each rank rebuilds a fresh partitioned model from that
adapter with ``init_from`` (the resume path) and records its ranks and how far its A/B are from the saved ones.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file

import hfx
from hfx.testing.dist import deepspeed_cpu_state, zero3_test_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def config(**kw) -> hfx.EvaConfig:
    return hfx.EvaConfig(r=2, lora_alpha=4, target_modules=TARGETS, **kw)


def rank_batches(vocab: int, rank: int, n: int = 5) -> list[dict[str, torch.Tensor]]:
    """Rank ``rank``'s batches: different data (and padding) on each rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (2, 9), generator=gen)
        am = torch.ones_like(ids)
        am[rank, 9 - 2 - (i % 3) :] = 0
        out.append({"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)})
    return out


def union_batches(vocab: int, n: int = 5) -> list[dict[str, torch.Tensor]]:
    """Batch i of the single process = rank 0's batch i and rank 1's batch i stacked."""
    r0, r1 = rank_batches(vocab, 0, n), rank_batches(vocab, 1, n)
    return [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(r0, r1)]


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.arange(5, 5 + 22).reshape(2, 11) % vocab


def init_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if "lora_A" in n}


def run_gloo(args: argparse.Namespace) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float64)
    torch.manual_seed(1234 + rank)  # nothing random may leak into the init
    model = get_peft_model(base, config(tau=args.tau))
    summary = hfx.initialize(model, rank_batches(base.config.vocab_size, rank), show_progress=False)["default"]
    save_file(init_state(model), os.path.join(args.out, f"rank{rank}.safetensors"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)
    torch.distributed.barrier()  # both ranks leave together: torch 2.6 could hang in destroy once the peer had exited
    torch.distributed.destroy_process_group()


def run_zero3(args: argparse.Namespace) -> None:
    from peft import get_peft_model
    from train_adapters import partition_counts
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    deepspeed_cpu_state()  # gloo, set up once, for DeepSpeed; the Trainer reuses it
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        remove_unused_columns=False,
        deepspeed=zero3_test_config(),
        accelerator_config={"use_configured_state": True},
    )
    base = AutoModelForCausalLM.from_pretrained(args.base)  # partitioned at load time (zero.Init)
    vocab = base.config.vocab_size
    rows = [{k: v[i] for k, v in b.items()} for r in (0, 1) for b in rank_batches(vocab, r, n=6) for i in range(2)]
    model = get_peft_model(base, config(max_iterations=20))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]},
    )
    counts_before = partition_counts(model)
    summary = hfx.initialize(model, trainer.get_train_dataloader(), show_progress=False)["default"]
    trainer.train()
    model = trainer.model
    model.eval()
    rank = trainer.args.process_index
    with torch.no_grad():
        logits = model(input_ids=probe_ids(vocab)).logits.float().contiguous()
    trainer.save_model(os.path.join(args.out, "adapter"))
    save_file({"logits": logits}, os.path.join(args.out, f"rank{rank}.safetensors"))
    trainer.accelerator.wait_for_everyone()
    # the resume path on a partitioned base: a fresh model takes the saved ranks and A/B, with no batches
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(args.base), config(max_iterations=20))
    again = hfx.initialize(fresh, [], init_from=os.path.join(args.out, "adapter"), show_progress=False)["default"]
    saved = load_file(os.path.join(args.out, "adapter", "adapter_model.safetensors"))
    mine = {n.replace(".default", ""): p for n, p in fresh.named_parameters() if "lora_" in n}
    info = {
        "init_from": {
            "ranks": again["ranks"],
            "base_partitioned": partition_counts(fresh)["base_partitioned"],
            "same_keys": sorted(mine) == sorted(saved),
            "max_diff": max((mine[k].detach().float() - saved[k].float()).abs().max().item() for k in saved),
        },
        "summary": summary,
        "partition": counts_before,
        "wrapped": type(trainer.model_wrapped).__name__,
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["gloo", "zero3"], required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tau", type=float, default=0.99)
    args = p.parse_args()
    (run_gloo if args.backend == "gloo" else run_zero3)(args)


if __name__ == "__main__":
    main()
