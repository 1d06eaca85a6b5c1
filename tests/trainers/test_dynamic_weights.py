"""Dynamic reward weighting (hfx.DynamicWeightGRPOTrainer / DynamicWeightRLOOTrainer, arXiv 2509.11452): exact
hypervolume against brute force, the meta-reward and its effect on advantages, the mirror-descent step, the
activation-based Gram matrix against explicit parameter gradients, training runs, resume, and clear errors."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import hfx
from hfx.compat import activation_checkpointing
from hfx.data import format_reward, prompt_dataset
from hfx.testing import save_tiny_model, tiny_causal_lm
from hfx.trainers.dynamic_weight_utils import (
    ActivationGradientCapture,
    HypervolumeBuffer,
    gram_from_activations,
    hypervolume,
    mirror_descent_step,
    pareto_front,
    pareto_meta_reward,
    select_linear_modules,
)


# ------------------------------------------------------------------------------------------------ hypervolume
def hv_inclusion_exclusion(points, ref):
    """Σ over non-empty subsets T of (−1)^{|T|+1} · volume of the box [ref, min over T] (maximisation)."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            corner = [min(p[i] for p in subset) for i in range(len(ref))]
            vol = math.prod(max(c - r, 0.0) for c, r in zip(corner, ref))
            total += (-1) ** (size + 1) * vol
    return total


def hv_grid(points, ref):
    """Count unit cells (integer coordinates) dominated by some point."""
    hi = [max(p[i] for p in points) for i in range(len(ref))]
    cells = itertools.product(*[range(int(r), int(h)) for r, h in zip(ref, hi)])
    return float(sum(any(all(c + 1 <= p[i] for i, c in enumerate(cell)) for p in points) for cell in cells))


def test_hypervolume_2d_3d_equals_brute_force():
    front2 = [(1, 5), (2, 4), (4, 2), (5, 1), (3, 3), (2, 2)]  # (2, 2) dominated
    assert hypervolume(front2, (0, 0)) == hv_grid(front2, (0, 0)) == hv_inclusion_exclusion(front2, (0, 0)) == 15
    front3 = [(3, 1, 2), (1, 3, 2), (2, 2, 3), (1, 1, 4), (4, 2, 1), (2, 1, 1)]
    assert hypervolume(front3, (0, 0, 0)) == hv_grid(front3, (0, 0, 0)) == hv_inclusion_exclusion(front3, (0, 0, 0))
    # a reference that is not the origin, points partly below it (they add nothing in that region)
    ref = (1, 0, 1)
    assert hypervolume(front3, ref) == pytest.approx(hv_inclusion_exclusion(front3, ref))
    gen = torch.Generator().manual_seed(0)
    for d in (2, 3, 4):
        pts = (torch.rand(7, d, generator=gen) * 3 - 0.5).tolist()
        ref = [0.0] * d
        assert hypervolume(pts, ref) == pytest.approx(hv_inclusion_exclusion(pts, ref), rel=1e-12, abs=1e-12)
    assert pareto_front([(1, 2), (2, 1), (1, 1), (1, 2)]) == [(1.0, 2.0), (2.0, 1.0)]
    assert hypervolume([], (0, 0)) == 0.0


def test_buffer_meta_reward_and_minimised_objectives():
    assert pareto_meta_reward(0.0) == 0.5 and pareto_meta_reward(-1.0) == 0.5
    assert all(0.5 < pareto_meta_reward(x) < 2.0 for x in (1e-6, 0.3, 5.0)) and pareto_meta_reward(1e3) <= 2.0
    buf = HypervolumeBuffer([True, False])  # accuracy up, length down
    assert buf.update([0.2, 50.0]) == 1.0 and buf.reference == [0.2, 50.0] and buf.front == []  # B[0]
    r = buf.update([0.5, 40.0])  # better on both: ΔHV = 0.3 * 10
    assert r == pytest.approx(0.5 + 1.5 * math.tanh(3.0)) and buf.front == [[0.5, 40.0]]
    assert buf.update([0.4, 45.0]) == 0.5 and buf.last_delta == 0.0 and len(buf.front) == 1  # dominated: not added
    r = buf.update([0.6, 48.0])  # trade-off point: new area 0.1 * 2
    assert buf.last_delta == pytest.approx(0.2) and r == pytest.approx(0.5 + 1.5 * math.tanh(0.2))
    assert buf.hypervolume() == pytest.approx(3.0 + 0.2)
    buf.update([0.7, 30.0])  # dominates both: the front collapses to it
    assert buf.front == [[0.7, 30.0]]
    state = json.loads(json.dumps(buf.state_dict()))
    other = HypervolumeBuffer([True, False])
    other.load_state_dict(state)
    assert other == buf
    # an infinite objective is refused before it joins the front (the next ΔHV was inf − inf = NaN)
    with pytest.raises(ValueError, match=r"objective vector \[inf, 1.0\] is not finite"):
        buf.update([float("inf"), 1.0])
    assert other == buf


