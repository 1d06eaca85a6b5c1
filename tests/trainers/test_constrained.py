"""Constrained RLHF (hfx.ConstrainedGRPOTrainer / ConstrainedRLOOTrainer, hfx.trainers.lagrange, NM-PPO search):
the multiplier step against the hand-computed projected/sigmoid step, the trainers' advantages against a hand-computed
GDPO / RLOO mix with the updated weights, training runs, resume, Nelder–Mead against scipy, and clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

import hfx
from hfx.compat import activation_checkpointing
from hfx.data import prompt_dataset
from hfx.testing import save_tiny_model
from hfx.trainers.lagrange import LagrangeMultipliers
from hfx.trainers.threshold_search import NelderMead


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------ multipliers
def test_sigmoid_saturates_instead_of_overflowing():
    """A constraint met (ge) or violated (le) by a wide margin drives μ far below -709, where math.exp(-μ)
    overflowed; σ(μ) must saturate to 0 and the step must go on."""
    lm = LagrangeMultipliers(["ge", "le"], [0.0, 0.0], lr=1.0, momentum=0.0, init=[-800.0, 800.0])
    assert lm.values() == [0.0, 1.0] and lm.derivatives() == [0.0, 0.0]
    lm = LagrangeMultipliers(["ge"], [0.0], lr=1.0, momentum=0.0)
    lm.step([3000.0])  # μ = -0.25 * 3000 = -750
    assert lm.raw == [-750.0] and 0.0 <= lm.values()[0] < 1e-300
    lm.step([3000.0])  # the derivative has saturated too: μ stays
    assert lm.raw == [-750.0]
    with pytest.raises(ValueError, match="constraint 0's batch mean reward is inf"):
        lm.step([float("inf")])


def test_loaded_multiplier_state_is_checked_and_projected():
    """The trainer's own warning suggests editing the thresholds in constraint_state.json: a list of the wrong length
    used to load and drop a multiplier at the next step; a projected μ outside [0, max_value] was used as is."""
    saved = LagrangeMultipliers(["ge", "le"], [0.6, -0.1])
    saved.step([0.1, 0.9])
    state = json.loads(json.dumps(saved.state_dict()))
    for field, value in (("thresholds", [0.5]), ("buffer", [0.1, 0.2, 0.3]), ("raw", [0.1])):
        with pytest.raises(ValueError, match=rf"'{field}' has {len(value)} values for this trainer's 2 constraints"):
            LagrangeMultipliers(["ge", "le"], [0.6, -0.1]).load_state_dict({**state, field: value})
    with pytest.raises(ValueError, match="'thresholds' holds a value that is not a finite number"):
        LagrangeMultipliers(["ge", "le"], [0.6, -0.1]).load_state_dict({**state, "thresholds": [0.5, None]})
    projected = LagrangeMultipliers(["ge", "le"], [0.6, -0.1], parametrization="projected", max_value=1.0)
    projected.load_state_dict({**projected.state_dict(), "raw": [50.0, -3.0]})
    assert projected.raw == [1.0, 0.0]


def test_sigmoid_step_equals_hand_computed():
    mu0 = [0.3, -0.2, 0.5]
    lm = LagrangeMultipliers(["ge", "le", "eq"], [0.5, 0.2, 0.0], lr=0.1, momentum=0.1, init=mu0)
    J = [0.3, 0.6, -0.4]
    g1 = [
        sig(mu0[0]) * (1 - sig(mu0[0])) * (0.3 - 0.5),  # ge: d/dμ σ(μ)·(J − θ)
        -sig(mu0[1]) * (1 - sig(mu0[1])) * (0.6 - 0.2),  # le: sign −1
        (1 - math.tanh(mu0[2]) ** 2) * (-0.4 - 0.0),  # eq: tanh
    ]
    assert lm.gradient(J) == pytest.approx(g1)
    lm.step(J)  # first step: no momentum
    mu1 = [m - 0.1 * g for m, g in zip(mu0, g1)]
    assert lm.raw == pytest.approx(mu1)
    # a violated ge constraint raises its multiplier; a violated le too (its weight α − σ then falls); eq below θ
    assert mu1[0] > mu0[0] and mu1[1] > mu0[1] and mu1[2] > mu0[2]
    # second step: PyTorch SGD momentum, buf = m·buf + g
    J2 = [0.45, 0.1, 0.2]
    g2 = [
        sig(mu1[0]) * (1 - sig(mu1[0])) * (0.45 - 0.5),
        -sig(mu1[1]) * (1 - sig(mu1[1])) * (0.1 - 0.2),
        (1 - math.tanh(mu1[2]) ** 2) * 0.2,
    ]
    lm.step(J2)
    assert lm.raw == pytest.approx([m - 0.1 * (0.1 * a + b) for m, a, b in zip(mu1, g1, g2)])
    # same as torch.optim.SGD on the multiplier loss
    p = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.1)
    for j in (J, J2):
        opt.zero_grad()
        m = torch.stack([torch.sigmoid(p[0]), torch.sigmoid(p[1]), torch.tanh(p[2])])
        s = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
        (
            s * m * (torch.tensor(j, dtype=torch.float64) - torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64))
        ).sum().backward()
        opt.step()
    assert lm.raw == pytest.approx(p.tolist(), abs=1e-12)


def test_weights_task_weight_and_projection():
    lm = LagrangeMultipliers(["ge", "le"], [0.5, 0.2], init=[0.3, -0.2])
    m = [sig(0.3), sig(-0.2)]
    assert lm.values() == pytest.approx(m)
    assert lm.task_weight() == pytest.approx(1 - m[0])  # N − Σσ over the ge/eq constraints (Eq. 4.4)
    # rewards: [task, ge constraint, le constraint], α = [2, 1, 1.5]
    assert lm.reward_weights([2.0, 1.0, 1.5], [1, 2]) == pytest.approx([2 * (1 - m[0]), m[0], 1.5 - m[1]])
    # projected gradient ascent on the violation: clamp to [0, max] (eq: [−max, max]); task weight 1
    pr = LagrangeMultipliers(["ge", "eq"], [0.5, 0.0], lr=1.0, momentum=0.0, parametrization="projected", max_value=2)
    pr.step([0.9, -3.0])  # ge satisfied -> multiplier would go negative -> 0; eq far below -> capped at 2
    assert pr.raw == [0.0, 2.0] and pr.task_weight() == 1.0
    pr.step([0.1, 1.0])
    assert pr.raw == pytest.approx([0.4, 1.0])
    assert pr.reward_weights([1.0, 1.0, 1.0], [1, 2]) == pytest.approx([1.0, 0.4, 1.0])
    # an eq multiplier goes negative when the constraint is exceeded (down to -max); an init outside the box is
    # projected into it at construction
    eq = LagrangeMultipliers(["eq"], [0.5], lr=1.0, momentum=0.0, parametrization="projected", max_value=2)
    eq.step([0.8])
    assert eq.raw == pytest.approx([-0.3])
    eq.step([9.0])
    assert eq.raw == [-2.0]
    boxed = LagrangeMultipliers(["ge", "eq"], [0.5, 0.5], parametrization="projected", init=[-1.0, 20.0], max_value=3)
    assert boxed.values() == [0.0, 3.0]
    # NaN mean (no sample scored): that multiplier stays; clipping of the gradient norm
    nan = LagrangeMultipliers(["ge", "ge"], [0.5, 0.5], lr=1.0, max_grad_norm=0.01)
    nan.step([float("nan"), 0.0])
    assert nan.raw[0] == 0.0 and nan.raw[1] == pytest.approx(0.01)
    state = nan.state_dict()
    other = LagrangeMultipliers(["ge", "ge"], [0.1, 0.1])
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.raw == nan.raw and other.buffer == nan.buffer and other.thresholds == [0.5, 0.5]


# ------------------------------------------------------------------------------------------------ Nelder-Mead
def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def test_nelder_mead_matches_scipy_evaluation_sequence():
    scipy_optimize = pytest.importorskip("scipy.optimize")  # in the dev extra; CI installs it
    simplex = [[-1.0, 1.5], [-0.8, 1.5], [-1.0, 1.7]]
    seen = []

    def f(x):
        seen.append(list(x))
        return rosenbrock(x)

    scipy_optimize.minimize(f, simplex[0], method="Nelder-Mead",
                            options={"initial_simplex": np.array(simplex), "maxfev": 60, "xatol": 0, "fatol": 0})  # fmt: skip
    nm = NelderMead(simplex, tol=0.0)
    ours = []
    for _ in range(60):
        x = nm.ask()
        ours.append(x)
        nm.tell(rosenbrock(x))
    n = min(len(seen), 60)
    assert np.allclose(np.array(ours[:n]), np.array(seen[:n]), atol=1e-12)


def test_nelder_mead_converges_caches_and_replays():
    nm = NelderMead([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]], tol=1e-8, cache_tolerance=1e-12)
    for _ in range(400):
        if nm.converged:
            break
        x = nm.ask()
        nm.tell((x[0] - 0.3) ** 2 + (x[1] + 0.2) ** 2)
    assert nm.converged and nm.best[0] == pytest.approx([0.3, -0.2], abs=1e-3)
    # state -> JSON -> replay gives the same next point and history
    mid = NelderMead([[1.0, 1.0], [1.2, 1.0], [1.0, 1.2]])
    for _ in range(7):
        mid.tell(rosenbrock(mid.ask()))
    copy = NelderMead.from_state_dict(json.loads(json.dumps(mid.state_dict())))
    assert copy.ask() == mid.ask() and copy.history == mid.history
    # a point within cache_tolerance of an evaluated one is answered from the cache, not asked again
    cached = NelderMead([[0.0], [1.0]], cache_tolerance=0.6)
    cached.tell(1.0)  # at 0.0
    assert cached.ask() == [1.0]  # 1.0 away from 0.0: asked
    cached.tell(2.0)
    assert cached.ask() == [-1.0]  # the reflection
    cached.tell(3.0)  # worse than the worst: inside contraction to 0.5, within 0.6 of 0.0 -> answered from the cache
    cached.ask()
    assert len(cached.history) == 3 and len(cached._told) >= 4 and cached.converged
    with pytest.raises(ValueError, match="N\\+1 points"):
        NelderMead([[0.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="finite"):
        NelderMead([[0.0], [1.0]]).tell(float("nan"))


def _nelder_mead_asks(values: dict, n: int) -> list[tuple[float, float]]:
    """The first n points NelderMead asks on the simplex (0,0), (1,0), (0,1), told f from the ``values`` table."""
    nm = NelderMead([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], tol=0.0)
    asked = []
    for _ in range(n):
        x = tuple(nm.ask())
        asked.append(x)
        nm.tell(values[x])
    return asked


@pytest.mark.parametrize(
    "f_reflected, f_contracted, next_points",
    [
        # f_r between the second-worst and the worst: outside contraction (0.75, -0.5) ...
        (1.5, 1.8, [(0.5, 0.0), (0.0, 0.5)]),  # ... no better than the reflection: shrink towards the best
        (1.5, 1.5, [(0.25, 0.5)]),  # ... as good as the reflection: kept, next reflection of (1, 0)
    ],
)
def test_nelder_mead_outside_contraction(f_reflected, f_contracted, next_points):
    start = {(0.0, 0.0): 0.0, (1.0, 0.0): 1.0, (0.0, 1.0): 2.0}
    values = {**start, (1.0, -1.0): f_reflected, (0.75, -0.5): f_contracted, (0.5, 0.0): 0.5, (0.0, 0.5): 0.5}
    values[(0.25, 0.5)] = 9.0
    asked = _nelder_mead_asks(values, 5 + len(next_points))
    assert asked[3:5] == [(1.0, -1.0), (0.75, -0.5)]
    assert asked[5:] == next_points


@pytest.mark.parametrize(
    "f_contracted, next_points",
    [(1.9, [(0.25, 0.5), (0.75, -0.5)]), (2.0, [(0.25, 0.5), (0.5, 0.0), (0.0, 0.5)])],
)
def test_nelder_mead_inside_contraction(f_contracted, next_points):
    """A reflection as bad as the worst point contracts inside, to (0.25, 0.5); kept only if strictly better."""
    values = {(0.0, 0.0): 0.0, (1.0, 0.0): 1.0, (0.0, 1.0): 2.0, (1.0, -1.0): 2.0, (0.25, 0.5): f_contracted}
    values.update({(0.5, 0.0): 0.5, (0.0, 0.5): 0.5, (0.75, -0.5): 9.0})
    asked = _nelder_mead_asks(values, 4 + len(next_points))
    assert asked[3:] == [(1.0, -1.0), *next_points]


# ------------------------------------------------------------------------------------------------ trainers
@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("constrained") / "tiny", hidden_size=32)


def hash3(completions, **kwargs):
    """Deterministic pseudo-verifier (about a third of a random tiny model's completions pass)."""
    return [1.0 if int(hashlib.sha1(c.encode()).hexdigest(), 16) % 3 == 0 else 0.0 for c in completions]


def hash_graded(completions, **kwargs):
    return [(int(hashlib.sha1(c.encode()).hexdigest(), 16) % 7) / 6 for c in completions]


def short(completions, **kwargs):
    return [-len(c) / 30 for c in completions]


def config(tmp_path, cls=hfx.ConstrainedGRPOConfig, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        **activation_checkpointing(False), save_strategy="no", seed=0, disable_tqdm=True, beta=0.05,
        constraint_rewards=["hash_graded", "short"], constraint_thresholds=[0.6, -0.1],
        constraint_types=["ge", "le"], lagrange_lr=1.0,
    )  # fmt: skip
    base.update(kw)
    return cls(**base)


REWARDS = [hash3, hash_graded, short]


def expected_advantages(rewards: torch.Tensor, weights: list[float], estimator: str):
    """Hand-written GDPO (normalize_then_sum) / RLOO (beta = 0) advantages for groups of 2."""
    r = rewards.double().view(-1, 2, rewards.shape[1])
    w = torch.tensor(weights, dtype=torch.float64)
    if estimator == "grpo":
        z = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
        s = (z * w).sum(-1).view(-1)
        return (s - s.mean()) / (s.std() + 1e-4)
    total = (r * w).sum(-1)
    return (total - total.flip(1)).view(-1)  # leave-one-out with 2 samples: r_i − r_other


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_advantages_use_the_updated_multipliers(model_path, tmp_path, estimator):
    cls, tcls = {
        "grpo": (hfx.ConstrainedGRPOConfig, hfx.ConstrainedGRPOTrainer),
        "rloo": (hfx.ConstrainedRLOOConfig, hfx.ConstrainedRLOOTrainer),
    }[estimator]
    args = config(tmp_path, cls=cls, max_steps=1, reward_weights=[2.0, 1.0, 1.5], beta=0.0)
    trainer = tcls(model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8))
    assert trainer.reward_weights.tolist() == pytest.approx([2 * 0.5, 0.5, 1.5 - 0.5])  # σ(0) = 0.5
    trainer.train()
    rewards = torch.tensor([trainer._logs["rewards"][n] for n in ("hash3", "hash_graded", "short")]).T
    J = rewards[:, 1:].mean(0).tolist()
    # one step from μ = 0 (σ' = 1/4), lr 1: ge on hash_graded, le on short
    mu = [-0.25 * (J[0] - 0.6), 0.25 * (J[1] - (-0.1))]
    m = [sig(mu[0]), sig(mu[1])]
    weights = [2.0 * (1 - m[0]), m[0], 1.5 - m[1]]
    assert trainer.multipliers.raw == pytest.approx(mu, abs=1e-6)
    assert trainer.reward_weights.tolist() == pytest.approx(weights, abs=1e-6)
    logged = torch.tensor(trainer._logs["advantages"], dtype=torch.float64)
    assert logged.tolist() == pytest.approx(expected_advantages(rewards, weights, estimator).tolist(), abs=1e-4)
    hist = [h for h in trainer.state.log_history if "loss" in h][0]
    assert hist["constraint/hash_graded/multiplier"] == pytest.approx(m[0], abs=1e-4)
    assert hist["constraint/short/value"] == pytest.approx(J[1], abs=1e-4)
    assert hist["constraint/short/threshold"] == pytest.approx(-0.1)
    assert hist["reward_weights/hash3"] == pytest.approx(weights[0], abs=1e-4)


