"""``EvaConfig``: a ``LoraConfig`` (peft type ``LORA``) whose A and ranks come from ``hfx.initialize``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from peft import LoraConfig

from .._config import is_int, is_real, refuse_target_parameters


@dataclass
class EvaConfig(LoraConfig):
    """EVA (Paischer et al., arXiv 2410.07170): explained-variance adaptation, a data-driven LoRA initialisation.

    ``get_peft_model(base, EvaConfig(...))`` builds ordinary LoRA layers; ``hfx.initialize(peft_model, batches)``
    then runs the data-driven step, before the optimizer is built: the principal components of each target layer's
    input activations (real tokens only) are computed incrementally over the batches until they stop changing; every
    layer's rank is re-distributed by explained variance under the total budget (sum of the configured ranks); A gets
    the top components (rows), B = 0, so the model output is unchanged. The result is a plain LoRA adapter
    (``peft_type: LORA``, ``rank_pattern``/``alpha_pattern`` filled in): ``save_pretrained`` writes a stock
    ``LoraConfig`` that PEFT loads without hfx. Without ``hfx.initialize`` the adapter would train as a plain LoRA:
    the first training-mode forward warns. To resume a Trainer checkpoint, run ``hfx.initialize(model, [], init_from=<checkpoint>)``
    first (it reads the ranks from the checkpoint, no batches needed), then ``trainer.train(resume_from_checkpoint=...)``.

    Args:
        rho (`float`): each layer may take up to ``round(r * rho)`` components (>= 1; 1 = no redistribution).
        tau (`float`): convergence threshold: a layer is done when the cosine similarity between consecutive
            iterations' components is >= tau for each component it needs (0 < tau <= 1).
        max_iterations (`int`): hard cap on the number of batches (per process); unconverged layers then keep the
            components of the last iteration and a warning names them.
        whiten (`bool`): divide each A row by the square root of its singular value (PEFT's/the original's whitening).
        center (`bool`): principal components of mean-centred activations (PCA, as PEFT and the original code do);
            ``False``: right-singular vectors of the raw (uncentred) activations.
        use_label_mask (`bool`): use only tokens whose label is not ``label_mask_value`` (when batches carry
            ``labels``); padding (``attention_mask == 0``) is always excluded.
        label_mask_value (`int`): the ignore index of the labels.
        adjust_scaling_factors (`bool`): keep alpha/r per layer: alpha_l = lora_alpha * r_l / r (written to
            ``alpha_pattern``); ``False`` keeps lora_alpha, so the scaling varies with the rank.
        rank_budget (`int`, *optional*): total rank over all target layers; ``None``: the sum of the configured
            ranks (r * number of layers without ``rank_pattern``).
        min_rank (`int`): smallest rank a layer may get; 0 lets EVA drop a layer's adapter (as PEFT does).
        solver (`str`): ``"eigh"`` (exact eigendecomposition of the covariance), ``"subspace"`` (warm-started block
            power iteration, cheaper for wide layers) or ``"auto"`` (eigh up to ``in_features`` 2048).
        stats_device (`str`, *optional*): device of the per-layer d x d statistics (default: the activations').
    """

    rho: float = field(default=2.0, metadata={"help": "Max components per layer: round(r * rho)."})
    tau: float = field(default=0.99, metadata={"help": "Cosine-similarity convergence threshold."})
    max_iterations: int = field(default=100, metadata={"help": "Hard cap on the number of batches."})
    whiten: bool = field(default=False, metadata={"help": "Divide A rows by sqrt(singular value)."})
    center: bool = field(default=True, metadata={"help": "PCA of centred activations (False: uncentred SVD)."})
    use_label_mask: bool = field(default=True, metadata={"help": "Skip tokens with label == label_mask_value."})
    label_mask_value: int = field(default=-100, metadata={"help": "Ignore index of the labels."})
    adjust_scaling_factors: bool = field(default=True, metadata={"help": "alpha_l = lora_alpha * r_l / r."})
    rank_budget: int | None = field(default=None, metadata={"help": "Total rank (None: sum of configured ranks)."})
    min_rank: int = field(default=0, metadata={"help": "Smallest rank per layer (0 may drop a layer)."})
    solver: str = field(default="auto", metadata={"help": "'eigh', 'subspace' or 'auto'."})
    stats_device: str | None = field(default=None, metadata={"help": "Device of the d x d statistics."})

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_target_parameters(self, "EVA")
        # types first, so that a wrong type (e.g. a string from a CLI) gets a message naming the field, not a bare
        # TypeError from one of the comparisons below (ValueError, as for the other hfx configs)
        for name in ("rho", "tau"):
            value = getattr(self, name)
            if not is_real(value):
                raise ValueError(f"EvaConfig.{name} must be a number, got {value!r} ({type(value).__name__}).")
        if not is_int(self.r, 1):  # PEFT's LoraConfig does not check
            raise ValueError(f"EvaConfig.r must be an integer >= 1, got {self.r!r} ({type(self.r).__name__}).")
        if not is_int(self.label_mask_value):
            raise ValueError(
                f"EvaConfig.label_mask_value must be an integer (the labels' ignore index, -100), got "
                f"{self.label_mask_value!r} ({type(self.label_mask_value).__name__})."
            )
        if self.stats_device is not None:
            try:
                torch.device(self.stats_device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"EvaConfig.stats_device must be a torch device such as 'cpu' or 'cuda:0' (or None: the "
                    f"activations' device), got {self.stats_device!r}."
                ) from None
        for name, optional in (("max_iterations", False), ("min_rank", False), ("rank_budget", True)):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not is_int(value):
                raise ValueError(
                    f"EvaConfig.{name} must be an integer{' or None' if optional else ''}, got {value!r} "
                    f"({type(value).__name__})."
                )
        if not 1 <= self.rho < math.inf:  # NaN fails too
            raise ValueError(f"EvaConfig.rho must be >= 1 and finite, got {self.rho}.")
        if not 0 < self.tau <= 1:
            raise ValueError(f"EvaConfig.tau must be in (0, 1], got {self.tau}.")
        if self.max_iterations < 2:
            raise ValueError(
                f"EvaConfig.max_iterations must be >= 2 (convergence compares iterations), got {self.max_iterations}."
            )
        if self.min_rank < 0:
            raise ValueError(f"EvaConfig.min_rank must be >= 0, got {self.min_rank}.")
        if self.rank_budget is not None and self.rank_budget < 1:
            raise ValueError(f"EvaConfig.rank_budget must be >= 1, got {self.rank_budget}.")
        if self.solver not in ("auto", "eigh", "subspace"):
            raise ValueError(f"EvaConfig.solver must be 'auto', 'eigh' or 'subspace', got {self.solver!r}.")
        if self.use_dora:
            raise ValueError("EvaConfig does not support use_dora=True (EVA resizes the LoRA layers).")
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"EvaConfig sets A in hfx.initialize; leave init_lora_weights at True (got {self.init_lora_weights!r})."
            )
        if self.eva_config is not None:
            raise ValueError("EvaConfig takes its EVA settings as its own fields; leave eva_config (PEFT's) unset.")

    def to_lora_config(self) -> LoraConfig:
        """The plain ``LoraConfig`` written to ``adapter_config.json``: no hfx fields, loads in stock PEFT."""
        own = {f.name for f in fields(EvaConfig)} - {f.name for f in fields(LoraConfig)}
        kwargs = {f.name: getattr(self, f.name) for f in fields(LoraConfig) if f.init and f.name not in own}
        kwargs["init_lora_weights"] = True
        cfg = LoraConfig(**kwargs)
        cfg.peft_type = self.peft_type
        cfg.base_model_name_or_path = self.base_model_name_or_path
        cfg.revision = self.revision
        cfg.inference_mode = self.inference_mode
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A plain LoRA config dict (no EVA fields), so that every serialisation path stays stock-PEFT loadable."""
        return self.to_lora_config().to_dict()
