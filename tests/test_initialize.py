"""hfx/initialize.py: the data-driven init step's lifecycle for every registered tuner (EVA, LoRA-GA): low-memory
models whose LoRA weights start on the meta device, and one config object passed to several models or adapters.
The formulas are tested in tests/tuners/test_eva.py and test_loraga.py."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import hfx
from hfx.testing import tiny_causal_lm

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "eva": lambda: hfx.EvaConfig(r=4, lora_alpha=8, target_modules=ALL),
    "loraga": lambda: hfx.LoraGAConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}


def batches(vocab: int, n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (3, 12), generator=gen)
        labels = ids.clone()
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def init(model) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hfx.initialize(model, batches(model.config.vocab_size), show_progress=False)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_low_cpu_mem_usage_model_is_initialised(method):
    """With LoRA weights on meta, EVA reported success and wrote nothing (training then failed on meta tensors);
    LoRA-GA failed with 'Cannot copy out of meta tensor' and then refused a retry."""
    torch.manual_seed(0)
    low = get_peft_model(tiny_causal_lm(num_layers=2), CONFIGS[method](), low_cpu_mem_usage=True)
    assert any(p.is_meta for p in low.parameters())
    torch.manual_seed(0)
    ref = get_peft_model(tiny_causal_lm(num_layers=2), CONFIGS[method]())
    init(low), init(ref)
    assert not any(p.is_meta for p in low.parameters())
    assert {k: tuple(v.shape) for k, v in low.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    for key, value in ref.state_dict().items():  # the same init as the model built the usual way
        torch.testing.assert_close(low.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    low.train()
    low(**batches(low.config.vocab_size, n=1)[0]).loss.backward()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_one_config_for_two_models(method, tmp_path):
    """PEFT keeps the config object itself, and the init state lived on it: a second model built from the same
    object was refused ('already initialised'), EVA's ranks came from the first run, and LoRA-GA's export
    subtracted the first model's factors (a saved adapter that reloaded 1.2 off in the logits)."""
    config = CONFIGS[method]()
    first = get_peft_model(tiny_causal_lm(num_layers=2), config)
    init(first)
    second = get_peft_model(tiny_causal_lm(num_layers=2, seed=1), config)
    assert hfx.needs_initialization(second) and not hfx.needs_initialization(first)
    own = second.peft_config["default"]
    assert own is not config and first.peft_config["default"] is config  # the first model keeps the user's object
    assert own.rank_pattern == {} and own.exclude_modules in (None, set())  # not the first run's EVA ranks
    init(second)
    x = batches(second.config.vocab_size, n=1)[0]["input_ids"]
    second.eval()
    expected = second(input_ids=x).logits
    second.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_causal_lm(num_layers=2, seed=1), tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)
    # a second adapter on the first model from the same object is its own adapter too, and so is one added again
    # under a deleted adapter's name, or an unpickled config (another process)
    first.add_adapter("again", config)
    assert first.peft_config["again"] is not config and hfx.needs_initialization(first)
    first.delete_adapter("again")
    if method == "eva":  # an adapter added again under its own name after delete_adapter (one LoRA-GA per model)
        own_config = CONFIGS[method]()
        first.add_adapter("again", own_config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hfx.initialize(first, batches(first.config.vocab_size), adapter_names=["again"], show_progress=False)
        assert not hfx.needs_initialization(first) and own_config.rank_pattern
        first.delete_adapter("again")
        first.add_adapter("again", own_config)
        assert first.peft_config["again"] is not own_config and hfx.needs_initialization(first)
        assert first.peft_config["again"].rank_pattern == {}
    third = get_peft_model(tiny_causal_lm(num_layers=2), pickle.loads(pickle.dumps(config)))
    assert hfx.needs_initialization(third) and third.peft_config["default"].rank_pattern == {}


def test_each_model_keeps_its_own_base_model_name():
    """get_peft_model writes the base's name and revision onto the config object: the second model's went onto the
    first model's config (saved into its adapter_config.json) and the second got the first's."""
    config = CONFIGS["eva"]()
    a, b = tiny_causal_lm(num_layers=2), tiny_causal_lm(num_layers=2)
    a.name_or_path, b.name_or_path = "org/model-A", "org/model-B"
    first = get_peft_model(a, config)
    second = get_peft_model(b, config, revision="v2")
    assert (first.peft_config["default"].base_model_name_or_path, first.peft_config["default"].revision) == (
        "org/model-A",
        None,
    )
    assert (second.peft_config["default"].base_model_name_or_path, second.peft_config["default"].revision) == (
        "org/model-B",
        "v2",
    )


def test_eva_rank_zero_layer_keeps_another_adapters_weights():
    """A layer EVA gives rank 0 was swapped back to its base layer, dropping every other adapter's LoRA there."""
    model = get_peft_model(tiny_causal_lm(num_layers=2), hfx.EvaConfig(r=4, lora_alpha=8, target_modules=ALL))
    model.add_adapter("other", LoraConfig(r=4, target_modules=ALL, init_lora_weights=False))
    init(model)
    removed = model.peft_config["default"].exclude_modules
    assert removed, "this test needs a layer EVA gives rank 0"
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert sum("other" in m.lora_A for m in layers.values()) == 2 * len(ALL)  # all 14 still there
    for name in removed:
        layer = layers[f"base_model.model.{name}"]
        assert "default" not in layer.lora_A and layer.active_adapters == []  # no adapter runs there now
    model.set_adapter("other")
    assert all(m.active_adapters == ["other"] for m in layers.values())
