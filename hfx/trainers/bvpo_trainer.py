"""BVPO: bias–variance optimised preference optimisation for reasoning models (Zhu et al., 2025, arXiv 2510.05095).

A reasoning model answers ``x`` with a trace ``r`` then an answer ``y``. The DPO objective one wants uses the marginal
``π(y|x) = Σ_r π(r, y|x)``, which is intractable. BVPO combines two estimators of its gradient (paper §3):

- the trace loss ``ℓ_t`` — standard DPO on pairs sampled with reasoning on (trace + answer, joint likelihood):
  unbiased-ish but high variance, since the sampled trace adds noise;
- the empty-trace loss ``ℓ_e`` — DPO on pairs sampled with reasoning off (``r = ∅``): low variance, biased;

and trains on ``L = α·L_t + (1 − α)·L_e`` (gradient ``g_c = α g_t + (1 − α) g_e``). The conditional variance of
``g_c`` is ``α²·Var(g_t)`` (Thm 1); the MSE-optimal

    α* = E⟨d_e, d_e − d_t⟩ / E‖d_t − d_e‖²,    d_t = g_t − μ, d_e = g_e − μ  (Thm 2),

gives an MSE no larger than either estimator alone. The paper trains with a fixed α = 0.5 (App. C.1); hfx also offers
``bvpo_alpha="auto"``, an online estimate of α* (:class:`AlphaEstimator`) — an hfx extension, not the paper's method.

Implementation on TRL 1.x: each row is tokenised twice (the trace view by :class:`trl.DPOTrainer` itself, the
empty-trace view by :func:`tokenize_empty_view` into ``empty_*`` columns); :class:`BVPODataCollator` pads both views of
the same rows into ``{"trace": batch, "empty": batch}``; :meth:`BVPOTrainer.compute_loss` runs the parent's
``_compute_loss`` once per view (two forwards, one backward) and mixes them. The reference is whatever DPO uses (a
reference model, the PEFT base with the adapter disabled, or precomputed log-probs — computed for both views).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import textwrap
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset, concatenate_datasets
from transformers import TrainerCallback
from trl import DPOTrainer
from trl.data_utils import is_conversational

from ._data import check_not_empty
from ._divergence import DivergenceCheckMixin
from ._state import read_state_json, read_state_tensors, write_state_file, write_state_json
from .bvpo_config import BVPOConfig

__all__ = [
    "AlphaEstimator",
    "BVPODataCollator",
    "BVPOTrainer",
    "closed_form_alpha",
    "template_can_disable_thinking",
    "tokenize_empty_view",
]

logger = get_logger(__name__)

EMPTY_PREFIX = "empty_"
_VIEW_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
EMPTY_KEYS = tuple(EMPTY_PREFIX + k for k in _VIEW_KEYS)
STATE_JSON = "bvpo_state.json"
STATE_TENSORS = "bvpo_state.safetensors"
#: A leading empty think block (any whitespace inside and after it).
EMPTY_THINK_RE = re.compile(r"^\s*<think>\s*</think>\s*")


def _warn_anywhere(message: str) -> None:
    """``logger.warning`` (main process only) inside a run; plain :mod:`logging` where no accelerate state exists,
    e.g. an :class:`AlphaEstimator` used on its own (accelerate's logger refuses to log there)."""
    from accelerate.state import PartialState

    if PartialState._shared_state:
        logger.warning(message)
    else:
        logging.getLogger(__name__).warning(message)


# --------------------------------------------------------------------------------------------------------------------
# α*: closed form and online estimator
# --------------------------------------------------------------------------------------------------------------------
def closed_form_alpha(
    trace_var: float,
    empty_var: float,
    cross_cov: float,
    trace_bias: torch.Tensor | float = 0.0,
    empty_bias: torch.Tensor | float = 0.0,
    clip: bool = True,
) -> float | None:
    """The MSE-optimal mixing weight of Thm 2 from the estimators' biases and (traced) covariances.

    ``α* = (tr Σ_e − tr Σ_te + ‖b_e‖² − b_tᵀb_e) / (tr Σ_t + tr Σ_e − 2 tr Σ_te + ‖b_t − b_e‖²)`` — the minimiser of
    ``E‖α g_t + (1 − α) g_e − μ‖²``. Returns ``None`` when the denominator ``E‖g_t − g_e‖²`` is not positive (the
    two estimators coincide, any α is optimal); clipped to ``[0, 1]`` unless ``clip=False``.
    """
    b_t = torch.as_tensor(trace_bias, dtype=torch.float64)
    b_e = torch.as_tensor(empty_bias, dtype=torch.float64)
    num = empty_var - cross_cov + float((b_e * b_e).sum()) - float((b_t * b_e).sum())
    den = trace_var + empty_var - 2.0 * cross_cov + float(((b_t - b_e) ** 2).sum())
    if not den > 1e-30:
        return None
    alpha = num / den
    return min(1.0, max(0.0, alpha)) if clip else alpha


class AlphaEstimator:
    """Online estimate of BVPO's MSE-optimal α* (Thm 2) from a stream of paired gradients ``(g_t, g_e)``.

    hfx extension (the paper fixes α = 0.5). The true marginal gradient μ is unknown; it is approximated by the
    running mean of the trace gradients (the trace estimator is the unbiased one), so ``b_t = 0`` and
    ``b_e = m_e − m_t``, and α* reduces to ``E⟨g_e − m_t, g_e − g_t⟩ / E‖g_t − g_e‖²``. Moments are exponentially
    weighted sums (``decay``; ``None`` = plain running averages over all updates), kept in float64: the means
    ``m_t``, ``m_e`` (vectors) and the traced second moments ``E‖g_t‖²``, ``E‖g_e‖²``, ``E⟨g_t, g_e⟩`` (scalars).
    After ``warmup`` updates the clipped estimate is smoothed into :attr:`alpha` (``α ← s·α + (1 − s)·α*``).

    A pair with a NaN/inf entry (an overflowing or diverging step) is skipped with a warning and counted in
    :attr:`num_skipped`: added to the running sums it would make every later moment NaN, so α would freeze for the
    rest of training without a word.
    """

    def __init__(self, init: float = 0.5, decay: float | None = 0.95, smoothing: float = 0.9, warmup: int = 10):
        self.init, self.decay, self.smoothing, self.warmup = float(init), decay, float(smoothing), int(warmup)
        self.alpha = float(init)  # the smoothed value in use
        self.last_estimate: float | None = None  # the latest clipped α*, before smoothing
        self.num_updates = 0
        self.num_skipped = 0  # observations dropped for being non-finite
        self.weight = 0.0
        self.sum_t: torch.Tensor | None = None
        self.sum_e: torch.Tensor | None = None
        self.sq_t = self.sq_e = self.sq_te = 0.0

    def update(self, g_t: torch.Tensor, g_e: torch.Tensor) -> float:
        """Add one pair of gradients (same shape, flattened here); return the α to use from now on."""
        g_t = g_t.detach().reshape(-1).to(torch.float64)
        g_e = g_e.detach().reshape(-1).to(torch.float64)
        if g_t.shape != g_e.shape:
            raise ValueError(f"trace and empty-trace gradients differ in shape: {g_t.shape} vs {g_e.shape}")
        if self.sum_t is not None and self.sum_t.shape != g_t.shape:
            raise ValueError(f"gradient size changed from {self.sum_t.numel()} to {g_t.numel()}")
        squares = (float(g_t @ g_t), float(g_e @ g_e), float(g_t @ g_e))
        # the squares also catch finite entries whose products overflow float64
        if not all(math.isfinite(v) for v in squares):
            self.num_skipped += 1
            _warn_anywhere(
                f"bvpo_alpha='auto': a non-finite gradient observation (NaN/inf in the trace or empty-trace probe "
                f"gradient) was skipped ({self.num_skipped} so far); α stays at {self.alpha:.4g} and the estimator "
                "keeps its previous statistics. If this repeats, the loss itself is diverging: lower the learning "
                "rate, or train in bf16/fp32 rather than fp16."
            )
            return self.alpha
        keep = 1.0 if self.decay is None else self.decay
        if self.sum_t is None:
            self.sum_t, self.sum_e = torch.zeros_like(g_t), torch.zeros_like(g_e)
        self.sum_t = self.sum_t.to(g_t.device) * keep + g_t
        self.sum_e = self.sum_e.to(g_e.device) * keep + g_e
        self.sq_t = self.sq_t * keep + squares[0]
        self.sq_e = self.sq_e * keep + squares[1]
        self.sq_te = self.sq_te * keep + squares[2]
        self.weight = self.weight * keep + 1.0
        self.num_updates += 1
        if self.num_updates >= self.warmup:
            estimate = self.estimate()
            if estimate is not None:
                self.last_estimate = estimate
                self.alpha = self.smoothing * self.alpha + (1.0 - self.smoothing) * estimate
        return self.alpha

    def moments(self) -> dict[str, Any]:
        """Weighted means and traced (co)variances of the two gradient streams."""
        if self.sum_t is None:
            raise ValueError("no gradients observed yet")
        m_t, m_e = self.sum_t / self.weight, self.sum_e / self.weight
        return {
            "mean_trace": m_t,
            "mean_empty": m_e,
            "trace_var": self.sq_t / self.weight - float(m_t @ m_t),
            "empty_var": self.sq_e / self.weight - float(m_e @ m_e),
            "cross_cov": self.sq_te / self.weight - float(m_t @ m_e),
        }

    def estimate(self) -> float | None:
        """The clipped α* from the current moments (μ ≈ mean of the trace gradients), unsmoothed."""
        m = self.moments()
        return closed_form_alpha(
            m["trace_var"], m["empty_var"], m["cross_cov"], 0.0, m["mean_empty"] - m["mean_trace"], clip=True
        )

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able scalars, tensors) — what a checkpoint needs to resume exactly."""
        scalars = {
            "alpha": self.alpha,
            "last_estimate": self.last_estimate,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "weight": self.weight,
            "sq_t": self.sq_t,
            "sq_e": self.sq_e,
            "sq_te": self.sq_te,
            "init": self.init,
            "decay": self.decay,
            "smoothing": self.smoothing,
            "warmup": self.warmup,
        }
        tensors = {} if self.sum_t is None else {"sum_t": self.sum_t.cpu(), "sum_e": self.sum_e.cpu()}
        return scalars, tensors

    def load_state_dict(self, scalars: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.alpha = float(scalars["alpha"])
        self.last_estimate = scalars.get("last_estimate")
        self.num_updates = int(scalars["num_updates"])
        self.num_skipped = int(scalars.get("num_skipped", 0))  # absent from checkpoints of older hfx versions
        self.weight = float(scalars["weight"])
        self.sq_t, self.sq_e, self.sq_te = float(scalars["sq_t"]), float(scalars["sq_e"]), float(scalars["sq_te"])
        self.sum_t = tensors["sum_t"].to(torch.float64) if "sum_t" in tensors else None
        self.sum_e = tensors["sum_e"].to(torch.float64) if "sum_e" in tensors else None


def _reentrant_checkpointing(model: torch.nn.Module) -> bool:
    """Whether a layer of ``model`` runs under transformers' gradient checkpointing in reentrant mode (torch's
    ``checkpoint`` without ``use_reentrant=False``)."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) is True and func is not None:
            keywords = getattr(func, "keywords", None) or {}
            if keywords.get("use_reentrant", True) is not False:
                return True
    return False


