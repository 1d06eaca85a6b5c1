"""LoRA-GA (arXiv 2407.05000): LoRA initialised from the SVD of the weight gradient, saved as plain LoRA.

model = get_peft_model(base, hfx.LoraGAConfig(r=8, lora_alpha=16, target_modules=[...]))
hfx.initialize(model, train_dataloader)   # gradient estimate, SVD, A/B, base-weight offset
...train...
model.save_pretrained(path)               # rank-2r LoRA for the original base: stock PEFT loads it
"""

from hfx.initialize import register_initializer

from .config import LoraGAConfig
from .export import install_load_hook, read_export_init, rewrite_saved_weights
from .init import (
    apply_factors,
    check_gradient,
    estimate_gradients,
    initialize_loraga,
    loraga_factors,
    target_layers,
)

__all__ = [
    "LoraGAConfig",
    "apply_factors",
    "check_gradient",
    "estimate_gradients",
    "initialize_loraga",
    "install_load_hook",
    "loraga_factors",
    "read_export_init",
    "rewrite_saved_weights",
    "target_layers",
]

register_initializer(
    LoraGAConfig,
    initialize_loraga,
    resume_hint=(
        "hfx.initialize(model, [], init_from=<checkpoint>) (it reads LoRA-GA's init A_0/B_0 from the checkpoint's "
        "rank-2r export and offsets the base as the run that wrote it did; no batches needed), then "
        "trainer.train(resume_from_checkpoint=<checkpoint>)"
    ),
    fitting_load_warning=(
        "Rank-r weights were loaded into LoRA-GA adapter {adapter!r}, which hfx.initialize never ran on. If they were "
        "saved with export='mutated_base' (trained after hfx.initialize), they are valid only on the offset base "
        "W - s*B0*A0 of that run, and on the original base they give a different model: run hfx.initialize(model, "
        "<that run's batches>) (same seed) before loading. If the saving run never ran hfx.initialize either (a "
        "plain LoRA), they are right as loaded. The default export='relative_to_base' saves a rank-2r adapter that "
        "needs no offset."
    ),
)
