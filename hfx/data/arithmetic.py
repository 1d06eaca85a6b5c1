"""Built-in synthetic reasoning task: seeded multi-step arithmetic word problems (GSM8K style).

Why a synthetic task: hfx's demos, tests and benchmarks must run offline, on CPU, in minutes. The task is small
enough that a 2-4 layer transformer learns it quickly, yet it has a chain of thought, a checkable final answer
(``#### <int>``) and a difficulty knob (number of steps, value range, operations), so one can pre-train a tiny
model on ``"easy"`` problems (addition and subtraction) and adapt it (e.g. with an adapter) to ``"hard"`` ones,
which add multiplication.

Format (shared by every difficulty)::

    Question: Mia has 7 apples. She buys 5 more apples. Then she gives 3 apples to Tom. How many apples does Mia have now?
    Answer:
    7 + 5 = 12
    12 - 3 = 9
    #### 9

Every step is one binary operation ``a op b = c`` on the running total; all values are non-negative integers
bounded by the difficulty's ``max_value``.

Dataset views (``sft_dataset``, ``prompt_dataset``, ``preference_dataset``) return ``datasets.Dataset`` objects in
the column layouts TRL expects. Every view also has an ``answer`` column holding the final answer **as a string**
(``"9"``), GSM8K-style, so that TRL passes it unchanged to reward functions.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "DIFFICULTIES",
    "TEST_FRACTION",
    "Difficulty",
    "Problem",
    "Step",
    "extract_answer",
    "format_prompt",
    "generate_problems",
    "get_difficulty",
    "make_splits",
    "no_trace_solution",
    "preference_dataset",
    "prompt_dataset",
    "rejected_solution",
    "render_solution",
    "sft_dataset",
    "split_of",
]

# --------------------------------------------------------------------------------------------------------------------
# Vocabulary: small and closed, so that a tiny model (and the tiny tokenizer) sees every word many times.
# --------------------------------------------------------------------------------------------------------------------
FEMALE_NAMES = ("Mia", "Ana", "Lily", "Zoe", "Emma", "Nina")
MALE_NAMES = ("Tom", "Sam", "Ben", "Max", "Leo", "Jack")
NAMES = FEMALE_NAMES + MALE_NAMES
# Singular nouns; the plural adds "s".
ITEMS = ("apple", "pen", "book", "card", "coin", "egg", "ball", "toy", "stamp", "cookie", "shell", "marble")

# Step templates per operation. Fields: {s} subject pronoun, {o} object pronoun, {p} possessive, {b} operand,
# {things} noun agreeing with {b}, {other} another person's name.
ADD_TEMPLATES = (
    "{s} buys {b} more {things}.",
    "{s} finds {b} more {things}.",
    "{s} gets {b} more {things}.",
    "{other} gives {o} {b} more {things}.",
)
SUB_TEMPLATES = (
    "{s} gives {b} {things} to {other}.",
    "{s} loses {b} {things}.",
    "{s} sells {b} {things}.",
    "{s} uses {b} {things}.",
)
MUL_TEMPLATES = ("{s} gets {b} times as many {things}.",)
TEMPLATES = {"+": ADD_TEMPLATES, "-": SUB_TEMPLATES, "*": MUL_TEMPLATES}
_PRONOUNS = {"f": ("she", "her", "her"), "m": ("he", "him", "his")}

#: Fraction of the question space (by hash of the question text) that belongs to the ``"test"`` split.
TEST_FRACTION = 0.1

ANSWER_PREFIX = "####"
_MAX_MISSES = 20_000
# the integer, written as one ("12", "1,024", "12.0"), not the start of a longer number: "#### 12.5", "12e3",
# "12/5" or "12 / 5" is no answer (these used to parse as 12)
_ANSWER_RE = re.compile(r"####[ \t]*([+-]?\d+(?:,\d{3})*)(?:\.0+)?(?![\d,]*\d)(?!\.\d|[eE][+-]?\d|[ \t]*/[ \t]*\d)")


# --------------------------------------------------------------------------------------------------------------------
# Difficulty
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator: number of steps, operand/value bounds and allowed operations.

    ``max_operand`` bounds the second operand of ``+``/``-``; ``max_factor`` bounds the factor of ``*``;
    ``max_start`` bounds the starting amount (defaults to ``max_operand``); every value (start, intermediate,
    final) stays in ``[0, max_value]``. ``require_ops`` lists operations every problem uses at least once (e.g.
    ``("*",)``: a preset that is "easy plus multiplication" and never an easy problem in disguise).
    """

    min_steps: int = 1
    max_steps: int = 2
    max_operand: int = 9
    max_value: int = 20
    ops: tuple[str, ...] = ("+", "-")
    max_start: int | None = None
    max_factor: int = 3
    require_ops: tuple[str, ...] = ()
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1 or self.max_value < 1 or self.max_factor < 2:
            raise ValueError("max_operand and max_value must be >= 1 and max_factor >= 2")
        bad = set(self.ops) - set(TEMPLATES)
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty subset of {sorted(TEMPLATES)}, got {self.ops!r}")
        if not set(self.require_ops) <= set(self.ops):
            raise ValueError(f"require_ops must be a subset of ops {self.ops!r}, got {self.require_ops!r}")
        if self.start_bound < 1 or self.start_bound > self.max_value:
            raise ValueError("max_start must be in [1, max_value]")

    @property
    def start_bound(self) -> int:
        """Largest starting amount."""
        return self.max_operand if self.max_start is None else self.max_start

    def key(self) -> str:
        """A stable string identifying the knobs (used to seed the generator)."""
        key = (
            f"steps={self.min_steps}-{self.max_steps};operand={self.max_operand};value={self.max_value};"
            f"start={self.start_bound};factor={self.max_factor};ops={''.join(self.ops)}"
        )
        return key + (f";require={''.join(self.require_ops)}" if self.require_ops else "")