def test_buffer_computes_the_front_hypervolume_once_per_accepted_point(monkeypatch):
    """Each update used to compute HV(front) afresh (and the trainer's log once more): with 4 objectives a front of
    ~80 points costs ~0.2 s each. The kept value is the one a fresh computation gives, to the bit."""
    import hfx.trainers.dynamic_weight_utils as dwu

    gen = torch.Generator().manual_seed(0)
    points = [[0.0] * 4] + torch.rand(40, 4, generator=gen, dtype=torch.float64).tolist()  # B[0], then trade-offs
    calls = []
    real = dwu.hypervolume
    monkeypatch.setattr(dwu, "hypervolume", lambda *a: calls.append(1) or real(*a))
    buf = HypervolumeBuffer([True, True, True, True])
    for p in points:
        buf.update(p)
        logged = buf.hypervolume()  # what the trainer logs after each update
        assert logged == real([buf._orient(q) for q in buf.front], buf._orient(buf.reference))
    assert len(buf.front) > 3
    assert len(calls) == len(points)  # one per update with a front (the new point's), plus the empty front's once
    # a front or reference changed from outside is not answered from the kept value
    import dataclasses

    other = dataclasses.replace(buf, front=[[1.0] * 4])
    assert other.hypervolume() == real([(1.0,) * 4], other._orient(other.reference))
    buf.front.append([2.0] * 4)
    assert buf.hypervolume() == real([buf._orient(q) for q in buf.front], buf._orient(buf.reference))


# ------------------------------------------------------------------------------------------------ mirror descent
def test_mirror_descent_step_on_known_gram():
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    gram = torch.tensor([[2.0, 0.5, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.0, 3.0]], dtype=torch.float64)
    c = 0.1
    new = mirror_descent_step(w.log(), gram, c)
    expected = torch.softmax(w.log() + c * gram.sum(1), 0)
    assert torch.allclose(new.exp(), expected, atol=1e-15) and new.exp().sum() == pytest.approx(1.0)
    # a zero weight stays zero
    z = mirror_descent_step(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).log(), gram, c).exp()
    assert z[2] == 0 and z.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ activation Gram
def _param_gram(losses, params):
    flats = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flats.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    g = torch.stack(flats)
    return g @ g.T


def _losses(model, ids, adv):
    logits = model(input_ids=ids).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    seq = logp[:, 3:].mean(1)
    return [-(adv[:, k] * seq).mean() for k in range(adv.shape[1])]


@pytest.mark.parametrize("arch,peft", [("llama", False), ("qwen2", False), ("llama", True), ("llama", "frozen")])
def test_activation_gram_equals_parameter_gram(arch, peft):
    model = tiny_causal_lm(arch, hidden_size=32, num_layers=4).double()
    if peft == "frozen":
        model.requires_grad_(False)  # nothing trainable upstream: the first hooked outputs become leaves
    elif peft:
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (3, 10), generator=gen)
    adv = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    selected = select_linear_modules(model, layer_ids=[1, 2])  # chained hooked layers across two decoder layers
    assert all(".layers.1." in n or ".layers.2." in n for n, _ in selected)
    if peft is True:
        assert all("lora" not in n for n, _ in selected) and any(n.endswith("q_proj.base_layer") for n, _ in selected)
    with ActivationGradientCapture(selected) as cap:
        losses = _losses(model, ids, adv)
    gram = gram_from_activations(losses, cap.records, dtype=torch.float64)
    assert any(y.is_leaf for *_, y in cap.records) == (peft == "frozen")
    # explicit parameter gradients of the same Linear weights (and biases): base weights made trainable for the check
    params = []
    for _, m in selected:
        m.weight.requires_grad_(True)
        params.append(m.weight)
        if m.bias is not None:
            m.bias.requires_grad_(True)
            params.append(m.bias)
    expected = _param_gram(_losses(model, ids, adv), params)
    assert torch.allclose(gram, expected, rtol=1e-9, atol=1e-18)
    assert gram.abs().max() > 0
    assert all(p.grad is None for p in model.parameters())  # no .grad written


def test_activation_gram_sums_the_calls_of_a_shared_linear():
    """A Linear applied twice in one forward (shared weights): its weight gradient is the sum over both calls, so
    the Gram is of the summed gradient, not the sum of each call's Gram."""
    torch.manual_seed(0)
    shared, head = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 3, bias=False).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    coeffs = torch.randn(3, 3, dtype=torch.float64)

    def losses():
        out = head(torch.tanh(shared(torch.tanh(shared(x)))))  # shared twice, head once
        return [(out * coeffs[k]).sum() for k in range(3)]

    with ActivationGradientCapture([("shared", shared), ("head", head)]) as cap:
        got = gram_from_activations(losses(), cap.records, dtype=torch.float64)
    assert [name for name, *_ in cap.records] == ["shared", "shared", "head"]
    expected = _param_gram(losses(), [shared.weight, shared.bias, head.weight])
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)