@pytest.mark.parametrize("init", [-4.0, 0.0, 4.0])
def test_constraints_only_the_multiplier_size_reaches_the_advantages(model_path, tmp_path, init):
    """μ-PPO (one ge constraint, the KL as the task): GRPO's final standardisation made the advantages the same
    for σ(μ) = 0.018 and 0.982 (only beta moved), so a met constraint kept its full push. Eq. 4.4: σ(μ)·A."""
    args = config(
        tmp_path, max_steps=1, beta=0.05, constraint_rewards=["hash_graded"], constraint_thresholds=[0.5],
        constraint_types=["ge"], lagrange_lr=1e-9, lagrange_init=[init],
    )  # fmt: skip
    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=[hash_graded], args=args, train_dataset=prompt_dataset(8)
    )
    trainer.train()
    rewards = torch.tensor(trainer._logs["rewards"]["hash_graded"]).unsqueeze(1)
    m = sig(init)
    expected = m * expected_advantages(rewards, [m], "grpo")
    assert torch.tensor(trainer._logs["advantages"], dtype=torch.float64).tolist() == pytest.approx(
        expected.tolist(), abs=1e-4
    )
    assert trainer.advantage_scale() == pytest.approx(m, abs=1e-6)
    hist = [h for h in trainer.state.log_history if "loss" in h][0]
    assert hist["constraint/advantage_scale"] == pytest.approx(m, abs=1e-4)
    assert trainer.beta == pytest.approx(0.05 * (1 - m), abs=1e-6)


