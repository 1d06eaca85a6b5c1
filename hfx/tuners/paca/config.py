"""Configuration of PaCA (Woo et al., "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning", ICLR 2025,
arXiv 2503.01905)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .._config import check_peft_fields, is_int, is_real


@dataclass
class PacaConfig(PeftConfig):
    """Configuration for a [`PacaModel`].

    PaCA fine-tunes ``r`` randomly chosen *input columns* of each target weight ``W`` (``out x in``): the columns
    ``W[:, idx]`` are replaced by ``s * P`` with a trainable ``P`` of shape ``(out, r)`` and ``s = paca_alpha / r``.
    Only ``x[..., idx]`` is kept for the backward pass (``T x r`` per layer instead of LoRA's ``T x in``), which is
    where the paper's memory saving comes from. Saved as PEFT type ``PACA`` with parameter prefix ``paca_``.

    Args:
        r (`int`):
            Number of input columns trained per layer (``1 <= r <= in_features``). Trainable parameters per layer:
            ``out_features * r`` — PaCA at ``r`` on a square layer has as many as LoRA at ``r / 2``.
        paca_alpha (`float`):
            Scale ``s = paca_alpha / r`` of the trained columns (``W[:, idx] = s * P``, ``P`` initialised to
            ``W0[:, idx] / s``). With Adam it acts like a factor ``s`` on the learning rate of the columns. The
            reference defaults to ``paca_alpha = r`` (``s = 1``); its MMLU scripts use ``r=16, alpha=64``.
        target_modules (`list[str]` or `str`, *optional*):
            Names (suffix match) or a regex of the ``nn.Linear`` modules to adapt; ``"all-linear"`` selects every
            linear layer except the output head. Defaults to the architecture's LoRA targets.
        exclude_modules (`list[str]` or `str`, *optional*):
            Names or a regex of modules to leave alone.
        init_weights (`bool`):
            ``True``: ``P = W0[:, idx] / s``, so the model is bit for bit the base model at init (for any ``s``:
            the update is measured as ``s * (P - W0[:, idx] / s)``). ``False``: random non-identity ``P`` (still
            deterministic per layer) — for tests only.
        seed (`int`):
            Seed of the column selection. The columns of a layer are ``randperm(in_features)[:r]`` drawn from a
            private ``torch.Generator`` seeded from ``seed`` and the layer's module name: independent of the global
            RNG, identical on every rank without communication, reproducible, and different from layer to layer.
            The chosen indices are saved with the adapter, so a loaded adapter always uses the trained columns.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only adapt these layer indices.
        layers_pattern (`str` or `list[str]`, *optional*):
            Name of the ``nn.ModuleList`` holding the layers, used with ``layers_to_transform``.
        bias (`str`):
            ``"none"``, ``"all"`` or ``"paca_only"``: which biases are trained and saved with the adapter.
        modules_to_save (`list[str]`, *optional*):
            Extra modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    r: int = field(default=8, metadata={"help": "Number of input columns trained per layer."})
    paca_alpha: float = field(default=8, metadata={"help": "Scale s = paca_alpha / r of the trained columns."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex of the nn.Linear layers to adapt, or 'all-linear'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: identity at init (s*P = W0[:, idx]); False: random (tests only)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the column selection (combined with each layer's module name)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the ModuleList of layers, used with layers_to_transform."}
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'paca_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the PaCA layers to train in full and save."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PACA  # added to PEFT's enum by hfx._registry at import
        check_peft_fields(self, bias_only="paca_only")
        if not is_int(self.r, 1):
            raise ValueError(f"`r` (the number of trained columns) must be a positive integer, got {self.r!r}.")
        if (
            not is_real(self.paca_alpha) or not 0 < self.paca_alpha < math.inf  # NaN fails too
        ):
            raise ValueError(f"`paca_alpha` must be a finite number > 0, got {self.paca_alpha!r}.")
        if self.init_weights not in (True, False):
            raise ValueError(f"`init_weights` must be True (identity) or False (random), got {self.init_weights!r}.")
        if not is_int(self.seed):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
