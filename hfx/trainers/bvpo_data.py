"""Build BVPO training pairs from a policy and a reward function (the paper's on-policy recipe, §4 / App. C.1).

For every prompt, sample ``n`` completions with reasoning on and ``n`` with reasoning off, score them, and keep the
best as ``chosen`` and the worst as ``rejected`` in each mode (the paper: 5 samples per mode, ArmoRM scores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .bvpo_config import DEFAULT_EMPTY_THINK
from .bvpo_trainer import template_can_disable_thinking

__all__ = ["make_bvpo_pairs"]


def _render(prompt: Any, tokenizer: Any, thinking: bool, suffix: str) -> tuple[str, str]:
    """(prompt text to generate from, the empty think block that text ends with — '' when thinking)."""
    if isinstance(prompt, str):
        return (prompt, "") if thinking else (prompt + suffix, suffix)
    if template_can_disable_thinking(tokenizer):
        on = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        if thinking:
            return on, ""
        off = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        return off, off[len(on) :] if off.startswith(on) else suffix
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return (text, "") if thinking else (text + suffix, suffix)


@torch.no_grad()
def _sample(
    model, tokenizer, texts: list[str], n: int, batch_size: int, gen_kwargs: dict[str, Any]
) -> list[list[str]]:
    from transformers import GenerationConfig

    from hfx.data.metrics import _stop_ids

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        num_return_sequences=n,
        eos_token_id=_stop_ids(model, tokenizer),
        pad_token_id=pad_id,
        **gen_kwargs,
    )
    device = next(model.parameters()).device
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[str]] = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            out.extend(decoded[i * n : (i + 1) * n] for i in range(len(chunk)))
    finally:
        tokenizer.padding_side = old_side
    return out


def make_bvpo_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    reward_funcs: Callable[..., list[float]] | Sequence[Callable[..., list[float]]],
    n: int = 5,
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    no_trace_suffix: str = DEFAULT_EMPTY_THINK,
    drop_ties: bool = True,
    seed: int = 0,
    prompt_column: str = "prompt",
):
    """Sample ``n`` completions per prompt with thinking on and off, score, keep best/worst → a BVPO ``Dataset``.

    ``prompts`` is a ``datasets.Dataset`` (or list of dicts) with a ``prompt`` column (plain string or
    conversational ``[{"role": "user", ...}]``) and any columns the reward functions need (e.g. ``answer``), or a
    plain list of prompts. ``reward_funcs`` follow TRL's signature ``f(prompts=, completions=, **columns) -> list``
    (several are summed), e.g. ``hfx.data.correctness_reward``.

    Thinking off renders conversational prompts with ``enable_thinking=False`` where the chat template supports it,
    else appends ``no_trace_suffix``; the no-trace completions are stored *with* that empty think block in front,
    so the data is self-describing (:class:`hfx.BVPOTrainer` moves it back into the prompt). Rows where every
    sample of a mode scores the same carry no preference and are dropped unless ``drop_ties=False``.

    Columns: ``prompt``, ``chosen``, ``rejected``, ``chosen_no_trace``, ``rejected_no_trace``, the four scores
    (``chosen_score``, …) and the input's other columns.
    """
    from datasets import Dataset

    if n < 2:
        raise ValueError("n must be >= 2 (best and worst of n samples)")
    if isinstance(prompts, Dataset):
        rows = prompts.to_list()
    else:
        rows = [p if isinstance(p, dict) else {prompt_column: p} for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    if prompt_column not in rows[0]:
        raise ValueError(f"prompts need a {prompt_column!r} column")
    funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
    gen_kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    was_training = model.training
    model.eval()
    samples: dict[bool, list[list[str]]] = {}
    blocks: dict[bool, list[str]] = {}
    try:
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # manual_seed seeds CUDA too
            torch.manual_seed(seed)
            for thinking in (True, False):
                rendered = [_render(r[prompt_column], tokenizer, thinking, no_trace_suffix) for r in rows]
                blocks[thinking] = [b for _, b in rendered]
                samples[thinking] = _sample(model, tokenizer, [t for t, _ in rendered], n, batch_size, gen_kwargs)
    finally:
        model.train(was_training)

    out = []
    for i, row in enumerate(rows):
        prompt = row[prompt_column]
        extra = {k: v for k, v in row.items() if k != prompt_column}
        picked: dict[bool, tuple[Any, Any, float, float]] = {}
        for thinking in (True, False):
            texts = [blocks[thinking][i] + t for t in samples[thinking][i]]
            completions = texts if isinstance(prompt, str) else [[{"role": "assistant", "content": t}] for t in texts]
            scores = [0.0] * n
            for f in funcs:
                values = f(prompts=[prompt] * n, completions=completions, **{k: [v] * n for k, v in extra.items()})
                scores = [s + (0.0 if v is None else float(v)) for s, v in zip(scores, values)]
            best = max(range(n), key=scores.__getitem__)
            worst = min(range(n), key=scores.__getitem__)
            picked[thinking] = (completions[best], completions[worst], scores[best], scores[worst])
        if drop_ties and any(b <= w for _, _, b, w in picked.values()):
            continue
        (c, r, cs, rs), (ce, re_, ces, res) = picked[True], picked[False]
        out.append(
            {
                "prompt": prompt,
                "chosen": c,
                "rejected": r,
                "chosen_no_trace": ce,
                "rejected_no_trace": re_,
                "chosen_score": cs,
                "rejected_score": rs,
                "chosen_no_trace_score": ces,
                "rejected_no_trace_score": res,
                **extra,
            }
        )
    return Dataset.from_list(out)