def test_constraint_values_are_means_over_the_scored_samples(model_path, tmp_path):
    """A constraint reward that returns None for some samples: J_i is the mean over the scored ones (a plain mean
    made J NaN and froze that multiplier), and the multiplier steps with it."""
    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=config(tmp_path), train_dataset=prompt_dataset(8)
    )
    assert trainer.constraint_names == ["hash_graded", "short"]
    nan = float("nan")
    before = list(trainer.multipliers.raw)
    trainer.update_reward_weights(torch.tensor([[1.0, 0.2, nan], [0.0, nan, -0.4], [1.0, 0.6, -0.2]]))
    assert trainer.constraint_values == pytest.approx([0.4, -0.3])
    assert all(a != b for a, b in zip(trainer.multipliers.raw, before))


def test_advantage_scale_is_the_mean_constraint_weight_over_several_constraints(model_path, tmp_path):
    """Two constraint rewards and no task reward: the scale is the mean |weight| of the constraints (their sum would
    double the advantages), under both GRPO aggregations with std scaling, and 1 without it."""
    args = config(
        tmp_path, max_steps=1, beta=0.05, constraint_rewards=["hash_graded", "short"], constraint_thresholds=[0.5, -0.1],
        constraint_types=["ge", "le"], lagrange_init=[1.0, -2.0],
    )  # fmt: skip
    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=[hash_graded, short], args=args, train_dataset=prompt_dataset(8)
    )
    weights = [sig(1.0), 1 - sig(-2.0)]  # ge: m; le: alpha - m (alpha = 1)
    assert trainer.reward_weights.tolist() == pytest.approx(weights)
    want = (weights[0] + weights[1]) / 2
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        trainer.multi_objective_aggregation = aggregation
        assert trainer.advantage_scale() == pytest.approx(want, abs=1e-6), aggregation
    trainer.multi_objective_aggregation, trainer.scale_rewards = "sum_then_normalize", "none"
    assert trainer.advantage_scale() == 1.0