def test_select_linear_modules_defaults_and_errors():
    model = tiny_causal_lm(hidden_size=16, num_layers=4)
    names = [n for n, _ in select_linear_modules(model)]
    assert {n.split(".")[2] for n in names} == {"1", "2"} and not any("lm_head" in n for n in names)  # middle half
    mlp = [n for n, _ in select_linear_modules(model, layer_ids=[0], patterns=[r"mlp\."])]
    assert mlp == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="no decoder layer"):
        select_linear_modules(model, layer_ids=[7])
    with pytest.raises(ValueError, match="match none"):
        select_linear_modules(model, patterns=["nothing"])
    with pytest.raises(ValueError, match="numbered decoder layers"):
        select_linear_modules(nn.Sequential(nn.Linear(2, 2)))
    # Falcon / GPT-J / BLOOM number their decoder layers under ``h`` (used to be refused: only ``layers`` counted)
    from transformers import FalconConfig, FalconForCausalLM

    falcon = FalconForCausalLM(
        FalconConfig(
            hidden_size=16, num_hidden_layers=4, num_attention_heads=2, vocab_size=32, new_decoder_architecture=False
        )
    )
    names = [n for n, _ in select_linear_modules(falcon)]
    assert names and {n.split(".")[2] for n in names} == {"1", "2"}
    assert all(n.startswith("transformer.h.") for n in names)
    # a VLM: only the language decoder's layers (its vision tower's ``visual.blocks.<i>`` are not decoder layers)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]})  # fmt: skip
    vision = dict(depth=8, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
    vlm = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
    names = [n for n, _ in select_linear_modules(vlm)]
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert {n.split(".")[3] for n in names} == {"1", "2"}  # the middle half of the 4 language layers


# ------------------------------------------------------------------------------------------------ trainers
@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("dynw") / "tiny", hidden_size=32)


def hash_reward(completions, **kwargs):
    return [float(int(hashlib.sha1(c.encode()).hexdigest(), 16) % 3) / 2 for c in completions]


def short_reward(completions, **kwargs):
    return [-len(c) / 20 for c in completions]


REWARDS = [format_reward, hash_reward, short_reward]
REWARDS_NAMES = ["format_reward", "hash_reward", "short_reward"]


def config(tmp_path, cls=hfx.DynamicWeightGRPOConfig, **kw):
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
        beta=0.0,
        weight_regularization=1.0,
    )
    base.update(kw)
    return cls(**base)


TRAINERS = {"grpo": (hfx.DynamicWeightGRPOConfig, hfx.DynamicWeightGRPOTrainer),
            "rloo": (hfx.DynamicWeightRLOOConfig, hfx.DynamicWeightRLOOTrainer)}  # fmt: skip


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("weighting", ["hypervolume", "gradient"])
def test_train_runs_and_weights_move(model_path, tmp_path, kind, weighting):
    cls, trainer_cls = TRAINERS[kind]
    extra = dict(weight_regularization=0.5, lr_scheduler_type="constant") if weighting == "gradient" else {}
    args = config(tmp_path, cls=cls, weighting=weighting, maximize=[True, True, True], **extra)
    peft = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if (kind, weighting) == ("grpo", "gradient") else None
    trainer = trainer_cls(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(16), peft_config=peft
    )
    if peft is not None:  # PEFT: the frozen base_layer Linear of adapted modules, plain Linear elsewhere
        assert any(n.endswith("q_proj.base_layer") for n in trainer.weight_grad_module_names)
        assert not any("lora_" in n for n in trainer.weight_grad_module_names)
    assert trainer.reward_weights.tolist() == pytest.approx([1 / 3] * 3)
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    names = ["format_reward", "hash_reward", "short_reward"]
    assert all(f"reward_weights/{n}" in hist[-1] for n in names)
    if weighting == "gradient":
        w = trainer.reward_weights
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6) and not torch.allclose(w, torch.full((3,), 1 / 3))
        assert [hist[-1][f"reward_weights/{n}"] for n in names] != pytest.approx([1 / 3] * 3)
        assert "dynamic_weights/influence/hash_reward" in hist[-1]
        assert hist[-1]["dynamic_weights/step_size"] == pytest.approx(1e-2 / 0.5)  # lr / weight_regularization
    else:
        buf = trainer.hv_buffer
        assert buf.num_updates == 3 and buf.reference is not None
        r = [h["dynamic_weights/r_pareto"] for h in hist]
        assert r[0] == r[1] == 1.0 and r[2] != 1.0  # starts at 1; batch 1 = reference, batch 2's ΔHV acts on batch 3
        assert all(0.5 <= h["dynamic_weights/r_pareto"] < 2 for h in hist)
        assert trainer.reward_weights.tolist() == pytest.approx([1 / 3] * 3)  # HV keeps the weights


