"""EVA (explained-variance adaptation, arXiv 2410.07170): LoRA initialised from activation statistics, plain LoRA.

model = get_peft_model(base, hfx.EvaConfig(r=8, lora_alpha=16, target_modules=[...]))
hfx.initialize(model, train_dataloader)   # incremental PCA of layer inputs, rank redistribution, A, B = 0
...train...
model.save_pretrained(path)               # a plain LoRA adapter (rank_pattern filled in): stock PEFT loads it
hfx.initialize(fresh_model, [], init_from=checkpoint)  # before a resume: the saved ranks, no second data pass
"""

from hfx.initialize import register_initializer

from .config import EvaConfig
from .init import (
    LayerStats,
    apply_eva,
    compute_eva,
    initialize_eva,
    read_saved_eva,
    redistribute_ranks,
    target_layers,
    token_mask,
    zero3_gather_per_module,
)

__all__ = [
    "EvaConfig",
    "LayerStats",
    "apply_eva",
    "compute_eva",
    "initialize_eva",
    "read_saved_eva",
    "redistribute_ranks",
    "target_layers",
    "token_mask",
    "zero3_gather_per_module",
]

register_initializer(
    EvaConfig,
    initialize_eva,
    resume_hint=(
        "hfx.initialize(model, [], init_from=<checkpoint>) (it reads EVA's ranks from the checkpoint's adapter; "
        "no batches needed), then trainer.train(resume_from_checkpoint=<checkpoint>)"
    ),
)
