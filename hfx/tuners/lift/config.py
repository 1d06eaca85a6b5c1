"""Configuration of LIFT (Liu et al., "LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction
for Reasoning-Focused Supervised Fine-Tuning", ICML 2025, arXiv 2506.00772)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .._config import check_peft_fields, is_int, is_real

DEFAULT_R = 128


@dataclass
class LiftConfig(PeftConfig):
    """Configuration for a [`LiftModel`]: sparse fine-tuning of LIFT's "principal weights".

    Per target weight ``W`` (``m x n``) LIFT trains the ``k`` entries with the largest magnitude in the rank
    ``filter_rank`` SVD approximation of ``W``. hfx stores them as an adapter: a trainable fp32 delta vector
    (``lift_values``, zero at init) on a persistent sorted flat index buffer (``lift_indices``); ``W`` itself is
    untouched until merge. Saved as PEFT type ``LIFT`` with prefix ``lift_``.

    Args:
        r (`int`, *optional*):
            Budget as a LoRA rank: ``k = min((m + n) * r, m * n)`` entries per matrix, the trainable-parameter count
            of a rank-``r`` LoRA (the paper's ``lora_rank``). Defaults to 128 unless ``density`` is given.
        density (`float`, *optional*):
            Alternative budget: ``k = max(1, round(density * m * n))``, ``0 < density <= 1``. Exclusive with ``r``.
        filter_rank (`int`):
            Rank of the SVD approximation the entries are ranked on; ``>= min(m, n)`` means plain magnitude top-k.
        svd (`"lowrank"` or `"full"`):
            ``"lowrank"``: randomised ``torch.svd_lowrank`` with ``q = 2 * filter_rank`` and ``niter`` power
            iterations (fixed seed, so identical on every rank); ``"full"``: exact ``torch.linalg.svd``.
        niter (`int`):
            Power iterations of ``svd="lowrank"``.
        update_interval (`int`, *optional*):
            Re-select the mask every ``update_interval`` optimizer steps from the current effective weight (the
            paper's dynamic mask; 400 in its 1B/7B math runs). Needs [`hfx.LiftRefreshCallback`] in the Trainer;
            ``None`` keeps the mask fixed (required under DeepSpeed ZeRO, FSDP and with a quantized base).
        sync_indices (`bool`):
            Broadcast the selected indices from rank 0 when ``torch.distributed`` is initialised, so every rank
            trains the same entries. Needs every rank to build the model; set ``False`` otherwise (the selection is
            deterministic anyway, up to ties and GPU non-determinism).
        target_modules (`list[str]` or `str`, *optional*):
            Names (suffix match) or a regex of the ``nn.Linear`` modules to adapt; ``"all-linear"`` (the paper's
            setting) selects every linear layer except the output head. Defaults to the architecture's LoRA targets.
        exclude_modules (`list[str]` or `str`, *optional*):
            Names or a regex of modules to leave alone.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only adapt these layer indices.
        layers_pattern (`str` or `list[str]`, *optional*):
            Name of the ``nn.ModuleList`` holding the layers, used with ``layers_to_transform``.
        bias (`str`):
            ``"none"``, ``"all"`` or ``"lift_only"``: which biases are trained and saved with the adapter.
        modules_to_save (`list[str]`, *optional*):
            Extra modules trained in full and saved with the adapter (e.g. a classifier head).
        show_progress (`bool`):
            Show a progress bar over the layers during selection (rank 0 only).
    """

    r: Optional[int] = field(
        default=None, metadata={"help": "Budget as a LoRA rank: k = min((m+n)*r, m*n); default 128."}
    )
    density: Optional[float] = field(
        default=None, metadata={"help": "Alternative budget: the fraction of entries of each matrix to train."}
    )
    filter_rank: int = field(default=128, metadata={"help": "Rank of the SVD approximation used for selection."})
    svd: Literal["lowrank", "full"] = field(
        default="lowrank", metadata={"help": "'lowrank' (randomised torch.svd_lowrank) or 'full' SVD."}
    )
    niter: int = field(default=4, metadata={"help": "Power iterations of the randomised SVD."})
    update_interval: Optional[int] = field(
        default=400,
        metadata={"help": "Re-select the mask every N optimizer steps (with hfx.LiftRefreshCallback); None: fixed."},
    )
    sync_indices: bool = field(
        default=True, metadata={"help": "Broadcast the indices from rank 0 under torch.distributed."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex of the nn.Linear layers to adapt, or 'all-linear'."},
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
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'lift_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the LIFT layers to train in full and save."}
    )
    show_progress: bool = field(default=True, metadata={"help": "Progress bar over layers during selection."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LIFT  # added to PEFT's enum by hfx._registry at import
        check_peft_fields(self, bias_only="lift_only")
        if self.r is not None and self.density is not None:
            raise ValueError(
                f"Give either `r` (budget as a LoRA rank) or `density` (fraction of entries), not both; got "
                f"r={self.r!r} and density={self.density!r}."
            )
        if self.density is not None:
            if not is_real(self.density):
                raise ValueError(f"`density` must be a number in (0, 1], got {self.density!r}.")
            if not 0.0 < float(self.density) <= 1.0:
                raise ValueError(f"`density` must be in (0, 1], got {self.density!r}.")
        elif self.r is None:
            self.r = DEFAULT_R
        if self.r is not None and not is_int(self.r, 1):
            raise ValueError(f"`r` (the budget as a LoRA rank) must be a positive integer, got {self.r!r}.")
        if not is_int(self.filter_rank, 1):
            raise ValueError(f"`filter_rank` must be a positive integer, got {self.filter_rank!r}.")
        if self.svd not in ("lowrank", "full"):
            raise ValueError(f"`svd` must be 'lowrank' or 'full', got {self.svd!r}.")
        if not is_int(self.niter, 0):
            raise ValueError(f"`niter` must be a non-negative integer, got {self.niter!r}.")
        if self.update_interval is not None and not is_int(self.update_interval, 1):
            raise ValueError(
                f"`update_interval` must be a positive integer or None (fixed mask), got {self.update_interval!r}."
            )

    def budget(self, out_features: int, in_features: int) -> int:
        """Number ``k`` of trained entries for an ``out_features x in_features`` weight."""
        total = out_features * in_features
        if self.density is not None:
            return min(total, max(1, round(float(self.density) * total)))
        return min((out_features + in_features) * self.r, total)
