"""hfx trainers on 2 CPU processes (torchrun + gloo DDP): each rank trains on its own data shard, and both end with
identical weights and identical method state (e.g. BVPO's α, estimated from all-reduced gradient statistics).

One launch trains every case in ``train_trainers.CASES`` (a new trainer adds one line there).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from train_trainers import CASES, HV_EVAL_PROMPTS, prompt_score

from hfx.testing import save_tiny_model
from hfx.testing.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_trainers.py")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny", hidden_size=32)


@pytest.fixture(scope="module")
def launched(base_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dist-trainers")
    run_distributed(WORKER, ["--base", base_dir, "--out", str(out)], log_path=out / "log.txt", timeout=900)
    return str(out)


def read_rank(out: str, case: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(out, case, f"rank{rank}.json")) as f:
        info = json.load(f)
    return info, load_file(os.path.join(out, case, f"rank{rank}.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_agree_after_training(launched, case, base_dir):
    from transformers import AutoModelForCausalLM

    (info0, t0), (info1, t1) = read_rank(launched, case, 0), read_rank(launched, case, 1)
    assert info0["world_size"] == info1["world_size"] == 2
    assert info0["wrapped"] == info1["wrapped"] == "DistributedDataParallel"
    # different data shards on the two ranks
    assert info0["batches"] and len(info0["batches"]) == len(info1["batches"])
    assert not set(info0["batches"]) & set(info1["batches"])
    # identical weights and method state afterwards
    assert t0.keys() == t1.keys() and t0
    for k in t0:
        assert torch.equal(t0[k], t1[k]), f"{k} differs between ranks"
    assert info0["state"] == info1["state"]
    assert [h["loss"] for h in info0["history"]] == [h["loss"] for h in info1["history"]]  # logged globally
    # and the model trained
    init = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    assert any(not torch.equal(init[k.removeprefix("module.")], v) for k, v in t0.items() if k in init)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in info0["history"]])))


def test_bvpo_alpha_auto_logged_and_moved(launched):
    info, _ = read_rank(launched, "bvpo", 0)
    alphas = [h["bvpo/alpha"] for h in info["history"]]
    assert len(alphas) == 3 and alphas[0] == 0.5 and alphas[-1] != 0.5
    assert info["state"]["alpha"] != 0.5


def test_masked_thought_schedule_and_fraction_logged(launched):
    (info0, _), (info1, _) = read_rank(launched, "masked_thought", 0), read_rank(launched, "masked_thought", 1)
    rates = [h["masked_thought/mask_rate"] for h in info0["history"]]
    assert rates == pytest.approx([0.0, 0.4 * 1 / 1.5, 0.4])  # warm-up over half of 3 steps, from global_step
    fractions = [h["masked_thought/masked_fraction"] for h in info0["history"]]
    assert fractions == [h["masked_thought/masked_fraction"] for h in info1["history"]]  # gathered over ranks
    assert fractions[0] == 0.0 and 0.0 < fractions[-1] < 1.0


def test_constrained_multipliers_moved_identically(launched):
    (info0, _), (info1, _) = read_rank(launched, "constrained_grpo", 0), read_rank(launched, "constrained_grpo", 1)
    state0 = info0["state"]["method"]
    assert state0 == info1["state"]["method"]  # computed from gathered rewards: no communication needed
    assert state0["multipliers"]["steps"] == 3 and state0["multipliers"]["raw"][0] > 0  # -len/30 < -0.1: violated
    multipliers = [h["constraint/short/multiplier"] for h in info0["history"]]
    assert multipliers == [h["constraint/short/multiplier"] for h in info1["history"]] and multipliers[-1] > 0.5


def test_dynamic_weights_identical_on_ranks_and_moved(launched):
    (g0, _), (g1, _) = read_rank(launched, "dynamic_gradient_grpo", 0), read_rank(launched, "dynamic_gradient_grpo", 1)
    state = g0["state"]["method"]
    assert state == g1["state"]["method"]  # Gram from all-reduced activation gradients: same mirror step everywhere
    assert sum(state["reward_weights"]) == pytest.approx(1.0, abs=1e-6)
    assert state["reward_weights"] != pytest.approx([1 / 3] * 3)  # the weights moved
    names = ("format_reward", "short", "odd")
    logged = [[h[f"reward_weights/{n}"] for n in names] for h in g0["history"]]
    assert logged == [[h[f"reward_weights/{n}"] for n in names] for h in g1["history"]]
    (h0, _), (h1, _) = (
        read_rank(launched, "dynamic_hypervolume_rloo", 0),
        read_rank(launched, "dynamic_hypervolume_rloo", 1),
    )
    hv = h0["state"]["method"]["hypervolume"]
    assert hv == h1["state"]["method"]["hypervolume"] and hv["num_updates"] == 3 and hv["reference"] is not None
    r = [h["dynamic_weights/r_pareto"] for h in h0["history"]]
    assert r == [h["dynamic_weights/r_pareto"] for h in h1["history"]] and r[:2] == [1.0, 1.0] and r[2] != 1.0


def test_hypervolume_from_evaluation_counts_each_eval_sample_once(launched):
    """hv_source="eval" on 2 ranks: 3 prompts x 2 generations fill 2 per-device batches of 2 only with 2 samples
    accelerate repeats; the buffer's reference is the mean over the real samples, as on 1 process (it counted the
    repeats: 0.405 for a true 0.433)."""
    from hfx.data import prompt_dataset

    (info0, _), (info1, _) = (
        read_rank(launched, "dynamic_hypervolume_eval", 0),
        read_rank(launched, "dynamic_hypervolume_eval", 1),
    )
    hv = info0["state"]["method"]["hypervolume"]
    assert hv == info1["state"]["method"]["hypervolume"] and hv["num_updates"] == 1
    prompts = prompt_dataset(HV_EVAL_PROMPTS, seed=7)["prompt"]
    assert hv["reference"][0] == pytest.approx(sum(prompt_score(prompts)) / HV_EVAL_PROMPTS, abs=1e-6)


def test_bvpo_view_losses_are_means_over_ranks(launched):
    """trace/loss and empty/loss are the mean of the ranks' losses at every step; on the epoch's last, uneven batch
    gather_for_metrics kept rank 0's alone."""
    (info0, _), (info1, _) = read_rank(launched, "bvpo_uneven_epoch", 0), read_rank(launched, "bvpo_uneven_epoch", 1)
    for view in ("trace", "empty"):
        mine, theirs = info0["view_losses"][view], info1["view_losses"][view]
        assert len(mine) == len(theirs) == 3 and mine[-1] != theirs[-1]
        logged = [h[f"{view}/loss"] for h in info0["history"]]
        assert logged == pytest.approx([(a + b) / 2 for a, b in zip(mine, theirs)], rel=1e-5), view
