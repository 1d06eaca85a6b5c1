"""Configuration of DSEE (Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
Models", ACL 2023, arXiv 2111.00160)."""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .._config import check_peft_fields, is_int, is_real

logger = logging.getLogger("hfx.dsee")
SPARSE_METHODS = ("auto", "grebsmo", "svd_residual", "magnitude", "random")


@dataclass
class DseeConfig(PeftConfig):
    """Configuration for a [`DseeModel`]: DSEE's sparsity-embedded update of the pre-trained weights.

    Per target weight ``W`` (``m x n``) the update is ``dW = s * (B A + S)`` with ``s = lora_alpha / r`` scaling both
    terms (the paper's Eq. 2 and its code): a LoRA part of rank ``r`` (``A ~ N(0, 0.02^2)``, ``B = 0``) and ``N``
    trainable sparse entries ``S`` (zero at init) at positions ``Omega`` taken from the sparse residual of a low-rank
    decomposition of ``W`` (Eq. 3-4). ``S`` is stored as values + sorted flat indices (``dsee_s_values``,
    ``dsee_s_indices``), never as a dense ``m x n`` tensor. Saved as PEFT type ``DSEE`` with prefix ``dsee_``. The
    second half of DSEE, sparse final weights, is [`hfx.tuners.dsee.prune`].

    Args:
        r (`int`): Rank of the LoRA part (16 in the paper's GLUE scripts).
        lora_alpha (`float`): ``s = lora_alpha / r`` scales the LoRA **and** the sparse term (32 in the scripts).
        lora_dropout (`float`): Dropout on the LoRA branch's input.
        num_sparse (`int`, *optional*): ``N``, sparse entries per matrix; exactly ``N`` are selected (ties never
            select more, spec REF-BUG). Defaults to 64 (the reference's prune scripts; its GLUE runs use 16) unless
            ``density`` is given. Must not exceed ``m * n``.
        density (`float`, *optional*): Alternative budget ``N = max(1, round(density * m * n))``, in ``(0, 1]``.
        sparse_method (`str`): Where ``Omega`` comes from. ``"grebsmo"``: the paper's GreBsmo-style decomposition
            ``W ~ U V + S`` (see [`grebsmo`]), then the ``N`` largest ``|W - U V|``. ``"svd_residual"``: ``W - W_K``
            with ``W_K`` the rank-``sparse_rank`` truncated SVD, then top-``N`` (fast). ``"magnitude"``: top-``N``
            ``|W|`` (the reference's ``omp``). ``"random"``: ``N`` uniformly random entries (seeded per layer name;
            the reference's ``rp``). ``"auto"`` (default): ``"grebsmo"`` for matrices with at most
            ``grebsmo_max_numel`` entries (``2**20``: BERT-base/large attention), ``"svd_residual"`` above (LLMs).
        sparse_rank (`int`): Rank of the low-rank part for ``grebsmo`` (the rank it grows to) and ``svd_residual``.
            Default 8. The reference's GreBsmo has no rank cap: it grows by 5 in each of its 100 iterations, to ~500
            on BERT-base's 768 x 768 (about 2/3 of full rank). hfx stops at ``sparse_rank`` instead, the same rank
            for both methods, so ``"auto"`` picks the same kind of support below and above ``grebsmo_max_numel``;
            ``sparse_rank=500`` (capped at ``min(m, n)``) reproduces the reference. ``Omega`` depends strongly on this
            choice (a synthetic 256 x 256 weight, N = 64: Jaccard overlap 0.20 between the supports at ranks 8, 64).
        grebsmo_max_iters (`int`): Cap on GreBsmo's outer iterations (the reference runs 100).
        grebsmo_rank_step (`int`): Rank added per outer GreBsmo iteration until ``sparse_rank`` (reference: 5).
        grebsmo_threshold (`float`): GreBsmo's hard threshold on ``S``, relative to the RMS of ``W``. The reference
            uses an absolute 0.01 (~0.25 RMS on BERT-base weights); 0.5 converges within the 100-iteration cap on
            low-rank + sparse test matrices where 0.25 does not (recall of the planted support 1.0 vs 0.77).
        grebsmo_max_numel (`int`): Largest ``m * n`` for which ``"auto"`` runs GreBsmo.
        seed (`int`): Seed of GreBsmo's initial ``V`` and of ``"random"`` (combined with the layer name).
        sync_indices (`bool`): Broadcast ``Omega`` from rank 0 when ``torch.distributed`` is initialised (as the
            reference does); the selection is deterministic anyway.
        init_lora_weights (`bool` or `"kaiming"`): ``True``: ``A ~ N(0, 0.02^2)`` as in the paper's code;
            ``"kaiming"``: PEFT LoRA's Kaiming-uniform ``A``. ``B = 0`` either way (output unchanged at init).
        target_modules (`list[str]` or `str`, *optional*): Names (suffix match) or a regex of the ``nn.Linear``
            modules to adapt. Defaults to the architecture's LoRA targets: query/value projections (the paper's
            choice): ``q_proj``/``v_proj`` for decoder LMs, ``query``/``value`` for BERT.
        exclude_modules, layers_to_transform, layers_pattern: As in PEFT's LoRA.
        bias (`str`): ``"none"``, ``"all"`` or ``"dsee_only"``.
        modules_to_save (`list[str]`, *optional*): Modules trained in full and saved (e.g. ``["classifier"]``).
        pruned (`bool`): Set by [`hfx.tuners.dsee.prune`], not by hand: the final weights are pruned, so every
            ``save_pretrained`` (Trainer checkpoints included) writes the pruning masks beside the adapter
            (``dsee_pruning.safetensors`` / ``.json``) and loading the adapter re-applies them to the base model.
    """

    r: int = field(default=16, metadata={"help": "Rank of the LoRA part."})
    lora_alpha: float = field(default=32, metadata={"help": "s = lora_alpha / r scales BA and S."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    num_sparse: Optional[int] = field(default=None, metadata={"help": "Sparse entries N per matrix; default 64."})
    density: Optional[float] = field(default=None, metadata={"help": "Alternative budget: fraction of entries."})
    sparse_method: Literal["auto", "grebsmo", "svd_residual", "magnitude", "random"] = field(
        default="auto", metadata={"help": "Selection of the sparse positions."}
    )
    sparse_rank: int = field(default=8, metadata={"help": "Rank of the low-rank part removed before top-N."})
    grebsmo_max_iters: int = field(default=100, metadata={"help": "Cap on GreBsmo's outer iterations."})
    grebsmo_rank_step: int = field(default=5, metadata={"help": "Rank added per GreBsmo outer iteration."})
    grebsmo_threshold: float = field(default=0.5, metadata={"help": "GreBsmo's threshold on S, times RMS(W)."})
    grebsmo_max_numel: int = field(default=2**20, metadata={"help": "'auto' runs GreBsmo up to this m*n."})
    seed: int = field(default=0, metadata={"help": "Seed of GreBsmo and of the random selection."})
    sync_indices: bool = field(default=True, metadata={"help": "Broadcast indices from rank 0."})
    init_lora_weights: Union[bool, Literal["kaiming"]] = field(
        default=True, metadata={"help": "True: A ~ N(0, 0.02^2) (paper); 'kaiming': PEFT's LoRA init."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffix match) or a regex of the nn.Linear layers to adapt."}
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
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'dsee_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the DSEE layers to train in full and save."}
    )
    pruned: bool = field(
        default=False, metadata={"help": "Set by hfx.dsee.prune: the pruning masks are saved and loaded with it."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.DSEE  # added to PEFT's enum by hfx._registry at import
        check_peft_fields(self, bias_only="dsee_only")
        if not is_int(self.r, 1):
            raise ValueError(f"`r` (rank of the LoRA part) must be a positive integer, got {self.r!r}.")
        if not is_real(self.lora_alpha) or not 0 < self.lora_alpha < math.inf:
            raise ValueError(
                f"`lora_alpha` must be a finite number > 0 (s = lora_alpha / r scales the update; 0 freezes it), got "
                f"{self.lora_alpha!r}."
            )
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if self.num_sparse is not None and self.density is not None:
            raise ValueError(
                f"Give either `num_sparse` or `density`, not both; got num_sparse={self.num_sparse!r} and "
                f"density={self.density!r}."
            )
        if self.density is not None:
            if not is_real(self.density):
                raise ValueError(f"`density` must be a number in (0, 1], got {self.density!r}.")
            if not 0.0 < float(self.density) <= 1.0:
                raise ValueError(f"`density` must be in (0, 1], got {self.density!r}.")
        else:
            if self.num_sparse is None:
                self.num_sparse = 64
            if not is_int(self.num_sparse, 1):
                raise ValueError(
                    f"`num_sparse` (sparse entries per matrix) must be a positive integer, got {self.num_sparse!r}; "
                    "for a LoRA-only update use PEFT's LoraConfig."
                )
        if self.sparse_method not in SPARSE_METHODS:
            raise ValueError(f"`sparse_method` must be one of {SPARSE_METHODS}, got {self.sparse_method!r}.")
        for name in ("sparse_rank", "grebsmo_max_iters", "grebsmo_rank_step", "grebsmo_max_numel"):
            if not is_int(getattr(self, name), 1):
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if not (isinstance(self.grebsmo_threshold, (int, float)) and 0 <= self.grebsmo_threshold < math.inf):
            raise ValueError(
                f"`grebsmo_threshold` must be a finite non-negative number, got {self.grebsmo_threshold!r}."
            )
        if self.init_lora_weights not in (True, False, "kaiming"):
            raise ValueError(f"`init_lora_weights` must be True, False or 'kaiming', got {self.init_lora_weights!r}.")
        if not isinstance(self.pruned, bool):
            raise ValueError(f"`pruned` must be a bool (it is set by hfx.dsee.prune), got {self.pruned!r}.")
        # The pruned model whose masks save_pretrained writes (a weak reference set by prune / load_pruning; never
        # serialised: not a dataclass field).
        self._pruned_model: Optional[weakref.ref] = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pruned_model"] = None  # a weak reference does not pickle; copies do not save the masks
        return state

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` and, once the model is pruned, its pruning masks next to it
        (``PeftModel.save_pretrained`` and so every Trainer checkpoint call this after writing the weights): the
        masks cannot be rebuilt from the adapter, since pruning scored weights that retraining changed."""
        model = self._pruned_model() if getattr(self, "_pruned_model", None) is not None else None
        if model is not None:
            from .prune import save_pruning

            save_pruning(model, save_directory)
        elif self.pruned:
            logger.warning(
                "DseeConfig(pruned=True) is saved without a pruned model attached (a copy of the config?), so no "
                "pruning masks are written to %s; save from the PeftModel that hfx.dsee.prune pruned.",
                save_directory,
            )
        super().save_pretrained(save_directory, **kwargs)

    def budget(self, out_features: int, in_features: int) -> int:
        """Number ``N`` of sparse entries for an ``out_features x in_features`` weight (not clipped: the layer raises
        a clear error when it exceeds ``m * n``)."""
        if self.density is not None:
            return min(out_features * in_features, max(1, round(float(self.density) * out_features * in_features)))
        return int(self.num_sparse)

    def method_for(self, out_features: int, in_features: int) -> str:
        """The selection method used for a weight of this shape (resolves ``"auto"``)."""
        if self.sparse_method != "auto":
            return self.sparse_method
        return "grebsmo" if out_features * in_features <= self.grebsmo_max_numel else "svd_residual"