#: Named presets. They share vocabulary and format and differ only in steps, value ranges and operations:
#: easy (1-2 steps of ``+``/``-``), medium (2-3 steps), hard (2 steps, at least one of them ``*``), expert (3-4 steps
#: with ``*``, values up to 50).
DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(min_steps=1, max_steps=2, max_operand=9, max_value=20, ops=("+", "-"), name="easy"),
    "medium": Difficulty(min_steps=2, max_steps=3, max_operand=9, max_value=20, ops=("+", "-"), name="medium"),
    # Easy-sized (two steps, values up to 20) but every problem multiplies: a new operation and a new phrasing
    # ("gets 3 times as many"), which a model pre-trained on easy problems can pick up by adaptation in minutes.
    "hard": Difficulty(
        min_steps=2,
        max_steps=2,
        max_operand=9,
        max_value=20,
        max_factor=3,
        ops=("+", "-", "*"),
        require_ops=("*",),
        name="hard",
    ),
    "expert": Difficulty(
        min_steps=3,
        max_steps=4,
        max_operand=9,
        max_value=50,
        max_start=20,
        max_factor=3,
        ops=("+", "-", "*"),
        name="expert",
    ),
}


def get_difficulty(difficulty: str | Difficulty) -> Difficulty:
    """Resolve a preset name (``easy``/``medium``/``hard``/``expert``) or pass a ``Difficulty`` through."""
    if isinstance(difficulty, Difficulty):
        return difficulty
    try:
        return DIFFICULTIES[difficulty]
    except (KeyError, TypeError):
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTIES)}") from None


# --------------------------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One line of the chain of thought: ``a op b = c``."""

    a: int
    op: str
    b: int
    c: int

    def __str__(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.c}"


@dataclass(frozen=True)
class Problem:
    """A word problem with its worked solution."""

    question: str
    steps: tuple[Step, ...]
    answer: int
    difficulty: str = "custom"

    @property
    def prompt(self) -> str:
        """The question in the standard (non-chat) prompt format, see :func:`format_prompt`."""
        return format_prompt(self.question)

    @property
    def cot(self) -> str:
        """The chain of thought: one ``a op b = c`` line per step."""
        return "\n".join(str(s) for s in self.steps)

    def solution(self, think: bool = False) -> str:
        """The completion: CoT lines then ``#### answer``; with ``think`` the CoT sits inside ``<think>`` tags."""
        return render_solution(self.steps, self.answer, think=think)


