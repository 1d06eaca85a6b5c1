"""Masked Thought SFT (hfx.MaskedThoughtTrainer): p = 1 masks exactly the completion inputs, p = 0 is SFT, the think
scope, the warm-up schedule (and its resume), packed / padding-free batches, PEFT, add_mask_token, a real training run
and clear errors."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset

import hfx
from hfx.compat import activation_checkpointing
from hfx.data import sft_dataset
from hfx.testing import save_tiny_model, tiny_causal_lm
from hfx.trainers import add_mask_token, mask_rate_at
from hfx.trainers.masked_thought_trainer import sequence_starts, think_region


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("mft") / "tiny", hidden_size=32)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def config(tmp_path, cls=None, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        **activation_checkpointing(False),
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return (cls or hfx.MaskedThoughtConfig)(**base)


def make(model_path, tokenizer, tmp_path, ds=None, **kw):
    ds = sft_dataset(8) if ds is None else ds
    return hfx.MaskedThoughtTrainer(
        model_path, args=config(tmp_path, **kw), train_dataset=ds, processing_class=tokenizer
    )


def batch_of(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


class Capture:
    """Records the input_ids that reach the model's forward."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.seen.append(ids.detach().clone())

    def remove(self):
        self.handle.remove()


def completion_positions(batch) -> torch.Tensor:
    starts = sequence_starts(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    return (batch["labels"] != -100) & ~starts


def test_random_mask_tokens_are_ordinary_tokens_the_model_has(model_path, tokenizer, tmp_path):
    """mask_token="random" draws from the tokenizer's non-special ids below the embedding size: a special token
    (eos, pad) as noise would end or hide a sequence, an id past the embedding fails in the lookup."""
    trainer = make(model_path, tokenizer, tmp_path, mask_token="random")
    ids = set(trainer._random_ids.tolist())
    special = set(tokenizer.all_special_ids)
    assert special and not ids & special
    assert ids == set(range(len(tokenizer))) - special
    trainer.model.resize_token_embeddings(len(tokenizer) - 5)  # an embedding smaller than the tokenizer
    _, fewer = trainer._resolve_mask_token()
    assert int(fewer.max()) < len(tokenizer) - 5 and set(fewer.tolist()) == ids - set(range(len(tokenizer) - 5, 10**6))


def test_sequence_starts_are_never_masked_on_plain_lm_data(model_path, tokenizer, tmp_path):
    """Plain-LM rows (labels = input_ids, so a start token is a label too) under left padding and packing: the
    first token of every sequence is never masked, every other labelled token is at rate 1. The other tests' data
    starts every sequence with a prompt token labelled -100, which hid a start rule that found no start."""
    T, F = True, False
    ids = torch.arange(10, 20).view(2, 5)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    packed = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]])
    want_left = torch.tensor([[T, F, T, F, F], [T, F, F, F, F]])  # column 0 always counts as a start
    want_packed = torch.tensor([[T, F, T, F, F], [T, F, F, T, F]])
    assert torch.equal(sequence_starts(ids, attention_mask=left), want_left)
    assert torch.equal(sequence_starts(ids, position_ids=packed), want_packed)
    trainer = make(model_path, tokenizer, tmp_path, mask_rate=1.0, mask_warmup_ratio=0.0)
    for extra, starts in (({"attention_mask": left}, want_left), ({"position_ids": packed}, want_packed)):
        labels = ids.masked_fill(extra.get("attention_mask", torch.ones_like(ids)) == 0, -100)
        batch, counts = trainer.mask_batch(
            {"input_ids": ids, "labels": labels, **extra}, generator=torch.Generator().manual_seed(0)
        )
        new = batch["input_ids"]
        real_starts = starts & (labels != -100)
        assert real_starts.sum() >= 2 and torch.equal(new[real_starts], ids[real_starts])
        candidates = (labels != -100) & ~starts
        assert counts["candidates"] == int(candidates.sum())
        assert (new[candidates] == trainer._mask_id).all() and torch.equal(new[~candidates], ids[~candidates])


