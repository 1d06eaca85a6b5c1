"""A tiny, deterministic byte-level BPE tokenizer built locally (no Hub access).

Why: tests, examples and benchmarks need a real ``PreTrainedTokenizerFast`` with a ChatML chat template (with
``{% generation %}`` markers, so TRL's ``assistant_only_loss`` works) and the usual special tokens, without
downloading anything. The BPE is trained in well under a second on an in-code corpus made of the built-in
arithmetic task (:mod:`hfx.data.arithmetic`) and some generic English, so task words are single tokens and the
vocabulary is small (~1k). Digits are split one per token so tiny models can learn arithmetic.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "MASK_TOKEN",
    "THINK_END",
    "THINK_START",
    "build_tokenizer",
    "tokenizer_fingerprint",
]

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "<mask>"
THINK_START = "<think>"
THINK_END = "</think>"
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 512

# ChatML. Assistant content *and* its <|im_end|> are inside {% generation %} so the model is trained to stop.
# With add_generation_prompt and enable_thinking=false, an empty think block is appended (as Qwen3 does).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_GENERIC_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "A model is trained on data and then evaluated on a held out test set.",
    "Please answer the question and explain your reasoning step by step.",
    "The weather is nice today, so we will walk to the park after lunch.",
    "She opened the window and looked at the people in the street below.",
    "He said that the train would leave at noon from the second platform.",
    "We should write small tests that run quickly and check real behaviour.",
    "You are a helpful assistant. Think carefully before you give the final answer.",
    "What is the capital of France? The capital of France is Paris.",
    "Reading books is a good way to learn new words and new ideas.",
    "The children played in the garden until their mother called them home.",
    "This sentence is short. That one is a little longer than this one.",
    "Good morning! How are you? I am fine, thank you very much.",
    "There are many ways to solve a problem, but some are better than others.",
    "If you add two numbers and then subtract one of them, you get the other number back.",
    "The answer is correct. The answer is wrong. Let us check the result again.",
    "Hello world, this is a tiny tokenizer for testing language models offline.",
    "They went to the market to buy some bread, milk, cheese and fruit.",
    "Our team will review the results and share a summary with everyone next week.",
    "The user asked a question and the assistant gave a short and clear reply.",
    "Once upon a time there was a little girl who lived near a big forest.",
    "Learning rate, batch size and the number of steps are important settings.",
    "Each step of the solution should follow from the step before it.",
)


def _corpus() -> list[str]:
    """Training text: the task's vocabulary in context (many problems, all presets) plus generic English."""
    from hfx.data.arithmetic import (
        ADD_TEMPLATES,
        DIFFICULTIES,
        ITEMS,
        MUL_TEMPLATES,
        NAMES,
        SUB_TEMPLATES,
        generate_problems,
        no_trace_solution,
    )

    lines: list[str] = []
    for name in DIFFICULTIES:
        for p in generate_problems(150, name, seed=12345):
            lines.append(p.prompt + p.solution(think=False))
    # Every word of the closed vocabulary, in both cases and forms, so none is left to chance.
    words = list(NAMES) + list(ITEMS) + [i + "s" for i in ITEMS]
    for template in ADD_TEMPLATES + SUB_TEMPLATES + MUL_TEMPLATES:
        words.extend(w.strip(".{}") for w in template.split())
    lines.append(" ".join(words) + " " + " ".join(words).lower())
    lines.append(no_trace_solution(7))
    lines.extend(["user\nassistant\nsystem\ntool\n"] * 4)  # role names as rendered by the chat template
    lines.extend(_GENERIC_ENGLISH * 3)
    return lines


def _train_backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Digits first (one pre-token per digit), then GPT-2 style byte-level splitting of the rest.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, IM_START, IM_END, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Think tags are ordinary (non-special) added tokens: single ids, but kept by decode(skip_special_tokens=True),
    # so reward functions still see them in decoded completions.
    tok.add_tokens(
        [
            AddedToken(THINK_START, special=False, normalized=False),
            AddedToken(THINK_END, special=False, normalized=False),
        ]
    )
    return tok


_LOCK = threading.Lock()
_BACKEND_JSON: str | None = None


def _backend_json() -> str:
    global _BACKEND_JSON
    with _LOCK:
        if _BACKEND_JSON is None:
            _BACKEND_JSON = _train_backend().to_str()
        return _BACKEND_JSON


def tokenizer_fingerprint() -> str:
    """SHA-256 of the trained tokenizer's JSON: identifies the vocabulary (used to key cached tiny models)."""
    return hashlib.sha256(_backend_json().encode("utf-8")).hexdigest()


def build_tokenizer(save_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Build the tiny test tokenizer; if ``save_dir`` is given, also ``save_pretrained`` it there.

    The BPE is trained once per process and cached; every call returns a fresh wrapper (so callers may change
    ``padding_side`` etc. freely). ``<|endoftext|>`` is both EOS and PAD, ``<mask>`` is the mask token,
    ``<|im_start|>``/``<|im_end|>`` are special, ``<think>``/``</think>`` are single non-special tokens.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer
