"""GVM (hfx.gvm, hfx.GVMRAFTTrainer, hfx.GVMGRPOTrainer): Proposition 1 against a brute-force minimiser, rounding,
zero-p prompts, per-sample embedding-gradient norms against separate backward passes, training runs for RAFT++,
GVM-RAFT++ and GVM-GRPO, resume of the allocation, and clear errors."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
from datasets import Dataset

import hfx
from hfx.compat import activation_checkpointing
from hfx.data import correctness_reward, prompt_dataset
from hfx.gvm import (
    GVMAllocation,
    allocate,
    allocate_samples,
    embedding_grad_norms,
    pilot_statistics,
    proposition1,
    round_allocation,
    uniform_allocation,
    variance_objective,
)
from hfx.testing import save_tiny_model, tiny_causal_lm

P5 = [0.1, 0.5, 0.9, 0.3, 0.05]
G5 = [1.0, 2.0, 0.5, 3.0, 1.5]


# ------------------------------------------------------------------------------------------------ Proposition 1
def brute_force(p, G, budget, min_per_prompt=1):
    """Exhaustive integer minimiser of Eq. 7 over all allocations with Σ n = budget, n_i >= min (float64)."""
    k = len(p)
    c = np.array([g**2 / (pi + 1e-3 / pi) for pi, g in zip(p, G)], dtype=np.float64)  # Eq. 7 with β = 2
    free = budget - k * min_per_prompt
    cuts = np.array(list(itertools.combinations(range(free + k - 1), k - 1)))  # stars and bars
    bounds = np.concatenate([-np.ones((len(cuts), 1), int), cuts, np.full((len(cuts), 1), free + k - 1)], axis=1)
    n = np.diff(bounds, axis=1) - 1 + min_per_prompt
    values = (c / n).sum(1)
    best = values.argmin()
    return n[best], values[best]


def test_proposition1_matches_brute_force():
    budget = 40
    n_int, f_int = brute_force(P5, G5, budget)
    cont = np.array(proposition1(P5, G5, budget))
    assert cont.sum() == pytest.approx(budget, rel=1e-12)
    # the exact minimiser is within one sample of the continuous optimum, prompt by prompt
    assert np.all(np.abs(n_int - cont) < 1.0)
    # the continuous optimum is a lower bound of the integer one, and the rounded Prop. 1 allocation is near-optimal
    assert variance_objective(cont, P5, G5) <= f_int + 1e-12
    rounded = allocate_samples(P5, G5, budget)
    assert variance_objective(rounded, P5, G5) <= f_int * (1 + 1e-2)
    # and Prop. 1 beats a fine grid of random feasible points (continuous problem)
    rng = np.random.default_rng(0)
    for x in rng.dirichlet(np.ones(5), size=20000) * budget:
        assert variance_objective(cont, P5, G5) <= variance_objective(x, P5, G5) + 1e-12
    # closed form: n_i ∝ G_i / sqrt(p_i + α/p_i)
    w = np.array([g / np.sqrt(p + 1e-3 / p) for p, g in zip(P5, G5)])
    assert cont == pytest.approx(budget * w / w.sum(), rel=1e-12)


def test_minimum_per_prompt_matches_brute_force():
    budget, m = 40, 6
    n_int, f_int = brute_force(P5, G5, budget, min_per_prompt=m)
    cont = np.array(proposition1(P5, G5, budget, min_per_prompt=m))
    assert cont.min() >= m - 1e-12 and cont.sum() == pytest.approx(budget)
    assert np.all(np.abs(n_int - cont) < 1.0)
    assert variance_objective(cont, P5, G5) <= f_int + 1e-12
    assert min(allocate_samples(P5, G5, budget, min_per_prompt=m)) >= m


@pytest.mark.parametrize("budget", [7, 40, 41, 100, 1003])
def test_rounding_preserves_budget_and_zero_p_gets_zero(budget):
    p = [0.0, 0.2, 0.7, 0.0, 1.0, 0.4, 0.3]
    G = [5.0, 1.0, 2.0, 3.0, 0.7, 0.0, 1.2]
    n = allocate_samples(p, G, budget)
    assert sum(n) == budget and all(isinstance(x, int) and x >= 0 for x in n)
    assert n[0] == n[3] == 0  # p = 0
    assert n[5] == 0  # G = 0
    cont = proposition1(p, G, budget)
    assert all(abs(a - b) < 1 for a, b in zip(n, cont))
    assert round_allocation([0.5, 0.5, 1.0], 2) == [1, 0, 1]  # ties: lower index first


def test_allocation_errors():
    with pytest.raises(ValueError, match="smaller than min_per_prompt"):
        allocate_samples([0.5, 0.5, 0.0], [1.0, 1.0, 1.0], budget=5, min_per_prompt=3)
    with pytest.raises(ValueError, match="nothing to allocate"):
        allocate_samples([0.0, 0.0], [1.0, 1.0], budget=5)
    with pytest.raises(ValueError, match="p_i"):
        allocate_samples([1.5], [1.0], budget=5)
    # these were a "math domain error", a NaN-to-int error, a silent budget of 7 and a ZeroDivisionError
    with pytest.raises(ValueError, match=r"alpha and beta must be finite numbers >= 0, got alpha=-1"):
        allocate_samples([0.5, 0.5], [1.0, 1.0], budget=7, alpha=-1)
    assert allocate_samples([0.5, 0.5], [1e308, 1e308], budget=7) == [4, 3]
    with pytest.raises(ValueError, match=r"budget must be a whole number >= 0, got 7.9"):
        allocate_samples([0.5, 0.5], [1.0, 1.0], budget=7.9)
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        uniform_allocation(0, 2)


def test_allocation_record_roundtrip(tmp_path):
    alloc = GVMAllocation(indices=[3, 1, 2], p=[0.0, 0.5, 1.0], G=[0.0, 1.0, 2.0], n=[0, 4, 4], budget=8)
    alloc.save(tmp_path / "a.json")
    assert GVMAllocation.load(tmp_path / "a.json") == alloc
    summary = alloc.summary()
    assert summary["frac_dropped"] == pytest.approx(1 / 3) and summary["mean_p"] == pytest.approx(0.5)
    assert sum(alloc.histogram(4)["counts"]) == 3
    # a key from a newer hfx is ignored, as in the other state files (it was a TypeError); inconsistent lists are named
    assert GVMAllocation.from_dict({**alloc.to_dict(), "added_later": 1}) == alloc
    with pytest.raises(ValueError, match=r"lengths \{'indices': 3, 'p': 3, 'G': 3, 'n': 2\}"):
        GVMAllocation.from_dict({**alloc.to_dict(), "n": [4, 4]})
    with pytest.raises(ValueError, match="counts summing to 9 for a budget of 8"):
        GVMAllocation.from_dict({**alloc.to_dict(), "n": [1, 4, 4]})


# ------------------------------------------------------------------------------------------------ gradient norms
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_embedding_grad_norms_equal_separate_backward_passes(arch):
    model = tiny_causal_lm(arch, hidden_size=32, tie_word_embeddings=False).double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (4, 14), generator=gen)
    ids[0, 3] = ids[0, 9] = ids[0, 11]  # a repeated token: its gradient rows must be summed before the norm
    lengths = [14, 11, 7, 12]
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        attn[b, :n] = 1
        loss[b, 4:n] = 1
    batched = embedding_grad_norms(model, ids, attn, loss)
    weight = model.get_input_embeddings().weight
    for b, n in enumerate(lengths):
        model.zero_grad()
        logits = model(input_ids=ids[b : b + 1, :n]).logits[0, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, ids[b, 1:n, None]).squeeze(-1)
        (logp * loss[b, 1:n]).sum().backward()
        assert batched[b].item() == pytest.approx(weight.grad.norm().item(), rel=1e-9)
    model.zero_grad()
    embedding_grad_norms(model, ids, attn, loss)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # parameters untouched


# ------------------------------------------------------------------------------------------------ pilot statistics
def test_pilot_statistics_and_errors():
    rows = [{"prompt": f"q{i}"} for i in range(5)]
    table = {"q0": [1, 1, 0, 0], "q1": [0, 0, 0, 0], "q2": [1, 1, 1, 1], "q3": [None, 1, None, 0], "q4": [1, 0, 0, 0]}

    def generate_fn(batch):
        counts: dict[str, int] = {}
        outs = []
        for r in batch:
            k = counts.get(r["prompt"], 0)
            counts[r["prompt"]] = k + 1
            outs.append((r["prompt"], k))
        return [[1]] * len(batch), [[2, 3]] * len(batch), outs

    def score_fn(batch, completions, ids):
        return torch.tensor([float("nan") if table[q][k] is None else table[q][k] for q, k in completions])

    def grad_fn(prompt_ids, completion_ids):  # pilot k of each prompt has gradient norm k + 1
        return [1.0 + k % 4 for k in range(len(prompt_ids))]

    p, G, info = pilot_statistics(
        rows, list(range(5)), num_pilot=4, generate_fn=generate_fn, score_fn=score_fn, grad_fn=grad_fn,
        prompts_per_batch=2, show_progress=False,
    )  # fmt: skip
    assert p == [0.5, 0.0, 1.0, 0.5, 0.25]  # None-scored samples are left out of p
    assert G == [1.5, 0.0, 2.5, 2.0, 1.0]  # the mean norm over the accepted samples only (Prop. 1's G_i)
    assert info["pilot_samples"] == 20 and info["pilot_scored"] == 18
    with pytest.raises(ValueError, match="returned None for every pilot sample"):
        pilot_statistics(
            rows, list(range(5)), num_pilot=2, generate_fn=generate_fn, grad_fn=grad_fn, show_progress=False,
            score_fn=lambda b, c, i: torch.full((len(b),), float("nan")),
        )  # fmt: skip


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("gvm") / "tiny", hidden_size=32)


def hash_reward(completions, **kwargs):
    """Deterministic pseudo-verifier: accepts about a third of the completions of a random tiny model."""
    return [1.0 if int(hashlib.sha1(c.encode()).hexdigest(), 16) % 3 == 0 else 0.0 for c in completions]


def test_standalone_allocate(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    alloc = allocate(model, tok, prompt_dataset(6), hash_reward, num_pilot=4, max_new_tokens=6, show_progress=False)
    assert sum(alloc.n) == alloc.budget == 24
    assert all(n == 0 for n, p in zip(alloc.n, alloc.p) if p == 0)
    assert any(p > 0 for p in alloc.p) and all(g > 0 for g, p in zip(alloc.G, alloc.p) if p > 0)
    with pytest.raises(ValueError, match="'answer' column"):
        allocate(model, tok, prompt_dataset(4).remove_columns("answer"), correctness_reward, show_progress=False)
    with pytest.raises(ValueError, match="returned None for every pilot sample"):
        allocate(model, tok, prompt_dataset(2), lambda completions, **kw: [None] * len(completions),
                 num_pilot=2, max_new_tokens=4, show_progress=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------ trainers
def config(tmp_path, cls=hfx.GVMRAFTConfig, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        **activation_checkpointing(False),
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        gvm_num_pilot=4,
        gvm_pool_size=6,
        gvm_refresh_steps=2,
        beta=0.0,
    )
    base.update(kw)
    return cls(**base)


def changed(trainer, model_path):
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(model_path).state_dict()
    return any(not torch.equal(init[n], p.detach()) for n, p in trainer.model.named_parameters() if n in init)


@pytest.mark.parametrize(
    "cls,trainer_cls,gvm",
    [
        (hfx.GVMRAFTConfig, hfx.GVMRAFTTrainer, False),  # plain RAFT++
        (hfx.GVMRAFTConfig, hfx.GVMRAFTTrainer, True),  # GVM-RAFT++
        (hfx.GVMGRPOConfig, hfx.GVMGRPOTrainer, True),  # GVM-GRPO
    ],
    ids=["raft", "gvm-raft", "gvm-grpo"],
)
def test_train_runs(model_path, tmp_path, cls, trainer_cls, gvm):
    args = config(tmp_path, cls=cls, gvm=gvm)
    trainer = trainer_cls(model_path, reward_funcs=hash_reward, args=args, train_dataset=prompt_dataset(8))
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    assert changed(trainer, model_path)
    state = trainer.gvm_state
    assert state.iteration == 1 and sum(state.n) == state.budget == 24
    assert all(n % 2 == 0 for n in state.n)  # whole groups of num_generations
    assert hist[-1]["gvm/iteration"] == 1 and "gvm/frac_dropped" in hist[-1] and "gvm/mean_p" in hist[-1]
    if gvm:
        assert hist[-1]["gvm/pilot_samples_total"] == 48  # 2 rounds x 6 prompts x 4 pilot samples
        assert all(n == 0 for n, p in zip(state.n, state.p) if p == 0)
    else:
        assert state.uniform and hist[-1]["gvm/pilot_samples_total"] == 0


def test_grpo_advantages_normalised_over_all_copies(model_path, tmp_path):
    args = config(tmp_path, cls=hfx.GVMGRPOConfig, max_steps=1, gvm=False, gvm_budget=8, gvm_pool_size=2)
    trainer = hfx.GVMGRPOTrainer(model_path, reward_funcs=hash_reward, args=args, train_dataset=prompt_dataset(8))
    trainer.gvm_refresh()
    ids = trainer._plan_slice(0, 4)
    assert len(set(ids)) == 1  # 4 samples = 2 copies (groups) of one prompt in this generation batch
    trainer._gvm_batch_ids = ids
    trainer._gvm_rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    out = {"advantages": torch.zeros(4), "completion_mask": torch.ones(4, 3)}
    trainer._gvm_rewrite_advantages(out, 0, 4)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert out["advantages"] == pytest.approx(((r - r.mean()) / (r.std() + 1e-4)).tolist(), rel=1e-5)
    # two prompts with different spreads: each is centred and scaled by its own mean and std (one NaN: unscored)
    trainer._gvm_batch_ids = [3, 3, 3, 5, 5, 5]
    trainer._gvm_rewards = torch.tensor([[1.0], [0.0], [0.5], [4.0], [-2.0], [float("nan")]])
    a, b = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([4.0, -2.0])
    for scale, want in (
        ("group", [*((a - a.mean()) / (a.std() + 1e-4)), *((b - b.mean()) / (b.std() + 1e-4)), 0.0]),
        ("batch", [*((a - a.mean()) / (torch.cat([a, b]).std() + 1e-4)),
                   *((b - b.mean()) / (torch.cat([a, b]).std() + 1e-4)), 0.0]),
        ("none", [*(a - a.mean()), *(b - b.mean()), 0.0]),
    ):  # fmt: skip
        trainer.scale_rewards = scale
        out = {"advantages": torch.zeros(6), "completion_mask": torch.ones(6, 3)}
        trainer._gvm_rewrite_advantages(out, 0, 6)
        assert out["advantages"].tolist() == pytest.approx([float(v) for v in want], rel=1e-5, abs=1e-6), scale
    trainer.scale_rewards = "group"
    trainer._gvm_batch_ids, trainer._gvm_rewards = ids, torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    # RAFT++: advantage 1 on accepted samples, rejected ones masked out of the loss
    trainer.args.gvm_loss = "raft"
    out = {"advantages": torch.zeros(4), "completion_mask": torch.ones(4, 3, dtype=torch.long)}
    trainer._gvm_rewrite_advantages(out, 0, 4)
    assert out["advantages"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out["tool_mask"][:, 0].tolist() == [1, 0, 0, 0] and out["num_items_in_batch"].item() == 3


def test_min_per_prompt_rounds_up_to_whole_groups(model_path, tmp_path):
    """gvm_min_per_prompt=3 with groups of num_generations=2: every kept prompt gets at least 2 groups (4 samples),
    not 1 group (3 // 2): a minimum is a floor on samples, so it rounds up."""
    args = config(tmp_path, cls=hfx.GVMGRPOConfig, max_steps=1, gvm_budget=24, gvm_pool_size=3, gvm_min_per_prompt=3)
    trainer = hfx.GVMGRPOTrainer(model_path, reward_funcs=hash_reward, args=args, train_dataset=prompt_dataset(8))
    assert trainer.num_generations == 2
    # pilot statistics by hand (no sampling): one prompt carries almost all of the variance, the others get the floor
    trainer._gvm_pilot = lambda indices: ([0.5, 0.01, 0.01], [5.0, 0.1, 0.1], {"pilot_samples": 0})
    state = trainer.gvm_refresh()
    assert sum(state.n) == 24 and min(state.n) == 4, state.n


def test_plan_slices_are_windows_of_the_endless_plan(model_path, tmp_path):
    """_plan_slice(start, L) is the window [start, start + L) of the plan's passes laid end to end, also across a
    pass boundary (a window crossing it took too many entries from the first pass)."""
    args = config(tmp_path, cls=hfx.GVMGRPOConfig, max_steps=1, gvm=False, gvm_budget=8, gvm_pool_size=2)
    trainer = hfx.GVMGRPOTrainer(model_path, reward_funcs=hash_reward, args=args, train_dataset=prompt_dataset(8))
    trainer.gvm_refresh()
    total = sum(trainer.gvm_state.n)
    stream = [e for k in range(3) for e in trainer._plan_pass(trainer.gvm_state, k)]
    assert len(stream) == 3 * total
    for start, length in ((0, total), (total - 2, 4), (1, 2 * total)):
        assert trainer._plan_slice(start, length) == stream[start : start + length], (start, length)


def test_resume_restores_allocation(model_path, tmp_path):
    ds = prompt_dataset(8)
    args = config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, gvm_refresh_steps=10)
    trainer = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=args, train_dataset=ds)
    trainer.train()
    ckpt = os.path.join(args.output_dir, "checkpoint-2")
    with open(os.path.join(ckpt, "gvm_state.json")) as f:
        saved = json.load(f)
    assert saved["allocation"] == trainer.gvm_state.to_dict() and saved["cursor"] == 8
    resumed = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=args, train_dataset=ds)
    resumed.train(resume_from_checkpoint=ckpt)
    # no new pilot round was run: the saved allocation was restored and the plan continued from its position
    assert resumed._gvm_counters["rounds_run_here"] == 0
    assert resumed.gvm_state == trainer.gvm_state and resumed._gvm_cursor == trainer._gvm_cursor == 12


