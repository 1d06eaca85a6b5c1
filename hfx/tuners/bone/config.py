"""Configuration of Bone / BAT (Kang, "Bone: Block-Affine Adaptation of LLMs", arXiv 2409.15371)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .._config import check_peft_fields, is_int, is_real


@dataclass
class BoneConfig(PeftConfig):
    """Configuration for a [`BoneModel`].

    Saved as PEFT type ``BONE`` with parameter prefix ``bone_`` — the format of PEFT 0.14-0.18's own Bone — so
    adapters written by those PEFT versions load with hfx, and hfx adapters convert to PEFT's MiSS with
    [`hfx.tuners.bone.convert_to_miss`].

    Args:
        r (`int`):
            Block size. Bone trains a matrix ``B`` of shape ``(r, out_features)`` that is shared by every block of
            ``r`` input columns (``in_features`` need not be a multiple of ``r``; the last block is partial). BAT
            trains ``out_features // r`` blocks of ``r x r`` and needs ``r`` to divide both dimensions.
        target_modules (`list[str]` or `str`, *optional*):
            Names (suffix match) or a regex of the ``nn.Linear`` modules to adapt; ``"all-linear"`` selects every
            linear layer except the output head. Defaults to the architecture's LoRA targets.
        exclude_modules (`list[str]` or `str`, *optional*):
            Names or a regex of modules to leave alone.
        init_weights (`bool` or `"bat"`):
            ``True``: Bone (zero-initialised ``B``, the model is unchanged at init). ``"bat"``: the block-affine
            variant ``W_ij <- W_ij (I + B_i) + B_i`` (also zero-initialised). ``False``: random non-zero ``B`` — for
            tests only.
        bone_dropout (`float`):
            Dropout on the adapter path's input.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only adapt these layer indices.
        layers_pattern (`str` or `list[str]`, *optional*):
            Name of the ``nn.ModuleList`` holding the layers, used with ``layers_to_transform``.
        bias (`str`):
            ``"none"``, ``"all"`` or ``"bone_only"``: which biases are trained and saved with the adapter.
        modules_to_save (`list[str]`, *optional*):
            Extra modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    r: int = field(default=64, metadata={"help": "Block size of Bone/BAT; must divide in and out features for BAT."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex of the nn.Linear layers to adapt, or 'all-linear'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    init_weights: Union[bool, Literal["bat"]] = field(
        default=True,
        metadata={"help": "True: Bone (identity at init); 'bat': block-affine variant; False: random (tests only)."},
    )
    bone_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path's input."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the ModuleList of layers, used with layers_to_transform."}
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'bone_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the Bone layers to train in full and save."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BONE  # added to PEFT's enum by hfx._registry at import
        check_peft_fields(self, bias_only="bone_only")
        if not is_int(self.r, 1):
            raise ValueError(f"`r` (the block size) must be a positive integer, got {self.r!r}.")
        if self.init_weights not in (True, False, "bat"):
            raise ValueError(
                f"`init_weights` must be True (Bone), 'bat' (BAT) or False (random), got {self.init_weights!r}."
            )
        if not is_real(self.bone_dropout):
            raise ValueError(
                f"`bone_dropout` must be a number in [0, 1), got {self.bone_dropout!r} "
                f"({type(self.bone_dropout).__name__})."
            )
        if not 0.0 <= self.bone_dropout < 1.0:
            raise ValueError(f"`bone_dropout` must be in [0, 1), got {self.bone_dropout}.")

    def to_miss_config(self):
        """The equivalent ``peft.MissConfig`` (PEFT >= 0.17 loads it without hfx)."""
        from peft import MissConfig

        return MissConfig(
            r=self.r,
            miss_dropout=self.bone_dropout,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            init_weights=self.init_weights,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            bias="MiSS_only" if self.bias == "bone_only" else self.bias,
            modules_to_save=self.modules_to_save,
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
            inference_mode=self.inference_mode,
        )
