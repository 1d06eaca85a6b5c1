"""Adapters trained on 2 CPU processes: torchrun + gloo DDP, and DeepSpeed ZeRO-3 that really partitions.

One launch per backend trains every case in ``train_adapters.CASES`` (a new tuner adds one line there) with the HF
Trainer; these tests then check, per case, that both ranks saw different data but ended with identical adapters,
that the adapter trained, that ZeRO-3 partitioned base and adapter parameters, and that the adapter saved by
``trainer.save_model`` reloads with ``PeftModel.from_pretrained`` to the same values and logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from train_adapters import CASES, probe_ids

from hfx.testing import save_tiny_model
from hfx.testing.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_adapters.py")
BACKENDS = {"ddp": "DistributedDataParallel", "zero3": "DeepSpeedEngine"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    # intermediate 64 so that BAT's r=8 divides every target's in and out features
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny", hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module", params=list(BACKENDS))
def launched(request, base_dir, tmp_path_factory) -> tuple[str, str]:
    """Run the worker once per backend for all cases; return (backend, output folder)."""
    backend = request.param
    out = tmp_path_factory.mktemp(f"dist-{backend}")
    run_distributed(
        WORKER, ["--backend", backend, "--base", base_dir, "--out", str(out)], log_path=out / "log.txt", timeout=900
    )
    return backend, str(out)


def read_rank(out: str, case: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(out, case, f"rank{rank}.json")) as f:
        info = json.load(f)
    return info, load_file(os.path.join(out, case, f"rank{rank}.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_agree_and_trained(launched, case, base_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    backend, out = launched
    (info0, t0), (info1, t1) = read_rank(out, case, 0), read_rank(out, case, 1)
    assert info0["world_size"] == info1["world_size"] == 2
    assert info0["wrapped"] == info1["wrapped"] == BACKENDS[backend]
    # each rank trained on its own shard of the data
    assert info0["batches"] and not set(info0["batches"]) & set(info1["batches"])
    # ...and both hold the same adapter (and the same model output) afterwards
    assert t0.keys() == t1.keys() and any(k.startswith("adapter.") for k in t0)
    for k in t0:
        assert torch.equal(t0[k], t1[k]), f"{k} differs between ranks"
    # the adapter moved away from its initial values
    init = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), CASES[case]())
    init_state = {f"adapter.{n}": p.detach() for n, p in init.named_parameters() if p.requires_grad}
    assert init_state.keys() == {k for k in t0 if k.startswith("adapter.")}
    assert all(not torch.equal(init_state[k], t0[k]) for k in init_state), "some adapter parameters did not train"
    assert all(torch.isfinite(torch.tensor(info0["loss"])))


@pytest.mark.parametrize("launched", ["zero3"], indirect=True)
@pytest.mark.parametrize("case", list(CASES))
def test_zero3_really_partitions(launched, case):
    _, out = launched
    for rank in (0, 1):
        counts = read_rank(out, case, rank)[0]["partition"]
        assert counts["base_total"] > 0 and counts["base_partitioned"] == counts["base_total"], counts
        assert counts["adapter_total"] > 0 and counts["adapter_partitioned"] == counts["adapter_total"], counts


@pytest.mark.parametrize("case", list(CASES))
def test_saved_adapter_reloads(launched, case, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import hfx  # noqa: F401

    _, out = launched
    _, trained = read_rank(out, case, 0)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), os.path.join(out, case, "adapter")
    )
    model.eval()
    for name, p in model.named_parameters():
        if f"adapter.{name}" in trained:
            torch.testing.assert_close(p.detach(), trained[f"adapter.{name}"], rtol=0, atol=0)
    assert sum(f"adapter.{n}" in trained for n, _ in model.named_parameters()) == sum(
        k.startswith("adapter.") for k in trained
    )
    for name, b in model.named_buffers():
        if f"buffer.{name}" in trained:
            assert torch.equal(b, trained[f"buffer.{name}"]), f"{name} was not restored"
    assert sum(f"buffer.{n}" in trained for n, _ in model.named_buffers()) == sum(
        k.startswith("buffer.") for k in trained
    )
    with torch.no_grad():
        logits = model(input_ids=probe_ids(model.config.vocab_size)).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=1e-5, atol=1e-5)