def test_mask_noise_is_a_function_of_seed_step_process_and_micro_step(model_path, tokenizer, tmp_path, monkeypatch):
    """The noise of a micro-batch comes from ``(mask_seed or seed, global step, process index, micro-step)``: the same
    tuple gives the same mask (so a resumed run masks as the first did), and changing any one part changes it."""
    trainer = make(model_path, tokenizer, tmp_path, mask_warmup_ratio=0.0)
    batch = batch_of(trainer, 8)

    def masks(step: int, n: int = 1) -> list[torch.Tensor]:  # the first n micro-batches of optimizer step `step`
        trainer.state.global_step, trainer._mask_micro = step, (None, 0)
        return [trainer.mask_batch(batch, rate=0.5)[0]["input_ids"] for _ in range(n)]

    first, second = masks(2, n=2)  # micro-steps 0 and 1 of step 2
    assert not torch.equal(first, second) and not torch.equal(first, batch["input_ids"])
    trainer.state.global_step = 3  # the micro-step count restarts with each optimizer step
    third = trainer.mask_batch(batch, rate=0.5)[0]["input_ids"]
    assert torch.equal(third, masks(3)[0]) and not torch.equal(third, first)
    assert [torch.equal(m, w) for m, w in zip(masks(2, n=2), (first, second))] == [True, True]
    trainer.args.seed = 1  # mask_seed None: the config's seed
    assert not torch.equal(masks(2)[0], first)
    trainer.args.mask_seed = 0  # mask_seed overrides seed
    assert torch.equal(masks(2)[0], first)
    trainer.args.seed, trainer.args.mask_seed = 0, 5
    assert not torch.equal(masks(2)[0], first)
    trainer.args.mask_seed = None
    monkeypatch.setattr(type(trainer.args), "process_index", property(lambda self: 1))  # another process
    assert not torch.equal(masks(2)[0], first)
    monkeypatch.undo()
    assert torch.equal(masks(2)[0], first)


@pytest.mark.parametrize("mask_token", ["<mask>", "pad", "random"])
def test_p1_masks_every_completion_input_token_only(model_path, tokenizer, tmp_path, mask_token):
    trainer = make(model_path, tokenizer, tmp_path, mask_rate=1.0, mask_warmup_ratio=0.0, mask_token=mask_token)
    batch = batch_of(trainer)
    clean_ids, clean_labels = batch["input_ids"].clone(), batch["labels"].clone()
    comp = completion_positions(batch)
    assert comp.any() and (batch["labels"] == -100).any()  # both a prompt and a completion
    trainer.model.train()
    cap = Capture(trainer.model)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    cap.remove()
    (seen,) = cap.seen
    assert torch.equal(batch["labels"], clean_labels) and torch.equal(batch["input_ids"], clean_ids)  # not in place
    assert torch.equal(seen[~comp], clean_ids[~comp])  # prompt, padding, sequence starts untouched
    if mask_token == "random":
        special = torch.tensor(tokenizer.all_special_ids)
        assert not torch.isin(seen[comp], special).any()
        assert (seen[comp] != clean_ids[comp]).float().mean() > 0.9
    else:
        want = tokenizer.convert_tokens_to_ids("<mask>") if mask_token == "<mask>" else tokenizer.pad_token_id
        assert (seen[comp] == want).all()
    logged = trainer._metrics["train"]
    assert logged["masked_thought/mask_rate"] == [1.0] and logged["masked_thought/masked_fraction"] == [1.0]


