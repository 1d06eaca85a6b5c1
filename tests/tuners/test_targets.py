"""hfx/tuners/_targets.py: a failed injection leaves the model as it was (no half-wrapped base), for every tuner."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import hfx
from hfx.testing import tiny_causal_lm

TUNERS = {
    "bone": (hfx.BoneModel, lambda: hfx.BoneConfig(r=8, target_modules=["q_proj", "v_proj"])),
    "paca": (hfx.PacaModel, lambda: hfx.PacaConfig(r=8, target_modules=["q_proj", "v_proj"])),
    "lift": (hfx.LiftModel, lambda: hfx.LiftConfig(r=2, target_modules=["q_proj", "v_proj"])),
    "dsee": (hfx.DseeModel, lambda: hfx.DseeConfig(r=2, num_sparse=8, target_modules=["q_proj", "v_proj"])),
    "sara": (hfx.SaraModel, lambda: hfx.SaraConfig(ratio=0.2, target_modules=["q_proj", "v_proj"])),
}


def _fail_on_third_layer(monkeypatch, tuner_cls) -> None:
    """Make ``_create_and_replace`` raise on its third call, after two layers were wrapped."""
    original = tuner_cls._create_and_replace
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("a layer this method cannot handle")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tuner_cls, "_create_and_replace", flaky)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_failed_get_peft_model_leaves_the_base_as_it_was(method, monkeypatch):
    tuner_cls, make = TUNERS[method]
    torch.manual_seed(0)
    base = tiny_causal_lm(hidden_size=64, num_layers=2)
    state, types = _snapshot(base)
    _fail_on_third_layer(monkeypatch, tuner_cls)
    with pytest.raises(ValueError, match="cannot handle"):
        get_peft_model(base, make())
    monkeypatch.undo()
    assert [type(m) for m in base.modules()] == types  # no tuner layer left behind
    after = base.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    # a retry on the same object gives what a fresh base gives (it used to train every base weight)
    model = get_peft_model(base, make())
    fresh = get_peft_model(tiny_causal_lm(hidden_size=64, num_layers=2), make())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in fresh.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_failed_add_adapter_removes_the_new_adapter_from_existing_layers(method, monkeypatch):
    tuner_cls, make = TUNERS[method]
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(hidden_size=64, num_layers=2), make())
    x = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        y = model(x).logits
    _fail_on_third_layer(monkeypatch, tuner_cls)
    with pytest.raises(ValueError, match="cannot handle"):
        model.add_adapter("second", make())
    monkeypatch.undo()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            held = {key for attr in module.adapter_layer_names for key in getattr(module, attr, {})}
            assert held == {"default"}
    assert "second" not in model.peft_config
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, y, rtol=0, atol=0)
    model.add_adapter("second", make())  # the name is free again


def test_bat_on_an_indivisible_layer_fails_before_changing_the_model():
    """The case from the review: BAT's divisibility error on lm_head came after q_proj had been wrapped."""
    torch.manual_seed(0)
    base = tiny_causal_lm(hidden_size=64, num_layers=2)
    types = [type(m) for m in base.modules()]
    with pytest.raises(ValueError, match="BAT"):
        get_peft_model(base, hfx.BoneConfig(r=8, init_weights="bat", target_modules=["q_proj", "lm_head"]))
    assert [type(m) for m in base.modules()] == types
    model = get_peft_model(base, hfx.BoneConfig(r=8, init_weights="bat", target_modules=["q_proj"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 8 * 64


def test_a_plain_string_target_gets_the_regex_hint():
    """PEFT full-matches a string against the whole module name, so 'q_proj' matches nothing; the error says so."""
    with pytest.raises(ValueError, match=r"A string is a regex .*did you mean \['q_proj'\]\?"):
        get_peft_model(tiny_causal_lm(hidden_size=32), hfx.BoneConfig(r=8, target_modules="q_proj"))


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_layers_to_transform_selecting_no_layer_names_the_layer_indices(method):
    """With the right names but layer indices the model lacks, the hint said 'the linear layers are named ...'
    (the names were fine); it now names the indices the targets sit in."""
    _, make = TUNERS[method]
    config = make()
    config.layers_to_transform = [5, 7]
    model = tiny_causal_lm(num_layers=2)
    with pytest.raises(ValueError) as err:
        get_peft_model(model, config)
    msg = str(err.value)
    assert "keeps none of them: they sit in layers 0-1." in msg and "match 4 modules" in msg, msg
    assert "linear layers of this model are named" not in msg

    config = make()
    config.layers_to_transform, config.layers_pattern = [0], "blocks"  # Llama's are "layers"
    with pytest.raises(ValueError, match="no layer index could be read from their names with that `layers_pattern`"):
        get_peft_model(tiny_causal_lm(num_layers=2), config)


def test_layer_ranges_text():
    from hfx.tuners._targets import _ranges

    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and _ranges([3]) == "3" and _ranges([]) == ""


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_adapter_model_card_is_tagged_hfx_and_the_method(method, tmp_path):
    """Without ``import hfx`` PEFT cannot load these adapters (KeyError on the type): the saved model card's tags say
    hfx and the method, as TRL's trainers tag the models they train. A failed injection adds no tag."""
    model = get_peft_model(tiny_causal_lm(), TUNERS[method][1]())
    model.save_pretrained(str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "- hfx\n" in card and f"- {method}\n" in card
    bad = tiny_causal_lm()
    with pytest.raises(ValueError):
        get_peft_model(bad, type(TUNERS[method][1]())(target_modules=["no_such_layer"]))
    assert not bad.model_tags
