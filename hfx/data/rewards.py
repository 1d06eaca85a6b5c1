"""Reward functions for the built-in arithmetic task, in TRL's reward-function signature.

TRL (GRPO/RLOO) calls ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and logs each
function under its ``__name__``. ``completions`` are strings for standard data and lists of message dicts for
conversational data; both are handled. ``answer`` is the dataset's ``answer`` column (string or int).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from .arithmetic import extract_answer

__all__ = [
    "completion_text",
    "correctness_reward",
    "format_reward",
    "make_length_reward",
]

# Chat/EOS markers a decoder may leave at the end when special tokens are not skipped.
_TRAILING_MARKERS = ("<|im_end|>", "<|endoftext|>")
_ANSWER_LINE_RE = re.compile(r"^####[ \t]*[+-]?\d+$")
_THINK_TAG_RE = re.compile(r"</?think>")


def completion_text(completion: Any) -> str:
    """Flatten a completion to text: a string as is; for a message list, the assistant messages' contents joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts: list[str] = []
    for message in completion or []:
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content", "")
        if isinstance(content, list):  # multimodal-style content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(content or "")
    return "\n".join(parts)


def _parse_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):  # an answer column read as floats (12.0); a non-integer one matches nothing
        return int(value) if value.is_integer() else None
    text = str(value).strip().replace(",", "")
    try:
        return int(text)
    except ValueError:
        return extract_answer(text)


def correctness_reward(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where the last ``#### <int>`` of the completion equals ``answer``, else 0.0."""
    rewards = []
    for completion, target in zip(completions, answer, strict=True):
        predicted = extract_answer(completion_text(completion))
        expected = _parse_int(target)
        rewards.append(1.0 if predicted is not None and predicted == expected else 0.0)
    return rewards


def _strip_trailing_markers(text: str) -> str:
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for marker in _TRAILING_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def _think_balanced(text: str) -> bool:
    """Think tags, if any, form exactly one ``<think> ... </think>`` pair before the answer line."""
    tags = _THINK_TAG_RE.findall(text)
    return not tags or tags == ["<think>", "</think>"]


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 if the completion's last line is exactly ``#### <int>`` and think tags (if any) are one balanced pair.

    Trailing whitespace and trailing ``<|im_end|>``/``<|endoftext|>`` text are ignored.
    """
    rewards = []
    for completion in completions:
        text = _strip_trailing_markers(completion_text(completion))
        last_line = text.rsplit("\n", 1)[-1].strip()
        ok = bool(_ANSWER_LINE_RE.match(last_line)) and _think_balanced(text)
        rewards.append(1.0 if ok else 0.0)
    return rewards


def make_length_reward(
    target_tokens: int | None = None,
    target_chars: int | None = None,
    *,
    tokenizer: Any = None,
    tolerance: float | None = None,
    name: str | None = None,
) -> Callable[..., list[float]]:
    """Build a reward in ``[-1, 0]`` that penalises length beyond a target: ``-min(1, excess / tolerance)``.

    Give exactly one of ``target_tokens`` or ``target_chars``. Completions at or under the target get 0.0; the
    penalty grows linearly with the excess and saturates at -1.0 once the excess reaches ``tolerance`` (default:
    the target itself, i.e. at twice the target length). Token lengths come from ``tokenizer`` if given, else from
    the ``completion_ids`` TRL passes to reward functions. The function's ``__name__`` is ``name`` or
    ``length_reward``.
    """
    if (target_tokens is None) == (target_chars is None):
        raise ValueError("give exactly one of target_tokens or target_chars")
    target = target_tokens if target_tokens is not None else target_chars
    if target is None or target < 0:
        raise ValueError("the target length must be >= 0")
    scale = float(tolerance if tolerance is not None else max(target, 1))
    if scale <= 0:
        raise ValueError("tolerance must be > 0")
    use_tokens = target_tokens is not None

    def length_reward(completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None, **kwargs):
        rewards = []
        for i, completion in enumerate(completions):
            if not use_tokens:
                length = len(completion_text(completion))
            elif tokenizer is not None:
                length = len(tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"])
            elif completion_ids is not None:
                length = len(completion_ids[i])
            else:
                raise ValueError("target_tokens needs a tokenizer or TRL's `completion_ids` argument")
            rewards.append(0.0 - min(1.0, max(0, length - target) / scale))
        return rewards

    length_reward.__name__ = length_reward.__qualname__ = name or "length_reward"
    return length_reward
