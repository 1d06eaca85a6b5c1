"""Worker for tests/dist/test_loraga_distributed.py: LoRA-GA's hfx.initialize on 2 processes.

``--backend gloo``: each rank initialises from its own half of a fixed set of batches (gradient all-reduce) and
writes ``rank<r>.safetensors`` (every LoRA-GA layer's A, B and offset base weight). The test compares them with a
single-process init on the union of the batches.

``--backend zero3``: DeepSpeed ZeRO-3 that really partitions the base; ``hfx.initialize(model,
trainer.get_train_dataloader())`` then a few Trainer steps; each rank writes its losses, partition counts and probe
logits, rank 0 the adapter saved by ``trainer.save_model`` (the plain rank-2r export).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file

import hfx
from hfx.testing.dist import deepspeed_cpu_state, zero3_test_config

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def config(**kwargs) -> hfx.LoraGAConfig:
    return hfx.LoraGAConfig(r=2, lora_alpha=4, target_modules=TARGETS, **kwargs)


def batches(vocab: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (2, 9), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.arange(5, 5 + 22).reshape(2, 11) % vocab


def init_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from hfx.tuners.loraga import target_layers

    out = {}
    for name, layer in target_layers(model, "default"):
        out[f"{name}.A"] = layer.lora_A["default"].weight.detach().clone()
        out[f"{name}.B"] = layer.lora_B["default"].weight.detach().clone()
        out[f"{name}.W"] = layer.get_base_layer().weight.detach().clone()
    return out


def run_gloo(args: argparse.Namespace) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    base = AutoModelForCausalLM.from_pretrained(args.base)
    torch.manual_seed(1234 + rank)  # nothing random may leak into the init
    model = get_peft_model(base, config())
    mine = batches(base.config.vocab_size)[rank::2]
    summary = hfx.initialize(model, mine, show_progress=False)["default"]
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
    rows = [{k: v[i] for k, v in b.items()} for b in batches(vocab, n=8) for i in range(2)]
    # weightS and norm_clip read the partitioned base weight itself (gathered for the SVD and the clip)
    model = get_peft_model(base, config(scale="weightS", norm_clip=True))
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
    info = {
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
    args = p.parse_args()
    (run_gloo if args.backend == "gloo" else run_zero3)(args)


if __name__ == "__main__":
    main()