class _GradientProbe:
    """Rebuilds weight gradients of a few linear modules from activations: ``∇W = Σ_tokens δ ⊗ x``.

    Forward hooks keep each module's input ``x`` and output while a view is being computed; ``torch.autograd.grad``
    of that view's loss w.r.t. the outputs gives ``δ``. Only activations are touched, never parameters, so this works
    with PEFT wrappers (the gradient of the effective weight) and with ZeRO-3 partitioned parameters (the hooks go on
    at the first probed step, after DeepSpeed's, see :meth:`attach`; tests/dist/test_trainers_zero3.py).
    Recomputation under gradient checkpointing runs outside the capture window and is ignored.
    """

    def __init__(self, modules: list[tuple[str, torch.nn.Module]], max_rows: int):
        self.names = [n for n, _ in modules]
        self.max_rows = max_rows
        self.active: str | None = None
        self.records: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.modules = modules
        self.handles: list[Any] = []

    def attach(self) -> None:
        """Register the forward hooks, at the first probed step: after the engine's own hooks (DeepSpeed ZeRO-3 wraps
        a module's output to gather its weights for backward; the probe must read the wrapped output, or its extra
        backward runs that wrapper and the main backward finds the weights released)."""
        if not self.handles:
            self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules]

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.active is None or not torch.is_grad_enabled():
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                return
            self.records.setdefault(self.active, {}).setdefault(name, (args[0].detach(), out))

        return hook

    def pop(self, view: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.records.pop(view, {})

    def gradient(
        self, loss: torch.Tensor, records: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor | None:
        names = [n for n in self.names if n in records and records[n][1].requires_grad]
        if not names:
            return None
        outs = [records[n][1] for n in names]
        deltas = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
        parts = []
        for n, delta in zip(names, deltas):
            if delta is None:
                return None
            x = records[n][0]
            rows = min(self.max_rows, delta.shape[-1])
            d = delta.reshape(-1, delta.shape[-1])[:, :rows].float()
            parts.append((d.T @ x.reshape(-1, x.shape[-1]).float()).reshape(-1))
        return torch.cat(parts)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# --------------------------------------------------------------------------------------------------------------------
# The empty-trace view
# --------------------------------------------------------------------------------------------------------------------
def template_can_disable_thinking(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a different generation prompt for ``enable_thinking=False``."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    messages = [{"role": "user", "content": "hi"}]
    try:
        on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        off = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    except Exception:  # a template that fails on extra kwargs cannot disable thinking either
        return False
    return on != off


def _completion_head(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    for message in completion or []:
        if message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def resolve_no_trace_mode(example: Mapping[str, Any], tokenizer: Any, args: BVPOConfig) -> str:
    """How the empty-trace view disables reasoning: ``"template"``, ``"suffix"`` or ``"completion"`` (see the config).

    Raises ``ValueError`` when there is no way: a chat template without ``enable_thinking`` (or plain prompts), no
    ``no_trace_suffix``, and no-trace completions that do not themselves start with an empty think block.
    """
    conversational = is_conversational(example)
    if conversational and template_can_disable_thinking(tokenizer):
        return "template"
    if args.no_trace_suffix is not None:
        return "suffix"
    heads = [_completion_head(example[c]) for c in (args.chosen_no_trace_column, args.rejected_no_trace_column)]
    if all(EMPTY_THINK_RE.match(h) for h in heads):
        return "completion"
    where = "the chat template has no `enable_thinking` switch" if conversational else "plain-text prompts have no "
    where += "" if conversational else "chat template"
    raise ValueError(
        f"BVPO renders the empty-trace prompt with reasoning disabled, but {where} and no empty-trace string is given "
        "(and the no-trace completions do not start with an empty think block). Set `BVPOConfig(no_trace_suffix=...)` "
        "to your model's empty think block, e.g. '<think>\\n\\n</think>\\n\\n', or use a chat template that honours "
        "`enable_thinking=False`."
    )


def _render_conversational(
    prompt: list, completion: list, tokenizer: Any, kwargs: dict[str, Any], mode: str, suffix: str | None
) -> tuple[str, str]:
    off = {**kwargs, "enable_thinking": False} if mode == "template" else kwargs
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **off)
    if mode == "suffix" and suffix and not prompt_text.endswith(suffix):
        prompt_text += suffix
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False, **off)
    plain_gen = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    # Templates that render the empty block in the final assistant turn too (Qwen3) start `full` with the whole
    # thinking-disabled prompt; others (ChatML-like) with the plain generation prompt.
    for head in (prompt_text, plain_gen):
        if full.startswith(head):
            return prompt_text, full[len(head) :]
    return prompt_text, full[len(os.path.commonprefix([full, plain_gen])) :]


def tokenize_empty_view(
    example: dict[str, Any],
    tokenizer: Any,
    mode: str,
    suffix: str | None,
    strip_empty_think: bool,
    chosen_column: str,
    rejected_column: str,
    prompt_column: str,
) -> dict[str, list[int]]:
    """Tokenise one row's empty-trace view into ``empty_prompt_ids`` / ``empty_chosen_ids`` / ``empty_rejected_ids``.

    Mirrors :class:`trl.DPOTrainer`'s tokenisation (EOS appended to plain completions, the completion starting where
    the tokenised prompt and prompt+completion diverge) after rendering the prompt with reasoning disabled.
    """
    prompt = example.get(prompt_column) if example.get(prompt_column) is not None else example["prompt"]
    completions = [example[chosen_column], example[rejected_column]]
    strip = strip_empty_think and mode in ("template", "suffix")
    if is_conversational(example):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        texts = [_render_conversational(prompt, c, tokenizer, kwargs, mode, suffix) for c in completions]
        prompt_text = texts[0][0]
        completion_texts = [t for _, t in texts]
        special = False  # the template already wrote any BOS
    else:
        prompt_text = prompt + (suffix if mode == "suffix" and suffix and not prompt.endswith(suffix) else "")
        completion_texts = [c if c.endswith(tokenizer.eos_token) else c + tokenizer.eos_token for c in completions]
        special = True
    if strip:
        completion_texts = [EMPTY_THINK_RE.sub("", c, count=1) for c in completion_texts]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    full_ids = [tokenizer(prompt_text + c, add_special_tokens=special)["input_ids"] for c in completion_texts]
    # a template may tokenize the prompt alone differently from prompt + reply: split where they stop agreeing
    n = len(os.path.commonprefix([prompt_ids, *full_ids]))
    return {
        EMPTY_PREFIX + "prompt_ids": prompt_ids[:n],
        EMPTY_PREFIX + "chosen_ids": full_ids[0][n:],
        EMPTY_PREFIX + "rejected_ids": full_ids[1][n:],
    }


def _is_text_or_messages(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, Mapping) for m in value))


