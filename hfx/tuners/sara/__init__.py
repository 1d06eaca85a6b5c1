"""SaRA: progressive sparse low-rank adaptation of the smallest weights (arXiv 2409.06633) as a PEFT tuner."""

from hfx._registry import register

from .callback import SaraCallback
from .config import SaraConfig, default_learning_rate
from .layer import SaraConv2d, SaraLayer, SaraLinear, sara_select
from .model import SaraModel, adjust_sara_masks, sara_nuclear_norm

__all__ = [
    "SaraCallback",
    "SaraConfig",
    "SaraConv2d",
    "SaraLayer",
    "SaraLinear",
    "SaraModel",
    "adjust_sara_masks",
    "default_learning_rate",
    "sara_nuclear_norm",
    "sara_select",
]

register("sara", SaraConfig, SaraModel)
