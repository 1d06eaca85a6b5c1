"""Worker for tests/dist/test_cce_distributed.py: the same few Trainer steps with and without ``hfx.use_cce``
under DeepSpeed ZeRO-3 on 2 CPU processes (parameters, lm_head included, really partitioned).

For every case each rank writes ``<out>/<case>/rank<r>.json`` (logged losses, whether lm_head was partitioned) and
``rank<r>.safetensors`` (all parameters after training, gathered).
"""

from __future__ import annotations

import argparse
import json
import os

from safetensors.torch import save_file

from hfx.testing.dist import deepspeed_cpu_state, zero3_test_config

# name -> (use_cce, tie_word_embeddings)
CASES = {
    "plain_tied": (False, True),
    "cce_tied": (True, True),
    "plain_untied": (False, False),
    "cce_untied": (True, False),
}


def run_case(name: str, args: argparse.Namespace) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import hfx
    from hfx.data import sft_dataset

    cce, tied = CASES[name]
    out = os.path.join(args.out, name)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    rows = sft_dataset(32, difficulty="easy", seed=0, format="text")
    encoded = [{"input_ids": tokenizer(r["text"])["input_ids"]} for r in rows]

    def collate(features):
        batch = tokenizer.pad({"input_ids": [f["input_ids"] for f in features]}, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    training_args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        remove_unused_columns=False,
        deepspeed=zero3_test_config(),
        accelerator_config={"use_configured_state": True},
        disable_tqdm=True,
    )
    # Loaded after TrainingArguments so that ZeRO-3 partitions it at load time (zero.Init).
    model = AutoModelForCausalLM.from_pretrained(args.base, tie_word_embeddings=tied)
    head = model.get_output_embeddings().weight
    partitioned = bool(hasattr(head, "ds_tensor") and head.numel() == 0)
    if cce:
        hfx.use_cce(model)
    trainer = Trainer(model=model, args=training_args, train_dataset=encoded, data_collator=collate)
    trainer.train()
    rank = trainer.args.process_index
    params = list(trainer.model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        tensors = {n: p.detach().clone().contiguous() for n, p in params}
    info = {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "lm_head_partitioned": partitioned,
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "cce": hfx.cce_enabled(model),
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="directory of the tiny base model (save_tiny_model)")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    from accelerate.state import AcceleratorState

    deepspeed_cpu_state()  # gloo, set up once, for DeepSpeed; the Trainer reuses it
    for name in args.cases.split(","):
        run_case(name, args)
        AcceleratorState._reset_state(reset_partial_state=False)


if __name__ == "__main__":
    main()