def render_solution(steps: tuple[Step, ...] | list[Step], answer: int, think: bool = False) -> str:
    """Render CoT lines and the final answer line (see :meth:`Problem.solution`)."""
    cot = "\n".join(str(s) for s in steps)
    if think:
        return f"<think>\n{cot}\n</think>\n{ANSWER_PREFIX} {answer}"
    return f"{cot}\n{ANSWER_PREFIX} {answer}"


def no_trace_solution(answer: int | str) -> str:
    """The answer with an empty reasoning trace: ``<think>\\n\\n</think>\\n#### answer`` (for BVPO-style views)."""
    return f"<think>\n\n</think>\n{ANSWER_PREFIX} {answer}"


def format_prompt(question: str) -> str:
    """Standard prompt format: ``"Question: <q>\\nAnswer:\\n"``; the completion (CoT) starts on the next line.

    The prompt ends on a newline, which is always its own token, so prompt and completion tokenise the same
    separately and concatenated (TRL checks this for prompt-completion data).
    """
    return f"Question: {question}\nAnswer:\n"


def extract_answer(text: str | None, *, first: bool = False) -> int | None:
    """Parse the integer of the **last** ``#### <int>`` in ``text`` (the first with ``first=True``); else ``None``.

    Tolerates spaces/tabs after the marker, a sign and thousands separators (``#### 1,024``); the integer must
    follow the marker on the same line; ``12.0`` is 12, but a number that goes on as a decimal, exponent or fraction
    (``#### 12.5``, ``#### 3 / 4``) is no answer.
    """
    if not text:
        return None
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    return int(matches[0 if first else -1].replace(",", ""))


def _things(item: str, count: int) -> str:
    return item if count == 1 else item + "s"