def test_objective_advantages_are_each_trainers_estimator_hand_computed(model_path, tmp_path):
    """The per-objective advantages behind the gradient method's Gram matrix, by hand on G = 4, K = 2 with one
    unscored (NaN) sample: RLOO's leave-one-out baseline over the other scored samples of the group, GRPO's group
    centring with group / batch / no std scaling; NaN advantages are 0."""
    nan = float("nan")
    rewards = torch.tensor(
        [[1.0, 0.0], [2.0, 1.0], [4.0, nan], [0.0, 3.0],  # group 0
         [3.0, 2.0], [3.0, 2.0], [1.0, 0.0], [5.0, 4.0]]  # group 1
    )  # fmt: skip
    x = rewards.view(2, 4, 2)
    kw = dict(num_generations=4, per_device_train_batch_size=8, max_steps=1, weighting="gradient")
    rloo = hfx.DynamicWeightRLOOTrainer(
        model_path, reward_funcs=REWARDS[:2], train_dataset=prompt_dataset(8),
        args=config(tmp_path / "rloo", cls=hfx.DynamicWeightRLOOConfig, normalize_advantages=False, **kw),
    )  # fmt: skip
    want = torch.zeros(2, 4, 2)
    for g in range(2):
        for i in range(4):
            for k in range(2):
                others = [float(x[g, j, k]) for j in range(4) if j != i and not math.isnan(float(x[g, j, k]))]
                if not math.isnan(float(x[g, i, k])):
                    want[g, i, k] = float(x[g, i, k]) - sum(others) / len(others)
    torch.testing.assert_close(rloo._objective_advantages(rewards), want.view(8, 2), rtol=1e-6, atol=1e-6)
    grpo = hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=REWARDS[:2], args=config(tmp_path / "grpo", **kw), train_dataset=prompt_dataset(8)
    )
    valid = ~torch.isnan(x)
    mean = torch.stack([torch.stack([x[g, valid[g, :, k], k].mean() for k in range(2)]) for g in range(2)])
    std = torch.stack([torch.stack([x[g, valid[g, :, k], k].std() for k in range(2)]) for g in range(2)])
    batch_std = torch.stack([rewards[~torch.isnan(rewards[:, k]), k].std() for k in range(2)])
    centred = torch.nan_to_num(x - mean[:, None, :], nan=0.0)
    for scale, want in (("group", centred / (std[:, None, :] + 1e-4)), ("batch", centred / (batch_std + 1e-4)),
                        ("none", centred)):  # fmt: skip
        grpo.scale_rewards = scale
        torch.testing.assert_close(grpo._objective_advantages(rewards), want.view(8, 2), rtol=1e-5, atol=1e-6)
    # normalize_then_sum (TRL's GDPO path): each reward z-scored in its group, then standardised over the batch,
    # whatever scale_rewards says; it followed scale_rewards, so with "none" a reward 100x larger took the weight
    grpo.multi_objective_aggregation = "normalize_then_sum"
    z = ((x - mean[:, None, :]) / (std[:, None, :] + 1e-4)).view(8, 2)
    want = torch.zeros(8, 2)
    for k in range(2):
        ok = ~torch.isnan(z[:, k])
        want[ok, k] = (z[ok, k] - z[ok, k].mean()) / (z[ok, k].std() + 1e-4)
    for scale in ("none", "group", "batch"):
        grpo.scale_rewards = scale
        torch.testing.assert_close(grpo._objective_advantages(rewards), want, rtol=1e-5, atol=1e-6)
        scaled = rewards * torch.tensor([1.0, 100.0])
        torch.testing.assert_close(grpo._objective_advantages(scaled), want, rtol=1e-4, atol=1e-5)
    # a scored sample alone in its group (no group std): TRL's nansum makes its z-score 0, kept in the batch moments
    lone = torch.tensor(
        [[nan, 1.0], [nan, 2.0], [nan, 4.0], [5.0, 0.0], [0.0, 3.0], [1.0, 2.0], [1.0, 1.0], [4.0, 5.0]]
    )
    g1 = lone[4:, 0]
    z0 = torch.tensor([nan, nan, nan, 0.0, *((g1 - g1.mean()) / (g1.std() + 1e-4)).tolist()])
    ok = ~torch.isnan(z0)
    want0 = torch.zeros(8)
    want0[ok] = (z0[ok] - z0[ok].mean()) / (z0[ok].std() + 1e-4)
    torch.testing.assert_close(grpo._objective_advantages(lone)[:, 0], want0, rtol=1e-5, atol=1e-6)


