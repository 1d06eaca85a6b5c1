"""Masked Thought SFT (MFT): Chen et al., "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical
Reasoning Learning of Language Models", ACL 2024, arXiv 2403.02178.

Supervised fine-tuning where, during training only, the model reads a *corrupted* chain of thought but must still
predict the clean one:

    L_MFT = −Σ_t log p(w_t | w^s_{<t}),   w^s_t = noise if M_t = 1 else w_t,   M_t ~ Bernoulli(p) on target tokens only.

The question (prompt) is never masked, the labels are the unchanged ground truth, and ``p`` rises linearly from 0 to
``mask_rate`` over the first ``mask_warmup_ratio`` of training (:func:`mask_rate_at`). The paper reads this as a data
augmentation / regulariser against over-reliance on exact earlier reasoning steps (a form of noisy teacher forcing).

Implementation on TRL 1.x: :class:`trl.SFTTrainer` builds ``labels`` (−100 outside the completion / assistant turns)
while preparing the dataset, its collator only pads, and its ``compute_loss`` feeds ``input_ids`` to the model and
scores ``labels``. So :meth:`MaskedThoughtTrainer.compute_loss` replaces, in training mode, the selected
``input_ids`` positions (where ``labels != −100``) and hands the batch on to the parent unchanged otherwise. Masking
lives in the trainer, not in a collator, because that is where ``state.global_step`` is known: the rate follows the
optimizer step count (which checkpoints restore) rather than a per-process collator counter (which dataloader workers
and resuming would each restart), and the noise is drawn from a generator seeded by
``(mask_seed, global step, process index, micro-step)`` — reproducible, independent of the global torch RNG, and
identical after ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.logging import get_logger
from trl import SFTTrainer

from ._data import check_not_empty
from ._divergence import DivergenceCheckMixin
from .masked_thought_config import MaskedThoughtConfig

__all__ = [
    "MaskedThoughtTrainer",
    "add_mask_token",
    "mask_input_ids",
    "mask_rate_at",
    "sequence_starts",
    "think_region",
]

logger = get_logger(__name__)

_HELPER_HINT = (
    "call `hfx.trainers.add_mask_token(model, tokenizer, {token!r})` on the model and tokenizer before building the "
    "trainer (and before wrapping the model with PEFT / DeepSpeed), then pass both to the trainer"
)


# --------------------------------------------------------------------------------------------------------------------
# Schedule and masking (pure functions on tensors)
# --------------------------------------------------------------------------------------------------------------------
def mask_rate_at(step: int, total_steps: int | None, mask_rate: float, warmup_ratio: float) -> float:
    """The scheduled mask probability at optimizer step ``step`` (0-based) of ``total_steps``.

    ``p(step) = mask_rate · min(1, step / (warmup_ratio · total_steps))``: a linear rise from 0 over the first
    ``warmup_ratio`` of training, then constant (the paper's ``mask_rate_warmup_ratio``, 2/3 in its scripts). With
    ``warmup_ratio == 0`` or an unknown total (``None`` / ``<= 0``) it is ``mask_rate`` throughout.
    """
    if warmup_ratio <= 0 or not total_steps or total_steps <= 0:
        return float(mask_rate)
    return float(mask_rate) * min(1.0, max(0, step) / (warmup_ratio * total_steps))


def sequence_starts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean ``[B, T]``: where a sequence starts — ``position_ids == 0`` (packed / padding-free rows hold several
    sequences), else the first attended token of each row. Column 0 is always a start."""
    if position_ids is not None and position_ids.shape == input_ids.shape:
        starts = position_ids == 0
    elif attention_mask is not None and attention_mask.shape == input_ids.shape:
        am = attention_mask.bool()
        starts = am & (am.long().cumsum(-1) == 1)
    else:
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts = starts.clone()
    starts[:, 0] = True
    return starts


def think_region(input_ids: torch.Tensor, start_id: int | None, end_id: int, starts: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, T]``: tokens strictly inside a ``<think>…</think>`` block, per sequence (``starts`` splits packed
    rows, so a block never leaks into the next sequence).

    A token is inside when the last think tag before it (in its sequence) is an opening one; or, for templates whose
    opening tag is implicit (absent from the text), when its sequence has no tag before it and the next tag after it
    is a closing one. The tags themselves are outside.
    """
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    seg_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    seg_id = starts.long().cumsum(-1)
    is_end = input_ids == end_id
    is_open = input_ids == start_id if start_id is not None else torch.zeros_like(is_end)

    def last(flags):  # index of the latest flag at or before t in the same sequence, else -1
        pos = torch.where(flags, idx, torch.full_like(idx, -1)).cummax(-1).values
        return torch.where(pos >= seg_start, pos, torch.full_like(pos, -1))

    def next_in_seq(flags):  # index of the first flag at or after t in the same sequence, else T
        pos = torch.where(flags, idx, torch.full_like(idx, T)).flip(-1).cummin(-1).values.flip(-1)
        same = seg_id.gather(-1, pos.clamp(max=T - 1)) == seg_id
        return torch.where((pos < T) & same, pos, torch.full_like(pos, T))

    last_open, last_end = last(is_open), last(is_end)
    opened = (last_open >= 0) & (last_open > last_end)
    implicit = (last_open < 0) & (last_end < 0) & (next_in_seq(is_end) < next_in_seq(is_open))
    return (opened | implicit) & ~is_open & ~is_end


def mask_input_ids(
    input_ids: torch.Tensor,
    candidates: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    mask_id: int | None = None,
    random_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each ``candidates`` position of ``input_ids`` with probability ``rate``; return ``(new_ids, masked)``.

    The replacement is ``mask_id``, or (``random_ids`` given) a uniformly drawn entry of ``random_ids`` per position.
    ``input_ids`` is not modified in place.
    """
    if rate <= 0:
        return input_ids, torch.zeros_like(candidates)
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = candidates & (draw < rate)
    if random_ids is not None:
        pick = torch.randint(0, random_ids.numel(), input_ids.shape, generator=generator, device=input_ids.device)
        replacement = random_ids.to(input_ids.device)[pick].to(input_ids.dtype)
    else:
        if mask_id is None:
            raise ValueError("mask_input_ids needs mask_id or random_ids")
        replacement = torch.full_like(input_ids, mask_id)
    return torch.where(masked, replacement, input_ids), masked


def _seed_for(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------------------------
# The mask token
# --------------------------------------------------------------------------------------------------------------------
def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if the tokenizer has it as one token, else ``None``."""
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    ids = tokenizer.convert_tokens_to_ids(token)
    if isinstance(ids, int) and ids >= 0 and ids != tokenizer.unk_token_id:
        return ids
    return None


def _mean_init_rows(weight: torch.Tensor, rows: list[int], n_ref: int) -> None:
    """Set ``weight[rows]`` to the mean of ``weight[:n_ref]`` over the rows not being initialised."""
    keep = torch.ones(n_ref, dtype=torch.bool, device=weight.device)
    inside = [r for r in rows if r < n_ref]
    if inside:
        keep[inside] = False
    mean = weight[:n_ref][keep].float().mean(0)
    weight[rows] = mean.to(weight.dtype)


def add_mask_token(model: Any, tokenizer: Any, token: str = "<mask>", *, reinit: bool = False) -> int:
    """Make ``token`` a single token of ``tokenizer`` with an embedding row in ``model``; return its id.

    Adds the token (as a special token) when the tokenizer lacks it, resizes the embeddings when the model has no row
    for it, and initialises every new row of the input embeddings — and of the output embeddings when they are not
    tied — to the **mean of the existing rows** (the authors' initialisation), so the token starts as an "average",
    content-free input. ``reinit=True`` also re-initialises the row of a token that already exists (e.g. an unused
    ``<mask>`` that a pre-trained model never saw as input). Tied embeddings are written once.

    Order: call it on the plain ``transformers`` model *before* ``get_peft_model`` / passing ``peft_config`` to the
    trainer, and before DeepSpeed ZeRO-3 or FSDP wrap it (the trainer does that) — resizing a wrapped or sharded
    embedding is not supported by PEFT. Under a ZeRO-3 ``from_pretrained`` load, the rows are gathered for the write.
    With PEFT the new row stays frozen (a fixed noise embedding, which is all MFT needs); add
    ``trainable_token_indices`` to the PEFT config to train it.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise ValueError(
            "add_mask_token must run on the plain transformers model, before it is wrapped with PEFT "
            "(get_peft_model / SFTTrainer(peft_config=...)): resizing a PEFT model's embeddings is not supported"
        )
    from tokenizers import AddedToken

    len_before = len(tokenizer)
    added = _token_id(tokenizer, token) is None
    if added:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = _token_id(tokenizer, token)
    if token_id is None:
        raise ValueError(f"could not add {token!r} to the tokenizer as a single token")

    n_old = model.get_input_embeddings().num_embeddings
    n_ref = min(n_old, len_before)
    if token_id >= n_old:
        model.resize_token_embeddings(max(len(tokenizer), token_id + 1), mean_resizing=False)
        rows = list(range(n_old, model.get_input_embeddings().num_embeddings))
    elif added or reinit:
        rows = [token_id]
    else:
        return token_id
    if n_ref < 2:
        raise ValueError("add_mask_token needs existing embedding rows to average")

    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is None or out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()
    params = [inp.weight] + (
        [] if tied else [out.weight] + ([out.bias] if getattr(out, "bias", None) is not None else [])
    )

    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        import contextlib

        gather = contextlib.nullcontext()
    with gather, torch.no_grad():
        for p in params:
            if p.dim() == 1:  # an output bias: the mean bias
                p[rows] = p[:n_ref].float().mean().to(p.dtype)
            else:
                _mean_init_rows(p, rows, n_ref)
    return token_id


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------
class MaskedThoughtTrainer(DivergenceCheckMixin, SFTTrainer):
    """Masked Thought SFT: :class:`trl.SFTTrainer` whose training inputs have part of the completion masked.

    Takes the arguments of :class:`trl.SFTTrainer` with a :class:`MaskedThoughtConfig`. In training mode each
    completion token of the *input* (a position whose label is not −100, and not the first token of a sequence, which
    is never predicted) is replaced with probability ``p`` by the mask token (``mask_token``); the labels and the prompt
    are untouched, and evaluation / prediction see clean inputs. ``p`` follows :func:`mask_rate_at` of the trainer's
    ``state.global_step`` and ``state.max_steps``.

    Data: anything :class:`trl.SFTTrainer` takes. Masked Thought needs to know which tokens are the completion, so
    prompt/completion data (``completion_only_loss``, the default for it) or conversational ``messages`` with
    ``assistant_only_loss=True`` are the natural inputs; with plain language-modelling data every token is a target
    and may be masked (a warning says so). Packing and padding-free batches work: sequence starts come from
    ``position_ids`` and think blocks never cross sequences. PEFT models (any hfx tuner) work unchanged — only the
    input ids change.

    With ``mask_token="<mask>"`` (default) the token must exist in the tokenizer and the model: call
    :func:`add_mask_token` first. Logged metrics: ``masked_thought/mask_rate`` (the scheduled ``p``) and
    ``masked_thought/masked_fraction`` (the realised fraction of candidate tokens masked, over all processes).
    """

    _tag_names = ["trl", "sft", "masked-thought", "hfx"]
    _name = "Masked Thought"
    _paper = {
        "title": "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning Learning "
        "of Language Models",
        "id": "2403.02178",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{chen2024masked,
                title     = {{Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning Learning of Language Models}},
                author    = {Chen, Changyu and Wang, Xiting and Lin, Ting-En and Lv, Ang and Wu, Yuchuan and Gao, Xin and Wen, Ji-Rong and Yan, Rui and Li, Yongbin},
                year      = 2024,
                booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics (ACL)},
            }"""),  # noqa: E501
    }

    def __init__(self, model, args: MaskedThoughtConfig | None = None, *pos_args, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = MaskedThoughtConfig(f"{str(name).rstrip('/').split('/')[-1]}-MaskedThought")
        elif not isinstance(args, MaskedThoughtConfig):
            raise TypeError(f"MaskedThoughtTrainer needs a MaskedThoughtConfig, got {type(args).__name__}")
        self._mask_micro = (None, 0)  # (global step, micro-steps seen in it)
        self._warned_no_think = False
        check_not_empty(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        super().__init__(model, args, *pos_args, **kwargs)
        self._mask_id, self._random_ids = self._resolve_mask_token()
        self._think_ids = self._resolve_think_tokens() if args.mask_scope == "think" else None

    # ---------------------------------------------------------------- setup
    def _embedding_rows(self) -> int | None:
        emb = self.model.get_input_embeddings()
        return getattr(emb, "num_embeddings", None)

    def _resolve_mask_token(self) -> tuple[int | None, torch.Tensor | None]:
        tok, token = self._tokenizer, self.args.mask_token
        rows = self._embedding_rows()
        if token == "random":
            special = set(tok.all_special_ids)
            limit = min(len(tok), rows) if rows is not None else len(tok)
            ids = [i for i in range(limit) if i not in special]
            if not ids:
                raise ValueError("mask_token='random': the tokenizer has no non-special tokens to draw from")
            return None, torch.tensor(ids, dtype=torch.long)
        if token == "pad":
            mask_id = tok.pad_token_id
            if mask_id is None:
                raise ValueError("mask_token='pad' but the tokenizer has no pad token; set `pad_token` in the config")
        else:
            mask_id = _token_id(tok, token)
            if mask_id is None:
                raise ValueError(
                    f"mask_token={token!r} is not a token of the tokenizer. To use a dedicated mask token, "
                    + _HELPER_HINT.format(token=token)
                    + ". Or set mask_token='pad' or 'random'."
                )
        if rows is not None and mask_id >= rows:
            raise ValueError(
                f"mask token id {mask_id} has no row in the model's input embeddings ({rows} rows): "
                + _HELPER_HINT.format(token=token)
            )
        return int(mask_id), None

    def _resolve_think_tokens(self) -> tuple[int | None, int]:
        tok, args = self._tokenizer, self.args
        end_id = _token_id(tok, args.think_end_token)
        if end_id is None:
            raise ValueError(
                f"mask_scope='think' needs the reasoning end tag {args.think_end_token!r} as a single token of the "
                "tokenizer, and it has none. Use mask_scope='completion', or set `think_start_token` / "
                "`think_end_token` to your model's reasoning delimiters."
            )
        return _token_id(tok, args.think_start_token), end_id

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = getattr(dataset, "column_names", None)
        if columns is not None and not self._is_vision_dataset:
            self._check_columns(list(columns), args, formatting_func, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _check_columns(self, columns: list[str], args, formatting_func, name: str) -> None:
        has = set(columns).__contains__
        if has("input_ids"):
            whole = not (
                has("labels") or has("assistant_masks") or (has("completion_mask") and self.completion_only_loss)
            )
        elif has("prompt") or has("completion"):
            if not (has("prompt") and has("completion")):
                missing = "completion" if has("prompt") else "prompt"
                raise ValueError(
                    f"Masked Thought: the {name} dataset has {'prompt' if has('prompt') else 'completion'} but no "
                    f"{missing!r} column; prompt/completion data needs both (the completion is what gets masked)."
                )
            if not self.completion_only_loss:
                raise ValueError(
                    "Masked Thought never masks the prompt, but with completion_only_loss=False the prompt tokens are "
                    "loss tokens and cannot be told apart from the completion. Leave completion_only_loss unset/True."
                )
            whole = False
        elif has("messages"):
            whole = not args.assistant_only_loss
        elif has(args.dataset_text_field) or formatting_func is not None:
            whole = True
        else:
            raise ValueError(
                f"Masked Thought: the {name} dataset has none of the columns SFT needs (found {columns}). Provide "
                "'prompt' and 'completion' (recommended: only the completion is masked), conversational 'messages' "
                f"(with assistant_only_loss=True), a {args.dataset_text_field!r} text column, or tokenized "
                "'input_ids' with 'labels' (-100 on the prompt)."
            )
        if whole:
            logger.warning(
                f"Masked Thought: every token of the {name} dataset is a loss token (language-modelling data, or "
                "messages without assistant_only_loss), so any of them may be masked, prompts included. Use "
                "prompt/completion data or assistant_only_loss=True to keep the prompts clean."
            )

    # ---------------------------------------------------------------- schedule
    @property
    def mask_rate(self) -> float:
        """The mask probability for the current optimizer step (:func:`mask_rate_at` of ``state.global_step``)."""
        total = self.state.max_steps if self.state.max_steps > 0 else self.args.max_steps
        return mask_rate_at(self.state.global_step, total, self.args.mask_rate, self.args.mask_warmup_ratio)

    def _generator(self, device: torch.device) -> torch.Generator:
        step = self.state.global_step
        seen_step, micro = self._mask_micro
        micro = micro if seen_step == step else 0
        self._mask_micro = (step, micro + 1)
        seed = self.args.seed if self.args.mask_seed is None else self.args.mask_seed
        try:
            gen = torch.Generator(device=device)
        except RuntimeError:  # a backend without device generators: draw on the CPU
            gen = torch.Generator()
        return gen.manual_seed(_seed_for(seed, step, self.args.process_index, micro))

    def mask_batch(
        self, inputs: Mapping[str, Any], rate: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The batch with its completion input ids masked at ``rate`` (default :attr:`mask_rate`), and counts.

        Without ``generator`` the noise comes from the trainer's ``(seed, step, process, micro-step)`` stream and the
        micro-step counter advances (one call per micro-batch, as in training); pass a generator to preview masking
        without disturbing that stream. Returns ``(batch, {"masked": m, "candidates": c, "completion": k})`` for this
        process (``k``: completion tokens before the think scope restricts them, equal to ``c`` without it);
        ``labels`` and every other entry are the original objects.
        """
        if "labels" not in inputs or "input_ids" not in inputs:
            raise ValueError(
                "MaskedThoughtTrainer needs 'input_ids' and 'labels' in every batch (labels -100 outside the "
                "completion); a custom data_collator must provide both"
            )
        rate = self.mask_rate if rate is None else rate
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        gen = self._generator(input_ids.device) if generator is None else generator
        starts = sequence_starts(input_ids, inputs.get("attention_mask"), inputs.get("position_ids"))
        candidates = (labels != -100) & ~starts
        completion = int(candidates.sum())
        if self._think_ids is not None:
            candidates &= think_region(input_ids, self._think_ids[0], self._think_ids[1], starts)
        if gen.device != input_ids.device:
            new_ids, masked = mask_input_ids(
                input_ids.cpu(), candidates.cpu(), rate, gen, self._mask_id, self._random_ids
            )
            new_ids, masked = new_ids.to(input_ids.device), masked.to(input_ids.device)
        else:
            new_ids, masked = mask_input_ids(input_ids, candidates, rate, gen, self._mask_id, self._random_ids)
        batch = dict(inputs)
        batch["input_ids"] = new_ids
        return batch, {"masked": int(masked.sum()), "candidates": int(candidates.sum()), "completion": completion}

    def _warn_no_think_region(self) -> None:
        """Warn once that a think-scoped batch had completion tokens but no think block: nothing in it is masked,
        and if the data has no reasoning blocks at all the run is plain SFT (the reason this is not silent)."""
        if self._warned_no_think:
            return
        self._warned_no_think = True
        args = self.args
        logger.warning(
            f"Masked Thought: mask_scope='think', but a training batch has completion tokens and none inside a "
            f"{args.think_start_token}…{args.think_end_token} block, so nothing in it is masked (warned once; "
            "masked_thought/masked_fraction logs 0 for such batches). If your data has no reasoning blocks, the run "
            "is plain SFT: use mask_scope='completion' to mask the whole completion, or set `think_start_token` / "
            "`think_end_token` to the reasoning delimiters your data uses."
        )

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFT loss on the masked batch in training mode (clean batch otherwise); logs the rate and masked fraction."""
        if self.model.training:
            rate = self.mask_rate
            inputs, counts = self.mask_batch(inputs, rate)
            metrics = self._metrics["train"]
            metrics["masked_thought/mask_rate"].append(rate)
            stats = torch.tensor(
                [counts["masked"], counts["candidates"], counts.get("completion", counts["candidates"])],
                dtype=torch.float64,
                device=self.accelerator.device,
            )
            stats = self.accelerator.gather(stats.unsqueeze(0)).reshape(-1, 3).sum(0)
            metrics["masked_thought/masked_fraction"].append(float(stats[0] / stats[1]) if stats[1] > 0 else 0.0)
            if self._think_ids is not None and stats[2] > 0 and stats[1] == 0:
                self._warn_no_think_region()
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
