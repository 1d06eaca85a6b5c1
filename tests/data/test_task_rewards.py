"""Reward functions on hand-written completions, standard and conversational."""

from __future__ import annotations

import pytest

from hfx.data import completion_text, correctness_reward, format_reward, make_length_reward
from hfx.testing import build_tokenizer


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


GOOD = "7 + 5 = 12\n12 - 3 = 9\n#### 9"


def test_names():
    assert correctness_reward.__name__ == "correctness_reward"
    assert format_reward.__name__ == "format_reward"
    assert make_length_reward(target_chars=10).__name__ == "length_reward"
    assert make_length_reward(target_chars=10, name="short").__name__ == "short"


@pytest.mark.parametrize("wrap", [lambda s: s, conv], ids=["standard", "conversational"])
def test_correctness(wrap):
    completions = [GOOD, "7 + 5 = 12\n12 - 3 = 8\n#### 8", "no answer here", "#### 9\n#### 10", "####9", ""]
    rewards = correctness_reward([wrap(c) for c in completions], answer=["9"] * 6, prompts=["p"] * 6)
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert correctness_reward([wrap(GOOD)], answer=[9]) == [1.0]  # int answers work too
    assert correctness_reward([wrap("#### 0")], answer=["0"]) == [1.0]
    # a decimal is not the integer it starts with; an answer column of floats compares by value
    assert correctness_reward([wrap("#### 9.5"), wrap("#### 9e3"), wrap("#### 9/2")], answer=["9"] * 3) == [0.0] * 3
    assert correctness_reward([wrap(GOOD), wrap(GOOD)], answer=[9.0, 9.5]) == [1.0, 0.0]


@pytest.mark.parametrize("wrap", [lambda s: s, conv], ids=["standard", "conversational"])
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (GOOD, 1.0),
        (GOOD + "\n\n  ", 1.0),  # trailing whitespace
        (GOOD + "<|im_end|>", 1.0),  # decoded with special tokens kept
        ("#### 3", 1.0),
        ("<think>\n1 + 2 = 3\n</think>\n#### 3", 1.0),
        ("<think>\n\n</think>\n#### 3", 1.0),
        ("1 + 2 = 3\n#### 3 apples", 0.0),  # answer line must be only the number
        ("1 + 2 = 3\n#### 3\nQuestion: next", 0.0),  # text after the answer line
        ("1 + 2 = 3\nThe answer is 3", 0.0),
        ("#### three", 0.0),
        ("<think>\n1 + 2 = 3\n#### 3", 0.0),  # unclosed think
        ("1 + 2 = 3\n</think>\n#### 3", 0.0),  # close without open
        ("</think><think>\n#### 3", 0.0),  # wrong order
        ("<think>\n</think>\n<think>\n</think>\n#### 3", 0.0),  # two blocks
        ("", 0.0),
    ],
)
def test_format(wrap, completion, expected):
    assert format_reward([wrap(completion)]) == [expected]


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]) == "x"


def test_length_reward_chars():
    f = make_length_reward(target_chars=10)
    rewards = f(["a" * 5, "a" * 10, "a" * 15, "a" * 20, "a" * 100])
    assert rewards == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert all(-1.0 <= r <= 0.0 for r in rewards)
    g = make_length_reward(target_chars=10, tolerance=40)
    assert g([conv("a" * 30)]) == [-0.5]


def test_length_reward_tokens():
    tok = build_tokenizer()
    f = make_length_reward(target_tokens=4, tokenizer=tok)
    n = len(tok(GOOD, add_special_tokens=False)["input_ids"])
    assert f([GOOD]) == [-min(1.0, (n - 4) / 4)]
    assert f(["#### 9"]) == [0.0]
    # Without a tokenizer, TRL's completion_ids are used.
    g = make_length_reward(target_tokens=4)
    assert g(["x", "y"], completion_ids=[[1, 2, 3], [1] * 6]) == [0.0, -0.5]
    with pytest.raises(ValueError):
        g(["x"])


def test_length_reward_arguments():
    with pytest.raises(ValueError):
        make_length_reward()
    with pytest.raises(ValueError):
        make_length_reward(target_tokens=3, target_chars=3)
    with pytest.raises(ValueError):
        make_length_reward(target_chars=-1)
