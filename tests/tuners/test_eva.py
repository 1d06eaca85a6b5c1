"""EVA (hfx.EvaConfig + hfx.initialize): exact components, rank redistribution, masks, PEFT equivalence, plain-LoRA
export, convergence and its cap, errors, and the Trainer order (initialize before train builds the optimizer)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import hfx
from hfx.testing import save_tiny_model, tiny_causal_lm
from hfx.tuners.eva import apply_eva, compute_eva, redistribute_ranks

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lm_batches(vocab: int, n: int = 3, bsz: int = 3, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches with right padding and label-masked prompts, so both masks matter."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (bsz, seq), generator=gen)
        am = torch.ones_like(ids)
        am[0, seq - 3 - i :] = 0
        labels = ids.masked_fill(am == 0, -100)
        labels[:, :2] = -100  # "prompt" tokens
        out.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return out


def layer_inputs(model: nn.Module, names: list[str], batches, use_label_mask: bool = True) -> dict[str, torch.Tensor]:
    """The stacked inputs (real tokens only) of the named modules of a plain model over ``batches``."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mask = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1])[mask["m"].reshape(-1)])
        )
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].bool()
            if use_label_mask:
                m = m & (b["labels"] != -100)
            mask["m"] = m
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def assert_rows_equal_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    signs = torch.sign((a * b).sum(1, keepdim=True))
    torch.testing.assert_close(a, b * signs, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("center", [True, False])
def test_components_are_top_right_singular_vectors_of_stacked_masked_activations(center):
    base = tiny_causal_lm(hidden_size=16, num_layers=2, dtype=torch.float64)
    targets = ["q_proj", "o_proj", "up_proj", "down_proj"]
    batches = lm_batches(base.config.vocab_size, n=3)
    names = [n for n, _ in base.named_modules() if n.split(".")[-1] in targets]
    acts = layer_inputs(copy.deepcopy(base), names, batches)
    # rho=1: no redistribution, so no layer is ever "done" (a rank-0 layer stops collecting) and tau=1 runs exactly
    # the 3 batches (the cap) for every layer
    cfg = hfx.EvaConfig(r=3, target_modules=targets, rho=1.0, tau=1.0, max_iterations=3, center=center)
    model = get_peft_model(base, cfg)
    with pytest.warns(UserWarning, match="not converged"):
        res = compute_eva(model, iter(batches), show_progress=False)
    assert res["iterations"] == 3
    for name in names:
        x = acts[name]
        if center:
            x = x - x.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        full = f"base_model.model.{name}"
        rank = res["ranks"][full]
        assert_rows_equal_up_to_sign(res["components"][full], vh[:rank], atol=1e-8)
        ratios = s**2 / (s**2).sum()
        assert res["explained"][full] == pytest.approx(float(ratios[:rank].sum()), rel=1e-9)
    assert res["tokens"] == len(acts[names[0]])  # both masks applied


def test_label_mask_off_uses_all_attended_tokens():
    base = tiny_causal_lm(hidden_size=16, num_layers=1, dtype=torch.float64)
    batches = lm_batches(base.config.vocab_size, n=2)
    acts = layer_inputs(copy.deepcopy(base), ["model.layers.0.mlp.up_proj"], batches, use_label_mask=False)
    cfg = hfx.EvaConfig(r=2, target_modules=["up_proj"], rho=1.0, tau=1.0, max_iterations=2, use_label_mask=False)
    model = get_peft_model(base, cfg)
    with pytest.warns(UserWarning, match="not converged"):
        res = compute_eva(model, iter(batches), show_progress=False)
    x = acts["model.layers.0.mlp.up_proj"]
    assert res["tokens"] == len(x)
    vh = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh
    assert_rows_equal_up_to_sign(res["components"]["base_model.model.model.layers.0.mlp.up_proj"], vh[:2], atol=1e-8)


def test_rank_redistribution_hand_computed():
    r = [torch.tensor([0.5, 0.2, 0.1]), torch.tensor([0.4, 0.3, 0.05]), torch.tensor([0.01, 0.005, 0.001])]
    # pooled, sorted: .5 (L0) .4 (L1) .3 (L1) .2 (L0) .1 (L0) .05 (L1) .01 (L2) ...
    assert redistribute_ranks(r, 3) == [1, 2, 0]
    assert redistribute_ranks(r, 4) == [2, 2, 0]
    assert redistribute_ranks(r, 7) == [3, 3, 1]
    assert redistribute_ranks(r, 100) == [3, 3, 3]  # capped at the candidates
    assert redistribute_ranks(r, 4, min_rank=1) == [1, 2, 1]  # each 1, then .3 (L1)
    assert sum(redistribute_ranks(r, 6)) == 6
    # ties: the earlier layer first
    assert redistribute_ranks([torch.tensor([0.3, 0.1]), torch.tensor([0.3, 0.1])], 3) == [2, 1]
    with pytest.raises(ValueError, match="smaller than min_rank=1 times the number of target layers"):
        redistribute_ranks(r, 2, min_rank=1)
    # components that explain nothing (directions the inputs do not span) get no budget beyond min_rank
    null = [torch.tensor([0.6, 0.4, 0.0]), torch.tensor([0.0, 0.0, 0.0])]
    assert redistribute_ranks(null, 5) == [2, 0]
    assert redistribute_ranks(null, 5, min_rank=1) == [2, 1]


class OneLinear(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x):
        return self.a(x)


def one_linear_eva(whiten: bool = False, **kw):
    torch.manual_seed(0)
    return get_peft_model(OneLinear(), hfx.EvaConfig(r=4, target_modules=["a"], whiten=whiten, **kw))


@pytest.mark.parametrize("center", [True, False])
def test_inputs_without_variance_are_refused(center):
    """Identical tokens (or all-zero ones, uncentred) have no principal directions: EVA used to hand out arbitrary
    basis vectors with explained variance 0, and with whiten=True rows of norm 3e7 that made the loss inf."""
    value = 0.5 if center else 0.0
    model = one_linear_eva(center=center)
    with pytest.raises(ValueError, match=r"inputs of target layer\(s\) \['base_model.model.a'\] have no variance"):
        hfx.initialize(model, [{"x": torch.full((40, 16), value)}] * 3, show_progress=False)


@pytest.mark.parametrize("whiten", [False, True])
def test_rank_deficient_inputs_get_no_rank_on_null_directions(whiten):
    """Inputs spanning 2 of 16 dimensions: 2 ranks, not 4 with two on directions no token has (A·x = 0, never
    trained; with whiten=True they were blown up by 1/λ^¼ of a round-off eigenvalue)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=gen, dtype=torch.float64)).Q.T.float()
    batches = [{"x": torch.randn(64, 2, generator=gen) @ basis} for _ in range(3)]
    model = one_linear_eva(whiten=whiten)
    with pytest.warns(UserWarning, match="2 of the rank budget 4 are not used"):
        summary = hfx.initialize(model, batches, show_progress=False)["default"]
    a = model.base_model.model.a.lora_A["default"].weight
    assert summary["ranks"] == {"a": 2} and a.shape == (2, 16)
    torch.testing.assert_close(a @ basis.T @ basis, a, atol=1e-5, rtol=0)  # rows in the inputs' span
    assert float(a.norm(dim=1).max()) < 10
    # a budget beyond the candidates (r * rho, in_features) is capped as before, without that warning
    full = [{"x": torch.randn(64, 16, generator=gen)} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        capped = hfx.initialize(one_linear_eva(rank_budget=20, rho=1.0), full, show_progress=False)["default"]
    assert capped["ranks"] == {"a": 4}


def test_cycled_batches_do_not_count_their_tokens_twice():
    """A list is re-iterated until convergence; its 3 tokens used to pass "more than 8 tokens" by the third pass,
    giving components orthogonal to all the data. The same data as a one-shot iterator was refused."""
    batch = {"x": torch.randn(3, 16, generator=torch.Generator().manual_seed(0))}
    for batches in (iter([batch]), [batch]):
        with pytest.raises(
            ValueError, match=r"too few valid tokens for layers .* \(seen \[3.0\], need more than \[8\]"
        ):
            hfx.initialize(one_linear_eva(), batches, show_progress=False)
    # enough tokens, cycled until convergence: the summary counts each token once
    many = [{"x": torch.randn(40, 16, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    with pytest.warns(UserWarning, match="had not converged"):
        summary = hfx.initialize(one_linear_eva(tau=1.0, max_iterations=6), many, show_progress=False)["default"]
    assert summary["iterations"] == 6 and summary["tokens"] == 80


def test_output_unchanged_at_init_and_plain_lora_state():
    base = tiny_causal_lm(hidden_size=32, num_layers=2)
    batches = lm_batches(base.config.vocab_size, n=6, bsz=4, seq=16)
    with torch.no_grad():
        ref = base(input_ids=batches[0]["input_ids"]).logits
    model = get_peft_model(base, hfx.EvaConfig(r=4, lora_alpha=8, target_modules=ALL))
    summary = hfx.initialize(model, batches, show_progress=False)["default"]
    with torch.no_grad():
        got = model(input_ids=batches[0]["input_ids"]).logits
    assert torch.equal(got, ref)  # B = 0: fp32 exact
    cfg = model.peft_config["default"]
    assert sum(summary["ranks"].values()) == 4 * 14 == summary["rank_budget"]
    assert max(summary["ranks"].values()) <= 8  # round(r * rho)
    assert summary["shared_input_groups"] == 4  # q/k/v and gate/up of both layers
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            rank = summary["ranks"][name.removeprefix("base_model.model.")]
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            assert a.shape[0] == rank and b.shape[1] == rank and a.requires_grad and b.requires_grad
            assert torch.count_nonzero(b) == 0
            torch.testing.assert_close(a @ a.T, torch.eye(rank), atol=1e-5, rtol=0)  # orthonormal components
            assert module.scaling["default"] == pytest.approx(2.0)  # adjust_scaling_factors keeps alpha/r
            assert cfg.rank_pattern.get(name.removeprefix("base_model.model."), 4) == rank
    # within a shared-input group the first layer holds the largest rank
    for layer in range(2):
        p = f"model.layers.{layer}."
        ranks = summary["ranks"]
        assert ranks[p + "self_attn.q_proj"] >= ranks[p + "self_attn.k_proj"] >= ranks[p + "self_attn.v_proj"]
        assert ranks[p + "mlp.gate_proj"] >= ranks[p + "mlp.up_proj"]


def test_initialize_twice_raises_and_other_tuners_are_noop():
    base = tiny_causal_lm(hidden_size=16, num_layers=1)
    batches = lm_batches(base.config.vocab_size)
    model = get_peft_model(base, hfx.EvaConfig(r=2, target_modules=["q_proj"]))
    hfx.initialize(model, batches, show_progress=False)
    with pytest.raises(RuntimeError, match="already initialised"):
        hfx.initialize(model, batches, show_progress=False)
    assert not hfx.needs_initialization(model)  # it stayed True after initialising


def test_needs_initialization_tracks_each_adapter():
    base = tiny_causal_lm(hidden_size=16, num_layers=1)
    batches = lm_batches(base.config.vocab_size)
    model = get_peft_model(base, hfx.EvaConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", hfx.EvaConfig(r=2, target_modules=["v_proj"]))
    assert hfx.needs_initialization(model)
    hfx.initialize(model, batches, adapter_names=["default"], show_progress=False)
    assert hfx.needs_initialization(model)  # "other" still waits
    hfx.initialize(model, batches, adapter_names=["other"], show_progress=False)
    assert not hfx.needs_initialization(model)
    assert not hfx.needs_initialization(get_peft_model(tiny_causal_lm(hidden_size=16, num_layers=1), LoraConfig()))


def _init_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "data-driven initialisation" in str(w.message)]


def test_training_without_initialize_warns_once_then_the_hook_is_gone():
    """Forgetting hfx.initialize silently trained (and saved) a plain LoRA. The first training-mode forward of an
    adapter never initialised now warns, once, naming hfx.initialize and the adapter; eval forwards do not."""
    base = tiny_causal_lm(hidden_size=16, num_layers=1)
    ids = lm_batches(base.config.vocab_size, n=1)[0]["input_ids"]
    model = get_peft_model(base, hfx.EvaConfig(r=2, target_modules=["q_proj"]))
    inner = model.get_base_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()
        model(input_ids=ids)
        assert not _init_warnings(caught)
        model.train()
        for _ in range(3):
            model(input_ids=ids)
    [msg] = _init_warnings(caught)
    assert "Adapter 'default' (EvaConfig)" in msg and "hfx.initialize(model, trainer.get_train_dataloader())" in msg
    assert not inner._forward_pre_hooks  # removed after the first training forward: no per-step cost

    # initialised: no warning
    model = get_peft_model(tiny_causal_lm(hidden_size=16, num_layers=1), hfx.EvaConfig(r=2, target_modules=["q_proj"]))
    hfx.initialize(model, lm_batches(base.config.vocab_size), show_progress=False)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids)
    assert not _init_warnings(caught)
    assert not model.get_base_model()._forward_pre_hooks


def test_non_finite_batch_is_refused_naming_the_layer_and_the_batch():
    """A single batch with inf/NaN activations made the statistics NaN: the loop ran to max_iterations, a layer
    got rank 0, another NaN components, and the model output NaN. Now the hook's check stops at that batch."""
    base = tiny_causal_lm(hidden_size=16, num_layers=1)
    batches = lm_batches(base.config.vocab_size, n=4)
    model = get_peft_model(base, hfx.EvaConfig(r=2, target_modules=["q_proj"]))

    def poison(module, args, out):  # batch 2 overflows (e.g. in fp16) at the embedding
        return out * float("inf") if torch.equal(args[0], batches[2]["input_ids"]) else None

    handle = model.get_base_model().model.embed_tokens.register_forward_hook(poison)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.lora_A["default"].weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj'.* non-finite.* batch 2"
    ):
        hfx.initialize(model, batches, show_progress=False)
    handle.remove()
    assert torch.equal(layer.lora_A["default"].weight, before) and hfx.needs_initialization(model)


