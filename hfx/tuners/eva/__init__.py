"""EVA (explained-variance adaptation, arXiv 2410.07170): LoRA initialised from activation statistics, plain LoRA.

model = get_peft_model(base, hfx.EvaConfig(r=8, lora_alpha=16, target_modules=[...]))
hfx.initialize(model, train_dataloader)   # incremental PCA of layer inputs, rank redistribution, A, B = 0
...train...
model.save_pretrained(path)               # a plain LoRA adapter (rank_pattern filled in): stock PEFT loads it
"""

from hfx.initialize import register_initializer

from .config import EvaConfig
from .init import (
    LayerStats,
    apply_eva,
    compute_eva,
    initialize_eva,
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
    "redistribute_ranks",
    "target_layers",
    "token_mask",
    "zero3_gather_per_module",
]

register_initializer(
    EvaConfig,
    initialize_eva,
    resume_hint=(
        "hfx.initialize(model, trainer.get_train_dataloader()) with the data and EvaConfig of the run that wrote the "
        "checkpoint (EVA computes the same ranks from the same batches), then "
        "trainer.train(resume_from_checkpoint=<checkpoint>)"
    ),
)