@pytest.mark.parametrize("beta, scaled", [(0.0, True), (0.05, False)])
def test_rloo_advantage_scale_only_without_a_kl_in_the_reward(model_path, tmp_path, beta, scaled):
    """RLOO standardises w·z − β·kl (its KL is in the reward): those keep their ratio, and scaling by σ(μ) would damp
    the KL task along with the met constraint, so only beta=0 is scaled."""
    args = config(
        tmp_path, cls=hfx.ConstrainedRLOOConfig, max_steps=1, beta=beta, normalize_advantages=True,
        constraint_rewards=["hash_graded"], constraint_thresholds=[0.5], constraint_types=["ge"],
        lagrange_init=[-4.0],
    )  # fmt: skip
    trainer = hfx.ConstrainedRLOOTrainer(
        model_path, reward_funcs=[hash_graded], args=args, train_dataset=prompt_dataset(8)
    )
    assert trainer.advantage_scale() == pytest.approx(sig(-4.0) if scaled else 1.0)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_train_runs_and_scales_beta(model_path, tmp_path, estimator):
    cls, tcls = {
        "grpo": (hfx.ConstrainedGRPOConfig, hfx.ConstrainedGRPOTrainer),
        "rloo": (hfx.ConstrainedRLOOConfig, hfx.ConstrainedRLOOTrainer),
    }[estimator]
    args = config(tmp_path, cls=cls, constraint_types=["ge", "ge"], constraint_thresholds=[0.9, 0.0])
    trainer = tcls(model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8))
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    # both thresholds unreachable (0.9, and 0 for a length penalty): both multipliers rise every step
    ms = [h["constraint/hash_graded/multiplier"] for h in hist]
    assert ms[0] > 0.5 and ms == sorted(ms)
    task = 2 - sum(trainer.multipliers.values())
    assert trainer.multipliers.task_weight() == pytest.approx(task)
    assert trainer.beta == pytest.approx(0.05 * task) and hist[-1]["constraint/beta"] == pytest.approx(
        0.05 * task, rel=1e-3
    )
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(model_path).state_dict()
    assert any(not torch.equal(init[n], p.detach()) for n, p in trainer.model.named_parameters() if n in init)


def test_peft_model_and_reward_model(model_path, tmp_path):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from hfx.testing import tiny_reward_model

    rm_tok = AutoTokenizer.from_pretrained(model_path)
    rm = tiny_reward_model(hidden_size=32, tokenizer=rm_tok)
    args = config(tmp_path, constraint_rewards=None, constraint_thresholds=[0.5, 0.5, -0.1, 0.0],
                  constraint_types=["ge"], max_steps=2)  # fmt: skip
    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=[*REWARDS, rm], args=args, train_dataset=prompt_dataset(8),
        reward_processing_classes=[None, None, None, rm_tok],
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )  # fmt: skip
    trainer.train()
    assert len(trainer.constraint_names) == 4 and trainer.multipliers.steps == 2
    assert trainer.state.log_history[0][f"constraint/{trainer.constraint_names[3]}/multiplier"] != 0.5


def test_resume_restores_multipliers(model_path, tmp_path):
    ds = prompt_dataset(8)
    args = config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    full = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=args, train_dataset=ds)
    full.train()
    ckpt = os.path.join(args.output_dir, "checkpoint-2")
    with open(os.path.join(ckpt, "constraint_state.json")) as f:
        saved = json.load(f)
    assert saved["multipliers"]["steps"] == 2 and saved["constraint_names"] == ["hash_graded", "short"]
    resumed = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=args, train_dataset=ds)
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.multipliers.steps == 3
    assert resumed.multipliers.raw == pytest.approx(full.multipliers.raw, abs=1e-6)
    assert resumed.multipliers.buffer == pytest.approx(full.multipliers.buffer, abs=1e-6)
    assert resumed.reward_weights.tolist() == pytest.approx(full.reward_weights.tolist(), abs=1e-6)
    assert resumed.beta == pytest.approx(full.beta)
    # a damaged state file names itself and the way on (it was a bare JSONDecodeError)
    damaged = os.path.join(tmp_path, "damaged")
    shutil.copytree(ckpt, damaged)
    with open(os.path.join(damaged, "constraint_state.json"), "r+") as f:
        f.truncate(40)
    again = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=args, train_dataset=ds)
    path = os.path.join(damaged, "constraint_state.json")
    with pytest.raises(ValueError, match=rf"{re.escape(path)} is damaged \(JSONDecodeError.*delete the file"):
        again.train(resume_from_checkpoint=damaged)


