"""Greedy-decoding evaluation for the arithmetic task (exact match on the ``#### <int>`` answer).

Works with plain ``transformers`` models and PEFT-wrapped ones, on CPU or GPU: batched, left-padded, with the KV
cache, under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .arithmetic import Problem, extract_answer
from .rewards import completion_text

__all__ = ["accuracy", "generate_completions"]


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in [tokenizer.eos_token_id, gen_eos, tokenizer.convert_tokens_to_ids("<|im_end|>")]:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v >= 0 and v != tokenizer.unk_token_id and v not in ids:
                ids.append(v)
    return ids


@torch.inference_mode()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) for string or conversational prompts, in input order.

    Conversational prompts go through ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``. Prompts
    are sorted by length and batched with left padding; the tokenizer's ``padding_side`` and the model's training
    mode are restored afterwards.
    """
    from transformers import GenerationConfig

    texts = [
        p
        if isinstance(p, str)
        else tokenizer.apply_chat_template(
            p, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
        for p in prompts
    ]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_ids(model, tokenizer)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True
    )
    device = next(model.parameters()).device
    was_training = model.training
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = [""] * len(texts)
    try:
        model.eval()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                generation_config=gen_config,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outputs


def _prompts_and_answers(data: Any, chat: bool) -> tuple[list[Any], list[Any]]:
    rows = list(data)
    if rows and isinstance(rows[0], Problem):
        prompts = [[{"role": "user", "content": p.question}] if chat else p.prompt for p in rows]
        return prompts, [p.answer for p in rows]
    prompts, answers = [], []
    for row in rows:
        if "prompt" in row:
            prompts.append(row["prompt"])
        elif "messages" in row:  # conversational language-modelling row: everything before the last assistant turn
            messages = list(row["messages"])
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            prompts.append(messages)
        else:
            raise ValueError("each row needs a `prompt` or `messages` column")
        answers.append(row["answer"])
    return prompts, answers


def accuracy(
    model: Any,
    tokenizer: Any,
    data: Any,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    *,
    chat: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    return_completions: bool = False,
) -> float | tuple[float, list[str]]:
    """Exact-match accuracy of greedy generations on a list of :class:`Problem` or a dataset with ``answer``.

    ``data`` is a list of problems (prompted with :func:`format_prompt`, or as a user message if ``chat``), or rows
    (e.g. a ``datasets.Dataset``) with ``prompt`` (string or messages) or ``messages``, plus ``answer``. With
    ``return_completions=True`` also returns the generated texts. The first ``#### <int>`` of a generation is its
    answer: whatever a model generates after it (e.g. a next question, when it never learned to stop) is ignored.
    """
    prompts, answers = _prompts_and_answers(data, chat)
    if not prompts:
        raise ValueError("no examples to evaluate")
    completions = generate_completions(
        model, tokenizer, prompts, max_new_tokens, batch_size, chat_template_kwargs=chat_template_kwargs
    )
    correct = 0
    for completion, answer in zip(completions, answers, strict=True):
        predicted = extract_answer(completion_text(completion), first=True)
        expected = answer if isinstance(answer, int) else extract_answer(f"#### {answer}")
        correct += int(predicted is not None and predicted == expected)
    acc = correct / len(prompts)
    return (acc, completions) if return_completions else acc