def test_resume_under_changed_settings_is_an_error(model_path, tmp_path):
    """A changed group size, gvm switch, dataset (length or prompts) or seed used to resume silently with an allocation, plan
    order and position that refer to other groups / prompts."""
    ds = prompt_dataset(8)
    saved = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path), train_dataset=ds)
    state = json.loads(json.dumps(saved.method_state_dict()))
    for kw, data, message in [
        (dict(num_generations=4), ds, "num_generations=2 in the checkpoint but 4 now"),
        (dict(gvm=False), ds, "gvm=True in the checkpoint but False now"),
        ({}, prompt_dataset(6), "dataset_size=8 in the checkpoint but 6 now"),
        ({}, prompt_dataset(8, seed=1), "prompt_digest="),  # same length, other prompts
        (dict(seed=1), ds, "seed=0 in the checkpoint but 1 now"),
    ]:
        other = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path, **kw),
                                   train_dataset=data)  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message) + ".*delete gvm_state.json"):
            other.load_method_state_dict(state)
    same = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path),
                              train_dataset=prompt_dataset(8))  # fmt: skip
    same.load_method_state_dict(state)  # an equal dataset built again: the digest matches
    assert same._gvm_cursor == saved._gvm_cursor
    del state["run"]  # a state file of an older hfx: loads unchecked
    other.load_method_state_dict(state)
    assert other._gvm_cursor == saved._gvm_cursor