def test_resume_under_changed_config(model_path, tmp_path, caplog):
    """Resuming used to accept changed constraint kinds / parametrization (the saved μ then gave other reward
    weights), changed thresholds (the checkpoint's won, silently) and a search state without its callback."""
    ds = prompt_dataset(8)
    saved = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path), train_dataset=ds)
    saved.multipliers.step([0.2, 0.3])
    state = json.loads(json.dumps(saved.method_state_dict()))

    def load(**kw):
        trainer = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path, **kw),
                                             train_dataset=ds)  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            trainer.load_method_state_dict(json.loads(json.dumps(state)))
        return trainer, [r.getMessage() for r in caplog.records]

    with pytest.raises(ValueError, match=r"constraint kinds \['ge', 'le'\] differ from constraint_types"):
        load(constraint_types=["ge", "ge"])
    with pytest.raises(ValueError, match="lagrange_parametrization='sigmoid', this run 'projected'"):
        load(lagrange_parametrization="projected")
    same, messages = load()
    assert messages == [] and same.multipliers.raw == saved.multipliers.raw
    moved, messages = load(constraint_thresholds=[0.2, -0.5])
    assert moved.multipliers.thresholds == [0.6, -0.1]  # the checkpoint's, as the warning says
    assert len(messages) == 1 and "constraint_thresholds=[0.2, -0.5] differ from the checkpoint's" in messages[0]
    # an unfinished threshold search in the checkpoint, resumed without its callback
    search = hfx.ThresholdSearchCallback(lambda t: 0.0, phase_max_steps=1)
    searching = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path),
                                           train_dataset=ds, callbacks=[search])  # fmt: skip
    search.on_train_begin(searching.args, searching.state, None)
    state = json.loads(json.dumps(searching.method_state_dict()))
    _, messages = load()
    assert len(messages) == 1 and "no ThresholdSearchCallback is attached" in messages[0]
    assert state["multipliers"]["kinds"] == ["ge", "le"] and state["multipliers"]["parametrization"] == "sigmoid"
    # states written before the kinds / parametrization were recorded still load
    del state["multipliers"]["kinds"], state["multipliers"]["parametrization"], state["threshold_search"]
    assert load(lagrange_parametrization="projected")[1] == []


def prompt_graded(prompts, **kwargs):
    """Depends on the prompt only: a regenerated batch (same prompts, new completions) gets the same constraint
    means, so multipliers after a resume can be compared exactly with an uninterrupted run."""
    return [(int(hashlib.sha1(p.encode()).hexdigest(), 16) % 7) / 6 for p in prompts]


def prompt_short(prompts, **kwargs):
    return [-len(p) / 300 for p in prompts]


def test_resume_inside_a_generation_batch_updates_once(model_path, tmp_path, caplog):
    """steps_per_generation=2, checkpoint after step 1: TRL does not checkpoint its generated batch and regenerates
    it on resume, which used to update the multipliers a second time (3 updates instead of 2 over 4 steps) and shift
    TRL's generation cycle for the rest of the run."""
    ds = prompt_dataset(16)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=1, steps_per_generation=2,
              constraint_rewards=["prompt_graded", "prompt_short"])  # fmt: skip
    rewards = [hash3, prompt_graded, prompt_short]
    args = config(tmp_path, **kw)
    full = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=rewards, args=args, train_dataset=ds)
    full.train()
    assert full.multipliers.steps == 2  # one update per generation batch
    ckpt = os.path.join(args.output_dir, "checkpoint-1")
    resumed = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=rewards, args=config(tmp_path / "b", **kw),
                                         train_dataset=ds)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.multipliers.steps == 2
    assert resumed.multipliers.raw == pytest.approx(full.multipliers.raw, abs=1e-9)
    assert resumed.multipliers.buffer == pytest.approx(full.multipliers.buffer, abs=1e-9)
    assert resumed._step == full._step == 4  # TRL's micro-step counter continues from the checkpoint
    (message,) = [r.getMessage() for r in caplog.records if "inside a generation batch" in r.getMessage()]
    assert "after micro-step 1 of 2" in message and "save_steps" in message
    with open(os.path.join(ckpt, "constraint_state.json")) as f:
        state = json.load(f)
    assert state.pop("generation_cycle") == {"micro_step": 1, "generate_every": 2}
    # a checkpoint of an older hfx (no recorded position): the extra update cannot be avoided, but is announced
    old = shutil.copytree(ckpt, tmp_path / "old" / "checkpoint-1")
    with open(old / "constraint_state.json", "w") as f:
        json.dump(state, f)
    again = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=rewards, args=config(tmp_path / "c", **kw),
                                       train_dataset=ds)  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again.train(resume_from_checkpoint=str(old))
    assert again.multipliers.steps == 3
    assert any("its position is not recorded" in r.getMessage() for r in caplog.records)
    # ignore_data_skip: the data restarts from its first batch, so does TRL's generation cycle: nothing is replayed
    # (each of the 2 generation batches in the 3 remaining micro-steps updates once) and nothing is warned
    fresh = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=rewards, train_dataset=ds,
                                       args=config(tmp_path / "d", ignore_data_skip=True, **kw))  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fresh.train(resume_from_checkpoint=ckpt)
    assert fresh.multipliers.steps == 3 and fresh._step == 3
    assert not any("inside a generation batch" in r.getMessage() for r in caplog.records)