def test_p0_is_plain_sft_and_eval_is_clean(model_path, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    ds = sft_dataset(8)
    mft = make(model_path, tokenizer, tmp_path, ds, mask_rate=0.0, mask_warmup_ratio=0.0)
    sft = SFTTrainer(model_path, args=config(tmp_path, SFTConfig), train_dataset=ds, processing_class=tokenizer)
    batch = batch_of(mft)
    assert all(torch.equal(batch[k], batch_of(sft)[k]) for k in batch)
    for t in (mft, sft):
        t.model.train()
    with torch.no_grad():
        assert torch.equal(mft.compute_loss(mft.model, dict(batch)), sft.compute_loss(sft.model, dict(batch)))
        mft.args.mask_rate = 0.5  # masking changes the loss...
        masked = mft.compute_loss(mft.model, dict(batch))
        assert not torch.equal(masked, sft.compute_loss(sft.model, dict(batch)))
        mft.model.eval()  # ...but never in evaluation
        cap = Capture(mft.model)
        mft.compute_loss(mft.model, dict(batch))
        cap.remove()
    assert torch.equal(cap.seen[0], batch["input_ids"])


def test_think_scope_masks_only_inside_think_blocks(model_path, tokenizer, tmp_path):
    ds = sft_dataset(8, think=True)
    trainer = make(model_path, tokenizer, tmp_path, ds, mask_rate=1.0, mask_warmup_ratio=0.0, mask_scope="think")
    batch = batch_of(trainer)
    trainer.model.train()
    masked, counts = trainer.mask_batch(batch)
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    mask_id = tokenizer.convert_tokens_to_ids("<mask>")
    for row_in, row_out, labels in zip(batch["input_ids"], masked["input_ids"], batch["labels"]):
        ids = row_in.tolist()
        o, c = ids.index(open_id), ids.index(close_id)
        assert labels[o] != -100  # the think block is in the completion
        assert (row_out[o + 1 : c] == mask_id).all()
        assert torch.equal(row_out[: o + 1], row_in[: o + 1]) and torch.equal(row_out[c:], row_in[c:])
        answer = tokenizer.decode(row_out[c:][labels[c:] != -100])
        assert "####" in answer  # the answer after </think> stays clean
    assert 0 < counts["masked"] == counts["candidates"] < int(completion_positions(batch).sum())


def test_think_scope_warns_once_when_batches_have_no_think_block(model_path, tokenizer, tmp_path, caplog):
    """mask_scope='think' on data without any <think> block used to train as plain SFT without a word."""

    def warnings_for(trainer, batches):
        trainer.model.train()
        caplog.clear()
        with caplog.at_level(logging.WARNING), torch.no_grad():
            for _ in range(batches):
                trainer.compute_loss(trainer.model, dict(batch_of(trainer)))
        return [r.getMessage() for r in caplog.records if "mask_scope='think'" in r.getMessage()]

    kw = dict(mask_rate=0.4, mask_warmup_ratio=0.0, mask_scope="think")
    plain = make(model_path, tokenizer, tmp_path, sft_dataset(8), **kw)
    (message,) = warnings_for(plain, 2)  # once, not once per batch
    assert "mask_scope='completion'" in message and "think_end_token" in message
    assert plain._metrics["train"]["masked_thought/masked_fraction"] == [0.0, 0.0]
    assert warnings_for(make(model_path, tokenizer, tmp_path, sft_dataset(8, think=True), **kw), 1) == []


def test_think_region_per_sequence_and_implicit_opening():
    OPEN, C = 90, 91  # <think>, </think>
    ids = torch.tensor(
        [
            [1, 2, OPEN, 5, 6, C, 7, 8, 1, OPEN, 5, C, 9, 9],  # two packed sequences, each with a block
            [1, 5, 6, C, 7, 1, 2, 3, 4, OPEN, 5, 5, 1, 5],  # implicit open; plain; unclosed; next
        ]
    )
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1]])
    starts = sequence_starts(ids, position_ids=pos)
    got = think_region(ids, OPEN, C, starts)
    want = torch.zeros_like(ids, dtype=torch.bool)
    want[0, [3, 4, 10]] = True
    want[1, [0, 1, 2, 10, 11]] = True  # row 1 position 0 is "inside" (implicit) but is a sequence start anyway
    assert torch.equal(got, want), got.int()
    # without a start tag id only the implicit rule applies
    assert torch.equal(think_region(ids, None, C, starts)[1], torch.tensor([1, 1, 1] + [0] * 11, dtype=torch.bool))


def test_schedule_values():
    # p_max 0.3, warm-up over 2/3 of 30 steps = 20 steps: linear from 0, then constant
    for step, want in [(0, 0.0), (5, 0.075), (10, 0.15), (19, 0.285), (20, 0.3), (29, 0.3)]:
        assert mask_rate_at(step, 30, 0.3, 2 / 3) == pytest.approx(want)
    assert mask_rate_at(0, 30, 0.3, 0.0) == 0.3 and mask_rate_at(3, None, 0.3, 2 / 3) == 0.3


