"""EVA's hfx.initialize on 2 CPU processes: gloo (all-reduced statistics) and DeepSpeed ZeRO-3 (partitioned base).

gloo: the 2-process init equals a single-process init whose batch i is both ranks' batch i stacked (same
components, ranks, iterations) — only d x d statistics cross processes. ZeRO-3: the init runs on a really partitioned
base from the Trainer's dataloader, training continues for a few steps, and the adapter saved by
``trainer.save_model`` (plain LoRA with the EVA ranks) reproduces the trained model's logits on the base, and a fresh
partitioned model rebuilt from it with ``init_from`` has its ranks and A/B.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from init_eva import config, init_state, probe_ids, union_batches
from safetensors.torch import load_file

import hfx
from hfx.testing import save_tiny_model
from hfx.testing.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init_eva.py")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny", hidden_size=32, intermediate_size=64)


def launch(backend: str, base_dir: str, out, *extra: str) -> str:
    args = ["--backend", backend, "--base", base_dir, "--out", str(out), *extra]
    run_distributed(WORKER, args, log_path=out / "log.txt")
    return str(out)


@pytest.mark.parametrize("tau", [0.99, 1.0])  # 1.0: never converges, runs to the cap on every rank
def test_gloo_init_equals_single_process_on_union(base_dir, tmp_path, tau):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    out = launch("gloo", base_dir, tmp_path, "--tau", str(tau))
    r0, r1 = load_file(os.path.join(out, "rank0.safetensors")), load_file(os.path.join(out, "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    with open(os.path.join(out, "rank0.json")) as f:
        dist_summary = json.load(f)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    single = get_peft_model(copy.deepcopy(base), config(tau=tau))
    with pytest.warns(UserWarning) if tau == 1.0 else _nothing():
        ref_summary = hfx.initialize(single, union_batches(base.config.vocab_size), show_progress=False)["default"]
    for key in ("ranks", "iterations", "converged", "tokens"):
        assert dist_summary[key] == ref_summary[key], key
    ref = init_state(single)
    assert ref.keys() == r0.keys()
    for k in ref:  # fp64: only the summation order differs
        signs = torch.sign((ref[k] * r0[k]).sum(1, keepdim=True))
        torch.testing.assert_close(r0[k], ref[k] * signs, rtol=0, atol=1e-8)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_zero3_init_runs_and_trains(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = launch("zero3", base_dir, tmp_path)
    infos = []
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            infos.append(json.load(f))
    assert infos[0]["summary"]["ranks"] == infos[1]["summary"]["ranks"]
    for info in infos:
        counts = info["partition"]
        assert counts["base_total"] > 0 and counts["base_partitioned"] == counts["base_total"], counts
        assert info["wrapped"] == "DeepSpeedEngine"
        assert info["summary"]["iterations"] > 0 and len(info["loss"]) == 3
        assert all(torch.isfinite(torch.tensor(info["loss"])))
        assert info["init_from"]["ranks"] == info["summary"]["ranks"], info["init_from"]  # init_from on ZeRO-3
        assert info["init_from"]["base_partitioned"] > 0, info["init_from"]
        assert info["init_from"]["same_keys"] and info["init_from"]["max_diff"] == 0.0, info["init_from"]
    logits = [load_file(os.path.join(out, f"rank{r}.safetensors"))["logits"] for r in (0, 1)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["peft_type"] == "LORA" and "rho" not in saved
    with torch.no_grad():
        assert (base(input_ids=probe_ids(base.config.vocab_size)).logits - logits[0]).abs().max() > 1e-4
        reloaded = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
        got = reloaded(input_ids=probe_ids(base.config.vocab_size)).logits
    torch.testing.assert_close(got, logits[0], rtol=0, atol=1e-4)
