"""The built-in arithmetic task: determinism, splits, arithmetic correctness, difficulty bounds, dataset views."""

from __future__ import annotations

import re

import pytest

from hfx.data import (
    DIFFICULTIES,
    Difficulty,
    Problem,
    extract_answer,
    format_prompt,
    generate_problems,
    get_difficulty,
    make_splits,
    preference_dataset,
    prompt_dataset,
    sft_dataset,
    split_of,
)

LINE_RE = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def check_solution(question: str, solution: str, difficulty: Difficulty | None = None) -> int:
    """Independently re-check a solution text against its question; return the final answer."""
    body = solution
    if body.startswith("<think>\n"):
        cot, sep, answer_part = body[len("<think>\n") :].partition("\n</think>\n")
        assert sep, solution
        lines = cot.split("\n") + [answer_part]
    else:
        lines = body.split("\n")
    *steps, last = lines
    m = re.fullmatch(r"#### (\d+)", last)
    assert m, f"bad answer line {last!r}"
    answer = int(m.group(1))

    numbers = [int(x) for x in re.findall(r"\d+", question)]
    sentences = question.split(". ")
    step_sentences = sentences[1:-1]  # between "X has N items" and "How many ... now?"
    assert len(steps) >= 1
    running = numbers[0]  # "X has N items." opens every question
    assert question.split(".")[0].split()[1] == "has"
    for i, line in enumerate(steps):
        m = LINE_RE.match(line)
        assert m, f"bad step line {line!r}"
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        assert a == running, (question, solution)  # chained on the running total
        assert OPS[op](a, b) == c, line  # arithmetic is right
        assert b == numbers[i + 1], (question, solution)  # operands appear in the question, in order
        sentence = step_sentences[i]
        expected_op = "*" if "times as many" in sentence else "+" if " more " in sentence else "-"
        assert op == expected_op, (sentence, line)
        if difficulty is not None:
            assert op in difficulty.ops
            assert 0 <= c <= difficulty.max_value
            assert 1 <= b <= (difficulty.max_factor if op == "*" else difficulty.max_operand)
        running = c
    assert answer == running
    assert len(numbers) == len(steps) + 1 == len(step_sentences) + 1
    return answer


# ---------------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------------
def test_deterministic_per_seed():
    assert generate_problems(50, "hard", seed=3) == generate_problems(50, "hard", seed=3)
    a = {p.question for p in generate_problems(50, "hard", seed=3)}
    b = {p.question for p in generate_problems(50, "hard", seed=4)}
    assert len(a & b) < 5
    assert generate_problems(10, "easy", seed=0)[0].question == generate_problems(10, "easy", seed=0)[0].question
    # A longer list extends a shorter one (same stream).
    assert generate_problems(30, "easy", seed=1)[:10] == generate_problems(10, "easy", seed=1)


def test_problems_are_distinct():
    problems = generate_problems(2000, "easy", seed=0)
    assert len({p.question for p in problems}) == 2000


def test_splits_are_disjoint():
    train = {p.question for d in DIFFICULTIES for p in generate_problems(1000, d, seed=0, split="train")}
    test = {p.question for d in DIFFICULTIES for p in generate_problems(300, d, seed=5, split="test")}
    assert not train & test
    assert all(split_of(q) == "train" for q in train) and all(split_of(q) == "test" for q in test)
    splits = make_splits(300, 100, "medium", seed=2)
    assert len(splits["train"]) == 300 and len(splits["test"]) == 100
    assert not {p.question for p in splits["train"]} & {p.question for p in splits["test"]}
    # Unsplit generation mixes both, at roughly the test fraction.
    mixed = [split_of(p.question) for p in generate_problems(2000, "hard", seed=0)]
    assert 0.05 < mixed.count("test") / len(mixed) < 0.15


@pytest.mark.parametrize("name", sorted(DIFFICULTIES))
def test_cot_is_correct_and_within_bounds(name):
    diff = DIFFICULTIES[name]
    problems = generate_problems(400, name, seed=11)
    n_steps = set()
    values = []
    for p in problems:
        assert p.difficulty == name
        answer = check_solution(p.question, p.solution(), diff)
        assert answer == p.answer
        assert check_solution(p.question, p.solution(think=True), diff) == p.answer
        assert diff.min_steps <= len(p.steps) <= diff.max_steps
        assert 1 <= p.steps[0].a <= diff.start_bound
        n_steps.add(len(p.steps))
        values += [s.c for s in p.steps]
        assert p.cot == "\n".join(f"{s.a} {s.op} {s.b} = {s.c}" for s in p.steps)
    # The whole range is used.
    assert n_steps == set(range(diff.min_steps, diff.max_steps + 1))
    assert {s.op for p in problems for s in p.steps} == set(diff.ops)
    assert max(values) >= diff.max_value - 3 and min(values) == 0