def test_logged_rate_follows_global_step_and_loss_drops(model_path, tokenizer, tmp_path):
    ds = sft_dataset(96, seed=1)
    trainer = make(model_path, tokenizer, tmp_path, ds, max_steps=12, mask_rate=0.4, mask_warmup_ratio=0.5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, 13))
    # the loss of step k is computed at global_step k - 1
    assert [h["masked_thought/mask_rate"] for h in logs] == pytest.approx(
        [mask_rate_at(k, 12, 0.4, 0.5) for k in range(12)]
    )
    assert logs[0]["masked_thought/masked_fraction"] == 0.0
    assert all(0.2 < h["masked_thought/masked_fraction"] < 0.6 for h in logs[7:])  # realised ≈ 0.4
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"]
    assert trainer.mask_rate == pytest.approx(0.4)


def test_resume_mid_warmup_gives_same_rate_and_loss(model_path, tokenizer, tmp_path):
    ds = sft_dataset(48, seed=2)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, mask_rate=0.5, mask_warmup_ratio=1.0)
    full = make(model_path, tokenizer, tmp_path / "a", ds, **kw)
    full.train()
    resumed = make(model_path, tokenizer, tmp_path / "b", ds, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    logs = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    ref = [h for h in full.state.log_history if "loss" in h and h["step"] > 3]
    assert [h["step"] for h in logs] == [4, 5, 6]
    assert [h["masked_thought/mask_rate"] for h in logs] == pytest.approx([0.5 * k / 6 for k in (3, 4, 5)])
    for got, want in zip(logs, ref):
        assert got["masked_thought/mask_rate"] == want["masked_thought/mask_rate"]
        assert got["masked_thought/masked_fraction"] == want["masked_thought/masked_fraction"]  # the same noise
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)


@pytest.mark.parametrize("scope", ["completion", "think"])
def test_packed_padding_free_batches_respect_boundaries(model_path, tokenizer, tmp_path, scope):
    ds = sft_dataset(12, think=True)
    trainer = make(
        model_path, tokenizer, tmp_path, ds, packing=True, packing_strategy="bfd", max_length=160, mask_rate=1.0,
        mask_warmup_ratio=0.0, mask_scope=scope, per_device_train_batch_size=2,
    )  # fmt: skip
    batch = batch_of(trainer, 2)
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1
    assert int((batch["position_ids"] == 0).sum()) > 2  # several sequences in the row
    trainer.model.train()
    masked, _ = trainer.mask_batch(batch)
    ids, out, labels, pos = batch["input_ids"][0], masked["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    changed = out != ids
    assert changed.any() and not changed[labels == -100].any() and not changed[pos == 0].any()
    # sequence by sequence, the result equals masking each sequence on its own (no leaks across boundaries)
    bounds = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
    mask_id = tokenizer.convert_tokens_to_ids("<mask>")
    for a, b in zip(bounds[:-1], bounds[1:]):
        one = {"input_ids": ids[None, a:b], "labels": labels[None, a:b], "attention_mask": torch.ones(1, b - a)}
        region = completion_positions(one)[0]
        if scope == "think":
            region &= think_region(one["input_ids"], *trainer._think_ids, sequence_starts(one["input_ids"]))[0]
        assert torch.equal(out[a:b], torch.where(region, torch.tensor(mask_id), ids[a:b]))
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)


