"""LoRA-GA's hfx.initialize on 2 CPU processes: gloo (gradient all-reduce) and DeepSpeed ZeRO-3 (partitioned base).

gloo: the 2-process init equals a single-process init on the union of both ranks' batches. ZeRO-3: the init runs on
a really partitioned base from the Trainer's dataloader, training continues for a few steps, and the adapter saved by
``trainer.save_model`` (the plain rank-2r export) reproduces the trained model's logits on the original base.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from init_loraga import batches, config, init_state, probe_ids
from safetensors.torch import load_file

import hfx
from hfx.testing import save_tiny_model
from hfx.testing.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init_loraga.py")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny", hidden_size=32, intermediate_size=64)


def launch(backend: str, base_dir: str, out) -> str:
    run_distributed(WORKER, ["--backend", backend, "--base", base_dir, "--out", str(out)], log_path=out / "log.txt")
    return str(out)


def test_gloo_init_equals_single_process_on_union(base_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    out = launch("gloo", base_dir, tmp_path)
    r0, r1 = load_file(os.path.join(out, "rank0.safetensors")), load_file(os.path.join(out, "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    with open(os.path.join(out, "rank0.json")) as f:
        assert json.load(f)["batches"] == 4  # both ranks' batches were counted
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    single = get_peft_model(copy.deepcopy(base), config())
    hfx.initialize(single, batches(base.config.vocab_size), show_progress=False)
    ref = init_state(single)
    assert ref.keys() == r0.keys()
    # the all-reduced gradient sums in another order than the single process (fp32 rounding ~1e-10 here); the
    # singular vectors amplify that by |G| / singular-value gap, hence fp32-SVD tolerances
    for k in ref:
        err = (r0[k] - ref[k]).abs().max().item()
        assert err < 1e-4 * max(1.0, ref[k].abs().max().item()), (k, err)


def test_zero3_init_runs_and_trains(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = launch("zero3", base_dir, tmp_path)
    infos = []
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            infos.append(json.load(f))
    for info in infos:
        counts = info["partition"]
        assert counts["base_total"] > 0 and counts["base_partitioned"] == counts["base_total"], counts
        assert info["wrapped"] == "DeepSpeedEngine"
        assert info["summary"]["batches"] > 0 and len(info["loss"]) == 3
        assert all(torch.isfinite(torch.tensor(info["loss"])))
    logits = [load_file(os.path.join(out, f"rank{r}.safetensors"))["logits"] for r in (0, 1)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        assert (base(input_ids=probe_ids(base.config.vocab_size)).logits - logits[0]).abs().max() > 1e-3
        reloaded = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
        got = reloaded(input_ids=probe_ids(base.config.vocab_size)).logits
    torch.testing.assert_close(got, logits[0], rtol=0, atol=1e-4)
