"""DSEE: dually sparsity-embedded efficient tuning (arXiv 2111.00160) as a PEFT tuner, plus pruning of the final
weights (``hfx.dsee.prune``)."""

from hfx._registry import register

from .config import DseeConfig
from .layer import DseeLayer, DseeLinear, dsee_select, grebsmo
from .model import DseeModel
from .prune import install_load_hook, load_pruning, prune, remove_pruned_heads, save_pruning

__all__ = [
    "DseeConfig",
    "DseeLayer",
    "DseeLinear",
    "DseeModel",
    "dsee_select",
    "grebsmo",
    "load_pruning",
    "prune",
    "remove_pruned_heads",
    "save_pruning",
]

register("dsee", DseeConfig, DseeModel)
install_load_hook()  # PeftModel.load_adapter (from_pretrained, Trainer resume) re-applies saved pruning masks