def test_presets_share_format_and_differ_in_size():
    easy, medium, hard, expert = (DIFFICULTIES[n] for n in ("easy", "medium", "hard", "expert"))
    assert (easy.min_steps, easy.max_steps, easy.max_value, easy.ops) == (1, 2, 20, ("+", "-"))
    assert (medium.min_steps, medium.max_steps, medium.max_value, medium.ops) == (2, 3, 20, ("+", "-"))
    # hard: easy-sized (two steps, same values) but every problem has a multiplication, which easy never has
    assert (hard.min_steps, hard.max_steps, hard.max_value) == (2, 2, easy.max_value)
    assert hard.ops == ("+", "-", "*") and hard.require_ops == ("*",) and not easy.require_ops
    assert all(any(s.op == "*" for s in p.steps) for p in generate_problems(300, "hard", seed=0))
    assert not any(s.op == "*" for d in ("easy", "medium") for p in generate_problems(300, d, seed=0) for s in p.steps)
    # expert: longer chains than medium, larger values than hard, and multiplication
    assert expert.min_steps > medium.min_steps and expert.max_value > hard.max_value and "*" in expert.ops
    assert get_difficulty("medium") is DIFFICULTIES["medium"]
    with pytest.raises(ValueError, match="easy"):
        get_difficulty("impossible")


def test_custom_difficulty():
    diff = Difficulty(min_steps=2, max_steps=2, max_operand=3, max_value=6, ops=("-",), max_start=6)
    for p in generate_problems(40, diff, seed=0):
        assert len(p.steps) == 2 and p.difficulty == "custom"
        check_solution(p.question, p.solution(), diff)
    with pytest.raises(ValueError):
        Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        Difficulty(ops=("/",))
    with pytest.raises(ValueError, match="require_ops"):
        Difficulty(ops=("+", "-"), require_ops=("*",))
    with pytest.raises(ValueError, match="distinct"):  # the problem space is smaller than asked for
        generate_problems(10**6, Difficulty(min_steps=1, max_steps=1, max_operand=1, max_value=1, ops=("-",)), seed=0)


def test_require_ops():
    base = Difficulty(min_steps=1, max_steps=2, ops=("+", "-"))
    needs_minus = Difficulty(min_steps=1, max_steps=2, ops=("+", "-"), require_ops=("-",))
    assert any("-" not in {s.op for s in p.steps} for p in generate_problems(300, base, seed=0))  # the knob matters
    problems = generate_problems(300, needs_minus, seed=0)
    assert all("-" in {s.op for s in p.steps} for p in problems)
    assert {len(p.steps) for p in problems} == {1, 2}
    for p in problems:
        check_solution(p.question, p.solution(), needs_minus)
    # Without require_ops the key, hence the problem stream, is what it was before the knob existed.
    assert base.key() == "steps=1-2;operand=9;value=20;start=9;factor=3;ops=+-"
    assert needs_minus.key() != base.key()


def test_format_prompt_and_question_text():
    p = generate_problems(1, "easy", seed=0)[0]
    assert p.prompt == format_prompt(p.question) == f"Question: {p.question}\nAnswer:\n"
    assert p.question.endswith("have now?")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 + 5 = 12\n#### 12", 12),
        ("#### 3\n#### 4", 4),  # the last one wins
        ("####7", 7),
        ("#### -3", -3),
        ("#### +8", 8),
        ("#### 1,024", 1024),
        ("#### 12\n", 12),
        ("#### 12 apples", 12),
        ("#### 12.", 12),
        ("#### 12.5", None),  # a longer number than the integer: no answer (these parsed as 12)
        ("#### 12.0", 12),  # an integer-valued decimal is the integer (as a float answer column is)
        ("#### 12.05", None),
        ("#### 12e3", None),
        ("#### 12/5", None),
        ("#### 3 / 4", None),
        ("#### 1,024.5", None),
        ("#### 12. Next", 12),
        ("#### twelve", None),
        ("####\n12", None),  # the number must be on the marker's line
        ("12", None),
        ("", None),
        (None, None),
        ("### 5", None),
        ("#### 5\n#### x", 5),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_first():
    assert extract_answer("#### 3\nQuestion: ...\n#### 4", first=True) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Dataset views
# ---------------------------------------------------------------------------------------------------------------------
def test_sft_prompt_completion():
    ds = sft_dataset(30, "medium", seed=1)
    assert ds.column_names == ["prompt", "completion", "answer"]
    problems = generate_problems(30, "medium", seed=1, split="train")
    for row, p in zip(ds, problems):
        assert row["prompt"] == p.prompt
        assert row["completion"] == p.solution()
        assert row["answer"] == str(p.answer) and isinstance(row["answer"], str)
        assert not row["completion"].endswith("<|endoftext|>")  # EOS is TRL's job
        assert check_solution(p.question, row["completion"]) == int(row["answer"])
    assert sft_dataset(5, format="standard")[:] == sft_dataset(5)[:]


