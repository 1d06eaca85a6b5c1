"""Configuration of SaRA (Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse
Low-Rank Adaptation", ICLR 2025, arXiv 2409.06633)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .._config import check_peft_fields, is_int, is_real

DEFAULT_THRESHOLD = 2e-3


def default_learning_rate(threshold: float = DEFAULT_THRESHOLD) -> float:
    """The reference code's learning rate when none is given: ``1e-3 * exp(-350 * threshold)`` (~4.97e-4 at the
    default threshold 2e-3; the paper's runs used it, since its driver never passes a learning rate)."""
    return 1e-3 * math.exp(-350.0 * float(threshold))


@dataclass
class SaraConfig(PeftConfig):
    """Configuration for a [`SaraModel`]: train the "temporarily ineffective" small weights of each target matrix.

    SaRA (arXiv 2409.06633) observes that the entries of a pre-trained weight with the smallest magnitudes barely
    affect the output, and re-uses exactly those as the trainable parameters: ``M0 = {(i, j) : |W0_ij| < threshold}``
    (strict inequality). hfx stores them as an adapter: a trainable fp32 delta vector (``sara_values``, zero at init,
    so the output is *exactly* the base model's at init) on a persistent sorted flat index buffer (``sara_indices``);
    ``W0`` itself is untouched until merge, which writes ``W0[M] + delta`` into the selected entries. Saved as PEFT
    type ``SARA`` with prefix ``sara_``.

    The two training-time parts of SaRA run in [`hfx.SaraCallback`] (add it to any HF/TRL ``Trainer``):

    - the nuclear-norm low-rank regulariser ``nuclear_norm_weight * sum_l ||M_l * W_l||_*`` on each layer's selected
      weights ``W0 + delta`` at the trained entries (the paper's low-rank sparse training; the reference's
      ``nuclear_norm(param * mask)``),
    - weight decay (``TrainingArguments.weight_decay``) on those weights ``W0 + delta``, as the reference's AdamW
      applies it to the trainable absolute values, not on the delta alone, and
    - the progressive parameter adjustment: after ``progressive_fraction`` of the optimizer steps, entries whose
      effective weight ``|W0 + delta|`` has grown to ``>= threshold`` are frozen at their learned value and the
      rest keep training with fresh optimizer state.

    Args:
        threshold (`float`, *optional*):
            Absolute magnitude threshold (the paper's): entries with ``|w| < threshold`` train. Default ``2e-3`` (the
            paper's) unless ``ratio`` is given. The fraction this selects depends on the model's weight scale; it is
            logged per adapter and a layer where it selects nothing or everything raises an error.
        ratio (`float`, *optional*):
            Alternative to ``threshold``: train the fraction ``ratio`` (``0 < ratio < 1``) of entries with the smallest
            ``|w|`` in each matrix (the paper finds the smallest 10-20 % ineffective). The progressive adjustment then
            uses each layer's implied threshold (the smallest ``|w|`` not selected). Exclusive with ``threshold``.
        nuclear_norm_weight (`float`):
            Weight ``lambda`` of the nuclear-norm regulariser (the reference's ``lambda_rank`` = 5e-4); 0 disables it.
            Applied by [`hfx.SaraCallback`] once per optimizer step.
        nuclear_norm_layers (`int`, *optional*):
            How many adapted layers (drawn at random each optimizer step, identically on every rank) the regulariser
            covers; the reference code regularises one random matrix per step, which keeps the cost to one SVD per
            step. ``None``: every layer, the full sum (one SVD per layer and step). hfx draws from every adapted
            layer (a conv kernel through its out x in*k*k matrix); the reference only from 2-D matrices with
            min(shape) > 64 (its UNet's conv kernels and smaller matrices are skipped), which on small models would
            leave none.
        progressive_fraction (`float`, *optional*):
            Fraction of the run's optimizer steps after which the progressive adjustment happens (the reference's
            2500 of 5005 steps: one half). ``None`` keeps the mask fixed (required under DeepSpeed ZeRO and FSDP).
        target_modules (`list[str]` or `str`, *optional*):
            Names (suffix match) or a regex of the ``nn.Linear`` / ``nn.Conv2d`` modules to adapt, or
            ``"all-linear"``. Defaults to the architecture's LoRA targets (PEFT's q/v projections for Llama); the
            paper adapts every weight of its diffusion UNet, conv kernels included: name them.
        exclude_modules (`list[str]` or `str`, *optional*):
            Names or a regex of modules to leave alone.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only adapt these layer indices.
        layers_pattern (`str` or `list[str]`, *optional*):
            Name of the ``nn.ModuleList`` holding the layers, used with ``layers_to_transform``.
        bias (`str`):
            ``"none"``, ``"all"`` or ``"sara_only"``: which biases are trained and saved with the adapter.
        modules_to_save (`list[str]`, *optional*):
            Extra modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    threshold: Optional[float] = field(
        default=None, metadata={"help": "Train the entries with |w| < threshold; default 2e-3 (the paper's)."}
    )
    ratio: Optional[float] = field(
        default=None, metadata={"help": "Alternative: train this fraction of smallest-|w| entries of each matrix."}
    )
    nuclear_norm_weight: float = field(
        default=5e-4, metadata={"help": "Weight of the nuclear-norm low-rank regulariser (hfx.SaraCallback); 0: off."}
    )
    nuclear_norm_layers: Optional[int] = field(
        default=1, metadata={"help": "Layers the regulariser covers per optimizer step (random); None: all."}
    )
    progressive_fraction: Optional[float] = field(
        default=0.5,
        metadata={"help": "Progressive adjustment after this fraction of the optimizer steps; None: fixed mask."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex of the nn.Linear / nn.Conv2d layers to adapt, or 'all-linear'."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the ModuleList of layers, used with layers_to_transform."}
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'sara_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the SaRA layers to train in full and save."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SARA  # added to PEFT's enum by hfx._registry at import
        check_peft_fields(self, bias_only="sara_only")
        if self.threshold is not None and self.ratio is not None:
            raise ValueError(
                f"Give either `threshold` (absolute |w| threshold) or `ratio` (fraction of smallest entries), not "
                f"both; got threshold={self.threshold!r} and ratio={self.ratio!r}."
            )
        if self.ratio is not None:
            if not is_real(self.ratio) or not 0 < self.ratio < 1:
                raise ValueError(f"`ratio` must be a number in (0, 1), got {self.ratio!r}.")
        elif self.threshold is None:
            self.threshold = DEFAULT_THRESHOLD
        if self.threshold is not None and (
            not is_real(self.threshold) or not math.isfinite(self.threshold) or self.threshold <= 0
        ):
            raise ValueError(f"`threshold` must be a positive number, got {self.threshold!r}.")
        if not is_real(self.nuclear_norm_weight) or not 0 <= self.nuclear_norm_weight < math.inf:
            raise ValueError(f"`nuclear_norm_weight` must be a number >= 0, got {self.nuclear_norm_weight!r}.")
        if self.nuclear_norm_layers is not None and not is_int(self.nuclear_norm_layers, 1):
            raise ValueError(
                f"`nuclear_norm_layers` must be a positive integer or None (all layers), got "
                f"{self.nuclear_norm_layers!r}."
            )
        if self.progressive_fraction is not None and (
            not is_real(self.progressive_fraction) or not 0 < self.progressive_fraction < 1
        ):
            raise ValueError(
                f"`progressive_fraction` must be in (0, 1) or None (fixed mask), got {self.progressive_fraction!r}."
            )