def test_peft_bone_model_trains_with_masking(model_path, tokenizer, tmp_path):
    peft_config = hfx.BoneConfig(r=8, target_modules=["q_proj", "v_proj"])
    trainer = hfx.MaskedThoughtTrainer(
        model_path, args=config(tmp_path, mask_rate=0.5, mask_warmup_ratio=0.0, max_steps=2), train_dataset=sft_dataset(8),
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("bone" in n for n in before)
    cap = Capture(trainer.model.get_base_model())
    trainer.train()
    cap.remove()
    mask_id = tokenizer.convert_tokens_to_ids("<mask>")
    assert any((ids == mask_id).any() for ids in cap.seen)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    fractions = [h["masked_thought/masked_fraction"] for h in trainer.state.log_history if "loss" in h]
    assert all(0.2 < f < 0.8 for f in fractions)


@pytest.mark.parametrize("tied", [True, False])
def test_add_mask_token_mean_init(tied):
    from hfx.testing import build_tokenizer

    tok = build_tokenizer()
    model = tiny_causal_lm(hidden_size=16, tie_word_embeddings=tied)
    n = len(tok)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    new_id = add_mask_token(model, tok, "<noise>")
    assert new_id == n and len(tok) == n + 1 and tok.convert_ids_to_tokens(new_id) == "<noise>"
    assert tok("a <noise> b")["input_ids"].count(new_id) == 1
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inp.shape[0] == n + 1 and model.config.vocab_size == n + 1
    torch.testing.assert_close(inp[:n], old_in)
    torch.testing.assert_close(inp[new_id], old_in.mean(0))
    if tied:
        assert out.data_ptr() == inp.data_ptr()
    else:
        torch.testing.assert_close(out[new_id], old_out.mean(0))
        assert not torch.allclose(out[new_id], inp[new_id])
    # an existing token is left alone unless reinit=True (then: mean of the *other* rows)
    mask_id = tok.convert_tokens_to_ids("<mask>")
    row = inp[mask_id].detach().clone()
    assert add_mask_token(model, tok) == mask_id and torch.equal(inp[mask_id], row) and len(tok) == n + 1
    add_mask_token(model, tok, reinit=True)
    others = torch.cat([inp[:mask_id], inp[mask_id + 1 : n]]).detach()
    torch.testing.assert_close(model.get_input_embeddings().weight[mask_id], others.mean(0))


def test_add_mask_token_then_trainer_and_peft_order(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hfx.testing import build_tokenizer

    tok = build_tokenizer()
    model = tiny_causal_lm(hidden_size=16)
    with pytest.raises(ValueError, match="add_mask_token"):
        hfx.MaskedThoughtTrainer(model, args=config(tmp_path, mask_token="<m>"), train_dataset=sft_dataset(4),
                                 processing_class=tok)  # fmt: skip
    add_mask_token(model, tok, "<m>")
    trainer = hfx.MaskedThoughtTrainer(
        model, args=config(tmp_path, mask_token="<m>", mask_rate=1.0, mask_warmup_ratio=0.0),
        train_dataset=sft_dataset(4), processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )  # fmt: skip
    trainer.model.train()
    masked, counts = trainer.mask_batch(batch_of(trainer))
    assert (masked["input_ids"] == tok.convert_tokens_to_ids("<m>")).sum() == counts["masked"] > 0
    with pytest.raises(ValueError, match="before it is wrapped"):
        add_mask_token(get_peft_model(tiny_causal_lm(hidden_size=16), LoraConfig(r=2, target_modules=["q_proj"])), tok)


def test_clear_errors(model_path, tokenizer, tmp_path):
    from trl import SFTConfig

    with pytest.raises(ValueError, match="mask_rate must be in"):
        config(tmp_path, mask_rate=1.5)
    with pytest.raises(ValueError, match="mask_rate must be in"):
        config(tmp_path, mask_rate=-0.1)
    with pytest.raises(ValueError, match="mask_warmup_ratio"):
        config(tmp_path, mask_warmup_ratio=2.0)
    with pytest.raises(ValueError, match="mask_scope"):
        config(tmp_path, mask_scope="prompt")
    with pytest.raises(TypeError, match="MaskedThoughtConfig"):
        hfx.MaskedThoughtTrainer(model_path, args=config(tmp_path, SFTConfig), train_dataset=sft_dataset(4))
    with pytest.raises(ValueError, match=r"add_mask_token\(model, tokenizer, '<nomask>'\)"):
        make(model_path, tokenizer, tmp_path, mask_token="<nomask>")
    with pytest.raises(ValueError, match="'</reason>'"):
        make(model_path, tokenizer, tmp_path, mask_scope="think", think_end_token="</reason>")
    with pytest.raises(ValueError, match=r"eval_dataset is empty \(0 rows\)"):
        hfx.MaskedThoughtTrainer(model_path, args=config(tmp_path), train_dataset=sft_dataset(4),
                                 eval_dataset=sft_dataset(4).select([]), processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="none of the columns"):
        make(model_path, tokenizer, tmp_path, Dataset.from_dict({"question": ["a"], "solution": ["b"]}))
    with pytest.raises(ValueError, match="no 'completion' column"):
        make(model_path, tokenizer, tmp_path, Dataset.from_dict({"prompt": ["a"], "answer": ["b"]}))
    with pytest.raises(ValueError, match="completion_only_loss=False"):
        make(model_path, tokenizer, tmp_path, completion_only_loss=False)
    trainer = make(model_path, tokenizer, tmp_path)
    trainer.model.train()
    with pytest.raises(ValueError, match="'labels'"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