def test_load_best_model_at_end_brings_back_the_best_checkpoints_multipliers(model_path, tmp_path):
    """transformers' load_best_model_at_end loads the best checkpoint's weights only; the multipliers (and so the
    reward weights a later evaluate() scores with) used to stay at the last step's values."""
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8))
    trainer.train()
    best = os.path.join(args.output_dir, "checkpoint-2")
    with open(os.path.join(best, "constraint_state.json")) as f:
        saved = json.load(f)["multipliers"]
    assert trainer.multipliers.state_dict() != saved  # two more updates after checkpoint-2
    trainer.state.best_model_checkpoint = best  # what load_best_model_at_end picks, here checkpoint-2
    trainer._load_best_model()
    assert trainer.multipliers.state_dict() == saved


def test_threshold_search_callback(model_path, tmp_path):
    calls = []

    def eval_fn(trainer):  # a deterministic "held-out score" peaking at thresholds (0.5, -0.2)
        t = trainer.multipliers.thresholds
        calls.append(list(t))
        return -((t[0] - 0.5) ** 2) - (t[1] + 0.2) ** 2

    search = hfx.ThresholdSearchCallback(eval_fn, phase_max_steps=1, max_phases=4, initial_step=0.2)
    args = config(tmp_path, max_steps=5, save_strategy="steps", save_steps=2)
    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8), callbacks=[search]
    )
    trainer.train()
    # phases of one step: 3 simplex vertices (θ, θ + 0.2·max(|θ_0|,0.1) e_0, θ + 0.2·0.1 e_1), then a reflection
    assert calls[:3] == [pytest.approx([0.6, -0.1]), pytest.approx([0.72, -0.1]), pytest.approx([0.6, -0.08])]
    assert search.phases == 4 and search.done
    best = max(calls[:4], key=lambda t: -((t[0] - 0.5) ** 2) - (t[1] + 0.2) ** 2)
    assert trainer.multipliers.thresholds == pytest.approx(best)
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert "threshold_search/score" in hist[0]
    with open(os.path.join(args.output_dir, "checkpoint-2", "constraint_state.json")) as f:
        saved = json.load(f)["threshold_search"]
    assert saved["phases"] == 2 and len(saved["search"]["history"]) == 2
    # resume: the search continues from the saved simplex state
    search2 = hfx.ThresholdSearchCallback(eval_fn, phase_max_steps=1, max_phases=4, initial_step=0.2)
    resumed = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8), callbacks=[search2]
    )
    calls.clear()
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    assert search2.phases == 4 and search2.done
    assert resumed.multipliers.thresholds == pytest.approx(trainer.multipliers.thresholds)


def test_threshold_search_ends_on_the_best_thresholds_not_the_last_tried(model_path, tmp_path):
    """A score peaking at the starting thresholds: every later vertex is worse, and once the search is done the
    trainer trains on the best point (0.6, -0.1), not on the last one tried."""
    calls = []

    def eval_fn(trainer):
        t = trainer.multipliers.thresholds
        calls.append(list(t))
        return -((t[0] - 0.6) ** 2) - (t[1] + 0.1) ** 2

    search = hfx.ThresholdSearchCallback(eval_fn, phase_max_steps=1, max_phases=3, initial_step=0.2)
    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=config(tmp_path, max_steps=3), train_dataset=prompt_dataset(8),
        callbacks=[search],
    )  # fmt: skip
    trainer.train()
    assert search.done and len(calls) == 3 and calls[-1] != pytest.approx([0.6, -0.1])
    assert trainer.multipliers.thresholds == pytest.approx([0.6, -0.1])


def test_threshold_search_state_round_trip_keeps_the_phase():
    """The callback's checkpoint state keeps where the current phase began, so a run resumed mid-phase trains the
    rest of that phase before it scores (with phase_start 0 it scored at once)."""
    from hfx.trainers.threshold_search import NelderMead

    search = hfx.ThresholdSearchCallback(lambda t: 0.0, phase_max_steps=4)
    search.search = NelderMead([[0.6, -0.1], [0.7, -0.1], [0.6, -0.05]])
    search.phase_start, search.phases, search.done = 7, 2, False
    again = hfx.ThresholdSearchCallback(lambda t: 0.0, phase_max_steps=4)
    again.load_state_dict(json.loads(json.dumps(search.state_dict())))
    assert (again.phase_start, again.phases, again.done) == (7, 2, False)
    assert again.search.state_dict() == search.search.state_dict()


@pytest.mark.parametrize(
    "values, thresholds, reached",
    [
        ([0.629, -0.1], [0.6, -0.1], True),  # |0.029| <= 0.05 * 0.6
        ([0.64, -0.1], [0.6, -0.1], False),  # |0.04| > 0.03: relative to the threshold, not absolute
        ([0.6, -0.104], [0.6, -0.1], True),  # |0.004| <= 0.05 * |-0.1|
        ([0.6, -0.106], [0.6, -0.1], False),
        ([4e-5], [0.0], True),  # a zero threshold: within 0.05 * 1e-3
        ([6e-5], [0.0], False),
        ([float("nan"), -0.1], [0.6, -0.1], False),  # a constraint no sample scored is not reached
        (None, [0.6, -0.1], False),  # nothing measured yet
    ],
)
def test_threshold_search_reach_tolerance_is_relative(values, thresholds, reached):
    """A phase ends early once every constrained reward's batch mean is within ``reach_tolerance`` of its threshold,
    relative to the threshold's size (floored at 1e-3)."""
    from types import SimpleNamespace

    search = hfx.ThresholdSearchCallback(lambda t: 0.0, reach_tolerance=0.05)
    search.trainer = SimpleNamespace(constraint_values=values, multipliers=SimpleNamespace(thresholds=thresholds))
    assert search._reached() is reached