def check_bvpo_row(
    example: Mapping[str, Any], index: int, columns: list[str], prompt_no_trace_column: str, dataset_name: str
) -> None:
    """Raise a ``TypeError`` naming the row and column when a BVPO column of ``example`` is not text or messages.

    Run on every row (in the tokenising map), not only the first: a ``None`` or a wrong type in a later row would
    otherwise stop training with an ``AttributeError`` deep inside the tokenisation, naming neither. The optional
    ``prompt_no_trace_column`` may be ``None`` (the row then uses ``prompt``). All the row's values must share one
    format: a plain prompt cannot be joined with conversational completions, nor the other way round.
    """
    kinds = {}
    checked = list(columns) + ([prompt_no_trace_column] if example.get(prompt_no_trace_column) is not None else [])
    for column in checked:
        value = example[column]
        if not _is_text_or_messages(value):
            raise TypeError(
                f"BVPO: column {column!r} of the {dataset_name} dataset must hold text (str) or conversational "
                f"messages (a list of {{'role', 'content'}} dicts) in every row; row {index} holds "
                f"{type(value).__name__}. Fix or drop that row (e.g. `dataset.filter(...)`) before training."
            )
        kinds[column] = "text" if isinstance(value, str) else "messages"
    if len(set(kinds.values())) > 1:
        raise TypeError(
            f"BVPO: row {index} of the {dataset_name} dataset mixes plain text and conversational messages "
            f"({kinds}); give every column in the same format."
        )