def test_apply_refuses_non_finite_components_and_changes_nothing():
    base = tiny_causal_lm(hidden_size=16, num_layers=1)
    model = get_peft_model(base, hfx.EvaConfig(r=2, target_modules=["q_proj", "v_proj"]))
    result = compute_eva(model, lm_batches(base.config.vocab_size), show_progress=False)
    name = "base_model.model.model.layers.0.self_attn.v_proj"
    result["components"][name] = torch.full_like(result["components"][name], float("nan"))
    q = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()
    with pytest.raises(
        ValueError, match=rf"components for layer '{re.escape(name)}' are not finite.*nothing was applied"
    ):
        apply_eva(model, result)
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight, q)


def test_a_checkpoint_missing_a_layer_of_an_uninitialised_adapter_is_named():
    """A checkpoint saved after EVA gave a layer rank 0 lacks that layer, while the other layers may happen to keep
    the fresh adapter's shapes: loading it into an adapter never initialised names the missing layer instead of
    leaving it at its random init."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    base = tiny_causal_lm(hidden_size=32, num_layers=1)
    config = hfx.EvaConfig(r=4, target_modules=["q_proj", "k_proj"])
    saved = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    state = {k: v for k, v in get_peft_model_state_dict(saved).items() if "k_proj" not in k}
    fresh = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    with pytest.raises(RuntimeError, match=r"never initialised.*k_proj: not in the state dict"):
        set_peft_model_state_dict(fresh, state)


def test_resuming_a_checkpoint_without_initialize_names_the_resume_call(tmp_path):
    """Loading a checkpoint written after EVA (its ranks) into an adapter never initialised failed with PEFT's bare
    size mismatch; the load hook names the call that rebuilds the ranks. A matching state dict loads and counts
    as initialised (no warning when training it)."""
    base = tiny_causal_lm(hidden_size=32, num_layers=1)
    batches = lm_batches(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=4, target_modules=["q_proj", "k_proj", "o_proj"]))
    ranks = hfx.initialize(model, batches, show_progress=False)["default"]["ranks"]
    assert set(ranks.values()) != {4}  # redistributed: the shapes differ from a fresh adapter's
    model.save_pretrained(tmp_path / "ckpt")  # what a Trainer checkpoint holds
    fresh = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=4, target_modules=["q_proj", "k_proj", "o_proj"]))
    with pytest.raises(
        RuntimeError, match=r"never initialised.*hfx\.initialize\(model, \[\], init_from=<checkpoint>\)"
    ):
        fresh.load_adapter(tmp_path / "ckpt", "default", is_trainable=True)
    # the documented resume: the ranks from the checkpoint, then load
    hfx.initialize(fresh, [], init_from=str(tmp_path / "ckpt"), show_progress=False)
    fresh.load_adapter(tmp_path / "ckpt", "default", is_trainable=True)
    # initialising again from the same data and config gives the same ranks, so that works too
    again = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=4, target_modules=["q_proj", "k_proj", "o_proj"]))
    hfx.initialize(again, batches, show_progress=False)
    again.load_adapter(tmp_path / "ckpt", "default", is_trainable=True)

    same = hfx.EvaConfig(r=2, rho=1.0, target_modules=["q_proj"])  # rho=1: EVA keeps every rank
    model = get_peft_model(copy.deepcopy(base), same)
    hfx.initialize(model, batches, show_progress=False)
    model.save_pretrained(tmp_path / "same")
    fresh = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=2, rho=1.0, target_modules=["q_proj"]))
    fresh.load_adapter(tmp_path / "same", "default", is_trainable=True)
    assert not hfx.needs_initialization(fresh)
    fresh.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh(input_ids=batches[0]["input_ids"])
    assert not _init_warnings(caught)


def test_init_from_a_saved_adapter_rebuilds_ranks_config_and_weights_without_data(tmp_path):
    """``hfx.initialize(model, [], init_from=dir)``: the saved ranks (a removed layer included), the saved A/B, and
    the same rank/alpha patterns and exclusions as the run that saved it, with no batches."""
    base = tiny_causal_lm(hidden_size=32, num_layers=2)
    batches = lm_batches(base.config.vocab_size)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], rank_budget=6)
    model = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(**cfg))
    ranks = hfx.initialize(model, batches, show_progress=False)["default"]["ranks"]
    assert 0 in ranks.values() and set(ranks.values()) - {0, 4}  # layers dropped, the others redistributed
    with torch.no_grad():  # "trained": B away from 0, so the output depends on every saved tensor
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "ckpt")
    fresh = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(**cfg))
    summary = hfx.initialize(fresh, [], init_from=str(tmp_path / "ckpt"), show_progress=False)["default"]
    assert summary["ranks"] == ranks and summary["batches"] == 0
    assert summary["removed_layers"] == sum(r == 0 for r in ranks.values())
    assert not hfx.needs_initialization(fresh)
    a, b = model.peft_config["default"], fresh.peft_config["default"]
    assert (a.rank_pattern, a.alpha_pattern, a.exclude_modules) == (b.rank_pattern, b.alpha_pattern, b.exclude_modules)
    ids = batches[0]["input_ids"]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    fresh.load_adapter(tmp_path / "ckpt", "default", is_trainable=True)  # what a Trainer resume does next
    with pytest.raises(RuntimeError, match="already initialised"):
        hfx.initialize(fresh, [], init_from=str(tmp_path / "ckpt"))


def test_init_from_errors_name_the_argument(tmp_path):
    base = tiny_causal_lm(hidden_size=32, num_layers=1)
    batches = lm_batches(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=2, target_modules=["q_proj"]))
    hfx.initialize(model, batches, show_progress=False)
    model.save_pretrained(tmp_path / "q")
    other = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"init_from=.*has LoRA weights for .*q_proj.*does not target"):
        hfx.initialize(other, [], init_from=str(tmp_path / "q"), show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"init_from=.*no saved adapter weights there"):
        hfx.initialize(other, [], init_from=str(tmp_path / "empty"), show_progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['init_form'\].*'init_from'"):
        hfx.initialize(other, batches, init_form=str(tmp_path / "q"))  # a typo used to run a fresh init silently
    # a LoRA-GA export (rank 2r everywhere) is no EVA adapter of this config: its ranks pass the budget
    loraga = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=["k_proj"]))
    hfx.initialize(loraga, batches, show_progress=False)
    loraga.save_pretrained(tmp_path / "loraga")
    with pytest.raises(ValueError, match=r"saved ranks \(sum 4.*rank budget 2.*LoRA-GA export has rank 2r"):
        hfx.initialize(other, [], init_from=str(tmp_path / "loraga"), show_progress=False)
    assert hfx.needs_initialization(other)  # nothing changed: a later initialize still works
    hfx.initialize(other, batches, show_progress=False)


def test_trainer_checkpoint_resume_with_init_from(tmp_path):
    """Resume = fresh model, ``hfx.initialize(model, [], init_from=ckpt)``, ``train(resume_from_checkpoint=ckpt)``:
    the same result as an uninterrupted run, without a second statistics pass."""
    from transformers import Trainer, TrainingArguments

    base = tiny_causal_lm(hidden_size=32, num_layers=2)
    rows = [{k: v[i] for k, v in b.items()} for b in lm_batches(base.config.vocab_size, n=4, bsz=2) for i in range(2)]

    def run(out, resume=None):
        model = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=4, lora_alpha=8, target_modules=ALL))
        args = TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, save_steps=2,
            save_strategy="steps", report_to=[], use_cpu=True, seed=0, remove_unused_columns=False,
        )  # fmt: skip
        collate = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        if resume is None:
            hfx.initialize(model, trainer.get_train_dataloader(), show_progress=False)
        else:
            hfx.initialize(model, [], init_from=resume, show_progress=False)
        trainer.train(resume_from_checkpoint=resume)
        model.eval()
        with torch.no_grad():
            return model(input_ids=rows[0]["input_ids"][None]).logits

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- PEFT's own EVA


def _peft_eva_model(base, targets, **eva):
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=PeftEvaConfig(**eva)
    )
    return get_peft_model(base, cfg)


@pytest.mark.parametrize("whiten", [False, True])
def test_equals_peft_eva_on_the_same_data(whiten):
    from peft import initialize_lora_eva_weights

    # hidden 16, k = round(4 * 2) = 8: PEFT's svd_lowrank(q=2k=16) is then an exact SVD; distinct inputs (no ties)
    targets = ["q_proj", "o_proj", "up_proj"]
    base = tiny_causal_lm(hidden_size=16, num_layers=2, initializer_range=0.2)
    batch = lm_batches(base.config.vocab_size, n=1, bsz=4, seq=16)
    ours = get_peft_model(copy.deepcopy(base), hfx.EvaConfig(r=4, lora_alpha=8, target_modules=targets, whiten=whiten))
    hfx.initialize(ours, batch, show_progress=False)
    theirs = _peft_eva_model(copy.deepcopy(base), targets, whiten=whiten)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(theirs, dataloader=batch, show_progress_bar=False)
    c1, c2 = ours.peft_config["default"], theirs.peft_config["default"]
    assert c1.rank_pattern == c2.rank_pattern and c1.rank_pattern  # ranks were redistributed, identically
    assert c1.alpha_pattern == pytest.approx(c2.alpha_pattern)
    sd1 = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    sd2 = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        if "lora_A" in k:
            assert_rows_equal_up_to_sign(sd1[k], sd2[k], atol=2e-4 * max(1.0, sd2[k].abs().max().item()))
        else:
            assert torch.equal(sd1[k], sd2[k])  # B = 0


def test_differs_from_peft_on_purpose_exact_statistics_not_truncated_ipca():
    """PEFT's IncrementalPCA keeps only k components between batches (and a randomised SVD), so after several
    batches its components drift from the SVD of all activations; hfx's merged scatter is exact."""
    from peft.utils.incremental_pca import IncrementalPCA

    gen = torch.Generator().manual_seed(0)
    d, k = 24, 3
    scales = torch.linspace(3.0, 0.5, d, dtype=torch.float64)
    xs = [torch.randn(20, d, generator=gen, dtype=torch.float64) * scales for _ in range(6)]
    x = torch.cat(xs)
    truth = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:k]
    ipca = IncrementalPCA(n_components=k, lowrank=True, lowrank_seed=42)
    for b in xs:
        ipca.partial_fit(b.clone())
    ours = hfx.tuners.eva.LayerStats(dim=d, k=k, center=True)
    for b in xs:
        ours.add_local(b)
        ours.merge(torch.float64, torch.device("cpu"), None)
    ours.solve("eigh", 0.99)
    err_ours = (ours.components.abs() - truth.abs()).abs().max().item()
    err_peft = (ipca.components_.abs() - truth.abs()).abs().max().item()
    assert err_ours < 1e-10
    assert err_peft > 1e-2, err_peft