def test_objective_gram_equals_parameter_gradients_of_unpadded_sequences(model_path, tmp_path):
    """The trainer's Gram (padded batch, activation gradients, sampling temperature, a row limit) against the
    parameter-gradient Gram of L_k = -sum_b A_bk * mean_t log pi_T(c_t | p, c_<t) / B, each sequence run on its own
    without padding: prompts and completions of different lengths, T = 0.7, and weight_grad_max_samples = 3 of 4
    rows (the reference tries every 3-row subset)."""
    import itertools

    args = config(tmp_path, weighting="gradient", temperature=0.7, weight_grad_max_samples=3)
    trainer = hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8)
    )
    gen = torch.Generator().manual_seed(0)
    lengths = [(3, 2), (5, 4), (4, 1), (2, 3)]
    trainer._mo_prompt_ids = [torch.randint(5, 100, (p,), generator=gen).tolist() for p, _ in lengths]
    trainer._mo_completion_ids = [torch.randint(5, 100, (c,), generator=gen).tolist() for _, c in lengths]
    rewards = torch.tensor([[1.0, 0.2, -0.3], [0.0, 0.9, -0.1], [1.0, 0.4, -0.6], [0.0, 0.1, -0.2]])
    gram = trainer.objective_gram(rewards).double()
    adv = trainer._objective_advantages(rewards).double()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    modules = dict(model.named_modules())
    params = [q for n in trainer.weight_grad_module_names for q in modules[n].parameters(recurse=False)]
    assert params and all(q.requires_grad for q in params)

    def reference(rows):
        seq = []
        for b in rows:
            p, c = trainer._mo_prompt_ids[b], trainer._mo_completion_ids[b]
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float() / 0.7
            seq.append(torch.log_softmax(logits, -1)[torch.arange(len(c)), torch.tensor(c)].mean())
        seq = torch.stack(seq).double()
        losses = [-(adv[rows, k] * seq).sum() / len(rows) for k in range(adv.shape[1])]
        return _param_gram(losses, params)

    candidates = [reference(list(rows)) for rows in itertools.combinations(range(4), 3)]
    errors = [float((gram - want).abs().max() / want.abs().max()) for want in candidates]
    assert min(errors) < 1e-4, errors
    assert gram.abs().max() > 0


def test_objective_gram_leaves_out_what_mask_truncated_completions_drops(model_path, tmp_path, monkeypatch):
    """TRL drops completions that do not end in EOS from the loss under mask_truncated_completions; the Gram took
    them in (every completion truncated: the loss was 0 and the weights still moved). They count as rows with no
    gradient now: the Gram equals that of the same batch with their advantages set to 0."""
    args = config(tmp_path, weighting="gradient", mask_truncated_completions=True)
    trainer = hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8)
    )
    eos = trainer._tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(0)
    trainer._mo_prompt_ids = [torch.randint(5, 100, (n,), generator=gen).tolist() for n in (3, 5, 4, 2)]
    completions = [torch.randint(5, 100, (n,), generator=gen).tolist() for n in (2, 4, 3, 3)]
    rewards = torch.tensor([[1.0, 0.2, -0.3], [0.0, 0.9, -0.1], [1.0, 0.4, -0.6], [0.0, 0.1, -0.2]])
    trainer._mo_completion_ids = completions  # none ends in EOS: all dropped
    assert torch.count_nonzero(trainer.objective_gram(rewards)) == 0
    trainer._mo_completion_ids = [c[:-1] + [eos] if b in (0, 2) else c for b, c in enumerate(completions)]
    gram = trainer.objective_gram(rewards)
    assert torch.count_nonzero(gram) > 0
    advantages = trainer._objective_advantages(rewards)
    trainer.mask_truncated_completions = False
    monkeypatch.setattr(trainer, "_objective_advantages", lambda r: advantages * torch.tensor([[1.0], [0], [1], [0]]))
    torch.testing.assert_close(gram, trainer.objective_gram(rewards), rtol=1e-5, atol=1e-8)


def test_hypervolume_scales_advantages(model_path, tmp_path):
    """r_pareto multiplies the advantages; the authors' reward scaling would be cancelled by GRPO's std scaling."""
    args = config(tmp_path, max_steps=1, weighting="hypervolume")
    trainer = hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8)
    )
    trainer.model.train()
    rows = [dict(prompt_dataset(8)[i]) for i in (0, 0, 1, 1)]

    def advantages(r_pareto, weight_scale=1.0):
        trainer.hv_buffer = HypervolumeBuffer([True] * 3, reference=[-9.0] * 3, r_pareto=r_pareto)
        trainer._set_reward_weights([weight_scale / 3] * 3)
        torch.manual_seed(0)
        out = trainer._generate_and_score_completions([dict(r) for r in rows])
        return out["advantages"], list(trainer._logs["advantages"])[-4:]

    base, logged_base = advantages(1.0)
    scaled, logged = advantages(1.7)
    assert base.abs().sum() > 0
    assert torch.allclose(scaled, 1.7 * base) and logged == pytest.approx([1.7 * a for a in logged_base])
    reward_scaled, _ = advantages(1.0, weight_scale=1.7)  # the paper's r̃ = r_pareto · r under GRPO
    assert torch.allclose(reward_scaled, base, atol=1e-3)