def _checked_tokenize_empty_view(
    example: dict[str, Any], index: int, columns: list[str], dataset_name: str, **kwargs: Any
) -> dict[str, list[int]]:
    """:func:`check_bvpo_row`, then :func:`tokenize_empty_view` (the ``dataset.map`` function, with indices). Row 0
    chose how reasoning is disabled; with ``"completion"`` (the no-trace completions carry the empty think block)
    every row must carry it, or its "empty-trace" pair would be scored under a prompt with reasoning on."""
    check_bvpo_row(example, index, columns, kwargs["prompt_column"], dataset_name)
    if kwargs["mode"] == "completion":
        for column in (kwargs["chosen_column"], kwargs["rejected_column"]):
            if not EMPTY_THINK_RE.match(_completion_head(example[column])):
                raise ValueError(
                    f"Row {index} of the {dataset_name} dataset: {column!r} does not start with an empty think block "
                    f"(got {str(_completion_head(example[column]))[:60]!r}), but row 0's no-trace completions do, so "
                    "BVPO disables reasoning through them and this row would keep it on. Give every row the empty "
                    "block, or set `BVPOConfig(no_trace_suffix=...)` to your model's empty think block."
                )
    return tokenize_empty_view(example, **kwargs)


class BVPODataCollator:
    """Pads the trace and the empty-trace views of the same rows with DPO's collator: ``{"trace": …, "empty": …}``.

    ``base`` sees each view as ordinary DPO rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and, when
    precomputed, ``ref_chosen_logps``/``ref_rejected_logps``).
    """

    def __init__(self, base: Any):
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        trace = [{k: v for k, v in ex.items() if not k.startswith(EMPTY_PREFIX)} for ex in examples]
        empty = []
        for ex in examples:
            row = {k: v for k, v in ex.items() if not k.startswith(EMPTY_PREFIX) and k not in _VIEW_KEYS}
            row.update({k[len(EMPTY_PREFIX) :]: ex[k] for k in EMPTY_KEYS if k in ex})
            empty.append(row)
        return {"trace": self.base(trace), "empty": self.base(empty)}


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------
class _AlphaStepCallback(TrainerCallback):
    """Feeds the α estimator once per optimizer step (after it, before logging and checkpointing)."""

    def __init__(self, trainer: BVPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._flush_alpha_observation()


class BVPOTrainer(DivergenceCheckMixin, DPOTrainer):
    """BVPO trainer: ``L = α·DPO(trace pairs) + (1 − α)·DPO(empty-trace pairs)`` over the same prompts, each step.

    Takes the arguments of :class:`trl.DPOTrainer` with a :class:`BVPOConfig`. The dataset needs ``prompt``,
    ``chosen``, ``rejected`` (reasoning on: trace + answer) and ``chosen_no_trace``, ``rejected_no_trace``
    (reasoning off), in the standard or the conversational format; the empty-trace prompt is rendered with
    reasoning disabled (``enable_thinking=False`` through the chat template, else ``no_trace_suffix`` appended).

    Logged metrics: the DPO metrics of each view under ``trace/…`` and ``empty/…`` (``trace/loss``,
    ``empty/rewards/accuracies``, …) and ``bvpo/alpha`` (plus ``bvpo/alpha_estimate`` with ``"auto"``). The α state
    is written to ``bvpo_state.json`` (and ``bvpo_state.safetensors`` for ``"auto"``) in every checkpoint and
    restored by ``train(resume_from_checkpoint=...)``.
    """

    _tag_names = ["trl", "dpo", "bvpo", "hfx"]
    _name = "BVPO"
    _paper = {
        "title": "Bias-Variance Optimized Preference Optimization for Large Reasoning Models",
        "id": "2510.05095",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhu2025bvpo,
                title   = {{Bias-Variance Optimized Preference Optimization for Large Reasoning Models}},
                author  = {Zhu, Zhengyu and Chen, Zhiyuan and Yu, Dian and Zhao, Kaiqiang and Jia, Robin},
                year    = 2025,
                journal = {arXiv preprint arXiv:2510.05095},
            }"""),
    }

    def __init__(self, model, ref_model=None, args: BVPOConfig | None = None, *pos_args, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = BVPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-BVPO")
        elif not isinstance(args, BVPOConfig):
            raise TypeError(f"BVPOTrainer needs a BVPOConfig, got {type(args).__name__}")
        self._estimator: AlphaEstimator | None = None
        self._probe: _GradientProbe | None = None
        self._warned: set[str] = set()
        self._pending: torch.Tensor | None = None  # this step's summed (g_t, g_e) probe gradients, per micro-batch
        self._pending_count = 0
        check_not_empty(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        if args.bvpo_alpha == "auto" and args.torch_compile:
            raise ValueError(
                "bvpo_alpha='auto' estimates α from activations its forward hooks record, and a model compiled with "
                "torch_compile=True gives autograd no path from the loss to them (the probe found no gradient, then "
                "the compiled backward refused the probe's retained graph). Use a fixed bvpo_alpha with "
                "torch_compile=True, or torch_compile=False with 'auto'."
            )
        super().__init__(model, ref_model, args, *pos_args, **kwargs)
        if not isinstance(self.data_collator, BVPODataCollator):
            self.data_collator = BVPODataCollator(self.data_collator)
        if args.bvpo_alpha == "auto":
            self._estimator = AlphaEstimator(
                init=args.bvpo_alpha_init,
                decay=args.bvpo_alpha_stats_decay,
                smoothing=args.bvpo_alpha_smoothing,
                warmup=args.bvpo_alpha_warmup_steps,
            )
            self._probe = _GradientProbe(self._probe_modules(), args.bvpo_alpha_max_rows)
            self.add_callback(_AlphaStepCallback(self))

    # ---------------------------------------------------------------- α
    @property
    def alpha(self) -> float:
        """The α used for the next step (fixed, or the smoothed online estimate with ``"auto"``, which changes only
        between optimizer steps: every micro-batch of a step uses the same α)."""
        return self._estimator.alpha if self._estimator is not None else float(self.args.bvpo_alpha)

    @property
    def alpha_estimator(self) -> AlphaEstimator | None:
        return self._estimator

    def _probe_modules(self) -> list[tuple[str, torch.nn.Module]]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.model
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        wanted = self.args.bvpo_alpha_modules
        found = []
        for name, module in model.named_modules():
            if module is out_emb or name.split(".")[-1] == "lm_head":
                continue
            if wanted:
                if any(name == w or name.endswith("." + w) for w in wanted):
                    found.append((name, module))
                continue
            if isinstance(module, (BaseTunerLayer, torch.nn.Linear)):
                found.append((name, module))
        if not wanted:
            # PEFT: prefer adapted layers (their outputs always need gradients); never adapter-internal linears.
            tuned = [(n, m) for n, m in found if isinstance(m, BaseTunerLayer)]
            if tuned:
                found = tuned
            else:
                found = [(n, m) for n, m in found if ".base_layer" not in n and "lora_" not in n]
            found = found[-1:]
        if not found:
            raise ValueError(f"bvpo_alpha='auto': no linear module matches bvpo_alpha_modules={wanted!r}")
        return found

    def _update_alpha(self, loss_t: torch.Tensor, loss_e: torch.Tensor) -> None:
        rec_t, rec_e = self._probe.pop("trace"), self._probe.pop("empty")
        g_t = self._probe.gradient(loss_t, rec_t)
        g_e = self._probe.gradient(loss_e, rec_e)
        # Every rank must take the same branch (the all-reduce below is collective).
        ok = torch.tensor([float(g_t is not None and g_e is not None)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            ok = self.accelerator.reduce(ok, reduction="sum") / self.accelerator.num_processes
        if ok.item() < 1.0:
            if _reentrant_checkpointing(self.model):
                raise ValueError(
                    "bvpo_alpha='auto' reads the probed modules' activations during the forward, but reentrant "
                    "gradient checkpointing runs the checkpointed layers under no_grad there (and again in backward, "
                    "outside the capture), so α would never move. Set gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}, turn checkpointing off, or use a "
                    "fixed bvpo_alpha."
                )
            if "probe" not in self._warned:
                self._warned.add("probe")
                logger.warning(
                    "bvpo_alpha='auto': no activation gradient at the probed modules (frozen, unused, or under "
                    "reentrant gradient checkpointing); α stays at its last value for such steps."
                )
            return
        g = torch.stack([g_t, g_e])
        self._pending = g if self._pending is None else self._pending + g
        self._pending_count += 1

    def _flush_alpha_observation(self) -> None:
        """One estimator update per optimizer step, from the probe gradients of the whole step: the mean over its
        micro-batches (gradient accumulation) and processes, i.e. the gradient the optimizer step uses. Every rank
        saw the same number of probed micro-batches (the check in :meth:`_update_alpha` is collective)."""
        if self._estimator is None or self._pending_count == 0:
            return
        g = self._pending / self._pending_count
        self._pending, self._pending_count = None, 0
        if self.accelerator.num_processes > 1:
            g = self.accelerator.reduce(g, reduction="mean")  # the global mini-batch gradients: same α on all ranks
        self._estimator.update(g[0], g[1])
        if self._estimator.last_estimate is not None:
            self._metrics["train"]["bvpo/alpha_estimate"].append(self._estimator.last_estimate)

    # ---------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, IterableDataset):
            raise ValueError("BVPOTrainer needs map-style `datasets.Dataset` data (got an IterableDataset)")
        columns = dataset.column_names
        if "prompt_ids" in columns and EMPTY_PREFIX + "prompt_ids" in columns:
            return dataset  # already prepared
        needed = ["prompt", "chosen", "rejected", args.chosen_no_trace_column, args.rejected_no_trace_column]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"BVPO needs the columns {needed} in the {dataset_name} dataset (trace pairs and empty-trace pairs "
                f"over the same prompts); missing: {missing}. Build them with "
                "`hfx.trainers.make_bvpo_pairs` or `hfx.data.preference_dataset(..., think=True)`, or point "
                "`chosen_no_trace_column` / `rejected_no_trace_column` at your columns."
            )
        if len(dataset) > 0:  # row 0 decides how reasoning is disabled: check it before reading it
            check_bvpo_row(dataset[0], 0, needed, args.prompt_no_trace_column, dataset_name)
        tokenizer = self._tokenizer
        mode = resolve_no_trace_mode(dataset[0], tokenizer, args)
        map_kwargs: dict[str, Any] = {"num_proc": args.dataset_num_proc}
        dataset = dataset.map(
            _checked_tokenize_empty_view,
            with_indices=True,
            fn_kwargs={
                "columns": needed,
                "dataset_name": dataset_name,
                "tokenizer": tokenizer,
                "mode": mode,
                "suffix": args.no_trace_suffix,
                "strip_empty_think": args.strip_empty_think,
                "chosen_column": args.chosen_no_trace_column,
                "rejected_column": args.rejected_no_trace_column,
                "prompt_column": args.prompt_no_trace_column,
            },
            desc=f"Tokenizing the empty-trace view of the {dataset_name} dataset",
            **map_kwargs,
        )
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            key = EMPTY_PREFIX + "prompt_ids"
            dataset = dataset.filter(lambda ex: len(ex[key]) < args.max_length, **map_kwargs)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "prompt_ids" in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [
                k for k in EMPTY_KEYS if k not in self._signature_columns
            ]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Reference log-probs for both views: the parent's pass over the trace view and over a renamed empty view."""
        collator = self.data_collator
        base = collator.base if isinstance(collator, BVPODataCollator) else collator
        self.data_collator = base
        try:
            empty_cols = [k for k in EMPTY_KEYS[:3]]
            view = dataset.select_columns(empty_cols).rename_columns({k: k[len(EMPTY_PREFIX) :] for k in empty_cols})
            view = super()._precompute_ref_logps(view, f"{name} (empty trace)", batch_size)
            empty_ref = view.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).rename_columns(
                {
                    "ref_chosen_logps": EMPTY_PREFIX + "ref_chosen_logps",
                    "ref_rejected_logps": EMPTY_PREFIX + "ref_rejected_logps",
                }
            )
            dataset = super()._precompute_ref_logps(dataset, f"{name} (trace)", batch_size)
        finally:
            self.data_collator = collator
        return concatenate_datasets([dataset, empty_ref], axis=1)

    # ---------------------------------------------------------------- loss
    def _view_loss(self, model, inputs, view: str, mode: str, return_outputs: bool, probe: bool):
        saved = self._metrics[mode]
        self._metrics[mode] = defaultdict(list)
        if probe:
            self._probe.attach()
            self._probe.active = view
        try:
            result = self._compute_loss(model, inputs, return_outputs)
        finally:
            if self._probe is not None:
                self._probe.active = None
            fresh, self._metrics[mode] = self._metrics[mode], saved
        loss, outputs = result if return_outputs else (result, None)
        for key, values in fresh.items():
            if key == "num_tokens":  # a running total over both views
                saved[key] = values
            else:
                saved[f"{view}/{key}"].extend(values)
        # the mean over processes (gather_for_metrics would treat each rank's scalar as a sample and, on the last
        # batch of an uneven epoch, keep only the first ranks')
        saved[f"{view}/loss"].append(self.accelerator.reduce(loss.detach(), reduction="mean").item())
        return loss, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``α·L_trace + (1 − α)·L_empty`` on a ``{"trace", "empty"}`` batch from :class:`BVPODataCollator`."""
        if not (isinstance(inputs, Mapping) and "trace" in inputs and "empty" in inputs):
            raise ValueError(
                "BVPOTrainer.compute_loss expects {'trace': batch, 'empty': batch} from BVPODataCollator; a custom "
                "data_collator is wrapped in BVPODataCollator automatically"
            )
        mode = "train" if self.model.training else "eval"
        alpha = self.alpha
        probe = self._probe is not None and mode == "train" and torch.is_grad_enabled()
        loss_t, outputs = self._view_loss(model, inputs["trace"], "trace", mode, return_outputs, probe)
        loss_e, _ = self._view_loss(model, inputs["empty"], "empty", mode, False, probe)
        if probe:
            self._update_alpha(loss_t, loss_e)
        self._metrics[mode]["bvpo/alpha"].append(alpha)
        loss = alpha * loss_t + (1.0 - alpha) * loss_e
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs, return_outputs=False), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss, outputs.logits, inputs["trace"]["input_ids"]

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        self.save_bvpo_state(folder)

    def _push_from_checkpoint(self, checkpoint_folder):
        # the Hub upload starts inside _save_checkpoint, before the lines above: write the α state first
        if self.args.should_save:
            self.save_bvpo_state(checkpoint_folder)
        super()._push_from_checkpoint(checkpoint_folder)

    def save_bvpo_state(self, folder: str) -> None:
        """Write the α state (``bvpo_state.json``, plus ``bvpo_state.safetensors`` for ``"auto"``) into ``folder``."""
        os.makedirs(folder, exist_ok=True)
        state: dict[str, Any] = {"bvpo_alpha": self.args.bvpo_alpha, "alpha": self.alpha}
        if self._estimator is not None:
            scalars, tensors = self._estimator.state_dict()
            state["estimator"] = scalars
            if tensors:
                from safetensors.torch import save

                data = save({k: v.contiguous() for k, v in tensors.items()})
                write_state_file(os.path.join(folder, STATE_TENSORS), data)
        write_state_json(os.path.join(folder, STATE_JSON), state)

    def load_bvpo_state(self, folder: str) -> None:
        """Restore the α state written by :meth:`save_bvpo_state` (a missing file leaves the state as it is)."""
        path = os.path.join(folder, STATE_JSON)
        if not os.path.isfile(path):
            logger.warning(f"no {STATE_JSON} in {folder}: the BVPO α state starts afresh")
            return
        state = read_state_json(path)
        if self._estimator is None or "estimator" not in state:
            if state.get("bvpo_alpha") != self.args.bvpo_alpha:
                logger.warning(f"checkpoint used bvpo_alpha={state.get('bvpo_alpha')!r}, now {self.args.bvpo_alpha!r}")
            return
        self._check_estimator_settings(state["estimator"])
        tensors = {}
        tensors_path = os.path.join(folder, STATE_TENSORS)
        if os.path.isfile(tensors_path):
            tensors = read_state_tensors(tensors_path)
        elif int(state["estimator"].get("num_updates", 0)) > 0:
            # without the gradient sums the estimator would restart them under the saved normaliser (a wrong α)
            raise FileNotFoundError(
                f"{tensors_path} is missing: {path} records {state['estimator']['num_updates']} α-estimator updates, "
                f"whose gradient sums are in that file. Restore it from a copy of the checkpoint, or delete {path} "
                "too to resume with the α state afresh."
            )
        self._estimator.load_state_dict(state["estimator"], tensors)

    def _check_estimator_settings(self, saved: Mapping[str, Any]) -> None:
        """Warn when the α-estimator settings of this run differ from the checkpoint's.

        A warning, not an error, as transformers does for changed arguments on resume: the saved moments stay valid
        under a new ``decay`` (each sum and its normaliser ``weight`` share one recursion, so the means stay weighted
        averages; older observations keep the weights they had), and ``smoothing`` / ``warmup`` only act on future
        updates. ``init`` has no effect at all: α resumes from its saved value. Silence would hide all of this.
        """
        fields = {
            "bvpo_alpha_stats_decay": "decay",
            "bvpo_alpha_smoothing": "smoothing",
            "bvpo_alpha_warmup_steps": "warmup",
            "bvpo_alpha_init": "init",
        }

        def as_float(value: Any) -> float | None:  # JSON round-trips floats exactly: no tolerance needed
            return None if value is None else float(value)

        changed = {
            name: (saved[key], getattr(self.args, name))
            for name, key in fields.items()
            if key in saved and as_float(saved[key]) != as_float(getattr(self.args, name))
        }
        if not changed:
            return
        listed = ", ".join(f"{name}={new!r} (checkpoint: {old!r})" for name, (old, new) in changed.items())
        note = ""
        if "bvpo_alpha_init" in changed:
            note = f" bvpo_alpha_init has no effect on resume: α continues from the saved {saved.get('alpha')!r}."
        logger.warning(
            f"bvpo_alpha='auto': resuming with different estimator settings: {listed}. The saved statistics are kept "
            f"and the new decay / smoothing / warm-up apply from the next update on.{note} Resume with the "
            "checkpoint's values to continue the estimate unchanged."
        )

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_bvpo_state(checkpoint)

    def _load_best_model(self):
        """``load_best_model_at_end``: the best checkpoint's α state comes back with its weights."""
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, STATE_JSON)):
            self.load_bvpo_state(best)
