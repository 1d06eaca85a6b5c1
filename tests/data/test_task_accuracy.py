"""accuracy() / generate_completions(): batching, ordering, left padding, prompt formats, PEFT models."""

from __future__ import annotations

import pytest
import torch

from hfx.data import accuracy, generate_completions, generate_problems, prompt_dataset, sft_dataset
from hfx.testing import build_tokenizer, tiny_causal_lm


class OracleModel(torch.nn.Module):
    """Answers from a lookup table keyed by the prompt text; wrong on purpose for the questions in `wrong`."""

    def __init__(self, tokenizer, problems, wrong=()):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tok = tokenizer
        self.solutions = {}
        for p in problems:
            self.solutions[p.prompt] = p.solution()
            chat = tokenizer.apply_chat_template(
                [{"role": "user", "content": p.question}], tokenize=False, add_generation_prompt=True
            )
            self.solutions[chat] = p.solution()
        self.wrong = set(wrong)
        self.padding_seen = []
        self.generation_config = None

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        assert not self.training
        pad = generation_config.pad_token_id
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n_pad = mask.index(1)
            assert all(m == 1 for m in mask[n_pad:]), "padding must be on the left"
            assert all(i == pad for i in ids[:n_pad])
            self.padding_seen.append(n_pad)
            prompt = self.tok.decode(ids[n_pad:])
            solution = self.solutions[prompt]
            if prompt in self.wrong:
                solution = solution.rsplit("#### ", 1)[0] + "#### 999"
            new = self.tok(solution, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(new[: generation_config.max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_oracle_accuracy_and_order(tok):
    problems = generate_problems(23, "medium", seed=3, split="test")
    wrong = {p.prompt for p in problems[::4]}  # 6 of 23 wrong
    model = OracleModel(tok, problems, wrong)
    model.train()
    acc, completions = accuracy(model, tok, problems, batch_size=5, return_completions=True)
    assert acc == pytest.approx(17 / 23)
    for p, c in zip(problems, completions):  # results come back in input order
        assert c == (p.solution() if p.prompt not in wrong else p.solution().rsplit("#### ", 1)[0] + "#### 999")
    assert model.training and tok.padding_side == "right"  # both restored
    assert max(model.padding_seen) > 0  # batches really were padded


def test_accuracy_on_dataset_views(tok):
    problems = generate_problems(10, "hard", seed=1, split="test")
    model = OracleModel(tok, problems)
    for ds in (
        prompt_dataset(problems=problems),
        prompt_dataset(problems=problems, format="conversational"),
        sft_dataset(problems=problems, format="messages"),
        sft_dataset(problems=problems, format="conversational"),
    ):
        assert accuracy(model, tok, ds, batch_size=4) == 1.0
    assert accuracy(model, tok, problems, chat=True) == 1.0
    with pytest.raises(ValueError):
        accuracy(model, tok, [])


def test_text_after_answer_is_ignored(tok):
    problems = generate_problems(2, "easy", seed=0)

    class Rambling(OracleModel):
        def generate(self, input_ids, attention_mask, generation_config, **kwargs):
            out = super().generate(input_ids, attention_mask, generation_config)
            tail = torch.tensor(tok("\nQuestion: ...\n#### 12345", add_special_tokens=False)["input_ids"])
            return torch.cat([out, tail.expand(out.shape[0], -1)], dim=1)

    assert accuracy(Rambling(tok, problems), tok, problems) == 1.0


def test_real_model_batched_equals_unbatched(tok):
    problems = generate_problems(6, "easy", seed=5, split="test")
    model = tiny_causal_lm(hidden_size=32, dtype=torch.float64)
    prompts = [p.prompt for p in problems]
    batched = generate_completions(model, tok, prompts, max_new_tokens=8, batch_size=6)
    single = generate_completions(model, tok, prompts, max_new_tokens=8, batch_size=1)
    assert batched == single
    assert all(isinstance(c, str) for c in batched)
    acc = accuracy(model, tok, problems, max_new_tokens=8)
    assert 0.0 <= acc <= 1.0


def test_peft_model(tok):
    from peft import LoraConfig, get_peft_model

    problems = generate_problems(4, "easy", seed=5, split="test")
    model = get_peft_model(tiny_causal_lm(hidden_size=32), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    acc, completions = accuracy(model, tok, problems, max_new_tokens=6, return_completions=True)
    assert 0.0 <= acc <= 1.0 and len(completions) == 4
    assert model.training
