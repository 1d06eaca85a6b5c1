"""hfx's PEFT tuners; importing this package registers each of them into PEFT."""

from .bone import BoneConfig, BoneModel
from .dsee import DseeConfig, DseeModel
from .eva import EvaConfig
from .lift import LiftConfig, LiftModel, LiftRefreshCallback
from .loraga import LoraGAConfig
from .paca import PacaConfig, PacaModel
from .sara import SaraCallback, SaraConfig, SaraModel

__all__ = ["BoneConfig", "BoneModel", "LiftConfig", "LiftModel", "LiftRefreshCallback", "PacaConfig", "PacaModel"]
__all__ += ["SaraCallback", "SaraConfig", "SaraModel"]
__all__ += ["DseeConfig", "DseeModel"]
__all__ += ["LoraGAConfig"]
__all__ += ["EvaConfig"]