def test_hypervolume_from_evaluation(model_path, tmp_path):
    args = config(tmp_path, weighting="hypervolume", hv_source="eval", per_device_eval_batch_size=4)
    trainer = hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8), eval_dataset=prompt_dataset(4)
    )
    first = trainer.evaluate()
    assert trainer.hv_buffer.reference is not None and trainer.hv_buffer.num_updates == 1
    assert first["eval_dynamic_weights/next_r_pareto"] == 1.0  # the first evaluation is the reference
    logged = [h for h in trainer.state.log_history if "eval_dynamic_weights/next_r_pareto" in h]
    assert len(logged) == 1 and logged[0]["eval_dynamic_weights/next_r_pareto"] == 1.0  # logged, not only returned
    means = [first[f"eval_rewards/{name}/mean"] for name in REWARDS_NAMES]
    assert trainer.hv_buffer.reference == pytest.approx(means)
    second = trainer.evaluate()
    assert trainer.hv_buffer.num_updates == 2 and 0.5 <= trainer.hv_buffer.r_pareto <= 2.0
    # the buffer's metrics come from evaluation rewards: logged with it (they were filed as the next training log's)
    for name in ("delta_hv", "hypervolume", "front_size"):
        assert f"eval_dynamic_weights/{name}" in first and f"eval_dynamic_weights/{name}" in second
    assert second["eval_dynamic_weights/hypervolume"] == pytest.approx(trainer.hv_buffer.hypervolume())
    assert not any(key.startswith("dynamic_weights/") for key in trainer._metrics["train"])


def test_hypervolume_from_evaluation_with_its_own_generation_count(model_path, tmp_path):
    """num_generations_eval != num_generations: the buffer takes every eval sample (4 prompts x 4), so its reference
    is the evaluation's reward means (cut at the training count, it kept the first half)."""
    args = config(tmp_path, weighting="hypervolume", hv_source="eval", num_generations_eval=4,
                  per_device_eval_batch_size=8)  # fmt: skip
    trainer = hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8), eval_dataset=prompt_dataset(4)
    )
    metrics = trainer.evaluate()
    means = [metrics[f"eval_rewards/{name}/mean"] for name in REWARDS_NAMES]
    assert trainer.hv_buffer.reference == pytest.approx(means, abs=1e-6)


def test_resume_restores_state(model_path, tmp_path):
    ds = prompt_dataset(16)
    args = config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, weighting="gradient")
    full = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=args, train_dataset=ds)
    full.train()
    ckpt = os.path.join(args.output_dir, "checkpoint-2")
    with open(os.path.join(ckpt, "dynamic_weight_state.json")) as f:
        saved = json.load(f)
    assert saved["weighting"] == "gradient" and len(saved["reward_weights"]) == 3
    resumed = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=args, train_dataset=ds)
    resumed.train(resume_from_checkpoint=ckpt)
    # the state was restored and the step after the checkpoint is the same as in the uninterrupted run
    assert torch.allclose(resumed.reward_weights, full.reward_weights, atol=1e-6)
    assert torch.allclose(resumed.log_weights, full.log_weights, atol=1e-6)
    # hypervolume buffer round trip through a checkpoint
    hv_args = config(
        tmp_path / "hv", cls=hfx.DynamicWeightRLOOConfig, max_steps=2, save_strategy="steps", save_steps=1
    )
    hv = hfx.DynamicWeightRLOOTrainer(model_path, reward_funcs=REWARDS, args=hv_args, train_dataset=ds)
    hv.train()
    with open(os.path.join(hv_args.output_dir, "checkpoint-2", "dynamic_weight_state.json")) as f:
        saved = json.load(f)
    again = hfx.DynamicWeightRLOOTrainer(model_path, reward_funcs=REWARDS, args=hv_args, train_dataset=ds)
    again.load_method_state_dict(saved)
    assert again.hv_buffer == hv.hv_buffer and again.hv_buffer.reference is not None
    assert again._batch_r_pareto == hv._batch_r_pareto


def prompt_hash(prompts, **kwargs):
    """Depends on the prompt only, so a regenerated batch (same prompts, new completions) scores the same."""
    return [float(int(hashlib.sha1(p.encode()).hexdigest(), 16) % 5) / 4 for p in prompts]


def prompt_length(prompts, **kwargs):
    return [len(p) / 100 for p in prompts]