def test_threshold_search_phase_ends_when_reached_or_after_phase_max_steps():
    """A phase is scored as soon as the thresholds are reached, else only after ``phase_max_steps`` steps."""
    from collections import defaultdict
    from types import SimpleNamespace

    trainer = SimpleNamespace(
        constraint_values=[0.0], multipliers=SimpleNamespace(thresholds=[0.6]),
        _metrics={"train": defaultdict(list)}, set_constraint_thresholds=lambda t: None,
    )  # fmt: skip
    search = hfx.ThresholdSearchCallback(lambda t: 0.0, phase_max_steps=3, initial_step=0.1)
    search.bind(trainer)
    scores = iter([1.0, 2.0, 3.0])
    search._score = lambda: next(scores)
    search.on_train_begin(None, SimpleNamespace(global_step=0), None)
    for step in (1, 2):  # far from 0.6 and under 3 steps: nothing scored
        search.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert search.phases == 0
    search.on_step_end(None, SimpleNamespace(global_step=3), None)  # phase_max_steps reached
    assert (search.phases, search.phase_start) == (1, 3)
    trainer.constraint_values = [0.61]  # within 5 % of 0.6: scored on the next step
    search.on_step_end(None, SimpleNamespace(global_step=4), None)
    assert (search.phases, search.phase_start) == (2, 4)
    trainer.constraint_values = [0.0]  # far again: the next phase counts its 3 steps from step 4
    for step in (5, 6):
        search.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert search.phases == 2
    search.on_step_end(None, SimpleNamespace(global_step=7), None)
    assert (search.phases, search.phase_start) == (3, 7)


def test_threshold_search_stays_within_bounds(model_path, tmp_path):
    """A score peaking outside the box: proposals are clipped to ``bounds`` before training and scoring, and the
    initial step that would leave the box goes the other way (0.6 + 0.12 > 0.65, so 0.48)."""
    calls = []

    def eval_fn(trainer):
        t = trainer.multipliers.thresholds
        calls.append(list(t))
        return -((t[0] - 0.9) ** 2) - (t[1] + 0.2) ** 2

    search = hfx.ThresholdSearchCallback(
        eval_fn, phase_max_steps=1, max_phases=5, initial_step=0.2, bounds=[(0.0, 0.65), (None, 0.0)]
    )
    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=config(tmp_path, max_steps=6), train_dataset=prompt_dataset(8),
        callbacks=[search],
    )  # fmt: skip
    trainer.train()
    assert calls[:3] == [pytest.approx([0.6, -0.1]), pytest.approx([0.48, -0.1]), pytest.approx([0.6, -0.08])]
    assert len(calls) == 5 and all(0.0 <= a <= 0.65 and b <= 0.0 for a, b in calls)
    assert any(a == 0.65 for a, _ in calls)  # a clipped proposal
    assert 0.0 <= trainer.multipliers.thresholds[0] <= 0.65
    with pytest.raises(ValueError, match=r"bounds: each \(low, high\) needs low < high"):
        hfx.ThresholdSearchCallback(eval_fn, bounds=[(1.0, 0.0)])
    with pytest.raises(ValueError, match=r"bounds: one \(low, high\) pair per constraint"):
        hfx.ThresholdSearchCallback(eval_fn, bounds=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"threshold 0 \(0.6\) is outside its bounds \(0.7, 1.0\)"):
        hfx.ThresholdSearchCallback(eval_fn, bounds=[(0.7, 1.0), (None, None)])._initial_simplex([0.6, -0.1])


def test_threshold_search_scores_with_rank_zeros_value_on_every_rank(model_path, tmp_path, monkeypatch):
    """The score is rank 0's, broadcast, then checked on every rank. Checked before the broadcast, a non-number from
    another rank (the docstring says only rank 0's value is used) raised there alone and left rank 0 waiting in the
    broadcast; a NaN on rank 0 did the same the other way round. Here as rank 1 of 2, with the broadcast faked."""
    import accelerate.utils

    trainer = hfx.ConstrainedGRPOTrainer(
        model_path, reward_funcs=REWARDS, args=config(tmp_path), train_dataset=prompt_dataset(8)
    )
    rank0 = {"value": 2.5}
    sent = []

    def broadcast(box, from_process=0):
        sent.append(box[0])
        box[0] = rank0["value"]
        return box

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)
    search = hfx.ThresholdSearchCallback(lambda t: None, phase_max_steps=1)  # what another rank's eval_fn may give
    search.trainer = trainer
    assert search._score() == 2.5 and sent == [None]
    rank0["value"] = float("nan")  # rank 0's value is checked on every rank, so all of them raise together
    with pytest.raises(ValueError, match="eval_fn returned nan"):
        search._score()