# -------------------------------------------------------------------------------------------- convergence and the cap


class Net(nn.Module):
    def __init__(self, d: int = 12):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


def stream(scales: torch.Tensor, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(len(scales), len(scales), generator=gen)).Q
    return [{"x": (torch.randn(64, len(scales), generator=gen) * scales) @ rot.T} for _ in range(n)], rot


def test_converges_before_the_cap_on_stationary_data_and_recovers_planted_subspace():
    scales = torch.tensor([9.0, 7.0, 2.0, 1.5] + [0.1] * 8)
    batches, rot = stream(scales, 200)
    model = get_peft_model(Net(), hfx.EvaConfig(r=2, target_modules=["lin"], max_iterations=200))
    s = hfx.initialize(model, batches, show_progress=False)["default"]
    assert s["converged"] and s["iterations"] < 50, s
    a = model.base_model.model.lin.lora_A["default"].weight.detach()
    assert a.shape[0] == 2  # one layer: its budget is its rank
    planted = rot[:, :2].T  # the two largest planted directions
    assert torch.linalg.svdvals(a @ planted.T).min() > 0.99


def test_cap_bounds_non_converging_data():
    batches, _ = stream(torch.ones(12), 50)  # isotropic: the components keep rotating
    model = get_peft_model(Net(), hfx.EvaConfig(r=3, target_modules=["lin"], max_iterations=7))
    with pytest.warns(UserWarning, match="max_iterations=7"):
        s = hfx.initialize(model, batches, show_progress=False)["default"]
    assert s["iterations"] == 7 and not s["converged"] and s["unconverged_layers"] == ["lin"]
    assert model.base_model.model.lin.lora_A["default"].weight.shape == (3, 12)