def test_resume_inside_a_generation_batch_updates_once(model_path, tmp_path):
    """steps_per_generation=2, checkpoint after step 1: TRL regenerates the checkpointed batch on resume, which used
    to feed it to the hypervolume buffer a second time (an extra update and another r_pareto)."""
    ds = prompt_dataset(16)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=1, steps_per_generation=2,
              objectives=["prompt_hash", "prompt_length"])  # fmt: skip
    rewards = [hash_reward, prompt_hash, prompt_length]
    full = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=rewards, args=config(tmp_path, **kw),
                                        train_dataset=ds)  # fmt: skip
    full.train()
    assert full.hv_buffer.num_updates == 2  # one per generation batch
    resumed = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=rewards, args=config(tmp_path / "b", **kw),
                                           train_dataset=ds)  # fmt: skip
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "out", "checkpoint-1"))
    assert resumed.hv_buffer == full.hv_buffer and resumed._batch_r_pareto == full._batch_r_pareto


def test_resume_with_eval_on_start_does_not_add_the_checkpoints_evaluation_again(model_path, tmp_path):
    """hv_source="eval" with eval_on_start (the README's advice): transformers evaluates again when a run resumes,
    at the checkpoint's step, whose evaluation the checkpoint's buffer already holds. It used to be added a second
    time (3 -> 4 updates, another r_pareto for the following batches)."""
    ds, ev = prompt_dataset(16), prompt_dataset(4, seed=7)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, weighting="hypervolume", hv_source="eval",
              eval_strategy="steps", eval_steps=2, eval_on_start=True, per_device_eval_batch_size=4)  # fmt: skip
    full = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path, **kw),
                                        train_dataset=ds, eval_dataset=ev)  # fmt: skip
    full.train()
    assert full.hv_buffer.num_updates == 3  # steps 0, 2, 4
    resumed = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path / "b", **kw),
                                           train_dataset=ds, eval_dataset=ev)  # fmt: skip
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "out", "checkpoint-2"))
    assert resumed.hv_buffer == full.hv_buffer and resumed._batch_r_pareto == full._batch_r_pareto
    r_pareto = [[h["dynamic_weights/r_pareto"] for h in t.state.log_history if "dynamic_weights/r_pareto" in h][-2:]
                for t in (full, resumed)]  # fmt: skip
    assert r_pareto[0] == r_pareto[1]
    # evaluations after the resume (at later steps, or a second one by hand) are added as before
    resumed.evaluate()
    assert resumed.hv_buffer.num_updates == 4


def test_errors(model_path, tmp_path):
    with pytest.raises(ValueError, match="weighting must be one of"):
        config(tmp_path, weighting="pareto")
    with pytest.raises(ValueError, match="non-negative and sum to 1"):
        config(tmp_path, weighting="gradient", reward_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative and sum to 1"):
        config(tmp_path, weighting="gradient", reward_weights=[1.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="one bool per objective"):
        config(tmp_path, objectives=["hash_reward"], maximize=[True, False])
    with pytest.raises(ValueError, match="hv_source"):
        config(tmp_path, hv_source="test")
    with pytest.raises(ValueError, match="weight_regularization"):
        config(tmp_path, weight_regularization=float("inf"))
    ds = prompt_dataset(8)
    with pytest.raises(ValueError, match="objectives: unknown reward name 'accuracy'"):
        hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path, objectives=["accuracy"]),
                                     train_dataset=ds)  # fmt: skip
    with pytest.raises(ValueError, match="one bool per objective"):
        hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path, maximize=[True]),
                                     train_dataset=ds)  # fmt: skip
    with pytest.raises(ValueError, match="no decoder layer"):
        hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, train_dataset=ds,
                                     args=config(tmp_path, weighting="gradient", weight_grad_layers=[9]))  # fmt: skip
    # no 'prompt' column (train or eval): used to be a bare KeyError: 'prompt' from inside TRL during training
    renamed = ds.rename_column("prompt", "question")
    with pytest.raises(ValueError, match="train_dataset has no 'prompt' column"):
        hfx.DynamicWeightRLOOTrainer(model_path, reward_funcs=REWARDS, train_dataset=renamed,
                                     args=config(tmp_path, cls=hfx.DynamicWeightRLOOConfig))  # fmt: skip
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\] has no 'prompt' column"):
        hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path), train_dataset=ds,
                                     eval_dataset={"held_out": renamed})  # fmt: skip
    with pytest.raises(TypeError, match="needs a DynamicWeightRLOOConfig"):
        hfx.DynamicWeightRLOOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path), train_dataset=ds)
    # a reward function needing a missing column: used to fail inside TRL at the first reward computation
    from hfx.data import correctness_reward

    funcs = [correctness_reward, hash_reward, short_reward]
    for cls, ccls in ((hfx.DynamicWeightGRPOTrainer, hfx.DynamicWeightGRPOConfig),
                      (hfx.DynamicWeightRLOOTrainer, hfx.DynamicWeightRLOOConfig)):  # fmt: skip
        with pytest.raises(ValueError, match=r"'correctness_reward' needs a 'answer' column, which train_dataset lac"):
            cls(
                model_path,
                reward_funcs=funcs,
                args=config(tmp_path, cls=ccls),
                train_dataset=ds.remove_columns("answer"),
            )