def test_resume_inside_a_generation_batch_replays_its_plan_entries(model_path, tmp_path):
    """steps_per_generation=2, checkpoint after step 1: TRL regenerates the checkpointed batch on resume, which used
    to take the next plan entries (the interrupted batch's prompts were skipped, later ones trained twice as early)."""
    ds = prompt_dataset(8)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=1, steps_per_generation=2, gvm_refresh_steps=10)
    full = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path, **kw), train_dataset=ds)
    full.train()
    assert full._gvm_cursor == full._gvm_counters["train_samples"] == 16  # two generation batches of 8
    resumed = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path / "b", **kw),
                                 train_dataset=ds)  # fmt: skip
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "out", "checkpoint-1"))
    assert resumed._gvm_counters["rounds_run_here"] == 0 and resumed.gvm_state == full.gvm_state
    assert resumed._gvm_cursor == resumed._gvm_counters["train_samples"] == 16
    assert resumed._gvm_batch_start == full._gvm_batch_start == 8


def test_pools_never_repeat_a_prompt_and_cover_each_epoch(model_path, tmp_path):
    """A round's pool used to run on across the epoch boundary, so it could hold a prompt twice (8 prompts, pool 6:
    round 1 = the last 2 of epoch 0 + the first 4 of epoch 1); now an epoch's last round wraps to its own start."""
    trainer = hfx.GVMRAFTTrainer(
        model_path, reward_funcs=hash_reward, args=config(tmp_path), train_dataset=prompt_dataset(8)
    )
    for pool in (1, 3, 6, 7, 8):
        trainer.args.gvm_pool_size = pool
        rounds_per_epoch = -(-8 // pool)
        for epoch in range(3):
            pools = [trainer._pool_indices(epoch * rounds_per_epoch + j) for j in range(rounds_per_epoch)]
            assert all(len(p) == pool and len(set(p)) == pool for p in pools), (pool, pools)
            assert set().union(*pools) == set(range(8))  # every prompt once per epoch (the wrap repeats a few)
        assert trainer._pool_indices(1) == trainer._pool_indices(1)  # deterministic (resume recomputes it)
    trainer.args.gvm_pool_size = 6
    assert trainer._pool_indices(0) != trainer._pool_indices(2)[:6]  # a new permutation each epoch


def test_trainer_errors(model_path, tmp_path):
    with pytest.raises(ValueError, match=r"gvm_pool_size=9 is larger than the train dataset \(8 prompts\)"):
        hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path, gvm_pool_size=9),
                           train_dataset=prompt_dataset(8))  # fmt: skip
    with pytest.raises(ValueError, match="'answer' column"):
        hfx.GVMRAFTTrainer(
            model_path, reward_funcs=correctness_reward, args=config(tmp_path),
            train_dataset=prompt_dataset(8).remove_columns("answer"),
        )  # fmt: skip
    with pytest.raises(ValueError, match="train_dataset has no 'prompt' column"):
        hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path),
                           train_dataset=prompt_dataset(8).rename_column("prompt", "question"))  # fmt: skip
    with pytest.raises(ValueError, match="gvm_loss"):
        config(tmp_path, gvm_loss="ppo")
    for name, bad in [("gvm_alpha", float("nan")), ("gvm_beta", float("inf")), ("gvm_beta", -1.0),
                      ("gvm_accept_threshold", float("nan"))]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            config(tmp_path, **{name: bad})
    trainer = hfx.GVMRAFTTrainer(
        model_path, reward_funcs=hash_reward, args=config(tmp_path, gvm_budget=4, gvm_min_per_prompt=2),
        train_dataset=prompt_dataset(8),
    )  # fmt: skip
    with pytest.raises(ValueError, match="smaller than min_per_prompt"):
        trainer.train()
    none_reward = lambda completions, **kw: [None] * len(completions)  # noqa: E731
    trainer = hfx.GVMRAFTTrainer(
        model_path, reward_funcs=none_reward, args=config(tmp_path, gvm_pool_size=4), train_dataset=Dataset.from_list(
            [{"prompt": "Question: a\nAnswer:\n"}] * 4
        ),
    )  # fmt: skip
    with pytest.raises(ValueError, match="returned None for every pilot sample"):
        trainer.train()


