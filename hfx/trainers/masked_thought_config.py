"""Configuration of :class:`hfx.MaskedThoughtTrainer` (Masked Thought SFT, Chen et al., ACL 2024, arXiv 2403.02178)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ._checks import check_fields

__all__ = ["MASK_SCOPES", "MaskedThoughtConfig"]

MASK_SCOPES = ("completion", "think")


@dataclass
class MaskedThoughtConfig(SFTConfig):
    r"""Configuration for :class:`hfx.MaskedThoughtTrainer`: every :class:`trl.SFTConfig` argument plus the ones below.

    Masked Thought fine-tuning (MFT) trains on ``L_MFT = −Σ_t log p(w_t | w^s_{<t})``, where the *input* ``w^s`` is
    the ground truth ``w`` with each target (chain-of-thought / answer) token replaced by a mask token with
    probability ``p`` (``M_t ~ Bernoulli(p)``) and the targets stay the ground truth. The prompt is never masked.
    ``p`` grows linearly from 0 to ``mask_rate`` over the first ``mask_warmup_ratio`` of the training steps, then stays.

    Parameters:
        mask_rate (`float`, defaults to `0.2`):
            ``p_max`` in ``[0, 1]``. The paper uses 0.2 with a ``<mask>`` token (MATH, MetaMathQA, MathInstruct) and
            0.4 with random tokens (GSM8K). ``0`` is plain SFT.
        mask_warmup_ratio (`float`, defaults to `2/3`):
            Fraction of the total training steps over which ``p`` rises linearly from 0 to ``mask_rate`` (the
            paper's ``mask_rate_warmup_ratio``); ``0`` masks at ``mask_rate`` from the first step.
        mask_token (`str`, defaults to `"<mask>"`):
            What replaces a masked token: a token string of the tokenizer (``"<mask>"``: a dedicated token, add it with
            :func:`hfx.trainers.add_mask_token` before building the trainer), ``"pad"`` (the pad token, which the
            authors' README allows) or ``"random"`` (a uniformly drawn non-special vocabulary token per position, the
            authors' GSM8K script).
        mask_scope (`str`, defaults to `"completion"`):
            ``"completion"``: every completion (loss) token may be masked, as in the paper. ``"think"`` (hfx
            extension, for reasoning models): only completion tokens inside ``<think>…</think>`` blocks.
        think_start_token (`str`, defaults to `"<think>"`), think_end_token (`str`, defaults to `"</think>"`):
            The reasoning delimiters for ``mask_scope="think"``; each must be a single token of the tokenizer (the
            end token is required, the start token may be absent from a sequence, see the trainer).
        mask_seed (`int` or `None`, defaults to `None`):
            Seed of the masking noise (``None``: the config's ``seed``). The noise of a micro-batch is a function of
            ``(mask_seed, global step, process index, micro-step)``, so it is reproducible and resumes exactly.
    """

    mask_rate: float = field(
        default=0.2, metadata={"help": "Maximum probability p_max of masking a completion input token, in [0, 1]."}
    )
    mask_warmup_ratio: float = field(
        default=2 / 3, metadata={"help": "Fraction of training over which p rises linearly from 0 to mask_rate."}
    )
    mask_token: str = field(
        default="<mask>",
        metadata={"help": "Replacement: a token string (e.g. '<mask>'), 'pad', or 'random' (random vocab tokens)."},
    )
    mask_scope: str = field(
        default="completion",
        metadata={"help": "'completion' (all loss tokens) or 'think' (only loss tokens inside <think>...</think>)."},
    )
    think_start_token: str = field(default="<think>", metadata={"help": "Start of a reasoning block."})
    think_end_token: str = field(default="</think>", metadata={"help": "End of a reasoning block."})
    mask_seed: int | None = field(
        default=None, metadata={"help": "Seed of the masking noise (default: the config's seed)."}
    )

    def __post_init__(self):
        check_fields(self, {
            "mask_rate": "number", "mask_warmup_ratio": "number", "mask_token": "str", "mask_scope": "str",
            "think_start_token": "str", "think_end_token": "str", "mask_seed": "int?",
        })  # fmt: skip
        self.mask_rate = float(self.mask_rate)
        self.mask_warmup_ratio = float(self.mask_warmup_ratio)
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"mask_rate must be in [0, 1] (the paper uses 0.2 or 0.4), got {self.mask_rate}")
        if not 0.0 <= self.mask_warmup_ratio <= 1.0:
            raise ValueError(f"mask_warmup_ratio must be in [0, 1] (the paper uses 2/3), got {self.mask_warmup_ratio}")
        if not isinstance(self.mask_token, str) or not self.mask_token:
            raise ValueError(f"mask_token must be a token string, 'pad' or 'random', got {self.mask_token!r}")
        if self.mask_scope not in MASK_SCOPES:
            raise ValueError(f"mask_scope must be one of {list(MASK_SCOPES)}, got {self.mask_scope!r}")
        super().__post_init__()
