"""hfx/tuners/_loading.py: transformers' own adapter loading (``model.load_adapter``, ``from_pretrained(<adapter
folder>)``) of adapters whose index sets changed length in training (LIFT's mask refresh, SaRA's progressive
adjustment). It failed with a size mismatch (and with ``ignore_mismatched_sizes=True`` SaRA ran as the base model)
while ``PeftModel.from_pretrained`` loaded the same folder."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfx
from hfx.testing import as_hub_cache, save_tiny_model
from hfx.tuners.lift.model import refresh_lift_masks
from hfx.tuners.sara.model import adjust_sara_masks

CASES = {
    "lift": (
        lambda: hfx.LiftConfig(r=2, filter_rank=4, target_modules=["q_proj", "v_proj"], show_progress=False),
        lambda m: refresh_lift_masks(m, show_progress=False),
        "lift_past_values",
    ),
    "sara": (
        lambda: hfx.SaraConfig(ratio=0.1, target_modules=["q_proj", "v_proj"]),
        adjust_sara_masks,
        "sara_values",
    ),
}
IDS = (torch.arange(24).reshape(2, 12) * 7 + 3) % 200


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


def _trained(base: str, method: str, folder, seed: int = 0) -> torch.Tensor:
    config, update, key = CASES[method]
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config())
    with torch.no_grad():  # stands in for training steps
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    update(model)  # what LiftRefreshCallback / SaraCallback do during training
    model.save_pretrained(str(folder))
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config())
    saved = load_file(str(folder / "adapter_model.safetensors"))
    name = next(k for k in saved if k.endswith(key))
    assert saved[name].shape != fresh.get_submodule(name)["default"].shape  # the case: lengths changed in training
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", sorted(CASES))
def test_transformers_loads_adapters_whose_index_sets_changed_length(method, base, tmp_path):
    expected = _trained(base, method, tmp_path / "adapter")
    loaded = {
        "PeftModel.from_pretrained": PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
        ),
        "AutoModelForCausalLM.from_pretrained(adapter)": AutoModelForCausalLM.from_pretrained(tmp_path / "adapter"),
    }
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(str(tmp_path / "adapter"))
    loaded["load_adapter(folder)"] = model
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(
        adapter_state_dict=load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")),
        peft_config=PeftConfig.from_pretrained(str(tmp_path / "adapter")),  # hfx's LiftConfig / SaraConfig
    )
    loaded["load_adapter(adapter_state_dict)"] = model
    for how, m in loaded.items():
        m.eval()
        with torch.no_grad():
            assert torch.equal(m(IDS).logits, expected), how


def test_a_second_adapter_takes_its_own_saved_lengths(base, tmp_path):
    """The saved shapes are per adapter name: a second adapter loaded beside the first gets its own lengths."""
    _trained(base, "sara", tmp_path / "a")
    _trained(base, "sara", tmp_path / "b", seed=1)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(str(tmp_path / "a"), adapter_name="first")
    model.load_adapter(str(tmp_path / "b"), adapter_name="second")
    lengths = {}
    for adapter, folder in (("first", "a"), ("second", "b")):
        saved = load_file(str(tmp_path / folder / "adapter_model.safetensors"))
        keys = [k for k in saved if k.endswith(("sara_values", "sara_indices", "sara_frozen_values"))]
        assert keys
        lengths[adapter] = [saved[k].shape for k in keys]
        for key in keys:
            assert torch.equal(model.get_submodule(key.removeprefix("base_model.model."))[adapter], saved[key])
    assert lengths["first"] != lengths["second"]


@pytest.mark.parametrize("method", sorted(CASES))
def test_transformers_loads_them_from_the_hub(method, base, tmp_path, monkeypatch):
    """By repository id the shapes come from the Hub client's download (here its offline cache), which transformers
    reads next: the local-folder fix alone left ``load_adapter("<user>/<repo>")`` failing."""
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # tests/conftest.py: nothing here reaches the network
    expected = _trained(base, method, tmp_path / "adapter")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    as_hub_cache(tmp_path / "adapter", tmp_path / "cache", f"hfx-test/{method}")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(f"hfx-test/{method}")
    for m in (model, AutoModelForCausalLM.from_pretrained(f"hfx-test/{method}")):
        m.eval()
        with torch.no_grad():
            assert torch.equal(m(IDS).logits, expected)
