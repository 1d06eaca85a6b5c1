"""hfx's PEFT tuners; importing this package registers each of them into PEFT."""

from .bone import BoneConfig, BoneModel

__all__ = ["BoneConfig", "BoneModel"]
