"""LIFT: low-rank informed sparse fine-tuning of principal weights (arXiv 2506.00772) as a PEFT tuner."""

from hfx._registry import register

from .callback import LiftRefreshCallback
from .config import LiftConfig
from .layer import LiftLayer, LiftLinear, lift_select
from .model import LiftModel, refresh_lift_masks

__all__ = [
    "LiftConfig",
    "LiftLayer",
    "LiftLinear",
    "LiftModel",
    "LiftRefreshCallback",
    "lift_select",
    "refresh_lift_masks",
]

register("lift", LiftConfig, LiftModel)