def test_pilot_samples_are_not_counted_as_tokens_seen(model_path, tmp_path):
    """TRL's generation adds each batch to ``state.num_input_tokens_seen`` (logged as ``num_tokens``); the pilot's
    samples used to be counted too (1356 tokens against 172 for the same 4 training samples)."""
    trainer = hfx.GVMRAFTTrainer(model_path, reward_funcs=hash_reward, args=config(tmp_path),
                                 train_dataset=prompt_dataset(12))  # fmt: skip
    trainer.model.train()  # TRL counts tokens of training-mode generations only
    trainer.state.num_input_tokens_seen = 7
    p, G, info = trainer._gvm_pilot([0, 1, 2])
    assert info["pilot_samples"] > 0 and len(p) == len(G) == 3
    assert trainer.state.num_input_tokens_seen == 7


def test_evaluation_scores_the_raft_objective(model_path, tmp_path):
    """Evaluation ran TRL's GRPO advantages (group-normalised, every sample kept), not the RAFT++ objective."""
    args = config(tmp_path, gvm=False, per_device_eval_batch_size=4)
    eval_set = prompt_dataset(4, split="test")
    trainer = hfx.GVMRAFTTrainer(
        model_path, reward_funcs=hash_reward, args=args, train_dataset=prompt_dataset(8), eval_dataset=eval_set
    )
    trainer.model.eval()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([dict(eval_set[i]) for i in (0, 0, 1, 1)])
    accepted = (trainer._gvm_rewards.sum(dim=1) >= args.gvm_accept_threshold).float()
    assert out["advantages"].tolist() == accepted.tolist()
    assert out["tool_mask"][:, 0].tolist() == accepted.tolist()
    metrics = trainer.evaluate()
    assert "eval_gvm/accepted_fraction" in metrics and np.isfinite(metrics["eval_loss"])
    assert "gvm/accepted_fraction" not in trainer._metrics["train"]
