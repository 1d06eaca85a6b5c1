"""The built-in task: seeded arithmetic word problems with chain of thought, TRL dataset views, rewards, accuracy.

Quick start::

    from hfx.data import accuracy, correctness_reward, generate_problems, prompt_dataset, sft_dataset

    train = sft_dataset(5000, "easy", split="train")           # prompt / completion / answer
    test = generate_problems(200, "hard", split="test")         # never overlaps any "train" split
"""

from .arithmetic import (
    DIFFICULTIES,
    TEST_FRACTION,
    Difficulty,
    Problem,
    Step,
    extract_answer,
    format_prompt,
    generate_problems,
    get_difficulty,
    make_splits,
    no_trace_solution,
    preference_dataset,
    prompt_dataset,
    rejected_solution,
    render_solution,
    sft_dataset,
    split_of,
)
from .metrics import accuracy, generate_completions
from .rewards import completion_text, correctness_reward, format_reward, make_length_reward

__all__ = [
    "DIFFICULTIES",
    "TEST_FRACTION",
    "Difficulty",
    "Problem",
    "Step",
    "accuracy",
    "completion_text",
    "correctness_reward",
    "extract_answer",
    "format_prompt",
    "format_reward",
    "generate_completions",
    "generate_problems",
    "get_difficulty",
    "make_length_reward",
    "make_splits",
    "no_trace_solution",
    "preference_dataset",
    "prompt_dataset",
    "rejected_solution",
    "render_solution",
    "sft_dataset",
    "split_of",
]