def test_errors(model_path, tmp_path):
    ds = prompt_dataset(8)
    with pytest.raises(ValueError, match="constraint_thresholds is required"):
        config(tmp_path, constraint_thresholds=None)
    with pytest.raises(ValueError, match="constraint_rewards names 2 rewards but constraint_thresholds has 1"):
        config(tmp_path, constraint_thresholds=[0.5])
    with pytest.raises(ValueError, match="constraint_types: 'gt'"):
        config(tmp_path, constraint_types=["gt"])
    with pytest.raises(ValueError, match="lagrange_parametrization"):
        config(tmp_path, lagrange_parametrization="softplus")
    # NaN/inf used to pass (NaN > 0 is False) and then train with NaN reward weights and a zero loss
    nan, inf = float("nan"), float("inf")
    for kw, name in [({"constraint_thresholds": [nan, 0.1]}, "constraint_thresholds"),
                     ({"constraint_thresholds": [0.5, inf]}, "constraint_thresholds"),
                     ({"lagrange_init": [0.0, nan]}, "lagrange_init"), ({"lagrange_lr": nan}, "lagrange_lr"),
                     ({"lagrange_lr": inf}, "lagrange_lr"), ({"lagrange_max": nan}, "lagrange_max"),
                     ({"lagrange_max_grad_norm": nan}, "lagrange_max_grad_norm")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            config(tmp_path, **kw)
    with pytest.raises(ValueError, match="constraint_thresholds has 2 values but there are 3 reward functions"):
        hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, train_dataset=ds,
                                   args=config(tmp_path, constraint_rewards=None))  # fmt: skip
    with pytest.raises(ValueError, match="constraint_rewards: unknown reward name 'lenght'"):
        hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, train_dataset=ds,
                                   args=config(tmp_path, constraint_rewards=["hash3", "lenght"]))  # fmt: skip
    with pytest.raises(TypeError, match="needs a ConstrainedGRPOConfig"):
        hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, train_dataset=ds,
                                   args=config(tmp_path, cls=hfx.ConstrainedRLOOConfig))  # fmt: skip
    # no 'prompt' column: used to be a bare KeyError: 'prompt' from inside TRL at the first generation
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column .*'question'.*rename_column"):
        hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path),
                                   train_dataset=ds.rename_column("prompt", "question"))  # fmt: skip
    # a reward function needing a column the dataset lacks: used to fail inside TRL at the first reward computation
    from hfx.data import correctness_reward

    for cls, ccls in ((hfx.ConstrainedGRPOTrainer, hfx.ConstrainedGRPOConfig),
                      (hfx.ConstrainedRLOOTrainer, hfx.ConstrainedRLOOConfig)):  # fmt: skip
        with pytest.raises(ValueError, match=r"'correctness_reward' needs a 'answer' column, which train_dataset lac"):
            cls(model_path, reward_funcs=[correctness_reward, hash_graded, short], args=config(tmp_path, cls=ccls),
                train_dataset=ds.remove_columns("answer"))  # fmt: skip
    with pytest.raises(ValueError, match=r"'correctness_reward' needs a 'answer' column, which eval_dataset lacks"):
        hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=[correctness_reward, hash_graded, short],
                                   args=config(tmp_path), train_dataset=ds,
                                   eval_dataset=ds.remove_columns("answer"))  # fmt: skip

    # a reward function asking for `prompt` (TRL passes `prompts` and keeps that column back): used to pass this
    # check, since the dataset has the column, and fail with a bare TypeError after the first generation
    def by_prompt(prompt, completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(
        ValueError, match=r"'by_prompt' requires a 'prompt' argument, which TRL never passes.*'prompts'"
    ):
        hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=[by_prompt, hash_graded, short], args=config(tmp_path),
                                   train_dataset=ds)  # fmt: skip
    with pytest.raises(RuntimeError, match="must be passed to a ConstrainedGRPOTrainer"):
        hfx.ThresholdSearchCallback(lambda t: 0.0).on_train_begin(None, None, None)


@pytest.mark.parametrize(
    "returned, error, match",
    [({"eval_loss": 1.0}, TypeError, r"eval_fn must return one number.*got dict.*t\.evaluate\(\)\['eval_loss'\]"),
     (float("nan"), ValueError, r"eval_fn returned nan at step 1; the search needs a finite score"),
     (None, TypeError, r"eval_fn must return one number.*got NoneType")],
)  # fmt: skip
def test_threshold_search_names_a_bad_eval_fn_result(returned, error, match, model_path, tmp_path):
    """``lambda t: t.evaluate()`` (a dict) used to fail as a bare float() TypeError after a whole phase."""
    search = hfx.ThresholdSearchCallback(lambda trainer: returned, phase_max_steps=1)
    trainer = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path),
                                         train_dataset=prompt_dataset(8), callbacks=[search])  # fmt: skip
    with pytest.raises(error, match=match):
        trainer.train()


def test_an_infinite_constraint_reward_is_named_and_an_empty_dataset_refused(model_path, tmp_path):
    def inf_short(completions, **kwargs):
        return [float("-inf")] * len(completions)

    inf_short.__name__ = "short"
    trainer = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=[hash3, hash_graded, inf_short],
                                         args=config(tmp_path), train_dataset=prompt_dataset(8))  # fmt: skip
    with pytest.raises(ValueError, match=r"reward function 'short' returned -inf for 4 of this batch's 4 samples"):
        trainer.train()  # used to say "constraint 1's batch mean reward"
    # TRL's GRPO "trains" 0 steps on an empty dataset, with a warning; BVPO and Masked Thought refused it already
    for cls in (hfx.ConstrainedGRPOTrainer, hfx.GVMRAFTTrainer):
        args = config(tmp_path) if cls is hfx.ConstrainedGRPOTrainer else hfx.GVMRAFTConfig(
            output_dir=str(tmp_path / "g"), use_cpu=True, report_to="none", num_generations=2,
            per_device_train_batch_size=4)  # fmt: skip
        with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
            cls(model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8).select([]))


def test_pushed_checkpoint_holds_the_multipliers(model_path, tmp_path, fake_hub):
    """hub_strategy="checkpoint" uploads the checkpoint folder from inside _save_checkpoint: the state file must be
    there when that upload starts (it was written after it, so the Hub copy resumed with fresh multipliers)."""
    args = config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, push_to_hub=True,
                  hub_model_id="user/hfx-test", hub_strategy="checkpoint")  # fmt: skip
    hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=args, train_dataset=prompt_dataset(8)).train()
    assert "constraint_state.json" in fake_hub["last-checkpoint"]
    # and it is not rewritten (truncated) while that upload runs
    st = os.stat(os.path.join(args.output_dir, "checkpoint-1", "constraint_state.json"))
    assert fake_hub["last-checkpoint"]["constraint_state.json"] == (st.st_ino, st.st_mtime_ns, st.st_size)


def test_threshold_search_warns_when_no_phase_fits_in_the_run(model_path, tmp_path, caplog):
    """phase_max_steps (50 by default) past max_steps used to end the run with no phase scored, silently."""
    search = hfx.ThresholdSearchCallback(lambda t: 0.0)
    trainer = hfx.ConstrainedGRPOTrainer(model_path, reward_funcs=REWARDS, args=config(tmp_path, max_steps=2),
                                         train_dataset=prompt_dataset(8), callbacks=[search])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert search.phases == 0
    assert any("no phase is scored" in r.getMessage() and "phase_max_steps=50" in r.getMessage()
               for r in caplog.records)  # fmt: skip
