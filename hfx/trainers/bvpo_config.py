"""Configuration of :class:`hfx.BVPOTrainer` (bias–variance optimised preference optimisation, arXiv 2510.05095)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ._checks import check_fields

__all__ = ["DEFAULT_EMPTY_THINK", "BVPOConfig"]

#: The "NoThinking" prefill of reasoning models (Qwen3's ``enable_thinking=False`` renders exactly this).
DEFAULT_EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclass
class BVPOConfig(DPOConfig):
    r"""Configuration for :class:`hfx.BVPOTrainer`: every :class:`trl.DPOConfig` argument plus the BVPO ones below.

    BVPO (Zhu et al., 2025, arXiv 2510.05095) trains a reasoning model with the convex combination
    ``L = α·L_trace + (1 − α)·L_empty`` of two DPO losses over the same prompts: ``L_trace`` on pairs sampled with
    reasoning on (trace + answer, columns ``prompt``/``chosen``/``rejected``) and ``L_empty`` on pairs sampled with
    reasoning off (empty trace, columns ``chosen_no_trace``/``rejected_no_trace``). Its gradient is
    ``g_c = α g_t + (1 − α) g_e`` (paper §3): the empty-trace estimator is biased but has low variance, the trace
    estimator the opposite, and the mix has lower mean-squared error than either (Thm 2).

    Parameters:
        bvpo_alpha (`float` or `"auto"`, defaults to `0.5`):
            Weight α of the trace loss, in ``[0, 1]``. The paper trains with a fixed 0.5. ``"auto"`` (an hfx
            extension, not in the paper) estimates the MSE-optimal α* of Thm 2 online from the two gradient
            estimators' statistics on a small parameter subset, see :class:`hfx.trainers.bvpo_trainer.AlphaEstimator`.
            The subset is small, reaching it is not: each step runs two extra partial backward passes (one per view)
            through the output layer, measured at 16–26 % of a step on CPU for a Llama-1B-proportioned model.
        chosen_no_trace_column (`str`, defaults to `"chosen_no_trace"`), rejected_no_trace_column
        (`str`, defaults to `"rejected_no_trace"`):
            Columns with the empty-trace (reasoning off) chosen / rejected answers.
        prompt_no_trace_column (`str`, defaults to `"prompt_no_trace"`):
            Optional column: a different prompt for the empty-trace view (else ``prompt`` is used). It is rendered
            with reasoning disabled like ``prompt``.
        no_trace_suffix (`str` or `None`, defaults to `None`):
            How the empty-trace prompt is rendered with reasoning disabled. Conversational prompts use the chat
            template's ``enable_thinking=False`` when the template supports it (the template output differs);
            otherwise this string (the empty think block, e.g. ``"<think>\n\n</think>\n\n"``) is appended to the
            rendered prompt. When neither is available, no-trace completions that already start with an empty
            think block (as the built-in ``hfx.data.preference_dataset(think=True)`` writes them) are used as they
            are; anything else is an error.
        strip_empty_think (`bool`, defaults to `True`):
            When the prompt carries the empty think block (template or suffix), remove a leading empty
            ``<think>…</think>`` block from the no-trace completions so that it is not doubled.
        bvpo_alpha_init (`float`, defaults to `0.5`):
            ``"auto"`` only: the α used until the estimator has ``bvpo_alpha_warmup_steps`` observations.
        bvpo_alpha_warmup_steps (`int`, defaults to `10`):
            ``"auto"`` only: observations before the estimate replaces ``bvpo_alpha_init``. One observation per
            optimizer step (the probe gradients averaged over its micro-batches and processes); α changes only
            between steps.
        bvpo_alpha_stats_decay (`float` or `None`, defaults to `0.95`):
            ``"auto"`` only: decay of the exponentially weighted gradient moments (``None``: plain running averages).
        bvpo_alpha_smoothing (`float`, defaults to `0.9`):
            ``"auto"`` only: exponential smoothing of the clipped α* estimate (0 = no smoothing).
        bvpo_alpha_modules (`list[str]` or `None`, defaults to `None`):
            ``"auto"`` only: names (or name suffixes) of the linear modules whose weight gradients form the
            parameter subset. ``None``: the last linear layer of the model body (e.g. the last ``down_proj``).
            The gradient is rebuilt from activations (``∇W = Σ_tokens δ ⊗ x``), so it works with PEFT and ZeRO-3.
        bvpo_alpha_max_rows (`int`, defaults to `64`):
            ``"auto"`` only: the subset keeps the first this many output rows of each module's weight gradient.
    """

    bvpo_alpha: float | str = field(
        default=0.5,
        metadata={"help": "Weight α of the trace loss in [0, 1] (paper: 0.5), or 'auto' (hfx extension: online α*)."},
    )
    chosen_no_trace_column: str = field(default="chosen_no_trace", metadata={"help": "Empty-trace chosen column."})
    rejected_no_trace_column: str = field(
        default="rejected_no_trace", metadata={"help": "Empty-trace rejected column."}
    )
    prompt_no_trace_column: str = field(
        default="prompt_no_trace", metadata={"help": "Optional prompt column for the empty-trace view."}
    )
    no_trace_suffix: str | None = field(
        default=None,
        metadata={"help": "Empty think block appended to the prompt when the chat template cannot disable thinking."},
    )
    strip_empty_think: bool = field(
        default=True, metadata={"help": "Drop a leading empty think block from no-trace completions."}
    )
    bvpo_alpha_init: float = field(default=0.5, metadata={"help": "'auto': α used during the warm-up."})
    bvpo_alpha_warmup_steps: int = field(default=10, metadata={"help": "'auto': observations before estimating."})
    bvpo_alpha_stats_decay: float | None = field(
        default=0.95, metadata={"help": "'auto': decay of the gradient-moment EMAs (None: running averages)."}
    )
    bvpo_alpha_smoothing: float = field(default=0.9, metadata={"help": "'auto': EMA smoothing of α (0 = none)."})
    bvpo_alpha_modules: list[str] | None = field(
        default=None, metadata={"help": "'auto': linear modules whose weight gradients form the subset."}
    )
    bvpo_alpha_max_rows: int = field(default=64, metadata={"help": "'auto': output rows kept per module."})

    def __post_init__(self):
        if isinstance(self.bvpo_alpha_modules, str):
            self.bvpo_alpha_modules = [m.strip() for m in self.bvpo_alpha_modules.split(",") if m.strip()]
        check_fields(self, {
            "chosen_no_trace_column": "str", "rejected_no_trace_column": "str", "prompt_no_trace_column": "str",
            "no_trace_suffix": "str?", "strip_empty_think": "bool", "bvpo_alpha_init": "number",
            "bvpo_alpha_warmup_steps": "int", "bvpo_alpha_stats_decay": "number?", "bvpo_alpha_smoothing": "number",
            "bvpo_alpha_modules": "list[str]?", "bvpo_alpha_max_rows": "int",
        })  # fmt: skip
        alpha = self.bvpo_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (str, int, float)):
            raise ValueError(f"BVPOConfig.bvpo_alpha must be a float in [0, 1] or 'auto', got {alpha!r}")
        if isinstance(alpha, str):
            if alpha.strip().lower() == "auto":
                self.bvpo_alpha = "auto"
            else:
                try:
                    self.bvpo_alpha = float(alpha)  # the CLI passes numbers as strings
                except ValueError:
                    raise ValueError(f"bvpo_alpha must be a float in [0, 1] or 'auto', got {alpha!r}") from None
        if self.bvpo_alpha != "auto":
            self.bvpo_alpha = float(self.bvpo_alpha)
            if not 0.0 <= self.bvpo_alpha <= 1.0:
                raise ValueError(f"bvpo_alpha must be in [0, 1] (or 'auto'), got {self.bvpo_alpha}")
        if not 0.0 <= self.bvpo_alpha_init <= 1.0:
            raise ValueError(f"bvpo_alpha_init must be in [0, 1], got {self.bvpo_alpha_init}")
        if self.bvpo_alpha_stats_decay is not None and not 0.0 < self.bvpo_alpha_stats_decay < 1.0:
            raise ValueError(f"bvpo_alpha_stats_decay must be in (0, 1) or None, got {self.bvpo_alpha_stats_decay}")
        if not 0.0 <= self.bvpo_alpha_smoothing < 1.0:
            raise ValueError(f"bvpo_alpha_smoothing must be in [0, 1), got {self.bvpo_alpha_smoothing}")
        if self.bvpo_alpha_warmup_steps < 1 or self.bvpo_alpha_max_rows < 1:
            raise ValueError("bvpo_alpha_warmup_steps and bvpo_alpha_max_rows must be >= 1")
        super().__post_init__()