def _sample_problem(rng: random.Random, diff: Difficulty) -> Problem | None:
    name = rng.choice(NAMES)
    subj, obj, poss = _PRONOUNS["f" if name in FEMALE_NAMES else "m"]
    item = rng.choice(ITEMS)
    n_steps = rng.randint(diff.min_steps, diff.max_steps)
    cur = rng.randint(1, diff.start_bound)
    sentences = [f"{name} has {cur} {_things(item, cur)}."]
    steps: list[Step] = []
    for i in range(n_steps):
        feasible = []
        if "+" in diff.ops and cur < diff.max_value:
            feasible.append("+")
        if "-" in diff.ops and cur >= 1:
            feasible.append("-")
        if "*" in diff.ops and cur >= 1 and cur * 2 <= diff.max_value:
            feasible.append("*")
        if not feasible:  # e.g. ops=("-",) and the total hit 0: the caller draws a new problem
            return None
        op = rng.choice(feasible)
        if op == "+":
            b = rng.randint(1, min(diff.max_operand, diff.max_value - cur))
            c = cur + b
        elif op == "-":
            b = rng.randint(1, min(diff.max_operand, cur))
            c = cur - b
        else:
            b = rng.randint(2, min(diff.max_factor, diff.max_value // cur))
            c = cur * b
        template = rng.choice(TEMPLATES[op])
        other = rng.choice([n for n in NAMES if n != name])
        sentence = template.format(s=subj, o=obj, p=poss, b=b, things=_things(item, b), other=other)
        sentence = ("Then " + sentence) if i > 0 else sentence[0].upper() + sentence[1:]
        sentences.append(sentence)
        steps.append(Step(cur, op, b, c))
        cur = c
    if not set(diff.require_ops) <= {s.op for s in steps}:  # the caller draws a new problem
        return None
    sentences.append(f"How many {item}s does {name} have now?")
    return Problem(" ".join(sentences), tuple(steps), cur, diff.name)


def _unit_hash(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: a fixed hash-based assignment of the question text, so splits never overlap."""
    return "test" if _unit_hash(question) < TEST_FRACTION else "train"


def generate_problems(
    n: int, difficulty: str | Difficulty = "easy", seed: int = 0, split: str | None = None
) -> list[Problem]:
    """Generate ``n`` distinct problems, deterministically for ``(difficulty, seed, split)``.

    ``split="train"``/``"test"`` keeps only questions whose hash falls in that split (see :func:`split_of`), so a
    train set and a test set never share a question, whatever their seeds or difficulties. ``split=None`` keeps all.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    diff = get_difficulty(difficulty)
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and machines.
    rng = random.Random(f"hfx-arithmetic|{diff.key()}|{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0  # consecutive draws that were duplicates, infeasible or in the other split
    while len(out) < n:
        prob = _sample_problem(rng, diff)
        if prob is None or prob.question in seen or (split is not None and split_of(prob.question) != split):
            misses += 1
            if misses > _MAX_MISSES:
                raise ValueError(
                    f"could only generate {len(out)} distinct {split or ''} problems of {diff}, asked for {n}; the "
                    "difficulty's problem space is too small (or infeasible)"
                )
            continue
        misses = 0
        seen.add(prob.question)
        out.append(prob)
    return out


def make_splits(
    n_train: int, n_test: int, difficulty: str | Difficulty = "easy", seed: int = 0
) -> dict[str, list[Problem]]:
    """Disjoint ``{"train": [...], "test": [...]}`` problem lists (hash-based split, see :func:`split_of`)."""
    return {
        "train": generate_problems(n_train, difficulty, seed=seed, split="train"),
        "test": generate_problems(n_test, difficulty, seed=seed, split="test"),
    }


# --------------------------------------------------------------------------------------------------------------------
# Wrong solutions (for preference data)
# --------------------------------------------------------------------------------------------------------------------
def _replay(steps: tuple[Step, ...], start: int, from_idx: int) -> list[Step] | None:
    """Recompute steps ``from_idx..`` from a new running value; ``None`` if a value would go negative."""
    out = []
    cur = start
    for s in steps[from_idx:]:
        c = cur + s.b if s.op == "+" else cur - s.b if s.op == "-" else cur * s.b
        if c < 0:
            return None
        out.append(Step(cur, s.op, s.b, c))
        cur = c
    return out


def _corrupt(problem: Problem, rng: random.Random) -> tuple[list[Step], int]:
    """A plausible wrong solution: an arithmetic slip or a wrong operation in one step, propagated to the end."""
    steps = problem.steps
    for _ in range(50):
        i = rng.randrange(len(steps))
        s = steps[i]
        if rng.random() < 0.5:  # arithmetic slip: the step's result is off by a little
            wrong_c = s.c + rng.choice((-2, -1, 1, 2))
            if wrong_c < 0:
                continue
            bad = Step(s.a, s.op, s.b, wrong_c)
        else:  # wrong operation: + <-> -, and * read as +
            new_op = {"+": "-", "-": "+", "*": "+"}[s.op]
            wrong_c = s.a + s.b if new_op == "+" else s.a - s.b
            if wrong_c < 0:
                continue
            bad = Step(s.a, new_op, s.b, wrong_c)
        tail = _replay(steps, wrong_c, i + 1)
        if tail is None:
            continue
        new_steps = [*steps[:i], bad, *tail]
        final = new_steps[-1].c
        if final != problem.answer:
            return new_steps, final
    # Always valid fallback: the last step's result is one too high.
    last = steps[-1]
    return [*steps[:-1], Step(last.a, last.op, last.b, last.c + 1)], last.c + 1


def rejected_solution(problem: Problem, seed: int = 0, think: bool = False) -> tuple[str, int]:
    """A deterministic wrong solution text for ``problem`` and its (wrong) final answer."""
    rng = random.Random(f"hfx-rejected|{seed}|{problem.question}")
    steps, final = _corrupt(problem, rng)
    return render_solution(steps, final, think=think), final


# --------------------------------------------------------------------------------------------------------------------
# datasets views
# --------------------------------------------------------------------------------------------------------------------
def _problems(
    n: int, difficulty: str | Difficulty, seed: int, split: str | None, problems: list[Problem] | None
) -> list[Problem]:
    return list(problems) if problems is not None else generate_problems(n, difficulty, seed=seed, split=split)


def _user(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_list(rows)


def sft_dataset(
    n: int = 1000,
    difficulty: str | Difficulty = "easy",
    seed: int = 0,
    split: str | None = "train",
    format: str = "prompt_completion",
    think: bool = False,
    *,
    problems: list[Problem] | None = None,
) -> Dataset:
    """Supervised fine-tuning view in one of TRL's formats.

    - ``"prompt_completion"`` (alias ``"standard"``): ``prompt`` (:func:`format_prompt`) and ``completion``
      (CoT + ``#### answer``; TRL appends EOS itself).
    - ``"conversational"``: ``prompt=[user]``, ``completion=[assistant]`` (user content is the bare question).
    - ``"messages"``: ``messages=[user, assistant]``.
    - ``"text"``: ``text`` = prompt + completion (plain language modelling).

    ``think=True`` wraps the CoT in ``<think>\\n...\\n</think>\\n``. Always adds ``answer`` (string). Pass
    ``problems`` to build the view from an existing problem list instead of generating.
    """
    rows = []
    for p in _problems(n, difficulty, seed, split, problems):
        sol = p.solution(think=think)
        if format in ("prompt_completion", "standard"):
            row = {"prompt": p.prompt, "completion": sol}
        elif format == "conversational":
            row = {"prompt": _user(p.question), "completion": _assistant(sol)}
        elif format == "messages":
            row = {"messages": _user(p.question) + _assistant(sol)}
        elif format == "text":
            row = {"text": p.prompt + sol}
        else:
            raise ValueError(
                f"unknown format {format!r}; choose 'prompt_completion', 'conversational', 'messages' or 'text'"
            )
        row["answer"] = str(p.answer)
        rows.append(row)
    return _to_dataset(rows)


def prompt_dataset(
    n: int = 1000,
    difficulty: str | Difficulty = "easy",
    seed: int = 0,
    split: str | None = "train",
    format: str = "standard",
    *,
    problems: list[Problem] | None = None,
) -> Dataset:
    """Prompt-only view for online RL (GRPO/RLOO): ``prompt`` (string or ``[user]``) and ``answer`` (string)."""
    if format not in ("standard", "conversational"):
        raise ValueError(f"unknown format {format!r}; choose 'standard' or 'conversational'")
    rows = [
        {"prompt": p.prompt if format == "standard" else _user(p.question), "answer": str(p.answer)}
        for p in _problems(n, difficulty, seed, split, problems)
    ]
    return _to_dataset(rows)


def preference_dataset(
    n: int = 1000,
    difficulty: str | Difficulty = "easy",
    seed: int = 0,
    split: str | None = "train",
    format: str = "standard",
    think: bool = False,
    *,
    problems: list[Problem] | None = None,
) -> Dataset:
    """Preference view (DPO & co.): ``prompt``, ``chosen`` (correct solution), ``rejected``, ``answer``.

    ``rejected`` is a plausible wrong solution: one step has an arithmetic slip or the wrong operation, and the
    error is carried through to a wrong final answer. With ``think=True`` solutions use ``<think>`` tags and two
    more columns hold the same answers with an empty trace: ``chosen_no_trace`` / ``rejected_no_trace``
    (``<think>\\n\\n</think>\\n#### answer``). ``format`` is ``"standard"`` or ``"conversational"``.
    """
    if format not in ("standard", "conversational"):
        raise ValueError(f"unknown format {format!r}; choose 'standard' or 'conversational'")
    wrap = (lambda s: s) if format == "standard" else _assistant
    rows = []
    for p in _problems(n, difficulty, seed, split, problems):
        rejected, wrong = rejected_solution(p, seed=seed, think=think)
        row: dict[str, Any] = {
            "prompt": p.prompt if format == "standard" else _user(p.question),
            "chosen": wrap(p.solution(think=think)),
            "rejected": wrap(rejected),
        }
        if think:
            row["chosen_no_trace"] = wrap(no_trace_solution(p.answer))
            row["rejected_no_trace"] = wrap(no_trace_solution(wrong))
        row["answer"] = str(p.answer)
        rows.append(row)
    return _to_dataset(rows)
