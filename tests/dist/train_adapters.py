"""Worker for tests/dist/test_distributed.py: train each adapter in CASES for a few Trainer steps on N processes.

Launched by ``hfx.testing.run_distributed`` (torchrun) with ``--backend ddp`` (gloo) or ``--backend zero3``
(DeepSpeed ZeRO-3 that really partitions). For every case, each rank writes what the test then checks:
``<out>/<case>/rank<r>.safetensors`` (adapter values after training, gathered if partitioned, and the logits of the
trained model on a fixed input), ``rank<r>.json`` (hashes of the batches it saw, partitioning counts), and rank 0's
``trainer.save_model`` output in ``<out>/<case>/adapter``.

A new method adds one line to CASES: name -> a function returning its PEFT config for TARGETS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch
from safetensors.torch import save_file

import hfx
from hfx.testing.dist import deepspeed_cpu_state, zero3_test_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "bone": lambda: hfx.BoneConfig(r=8, target_modules=TARGETS),
    "bat": lambda: hfx.BoneConfig(r=8, target_modules=TARGETS, init_weights="bat"),
    "lift": lambda: hfx.LiftConfig(r=2, filter_rank=4, update_interval=None, target_modules=TARGETS),
    "dsee": lambda: hfx.DseeConfig(r=4, num_sparse=16, target_modules=TARGETS),
    "paca": lambda: hfx.PacaConfig(r=8, paca_alpha=16, target_modules=TARGETS),
    "sara": lambda: hfx.SaraConfig(ratio=0.1, progressive_fraction=None, target_modules=TARGETS),
}


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed input whose logits every rank records and the test compares after reloading the saved adapter."""
    return torch.arange(3, 3 + 24).reshape(2, 12) % vocab_size


def gathered_adapter(model: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (all ranks take part in the gather under ZeRO-3)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone().contiguous() for n, p in params}
    return {n: p.detach().clone().contiguous() for n, p in params}


def adapter_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's buffers (index buffers and the like): they must be identical on every rank too."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_config["default"].peft_type]
    return {n: b.detach().clone().contiguous() for n, b in model.named_buffers() if prefix in n}


def partition_counts(model: torch.nn.Module) -> dict[str, int]:
    """How many base and adapter parameters are partitioned (ZeRO-3 keeps only a shard of each on this rank)."""
    counts = {"base_total": 0, "base_partitioned": 0, "adapter_total": 0, "adapter_partitioned": 0}
    for _, p in model.named_parameters():
        key = "adapter" if p.requires_grad else "base"
        counts[f"{key}_total"] += 1
        if hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel and p.numel() == 0:
            counts[f"{key}_partitioned"] += 1
    return counts


def run_case(name: str, args: argparse.Namespace) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hfx.data import sft_dataset

    zero3 = args.backend == "zero3"
    out = os.path.join(args.out, name)
    seen: list[str] = []

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    rows = sft_dataset(64, difficulty="easy", seed=0, format="text")
    encoded = [tokenizer(r["text"])["input_ids"] for r in rows]

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad({"input_ids": [f["input_ids"] for f in features]}, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        seen.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest())
        return batch

    training_args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not zero3,
        seed=0,
        remove_unused_columns=False,
        deepspeed=zero3_test_config() if zero3 else None,
        accelerator_config={"use_configured_state": True} if zero3 else None,
    )
    # Loaded after TrainingArguments so that ZeRO-3 partitions it at load time (zero.Init), as with a real model.
    base = AutoModelForCausalLM.from_pretrained(args.base)
    # A different RNG state on each rank: a tuner that draws anything at random must still agree across ranks.
    torch.manual_seed(1234 + training_args.process_index)
    model = get_peft_model(base, CASES[name]())
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=[{"input_ids": ids} for ids in encoded],
        data_collator=collate,
    )
    trainer.train()
    model = trainer.model
    model.eval()
    rank = trainer.args.process_index
    info = {
        "world_size": trainer.args.world_size,
        "batches": seen,
        "wrapped": type(trainer.model_wrapped).__name__,
        "partition": partition_counts(model) if zero3 else {},
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    tensors = {f"adapter.{k}": v for k, v in gathered_adapter(model, zero3).items()}
    tensors.update({f"buffer.{k}": v for k, v in adapter_buffers(model).items()})
    with torch.no_grad():
        tensors["logits"] = model(input_ids=probe_ids(len(tokenizer))).logits.float().contiguous()
    trainer.save_model(os.path.join(out, "adapter"))
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["ddp", "zero3"], required=True)
    p.add_argument("--base", required=True, help="directory of the tiny base model (save_tiny_model)")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()

    if args.backend == "zero3":
        deepspeed_cpu_state()  # gloo, set up once, for DeepSpeed; the Trainer reuses it
    from accelerate.state import AcceleratorState

    for name in args.cases.split(","):
        run_case(name, args)
        AcceleratorState._reset_state(reset_partial_state=False)


if __name__ == "__main__":
    main()