def test_sft_other_formats():
    p = generate_problems(3, "easy", seed=0, split="test")[0]
    conv = sft_dataset(3, "easy", split="test", format="conversational")[0]
    assert conv["prompt"] == [{"role": "user", "content": p.question}]
    assert conv["completion"] == [{"role": "assistant", "content": p.solution()}]
    msgs = sft_dataset(3, "easy", split="test", format="messages")[0]
    assert msgs["messages"] == conv["prompt"] + conv["completion"]
    text = sft_dataset(3, "easy", split="test", format="text")[0]
    assert text["text"] == p.prompt + p.solution()
    assert {conv["answer"], msgs["answer"], text["answer"]} == {str(p.answer)}
    with pytest.raises(ValueError, match="format"):
        sft_dataset(2, format="chatml")


def test_sft_think():
    row = sft_dataset(5, "hard", think=True)[0]
    assert row["completion"].startswith("<think>\n")
    cot, answer_line = row["completion"][len("<think>\n") :].split("\n</think>\n")
    assert answer_line == f"#### {row['answer']}"
    assert all(LINE_RE.match(line) for line in cot.split("\n"))


def test_sft_from_problems():
    problems = generate_problems(4, "expert", seed=9)
    ds = sft_dataset(problems=problems)
    assert len(ds) == 4 and ds[2]["completion"] == problems[2].solution()


def test_prompt_dataset():
    ds = prompt_dataset(20, "hard", seed=2, split="test")
    problems = generate_problems(20, "hard", seed=2, split="test")
    assert ds.column_names == ["prompt", "answer"]
    assert ds["prompt"] == [p.prompt for p in problems] and ds["answer"] == [str(p.answer) for p in problems]
    conv = prompt_dataset(20, "hard", seed=2, split="test", format="conversational")
    assert conv[0]["prompt"] == [{"role": "user", "content": problems[0].question}]
    with pytest.raises(ValueError):
        prompt_dataset(2, format="text")


@pytest.mark.parametrize("name", ["easy", "expert"])
def test_preference_chosen_right_rejected_wrong(name):
    ds = preference_dataset(200, name, seed=4)
    assert ds.column_names == ["prompt", "chosen", "rejected", "answer"]
    kinds = set()
    for row in ds:
        question = row["prompt"][len("Question: ") : -len("\nAnswer:\n")]
        assert check_solution(question, row["chosen"]) == int(row["answer"])
        wrong = extract_answer(row["rejected"])
        assert wrong is not None and wrong != int(row["answer"]) and wrong >= 0
        # Plausible: same format and number of steps, one step differs and the error is carried forward.
        chosen_lines, rejected_lines = row["chosen"].split("\n"), row["rejected"].split("\n")
        assert len(chosen_lines) == len(rejected_lines)
        assert all(LINE_RE.match(line) for line in rejected_lines[:-1])
        first_diff = next(i for i, (a, b) in enumerate(zip(chosen_lines, rejected_lines)) if a != b)
        a, op, b, c = LINE_RE.match(rejected_lines[first_diff]).groups()
        kinds.add("slip" if OPS[op](int(a), int(b)) != int(c) else "wrong_op")
        for line in rejected_lines[first_diff + 1 : -1]:  # later steps are computed correctly from the error
            a, op, b, c = LINE_RE.match(line).groups()
            assert OPS[op](int(a), int(b)) == int(c)
    assert kinds == {"slip", "wrong_op"}
    assert preference_dataset(20, name, seed=4)[:] == preference_dataset(20, name, seed=4)[:]


def test_preference_think_and_conversational():
    ds = preference_dataset(10, "medium", think=True, format="conversational")
    assert ds.column_names == ["prompt", "chosen", "rejected", "chosen_no_trace", "rejected_no_trace", "answer"]
    for row in ds:
        assert row["prompt"][0]["role"] == "user"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen.startswith("<think>\n") and rejected.startswith("<think>\n")
        assert row["chosen_no_trace"][0]["content"] == f"<think>\n\n</think>\n#### {row['answer']}"
        assert extract_answer(row["rejected_no_trace"][0]["content"]) == extract_answer(rejected)
        assert extract_answer(chosen) == int(row["answer"]) != extract_answer(rejected)


def test_problem_is_hashable_value():
    p = generate_problems(1, "easy")[0]
    assert isinstance(p, Problem) and hash(p) == hash(generate_problems(1, "easy")[0])
