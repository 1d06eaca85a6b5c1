"""``LoraGAConfig``: a ``LoraConfig`` (peft type ``LORA``) whose A/B come from ``hfx.initialize``'s gradient SVD."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from peft import LoraConfig

from .._config import is_int, is_real, refuse_target_parameters

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "peft", "gd", "unit", "weightS")
EXPORTS = ("relative_to_base", "mutated_base")


@dataclass
class LoraGAConfig(LoraConfig):
    """LoRA-GA (Wang et al., arXiv 2407.05000): LoRA whose A/B are initialised from the SVD of the weight gradient.

    ``get_peft_model(base, LoraGAConfig(...))`` builds ordinary LoRA layers (default LoRA init); then
    ``hfx.initialize(peft_model, batches)`` estimates each target weight's gradient from the batches, sets A/B from
    its singular vectors and offsets the frozen weight (``W <- W - s*B*A``) so the model output is unchanged. Call it
    before the optimizer is built. ``save_pretrained`` writes a plain LoRA adapter for the *original* base weights
    (rank ``2r``: ``[B_t, -B_0] [A_t; A_0]``), which stock PEFT loads without hfx. Without ``hfx.initialize`` the
    adapter would train as a plain LoRA: the first training-mode forward warns. To resume a Trainer checkpoint, run
    ``hfx.initialize(model, [], init_from=<checkpoint>)`` first, then ``trainer.train(resume_from_checkpoint=...)``.

    The offset lives in the frozen base weights (as with PEFT's PiSSA/OLoRA inits): with the adapter disabled,
    unloaded or deleted, the model is the offset base, not the original one; load the base again for that. Hence one
    LoRA-GA adapter per model: ``hfx.initialize`` refuses a second one, and warns when other adapters share the
    target layers (their outputs move with the offset).

    Args:
        iters (`int`, *optional*): at most how many batches the gradient estimate uses (default 64: the original
            code's example runs 64, PEFT suggests 64-128); ``None``: all of them, which with
            ``trainer.get_train_dataloader()`` is a whole epoch of forward and backward passes before training.
        direction (`str`): which singular vectors go to A and B. ``"ArB2r"`` (paper default): A = V[:, :r]^T,
            B = U[:, r:2r]; ``"A2rBr"``: A = V[:, r:2r]^T, B = U[:, :r]; ``"ArBr"``: A takes the odd, B the even
            indices of the first 2r; ``"random"``: a random split of the first 2r between A and B (the original
            code's; PEFT's ``"random"`` gives A and B the same r indices, which covers only r of the 2r directions);
            seeded by ``seed``, identical on every rank.
        scale (`str`): ``"stable"`` (default, the paper's Algorithm 1): A and B both times d_out^(1/4)/sqrt(gamma),
            no singular values, meant for rsLoRA scaling (``use_rslora=True``, the default here). ``"peft"``: PEFT's
            ``scale="stable"``: B = U diag(S) d_out^(1/4)/sqrt(gamma), A unscaled. ``"gd"``: A/s, B/s with s the
            LoRA scaling. ``"unit"``: orthonormal A, B unchanged. ``"weightS"`` (the original code's option): A and B
            both times mean_i sqrt(sigma_i(W) / s) over the r largest singular values of the base weight W.
        stable_gamma (`float`): gamma of the stable scale (paper: 16; its scripts also use 64).
        norm_clip (`bool`): the original code's guard: where the offset s*B*A would exceed the base weight in its
            largest entry (max|s*B*A| > max|W|), shrink A and B by sqrt(max|W| / max|s*B*A|) so it does not.
        export (`str`): what ``save_pretrained`` writes. ``"relative_to_base"`` (default): the rank-2r LoRA for the
            original, un-offset base weights. ``"mutated_base"``: the rank-r adapter as trained, valid only together
            with the offset base weights (save those yourself).
        max_layers_per_pass (`int`, *optional*): bound the gradient-estimate memory to this many layers' m x n fp32
            accumulators by running one pass over the batches per group of layers (more passes, less memory).
            ``None``: all target layers in one pass.
        svd (`str`): ``"full"`` (exact ``torch.linalg.svd``) or ``"lowrank"`` (``torch.svd_lowrank`` with
            q = min(4r, min(m, n)), niter 4, seeded); ``"auto"`` picks full up to 4096 on the smaller side.
        seed (`int`): seed for ``svd="lowrank"`` and ``direction="random"``.
    """

    use_rslora: bool = field(default=True, metadata={"help": "rsLoRA scaling alpha/sqrt(r), as in the paper."})
    iters: int | None = field(default=64, metadata={"help": "Batches for the gradient estimate (None: all)."})
    direction: str = field(default="ArB2r", metadata={"help": f"One of {DIRECTIONS}."})
    scale: str = field(default="stable", metadata={"help": f"One of {SCALES}; 'stable' is the paper's."})
    stable_gamma: float = field(default=16.0, metadata={"help": "gamma of the stable scale."})
    norm_clip: bool = field(default=False, metadata={"help": "Shrink A, B where max|s*B*A| > max|W|."})
    export: str = field(default="relative_to_base", metadata={"help": f"One of {EXPORTS}."})
    max_layers_per_pass: int | None = field(default=None, metadata={"help": "Layers per estimation pass."})
    svd: str = field(default="auto", metadata={"help": "'full', 'lowrank' or 'auto'."})
    seed: int = field(default=0, metadata={"help": "Seed for svd='lowrank' and direction='random'."})

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_target_parameters(self, "LoRA-GA")
        if not is_int(self.r, 1):  # PEFT's LoraConfig does not check (a float failed deep in torch.empty)
            raise ValueError(f"LoraGAConfig.r must be an integer >= 1, got {self.r!r} ({type(self.r).__name__}).")
        bad = {k: v for k, v in (self.rank_pattern or {}).items() if not is_int(v, 1)}
        if bad:
            raise ValueError(f"LoraGAConfig.rank_pattern ranks must be integers >= 1, got {bad}.")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"LoraGAConfig.direction must be one of {DIRECTIONS}, got {self.direction!r}.")
        if self.scale not in SCALES:
            raise ValueError(f"LoraGAConfig.scale must be one of {SCALES}, got {self.scale!r}.")
        if self.export not in EXPORTS:
            raise ValueError(f"LoraGAConfig.export must be one of {EXPORTS}, got {self.export!r}.")
        if self.svd not in ("auto", "full", "lowrank"):
            raise ValueError(f"LoraGAConfig.svd must be 'auto', 'full' or 'lowrank', got {self.svd!r}.")
        if not is_real(self.stable_gamma) or not 0 < self.stable_gamma < math.inf:  # NaN fails too
            raise ValueError(f"LoraGAConfig.stable_gamma must be a finite number > 0, got {self.stable_gamma!r}.")
        if not isinstance(self.norm_clip, bool):
            raise ValueError(f"LoraGAConfig.norm_clip must be True or False, got {self.norm_clip!r}.")
        if self.iters is not None and not is_int(self.iters, 1):
            raise ValueError(f"LoraGAConfig.iters must be an int >= 1 or None (all batches), got {self.iters!r}.")
        if self.max_layers_per_pass is not None and not is_int(self.max_layers_per_pass, 1):
            raise ValueError(
                "LoraGAConfig.max_layers_per_pass must be an int >= 1 or None (all layers in one pass), got "
                f"{self.max_layers_per_pass!r}."
            )
        if not is_int(self.seed):
            raise ValueError(f"LoraGAConfig.seed must be an int, got {self.seed!r}.")
        if self.use_dora:
            raise ValueError("LoraGAConfig does not support use_dora=True (the DoRA magnitude breaks the offset).")
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                "LoraGAConfig sets A/B in hfx.initialize; leave init_lora_weights at True (got "
                f"{self.init_lora_weights!r})."
            )
        # {lora layer name in the PeftModel: (B_0, A_0)} once hfx.initialize ran; not a dataclass field, so it is
        # never serialised. save_pretrained uses it to export the adapter relative to the original base weights.
        self._loraga_init: dict[str, tuple[Any, Any]] = {}

    def to_lora_config(self, *, double_rank: bool = False) -> LoraConfig:
        """The plain ``LoraConfig`` hfx writes to ``adapter_config.json`` (no hfx fields; loads in stock PEFT).

        ``double_rank``: the rank-2r export: every rank doubles and every alpha is adjusted so the LoRA scaling of
        each layer is unchanged (x2 with alpha/r, x sqrt(2) with rsLoRA's alpha/sqrt(r)).
        """
        own = {f.name for f in fields(LoraGAConfig)} - {f.name for f in fields(LoraConfig)}
        kwargs = {f.name: getattr(self, f.name) for f in fields(LoraConfig) if f.init and f.name not in own}
        kwargs["init_lora_weights"] = True
        if double_rank:
            factor = 2**0.5 if self.use_rslora else 2.0
            kwargs["r"] = 2 * self.r
            kwargs["lora_alpha"] = self.lora_alpha * factor
            kwargs["rank_pattern"] = {k: 2 * v for k, v in (self.rank_pattern or {}).items()}
            kwargs["alpha_pattern"] = {k: v * factor for k, v in (self.alpha_pattern or {}).items()}
        cfg = LoraConfig(**kwargs)
        cfg.peft_type = self.peft_type
        cfg.base_model_name_or_path = self.base_model_name_or_path
        cfg.revision = self.revision
        cfg.inference_mode = self.inference_mode
        return cfg

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` as a plain LoRA config; with ``export="relative_to_base"`` after
        ``hfx.initialize``, first rewrite the adapter weights PEFT just saved in ``save_directory`` as the rank-2r
        LoRA for the original base weights (``PeftModel.save_pretrained`` writes the weights, then calls this)."""
        from .export import rewrite_saved_weights

        converted = False
        if self._loraga_init and self.export == "relative_to_base":
            converted = rewrite_saved_weights(save_directory, self)
        self.to_lora_config(double_rank=converted).save_pretrained(save_directory, **kwargs)
