"""Bone / BAT: block-affine adaptation (arXiv 2409.15371) as a PEFT tuner."""

from hfx._registry import register

from .config import BoneConfig
from .convert import convert_to_miss
from .layer import BoneLayer, BoneLinear
from .model import BoneModel

__all__ = ["BoneConfig", "BoneLayer", "BoneLinear", "BoneModel", "convert_to_miss"]

register("bone", BoneConfig, BoneModel)