def test_one_shot_iterator_stops_when_exhausted():
    batches, _ = stream(torch.ones(12), 4)
    model = get_peft_model(Net(), hfx.EvaConfig(r=3, target_modules=["lin"]))
    with pytest.warns(UserWarning, match="ran out"):
        s = hfx.initialize(model, iter(batches), show_progress=False)["default"]
    assert s["iterations"] == 4


# ------------------------------------------------------------------------------------------------------------- errors


def test_errors():
    batches, _ = stream(torch.ones(12), 3)
    make = lambda **kw: get_peft_model(Net(), hfx.EvaConfig(r=2, target_modules=["lin", "out"], **kw))  # noqa: E731
    with pytest.raises(ValueError, match="dataloader is empty"):
        hfx.initialize(make(), [], show_progress=False)
    with pytest.raises(ValueError, match="has no model inputs"):
        hfx.initialize(make(), [{"labels": torch.zeros(3)}], show_progress=False)
    with pytest.raises(TypeError, match="dicts of model inputs"):
        hfx.initialize(make(), [torch.zeros(3, 12)], show_progress=False)
    with pytest.raises(TypeError, match=r"got list\. A GRPO/RLOO trainer's dataloader yields raw prompt rows"):
        hfx.initialize(make(), [[{"prompt": "2+2="}]], show_progress=False)
    with pytest.raises(ValueError, match="rank budget 1 is smaller than min_rank=1 times the number of target layers"):
        hfx.initialize(make(min_rank=1, rank_budget=1), batches, show_progress=False)
    with pytest.raises(ValueError, match="too few valid tokens"):
        hfx.initialize(make(), iter([{"x": torch.randn(2, 12)}]), show_progress=False)
    # a LoRA Embedding keeps its adapter in lora_embedding_A: named in the error, not skipped at PEFT's default init
    lm = tiny_causal_lm(hidden_size=32, num_layers=1, seed=0)
    emb = get_peft_model(lm, hfx.EvaConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        hfx.initialize(emb, lm_batches(lm.config.vocab_size, n=2, bsz=2, seq=8), show_progress=False)
    if not torch.cuda.is_available():  # a bare "Torch not compiled with CUDA enabled" before
        with pytest.raises(ValueError, match=r"stats_device='cuda', but CUDA is not available"):
            hfx.initialize(make(stats_device="cuda"), batches, show_progress=False)
    for rho in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho must be >= 1"):
            hfx.EvaConfig(rho=rho)
    with pytest.raises(ValueError, match="max_iterations must be >= 2"):
        hfx.EvaConfig(max_iterations=1)
    # wrong types: named, instead of a bare TypeError from a comparison (or, for 2.5, accepted)
    for kwargs, match in (
        ({"rho": "2"}, r"EvaConfig\.rho must be a number, got '2' \(str\)"),
        ({"tau": None}, r"EvaConfig\.tau must be a number"),
        ({"max_iterations": None}, r"EvaConfig\.max_iterations must be an integer, got None"),
        ({"max_iterations": 2.5}, r"EvaConfig\.max_iterations must be an integer, got 2\.5 \(float\)"),
        ({"min_rank": 1.0}, r"EvaConfig\.min_rank must be an integer"),
        ({"rank_budget": "8"}, r"EvaConfig\.rank_budget must be an integer or None"),
        ({"r": 2.5}, r"EvaConfig\.r must be an integer >= 1, got 2\.5"),  # used to fail inside torch.empty
        ({"label_mask_value": "x"}, r"EvaConfig\.label_mask_value must be an integer"),  # failed in initialize
        ({"stats_device": "gpu"}, r"EvaConfig\.stats_device must be a torch device"),
    ):
        with pytest.raises(ValueError, match=match):
            hfx.EvaConfig(**kwargs)


def test_models_and_layers_without_one_token_mask_are_refused():
    """An encoder-decoder model (the batch's attention_mask is the encoder's, its labels the decoder's: the one mask
    used to fail with a bare broadcast error, or, at equal lengths, to mask encoder layers by the decoder's label
    padding), a pooler that 'all-linear' picks (one vector per sample: named before any statistics, with the
    exclude_modules that leaves it out) and PEFT's target_parameters (no layer input to read)."""
    from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64, decoder_start_token_id=0)
    )
    seq2seq = get_peft_model(t5, hfx.EvaConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    ids = torch.randint(3, 64, (2, 6))
    with pytest.raises(NotImplementedError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        hfx.initialize(seq2seq, [{"input_ids": ids, "labels": ids[:, :4]}], show_progress=False)
    bert = BertForSequenceClassification(
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   max_position_embeddings=32, vocab_size=64, num_labels=2)
    )  # fmt: skip
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}] * 20
    pooled = get_peft_model(copy.deepcopy(bert), hfx.EvaConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"\['base_model\.model\.bert\.pooler\.dense'\] have \[2\] rows.*\(12\)"):
        hfx.initialize(pooled, batches, show_progress=False)
    assert hfx.needs_initialization(pooled)  # nothing was changed
    fixed = hfx.EvaConfig(r=2, target_modules="all-linear", exclude_modules=["pooler.dense"], task_type="SEQ_CLS")
    hfx.initialize(get_peft_model(bert, fixed), batches, show_progress=False)  # the fix the message names works
    for cls, method in ((hfx.EvaConfig, "EVA"), (hfx.LoraGAConfig, "LoRA-GA")):
        with pytest.raises(ValueError, match=f"{method}: `target_parameters`.*PEFT's LoraConfig"):
            cls(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"])


def test_exclusion_keys_leave_out_exactly_the_named_layers():
    """The exclude_modules the pooler error suggests: the shortest suffix per layer that no token layer also ends with
    (taking the last two name parts gave 'model.classifier' for a top-level head, which PEFT never matches, and
    'self_attn.q_proj' for a vision tower's layer, which also dropped the language model's)."""
    from hfx.tuners.eva.init import _exclusion_keys

    good = ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.attention.self.query"]
    assert _exclusion_keys(["bert.pooler.dense", "classifier"], good) == ["pooler.dense", "classifier"]
    good = ["model.language_model.layers.0.self_attn.q_proj"]
    bad = ["model.vision_tower.encoder.layers.0.self_attn.q_proj"]
    assert _exclusion_keys(bad, good) == ["encoder.layers.0.self_attn.q_proj"]
    assert _exclusion_keys(["pooler.dense"], ["bert.pooler.dense"]) is None  # no key leaves out only the first


# ------------------------------------------------------------------------------------------------- save and reload


@pytest.mark.slow
def test_saved_adapter_is_plain_lora_and_loads_without_hfx(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base", hidden_size=32, num_layers=2)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    batches = lm_batches(base.config.vocab_size, n=6, bsz=4, seq=16)
    model = get_peft_model(base, hfx.EvaConfig(r=4, lora_alpha=8, target_modules=ALL))
    summary = hfx.initialize(model, batches, show_progress=False)["default"]
    assert summary["removed_layers"] > 0  # this setup drops some layers: the reload must not recreate them
    with torch.no_grad():  # "train": make B non-zero
        gen = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    probe = torch.arange(5, 29).reshape(2, 12)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"probe": probe, "logits": logits}, tmp_path / "ref.pt")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["peft_type"] == "LORA" and saved["init_lora_weights"] is True
    assert not {"rho", "tau", "max_iterations", "whiten", "min_rank"} & saved.keys()
    assert saved["rank_pattern"] and saved["exclude_modules"]
    script = f"""
import sys, torch
from peft import PeftConfig, PeftModel, LoraConfig
from transformers import AutoModelForCausalLM
cfg = PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})
assert type(cfg) is LoraConfig, type(cfg)
base = AutoModelForCausalLM.from_pretrained({base_dir!r})
model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
ref = torch.load({str(tmp_path / "ref.pt")!r})
with torch.no_grad():
    got = model(input_ids=ref["probe"]).logits
assert "hfx" not in sys.modules
assert torch.equal(got, ref["logits"]), (got - ref["logits"]).abs().max()
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------- the Trainer


def test_initialize_from_the_trainers_dataloader_then_train(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_causal_lm(hidden_size=32, num_layers=2)
    rows = [{k: v[i] for k, v in b.items()} for b in lm_batches(base.config.vocab_size, n=8, bsz=2) for i in range(2)]
    model = get_peft_model(base, hfx.EvaConfig(r=4, lora_alpha=8, target_modules=ALL))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]},
    )
    summary = hfx.initialize(model, trainer.get_train_dataloader(), show_progress=False)["default"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in before.values()) > 0
    trainer.train()
    after = dict(model.named_parameters())
    # the optimizer (built in train()) holds the resized LoRA parameters: every B moved away from 0
    for n, p in before.items():
        assert after[n].shape == p.shape
        if "lora_B" in n:
            assert after[n].abs().max() > 0, n
    assert summary["tokens"] > 0
