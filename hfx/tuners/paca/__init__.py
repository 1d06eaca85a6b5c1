"""PaCA: partial connection adaptation (arXiv 2503.01905) as a PEFT tuner, with a 4-bit base (QPaCA)."""

from hfx._registry import register

from .config import PacaConfig
from .layer import PacaLayer, PacaLinear, PartialConnection, paca_column_indices
from .model import PacaModel

__all__ = ["PacaConfig", "PacaLayer", "PacaLinear", "PacaModel", "PartialConnection", "paca_column_indices"]

register("paca", PacaConfig, PacaModel)
