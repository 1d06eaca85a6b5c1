"""hfx's PEFT tuners; importing this package registers each of them into PEFT."""

from .bone import BoneConfig, BoneModel
from .lift import LiftConfig, LiftModel, LiftRefreshCallback
from .paca import PacaConfig, PacaModel

__all__ = ["BoneConfig", "BoneModel", "LiftConfig", "LiftModel", "LiftRefreshCallback", "PacaConfig", "PacaModel"]