def test_resume_with_changed_reward_weights_warns(model_path, tmp_path, caplog):
    """The checkpoint's weights win on resume (its state), but an edited reward_weights used to be dropped silently;
    in hypervolume mode, where the weights never move, that left the run on the old ones without a word."""
    import logging

    ds = prompt_dataset(16)
    kw = dict(max_steps=2, save_strategy="steps", save_steps=1, weighting="hypervolume")
    first = hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=config(tmp_path, **kw), train_dataset=ds
    )
    first.train()
    ckpt = os.path.join(tmp_path, "out", "checkpoint-1")
    edited = config(tmp_path / "b", reward_weights=[0.6, 0.2, 0.2], **kw)
    resumed = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=edited, train_dataset=ds)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.reward_weights.tolist() == pytest.approx([1 / 3] * 3)
    (message,) = [r.getMessage() for r in caplog.records if "reward_weights=" in r.getMessage()]
    assert "[0.6, 0.2, 0.2] differ from those of the run that saved this checkpoint (None)" in message
    caplog.clear()
    same = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path / "c", **kw),
                                        train_dataset=ds)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        same.train(resume_from_checkpoint=ckpt)
    assert not [r for r in caplog.records if "reward_weights=" in r.getMessage()]
    # weights that do not fit the reward functions are named (they failed later as a bare zip() length error)
    state = json.loads(json.dumps(same.method_state_dict()))
    with pytest.raises(ValueError, match=r"reward_weights \[0.5, 0.5\] are not 3 finite numbers"):
        same.load_method_state_dict({**state, "reward_weights": [0.5, 0.5]})


def test_reward_functions_sharing_a_name_are_refused(model_path, tmp_path):
    """Two make_length_reward()s are both 'length_reward': objectives / constraint_rewards bound the name to the
    first one and the per-name logs merged the two weights."""
    from hfx.data import make_length_reward

    rewards = [make_length_reward(target_tokens=4), make_length_reward(target_tokens=30)]
    with pytest.raises(
        ValueError, match=r"share the name\(s\) \['length_reward'\].*make_length_reward\(\.\.\., name="
    ):
        hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=rewards, args=config(tmp_path),
                                     train_dataset=prompt_dataset(8))  # fmt: skip
    with pytest.raises(ValueError, match="share the name"):
        hfx.ConstrainedGRPOTrainer(
            model_path, reward_funcs=rewards, train_dataset=prompt_dataset(8),
            args=hfx.ConstrainedGRPOConfig(output_dir=str(tmp_path / "c"), use_cpu=True, report_to="none",
                                           num_generations=2, per_device_train_batch_size=4,
                                           constraint_rewards=["length_reward"], constraint_thresholds=[0.5]),
        )  # fmt: skip
    named = [make_length_reward(target_tokens=4, name="short"), make_length_reward(target_tokens=30, name="long")]
    hfx.DynamicWeightGRPOTrainer(
        model_path, reward_funcs=named, args=config(tmp_path), train_dataset=prompt_dataset(8)
    )


def test_gradient_weighting_warns_about_a_zero_weight(model_path, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=REWARDS, train_dataset=prompt_dataset(8),
                                     args=config(tmp_path, weighting="gradient", reward_weights=[0.0, 0.5, 0.5]))  # fmt: skip
    assert any("['format_reward'] stay at 0 for the whole run" in r.getMessage() for r in caplog.records)


def test_an_infinite_reward_is_named_where_it_appears(model_path, tmp_path):
    """One inf reward used to enter the hypervolume front, make the next batch's advantages NaN, and stop the run two
    steps later as a "diverged" loss blaming the learning rate; with a checkpoint between, saved as Infinity."""
    calls = []

    def spiky(completions, **kwargs):
        calls.append(1)
        return [float("inf") if len(calls) == 2 and i == 0 else 0.5 for i in range(len(completions))]

    args = config(tmp_path, weighting="hypervolume", max_steps=4)
    trainer = hfx.DynamicWeightGRPOTrainer(model_path, reward_funcs=[hash_reward, spiky], args=args,
                                           train_dataset=prompt_dataset(16))  # fmt: skip
    with pytest.raises(ValueError, match=r"reward function 'spiky' returned inf for 1 of this batch's 4 samples"):
        trainer.train()
    assert trainer.state.global_step == 1 and len(calls) == 2
    assert all(math.isfinite(x) for p in trainer.hv_buffer.front for x in p)
