"""SaRA (arXiv 2409.06633): selection, forward and merge against float64 references, gradients, the nuclear-norm
regulariser, the progressive adjustment, save/load in a fresh process, a tiny LM and the HF Trainer."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import TrainerCallback

import hfx
from hfx.tuners.sara import SaraLinear, adjust_sara_masks, default_learning_rate, sara_nuclear_norm, sara_select

TORCH64 = torch.float64
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class One(nn.Module):
    def __init__(self, in_f: int, out_f: int, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.lin(x)


def one_layer(in_f=12, out_f=10, seed=0, dtype=TORCH64, weight=None, **cfg):
    torch.manual_seed(seed)
    base = One(in_f, out_f).to(dtype)
    if weight is not None:
        with torch.no_grad():
            base.lin.weight.copy_(weight)
    config = hfx.SaraConfig(**{"target_modules": ["lin"], "threshold": 0.05, **cfg})
    model = get_peft_model(base, config)
    return model, model.base_model.model.lin


def randomise_values(layer: SaraLinear, adapter: str = "default", seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        v = layer.sara_values[adapter]
        v.copy_(torch.randn(v.shape, generator=gen, dtype=v.dtype) * std)


# ---- selection -------------------------------------------------------------------------------------------------
def test_threshold_selection_matches_float64_reference_with_strict_inequality():
    torch.manual_seed(0)
    w = torch.randn(20, 30, dtype=TORCH64) * 0.05
    w[3, 4] = 0.01  # exactly at the threshold: not selected (|w| < thr is strict)
    w[5, 6] = -0.0099
    idx, thr = sara_select(w, threshold=0.01)
    ref = [i for i, x in enumerate(w.reshape(-1).tolist()) if abs(x) < 0.01]
    assert idx.tolist() == ref and thr == 0.01
    assert idx.dtype == torch.int32 and 3 * 30 + 4 not in ref and 5 * 30 + 6 in ref
    # fp32 selection on an fp32 copy is the same set here
    assert torch.equal(sara_select(w.float(), threshold=0.01)[0], idx)


def test_ratio_selection_is_the_smallest_fraction_and_implies_a_threshold():
    torch.manual_seed(0)
    w = torch.randn(16, 8, dtype=TORCH64)
    idx, thr = sara_select(w, ratio=0.25)
    k = round(0.25 * 128)
    order = sorted(range(128), key=lambda i: (abs(w.reshape(-1)[i].item()), i))
    assert idx.tolist() == sorted(order[:k])
    assert thr == abs(w.reshape(-1)[order[k]].item())  # the smallest |w| left out
    assert (w.reshape(-1)[idx.long()].abs() <= thr).all()


def test_selection_errors_name_layer_shape_fraction_and_fix():
    w = torch.full((4, 5), 0.5)
    with pytest.raises(
        ValueError, match=r"selects no entries \(0 of 20, 0.0%\) of mylayer \(shape 4x5, out x in\).*threshold"
    ):
        sara_select(w, threshold=1e-3, layer_name="mylayer")
    with pytest.raises(ValueError, match=r"selects all entries \(20 of 20, 100.0%\).*threshold.*ratio"):
        sara_select(w, threshold=1.0, layer_name="mylayer")
    with pytest.raises(ValueError, match=r"ratio 0.01 selects no entries.*shape 4x5"):
        sara_select(w, ratio=0.01)
    # through get_peft_model: the layer's name is in the message
    with pytest.raises(ValueError, match=r"selects no entries.*of layer 'lin' \(shape 10x12, out x in\)"):
        one_layer(threshold=1e-9)


# ---- forward, merge, gradients ---------------------------------------------------------------------------------
def test_ratio_error_states_bounds_that_are_accepted():
    """The message said "between 0.000244 and 1" for a 64x64 layer, though 0.999999 (< 1) selects everything."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        sara_select(w, ratio=0.999999)
    msg = str(err.value)
    assert "ratio 0.999999 selects all entries" in msg and "between 1 and 4095" in msg, msg
    lo, hi = (float(v) for v in re.search(r"from (\S+) to (\S+), or exclude", msg).groups())
    assert hi < 0.999999
    assert sara_select(w, ratio=lo)[0].numel() == 1 and sara_select(w, ratio=hi)[0].numel() == 4095


def test_init_output_is_exactly_the_base_output():
    torch.manual_seed(0)
    x = torch.randn(4, 12, dtype=TORCH64)
    model, layer = one_layer()
    with torch.no_grad(), model.disable_adapter():
        ref = model(x)
    assert torch.equal(model(x), ref)
    assert not layer.sara_values["default"].detach().any()


def test_small_negative_weights_keep_their_sign_regression_ref_bug_4():
    """The reference initialises the trainable values with |w|, flipping small negative weights (its output changed
    by 0.059 on a toy before any training). hfx trains a zero delta: output and merged weights are unchanged."""
    torch.manual_seed(0)
    w = torch.randn(10, 12, dtype=TORCH64) * 0.05
    w[0, :6] = -torch.linspace(1e-3, 4e-2, 6, dtype=TORCH64)  # small negatives, all selected (threshold 0.05)
    model, layer = one_layer(weight=w)
    idx = layer.sara_indices["default"].long()
    assert (w.reshape(-1)[idx] < 0).sum() > 6
    x = torch.randn(5, 12, dtype=TORCH64)
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            assert torch.equal(y, model(x))
        model.merge_adapter()
        assert torch.equal(layer.base_layer.weight, w)  # W0[idx] + 0 written back: signs kept
        assert torch.equal(model(x), y)


def test_forward_and_merge_match_dense_float64_reference():
    torch.manual_seed(0)
    model, layer = one_layer(in_f=16, out_f=12)
    randomise_values(layer)
    w0 = layer.base_layer.weight.detach().clone()
    idx = layer.sara_indices["default"].long()
    dense = torch.zeros(12 * 16, dtype=TORCH64)
    dense[idx] = layer.sara_values["default"].detach().double()
    w_eff = w0 + dense.view(12, 16)
    x = torch.randn(3, 5, 16, dtype=TORCH64)
    expected = x @ w_eff.T + layer.base_layer.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)  # values are fp32
    with torch.no_grad():
        model.merge_adapter()
        changed = (layer.base_layer.weight != w0).reshape(-1).nonzero().view(-1)
        assert set(changed.tolist()) <= set(idx.tolist())  # only the selected entries change
        torch.testing.assert_close(layer.base_layer.weight, w_eff.to(TORCH64), rtol=0, atol=1e-12)
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
        model.unmerge_adapter()
        assert torch.equal(layer.base_layer.weight, w0)


def test_bf16_merge_replaces_selected_entries_and_unmerge_restores_exactly():
    torch.manual_seed(0)
    model, layer = one_layer(dtype=torch.bfloat16)
    randomise_values(layer, std=0.01)
    w0 = layer.base_layer.weight.detach().clone()
    idx = layer.sara_indices["default"].long()
    model.merge_adapter()
    flat = layer.base_layer.weight.detach().view(-1)
    expected = (w0.view(-1)[idx].float() + layer.sara_values["default"].detach()).to(torch.bfloat16)
    assert torch.equal(flat[idx], expected)
    others = torch.ones_like(flat, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(flat[others], w0.view(-1)[others])
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)  # bit-exact, unlike subtracting in bf16


def test_gradcheck_through_the_layer():
    model, layer = one_layer(in_f=6, out_f=5)
    v0 = torch.randn(layer.sara_values["default"].shape, dtype=TORCH64)
    x = torch.randn(3, 6, dtype=TORCH64, requires_grad=True)
    idx = layer.sara_indices["default"]
    from hfx.tuners._sparse import sparse_delta_linear

    def fn(x, v):
        return layer.base_layer(x) + sparse_delta_linear(x, v, idx, (5, 6))

    assert torch.autograd.gradcheck(fn, (x, v0.clone().requires_grad_(True)))


def test_value_gradient_is_the_dense_gradient_at_the_indices_and_no_dense_weight_grad():
    torch.manual_seed(0)
    model, layer = one_layer(in_f=16, out_f=12)
    randomise_values(layer)
    x = torch.randn(7, 16, dtype=TORCH64)
    target = torch.randn(7, 12, dtype=TORCH64)
    ((model(x) - target) ** 2).sum().backward()
    w_eff = (layer.base_layer.weight.detach() + layer.get_delta_weight("default").double()).requires_grad_(True)
    ((x @ w_eff.T + layer.base_layer.bias.detach() - target) ** 2).sum().backward()
    idx = layer.sara_indices["default"].long()
    torch.testing.assert_close(layer.sara_values["default"].grad.double(), w_eff.grad.view(-1)[idx])
    assert layer.base_layer.weight.grad is None  # no persistent dense gradient of W ("unstructural backprop")


def test_gradient_accumulation_equals_the_full_batch_ref_bug_7():
    torch.manual_seed(0)
    model, layer = one_layer()
    randomise_values(layer)
    x = torch.randn(8, 12, dtype=TORCH64)
    model(x).pow(2).sum().backward()
    full = layer.sara_values["default"].grad.clone()
    layer.sara_values["default"].grad = None
    model(x[:4]).pow(2).sum().backward()
    model(x[4:]).pow(2).sum().backward()  # a second backward before the step works
    torch.testing.assert_close(layer.sara_values["default"].grad, full)


# ---- nuclear-norm regulariser ----------------------------------------------------------------------------------
def test_nuclear_norm_is_of_the_selected_weights_hand_computed():
    """||M * W||_* of the weights W0 + d at the selected entries (spec 4a; the reference's nuclear_norm(param * mask)),
    not of the delta d: it is nonzero at init and its gradient can differ in sign from the delta-only one."""
    w = torch.tensor([[0.001, 0.9], [0.8, -0.002], [0.7, 0.6]], dtype=TORCH64)
    model, layer = one_layer(in_f=2, out_f=3, weight=w, threshold=0.01)
    assert layer.sara_indices["default"].tolist() == [0, 3]  # (0, 0) and (1, 1)
    values = layer.sara_values["default"]
    # (d, ||M * W||_*, gradient on d): M * W = diag(W0 + d) padded, singular values |0.001 + d0|, |-0.002 + d1|,
    # gradient U V^T at the diagonal = sign(W0 + d)
    cases = [
        ([0.0, 0.0], 0.003, [1.0, -1.0]),  # at init: ||M * W0||_*, not 0
        ([3.0, -4.0], 7.003, [1.0, -1.0]),
        ([-0.0005, 0.0015], 0.001, [1.0, -1.0]),  # ||d||_* would be 0.002 with gradient (-1, 1)
    ]
    for d, norm_ref, grad_ref in cases:
        with torch.no_grad():
            values.copy_(torch.tensor(d))
        values.grad = None
        norm = sara_nuclear_norm(model)
        assert norm.item() == pytest.approx(norm_ref, rel=1e-6)
        norm.backward()
        torch.testing.assert_close(values.grad.double(), torch.tensor(grad_ref, dtype=TORCH64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nuclear_norm_of_16_bit_values(dtype):
    """With 16-bit SaRA values (a bf16/fp16 base with autocast_adapter_dtype=False, or model.to(bf16)), the
    regulariser, on by default in SaraCallback, failed at the first step: torch's SVD takes no 16-bit input. It is
    computed in float32 and its gradient comes back in the values' dtype."""
    w = torch.tensor([[0.001, 0.9], [0.8, -0.002], [0.7, 0.6]], dtype=TORCH64)
    model, layer = one_layer(in_f=2, out_f=3, weight=w, threshold=0.01)
    model.to(dtype)
    values = layer.sara_values["default"]
    assert values.dtype == dtype
    norm = sara_nuclear_norm(model)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(0.003, rel=1e-2)
    norm.backward()
    assert values.grad.dtype == dtype and values.grad.float().tolist() == [1.0, -1.0]


def test_nuclear_norm_matches_a_dense_float64_reference_after_the_adjustment():
    """Against an independent dense construction: W = W0 + D (trainable and frozen deltas), masked by the entries
    still trained (frozen entries leave the mask, as in the reference's adaptive mask)."""
    model, layer = one_layer(in_f=12, out_f=10, threshold=0.05)
    randomise_values(layer, std=0.05)
    layer.progressive_adjust("default")
    idx, frozen = layer.sara_indices["default"], layer.sara_frozen_indices["default"]
    assert idx.numel() > 4 and frozen.numel() > 4
    w0 = layer.base_layer.weight.detach().clone()
    d_dense = torch.zeros(120, dtype=TORCH64)
    d_dense[frozen.long()] = layer.sara_frozen_values["default"].double()
    d_dense[idx.long()] = layer.sara_values["default"].detach().double()
    d_dense.requires_grad_(True)
    mask = torch.zeros(120, dtype=TORCH64)
    mask[idx.long()] = 1.0
    ref = torch.linalg.svdvals(((w0.reshape(-1) + d_dense) * mask).view(10, 12)).sum()
    ref.backward()
    norm = layer.nuclear_norm("default")
    norm.backward()
    assert norm.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(
        layer.sara_values["default"].grad.double(), d_dense.grad[idx.long()], rtol=1e-5, atol=1e-6
    )


def test_regulariser_alone_lowers_the_nuclear_norm_of_the_selected_weights():
    """Spec 4g pitfall 4: descending on lambda * ||M * W||_* alone lowers it (toy problem)."""
    torch.manual_seed(0)
    base = One(24, 20).double()
    with torch.no_grad():
        base.lin.weight.copy_(torch.randn(20, 24, dtype=TORCH64) * 0.1)
    model = get_peft_model(base, hfx.SaraConfig(target_modules=["lin"], ratio=0.3))
    layer = model.base_model.model.lin
    opt = torch.optim.SGD([layer.sara_values["default"]], lr=2e-3)
    first = layer.nuclear_norm("default").item()
    for _ in range(30):
        opt.zero_grad()
        layer.nuclear_norm("default").backward()
        opt.step()
    assert layer.nuclear_norm("default").item() < 0.9 * first


# ---- weight decay on the weights W0 + d ------------------------------------------------------------------------
def _adamw_step(grad_seed: int, with_callback: bool = True, lr: float = 0.1, wd: float = 0.3):
    """One AdamW step over the delta d (plus the callback), and the reference's step: AdamW over the absolute
    selected weights v = W0[idx] + d with the same gradient, returned as a delta."""
    model, layer = one_layer(threshold=0.05)
    randomise_values(layer, std=0.01)
    values = layer.sara_values["default"]
    opt = torch.optim.AdamW([values], lr=lr, weight_decay=wd)
    values.grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=values.dtype)
    w0_sel = layer.base_layer.weight.detach().reshape(-1)[layer.sara_indices["default"].long()].to(values.dtype)
    absolute = (w0_sel + values.detach()).clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([absolute], lr=lr, weight_decay=wd)
    absolute.grad = values.grad.clone()
    ref_opt.step()
    opt.step()
    if with_callback:
        hfx.SaraCallback().on_optimizer_step(SimpleNamespace(), SimpleNamespace(), None, model=model, optimizer=opt)
    return values.detach(), absolute.detach() - w0_sel, lr * wd * w0_sel


def test_callback_applies_adamw_weight_decay_to_the_weights_not_the_delta():
    """Spec 4d: the reference's AdamW decays W0 + d; a step over d plus the callback equals that step exactly."""
    for seed in (0, 1):
        got, ref, _ = _adamw_step(seed)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # a plain AdamW over d misses exactly lr * wd * W0[idx]
    got, ref, missing = _adamw_step(0, with_callback=False)
    assert missing.abs().max() > 1e-4
    torch.testing.assert_close(got - ref, missing, rtol=0, atol=1e-12)


def test_callback_warns_when_weight_decay_stays_on_the_delta(caplog):
    model, layer = one_layer(threshold=0.05)
    values = layer.sara_values["default"]
    before = values.detach().clone()
    opt = torch.optim.SGD([values], lr=0.1, weight_decay=0.3)
    values.grad = torch.zeros_like(values)
    opt.step()
    cb = hfx.SaraCallback()
    with caplog.at_level("WARNING", logger="hfx.tuners.sara.callback"):
        cb.on_optimizer_step(SimpleNamespace(), SimpleNamespace(), None, model=model, optimizer=opt)
        cb.on_optimizer_step(SimpleNamespace(), SimpleNamespace(), None, model=model, optimizer=opt)
    assert torch.equal(values.detach(), before)  # nothing added for a coupled (SGD) decay
    warned = [r.getMessage() for r in caplog.records if "weight decay" in r.getMessage()]
    assert len(warned) == 1 and "with SGD" in warned[0] and "weight_decay=0" in warned[0]


def test_trainer_weight_decay_reaches_the_weights_through_the_callback(tmp_path):
    """A real Trainer step (AcceleratedOptimizer, HF's decay param groups): with a huge adam_epsilon the Adam part
    of the update vanishes, so one step from d = 0 leaves d = -lr * wd * W0[idx]; without the callback, d stays 0."""

    def one_step(callback):
        model = get_peft_model(tiny_lm(), lm_config(nuclear_norm_weight=0, progressive_fraction=None))
        trainer = make_trainer(model, tmp_path, 1, callback, lr=0.1)
        trainer.args.weight_decay, trainer.args.adam_epsilon, trainer.args.lr_scheduler_type = 0.5, 1e12, "constant"
        trainer.train()
        return [m for m in model.modules() if isinstance(m, SaraLinear)]

    for layer in one_step(hfx.SaraCallback()):
        w0 = layer.base_layer.weight.detach().reshape(-1)[layer.sara_indices["default"].long()]
        torch.testing.assert_close(layer.sara_values["default"].detach(), -0.05 * w0, rtol=1e-4, atol=1e-9)
    for layer in one_step(TrainerCallback()):  # does nothing: the run without SaRA's callback
        assert layer.sara_values["default"].detach().abs().max() < 1e-9


def _regularised_grad(weight: float, layers=None):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_lm(), lm_config(nuclear_norm_weight=weight, nuclear_norm_layers=layers, threshold=0.01)
    )
    for m in model.modules():
        if isinstance(m, SaraLinear):
            randomise_values(m, std=0.01)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    cb = hfx.SaraCallback()
    cb.on_pre_optimizer_step(SimpleNamespace(seed=0), SimpleNamespace(global_step=0), None, model=model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, grads, cb


def test_regulariser_changes_the_gradient_by_lambda_times_its_own_gradient_ref_bug_5():
    _, plain, cb0 = _regularised_grad(0.0)
    model, reg, cb = _regularised_grad(0.5, layers=None)
    assert not cb0._pending and len(cb._pending) == 1
    layers = [m for m in model.modules() if isinstance(m, SaraLinear)]
    for m in layers:
        m.sara_values["default"].grad = None
    sara_nuclear_norm(model).backward()
    assert cb._pending[0] == pytest.approx(sum(m.nuclear_norm("default").item() for m in layers), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(reg[name], plain[name] + 0.5 * p.grad, rtol=1e-5, atol=1e-6)
            assert not torch.equal(reg[name], plain[name])


def test_regulariser_samples_layers_deterministically_per_step():
    _, plain, _ = _regularised_grad(0.0)
    _, one, _ = _regularised_grad(0.5, layers=1)
    _, again, _ = _regularised_grad(0.5, layers=1)
    changed = [n for n in plain if not torch.equal(plain[n], one[n])]
    assert len(changed) == 1  # one layer per step, as the reference code
    assert all(torch.equal(one[n], again[n]) for n in one)  # same draw for the same (seed, step)


# ---- a real (tiny) causal LM ------------------------------------------------------------------------------------
def tiny_lm(arch: str = "llama", **kw):
    from hfx.testing import tiny_causal_lm

    return tiny_causal_lm(arch, hidden_size=32, num_layers=2, seed=0, **kw)


def lm_config(**kw) -> hfx.SaraConfig:
    return hfx.SaraConfig(**{"target_modules": LM_TARGETS, **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_forward_backward_merge(arch):
    base = tiny_lm(arch)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    model = get_peft_model(base, lm_config())  # the paper's threshold 2e-3 selects ~8 % at init std 0.02
    layers = [m for m in model.modules() if isinstance(m, SaraLinear)]
    assert len(layers) == 2 * len(LM_TARGETS)
    for m in layers:
        w = m.base_layer.weight.detach().reshape(-1)
        assert m.sara_indices["default"].tolist() == (w.abs() < 2e-3).nonzero().view(-1).tolist()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(m.sara_values["default"].numel() for m in layers)
    assert torch.equal(model(ids).logits, ref)  # zero delta at init: bit-identical
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        for m in layers:
            randomise_values(m, std=0.02)
        y = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)


# ---- progressive adjustment ---------------------------------------------------------------------------------------
def train_steps(model, ids, opt, n):
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("reset", [True, False])
def test_progressive_adjustment_subset_frozen_function_and_optimizer_state(reset):
    torch.manual_seed(0)
    model = get_peft_model(tiny_lm(), lm_config())
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.1)
    train_steps(model, ids, opt, 3)
    layers = [m for m in model.modules() if isinstance(m, SaraLinear)]
    before = {}
    for m in layers:
        p = m.sara_values["default"]
        before[id(m)] = (
            m.sara_indices["default"].clone(),
            p.detach().clone(),
            {k: v.clone() for k, v in opt.state[p].items()},
        )
    with torch.no_grad():
        logits = model(ids).logits
    stats = adjust_sara_masks(model, opt, reset_optimizer_state=reset)
    assert 0 < stats["kept_fraction"] < 1 and stats["frozen_entries"] > 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-6, rtol=1e-6)  # function unchanged
    for m in layers:
        old_idx, old_v, old_state = before[id(m)]
        p = m.sara_values["default"]
        new_idx = m.sara_indices["default"]
        keep = torch.isin(old_idx, new_idx)
        assert torch.equal(old_idx[keep], new_idx)  # a subset, in order
        assert p.numel() == new_idx.numel() and torch.equal(p.detach(), old_v[keep])
        eff = m.base_layer.weight.detach().view(-1)[old_idx.long()] + old_v
        assert torch.equal(keep, eff.abs() < 2e-3)  # dropped: those that grew past the threshold
        frozen_idx = m.sara_frozen_indices["default"]
        assert torch.equal(frozen_idx, old_idx[~keep]) and torch.equal(m.sara_frozen_values["default"], old_v[~keep])
        if reset:
            assert p not in opt.state
        else:
            assert torch.equal(torch.as_tensor(opt.state[p]["step"]), torch.as_tensor(old_state["step"]))
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], old_state[key][keep])
    frozen = {id(m): m.sara_frozen_values["default"].clone() for m in layers}
    train_steps(model, ids, opt, 2)  # training goes on; frozen entries are bit-frozen (weight decay included)
    for m in layers:
        assert torch.equal(m.sara_frozen_values["default"], frozen[id(m)])
        assert m.sara_frozen_values["default"].grad is None
    assert any(p.grad is None and p.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_repeated_adjustments_keep_the_function_and_only_grow_the_frozen_set():
    """Every round of train -> adjust keeps the function; entries frozen by an earlier round stay frozen with their
    values (a second adjustment that dropped the first one's frozen entries moved the logits by 0.1)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_lm(), lm_config())
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    layers = [m for m in model.modules() if isinstance(m, SaraLinear)]
    frozen = {
        id(m): (m.sara_frozen_indices["default"].clone(), m.sara_frozen_values["default"].clone()) for m in layers
    }
    grew = 0
    for _ in range(3):
        train_steps(model, ids, opt, 3)
        with torch.no_grad():
            logits = model(ids).logits
        adjust_sara_masks(model, opt)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, logits, atol=1e-6, rtol=1e-6)
        for m in layers:
            old_idx, old_val = frozen[id(m)]
            idx, val = m.sara_frozen_indices["default"], m.sara_frozen_values["default"]
            position = {int(i): j for j, i in enumerate(idx.tolist())}
            assert all(int(i) in position for i in old_idx.tolist())  # nothing unfrozen
            kept = torch.tensor([position[int(i)] for i in old_idx.tolist()], dtype=torch.long)
            assert torch.equal(val[kept], old_val)  # with the values it froze at
            grew += idx.numel() > old_idx.numel()
            frozen[id(m)] = (idx.clone(), val.clone())
    assert grew > len(layers)  # the set grows in more than one round


def test_adjustment_refuses_a_merged_layer():
    model = get_peft_model(tiny_lm(), lm_config())
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        adjust_sara_masks(model)


FRESH_LOAD = textwrap.dedent(
    """
    import sys, torch
    import hfx
    from peft import PeftModel
    from hfx.testing import tiny_causal_lm
    torch.manual_seed(987)  # another RNG state than the saving process
    for adapter, out in zip(sys.argv[1::2], sys.argv[2::2]):  # each adapter on its own fresh base
        base = tiny_causal_lm("llama", hidden_size=32, num_layers=2, seed=0)
        model = PeftModel.from_pretrained(base, adapter).eval()
        ids = torch.load(out + ".ids", weights_only=True)
        with torch.no_grad():
            torch.save(model(ids).logits, out)
    """
)


def test_save_after_adjustment_then_load_in_fresh_process_gives_identical_logits(tmp_path):
    model = get_peft_model(tiny_lm(), lm_config())
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    train_steps(model, ids, opt, 2)
    model.eval()
    with torch.no_grad():
        before_adjust = model(ids).logits
    model.save_pretrained(tmp_path / "before")
    model.train()
    adjust_sara_masks(model, opt)
    train_steps(model, ids, opt, 2)
    assert sum(m.sara_frozen_indices["default"].numel() for m in model.modules() if isinstance(m, SaraLinear)) > 0
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "after")
    torch.save(ids, tmp_path / "before.pt.ids")
    torch.save(ids, tmp_path / "after.pt.ids")
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = (("before", before_adjust), ("after", logits))
    argv = [str(tmp_path / a) for name, _ in cases for a in (name, f"{name}.pt")]
    subprocess.run([sys.executable, str(script), *argv], check=True, env=env, timeout=300)
    for name, expected in cases:
        assert torch.equal(torch.load(tmp_path / f"{name}.pt", weights_only=True), expected), name


def test_threshold_is_saved_and_a_load_under_another_config_keeps_it_with_a_warning(tmp_path):
    """The threshold was recomputed from the current config on load, so a checkpoint resumed with another `ratio`
    kept its trainable set (sara_indices is loaded) but froze entries at the new threshold. It is now saved with
    the adapter; loading (what a Trainer resume does) uses the saved one and warns that the config differs."""
    model, layer = one_layer(threshold=None, ratio=0.3)
    saved = layer.sara_threshold.value("default")
    assert any(k.endswith("lin.sara_threshold") for k in get_peft_model_state_dict(model))
    model.save_pretrained(tmp_path)
    other, other_layer = one_layer(threshold=None, ratio=0.1)
    assert other_layer.sara_threshold.value("default") != saved
    with pytest.warns(UserWarning, match=r"thresholds differ in 1 of 1 layers.*\(ratio=0.1\).*Using the saved ones"):
        other.load_adapter(tmp_path, "default", is_trainable=True)
    assert other_layer.sara_threshold.value("default") == saved
    assert torch.equal(other_layer.sara_indices["default"], layer.sara_indices["default"])
    # same values on the same set: the progressive adjustment freezes the same entries as the saved run would
    randomise_values(layer, std=0.2)
    randomise_values(other_layer, std=0.2)
    keep = layer.progressive_adjust("default")
    assert not keep.all() and torch.equal(other_layer.progressive_adjust("default"), keep)


def test_adapter_saved_without_thresholds_loads_with_the_configs_and_no_missing_key_warning(tmp_path):
    """Adapters saved before the threshold was stored lack the key: they load as before, silently."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    model, layer = one_layer(threshold=None, ratio=0.3)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    assert [k for k in state if "sara_threshold" in k]
    save_file({k: v for k, v in state.items() if "sara_threshold" not in k}, path)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(One(12, 10).to(TORCH64), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message) or "threshold" in str(w.message)]
    assert loaded.base_model.model.lin.sara_threshold.value("default") == layer.sara_threshold.value("default")


def test_threshold_stays_exact_float64_under_dtype_casts():
    """Rounding the saved threshold to the model's dtype (bf16 base, model.half()) would move which entries
    freeze; it stays a float64 mirror of the exact value."""
    model, layer = one_layer(dtype=torch.bfloat16, threshold=None, ratio=0.3)
    expected = sara_select(layer.get_base_layer().weight.detach(), ratio=0.3)[1]
    for cast in (lambda m: m, lambda m: m.half(), lambda m: m.to(torch.float32)):
        cast(model)
        buf = layer.sara_threshold["default"]
        assert buf.dtype == torch.float64 and buf.item() == expected == layer.sara_threshold.value("default")


# ---- the HF Trainer: loss drops, adjustment timing, logging, resume -------------------------------------------------
def make_trainer(model, out_dir, max_steps, callback, save_steps=None, lr=1e-2, n=64):
    from transformers import Trainer, TrainingArguments

    from hfx.data import sft_dataset
    from hfx.testing import build_tokenizer

    tok = build_tokenizer()
    rows = sft_dataset(n, difficulty="easy", seed=0, format="text")
    data = [{"input_ids": tok(r["text"])["input_ids"]} for r in rows]

    def collate(features):
        batch = tok.pad({"input_ids": [f["input_ids"] for f in features]}, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[callback])


def losses_of(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def wide_lm_config(**kw) -> hfx.SaraConfig:
    # With initializer_range=0.2 the paper's absolute threshold 2e-3 would select only ~0.8 % of the entries; the
    # fraction-based alternative keeps a sensible budget (the paper's "smallest 10-20 %").
    return lm_config(**{"threshold": None, "ratio": 0.2, **kw})


def test_training_run_loss_drops_and_callback_adjusts_and_logs(tmp_path):
    """A real trainer.train() run with the regulariser and the adjustment at half the run: the loss goes down."""
    model = get_peft_model(tiny_lm(initializer_range=0.2), wide_lm_config(nuclear_norm_layers=None))
    cb = hfx.SaraCallback()
    trainer = make_trainer(model, tmp_path, 30, cb, lr=1e-2, n=128)
    trainer.train()
    losses = [v for _, v in sorted(losses_of(trainer).items())]
    assert [s for s, _ in cb.history] == [15]
    assert 0 < cb.history[0][1]["kept_fraction"] < 1
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    logged = [h["sara_nuclear_norm"] for h in trainer.state.log_history if "sara_nuclear_norm" in h]
    assert len(logged) == 30 and logged[-1] > 0


def test_trainer_resume_after_the_adjustment_gives_the_same_losses(tmp_path):
    def build():
        return get_peft_model(tiny_lm(initializer_range=0.2), wide_lm_config(nuclear_norm_weight=1e-2))

    cb = hfx.SaraCallback()
    trainer = make_trainer(build(), tmp_path / "run", 6, cb, save_steps=4)
    trainer.train()
    assert [s for s, _ in cb.history] == [3] and cb.history[0][1]["kept_fraction"] < 1
    full = losses_of(trainer)

    cb2 = hfx.SaraCallback()
    resumed = make_trainer(build(), tmp_path / "resumed", 6, cb2, save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    again = losses_of(resumed)
    assert cb2.history == []  # the adjusted mask came from the checkpoint
    for step in (5, 6):
        assert again[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, again, full)


def test_callback_refuses_deepspeed_and_fsdp_unless_static():
    model = get_peft_model(tiny_lm(), lm_config())
    cb = hfx.SaraCallback()
    state = SimpleNamespace(global_step=0, max_steps=10)
    with pytest.raises(ValueError, match="DeepSpeed.*progressive_fraction=None and nuclear_norm_weight=0"):
        cb.on_train_begin(SimpleNamespace(deepspeed="ds.json", fsdp=[]), state, None, model=model)
    with pytest.raises(ValueError, match="FSDP"):
        cb.on_train_begin(SimpleNamespace(deepspeed=None, fsdp=["full_shard"]), state, None, model=model)
    static = get_peft_model(tiny_lm(), lm_config(progressive_fraction=None, nuclear_norm_weight=0))
    cb.on_train_begin(SimpleNamespace(deepspeed="ds.json", fsdp=[]), state, None, model=static)
    with pytest.raises(ValueError, match="no SaRA layers"):
        cb.on_train_begin(SimpleNamespace(deepspeed=None, fsdp=[]), state, None, model=tiny_lm())


# ---- errors and config ------------------------------------------------------------------------------------------
def test_quantized_base_is_refused_naming_the_layer_type():
    import bitsandbytes as bnb  # installed with the dev extra; a missing one must fail, not skip

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = bnb.nn.Linear4bit(16, 32, compute_dtype=torch.float32, quant_type="nf4")

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(TypeError, match="'lin'.*Linear4bit is quantized.*unquantized"):
        get_peft_model(Q(), hfx.SaraConfig(target_modules=["lin"]))


def test_non_linear_target_is_refused():
    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x):
            return self.emb(x)

    with pytest.raises((TypeError, ValueError), match="emb|Embedding"):
        get_peft_model(E(), hfx.SaraConfig(target_modules=["emb"]))


def test_conv1d_target_names_conv1d_and_suggests_lora_not_all_linear():
    """On GPT-2 (transformers' Conv1D) the error suggested 'all-linear', which selects the same Conv1D layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for targets in (["c_attn"], "all-linear"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
        with pytest.raises(TypeError) as err:
            get_peft_model(gpt2, hfx.SaraConfig(ratio=0.1, target_modules=targets))
        msg = str(err.value)
        assert "transformers' Conv1D (GPT-2 style" in msg and "Use LoRA instead (peft.LoraConfig" in msg, msg
        assert "or 'all-linear')" not in msg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1e-3, "ratio": 0.1}, "either"),
        ({"threshold": -1.0}, "threshold"),
        ({"ratio": 1.0}, "ratio"),
        ({"nuclear_norm_weight": -1.0}, "nuclear_norm_weight"),
        ({"nuclear_norm_weight": float("inf")}, "nuclear_norm_weight"),
        ({"nuclear_norm_layers": 0}, "nuclear_norm_layers"),
        ({"progressive_fraction": 1.5}, "progressive_fraction"),
        ({"bias": "lora_only"}, "bias"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfx.SaraConfig(**kwargs)


def test_defaults_are_the_papers():
    cfg = hfx.SaraConfig()
    assert (cfg.threshold, cfg.ratio, cfg.nuclear_norm_weight, cfg.progressive_fraction) == (2e-3, None, 5e-4, 0.5)
    assert default_learning_rate() == pytest.approx(1e-3 * 2.718281828459045 ** (-0.7))
    assert default_learning_rate() == pytest.approx(4.966e-4, rel=1e-3)


# ---- nn.Conv2d (the paper's UNet kernels) ---------------------------------------------------------------------------
CONV_NET = '''
import torch
from torch import nn


class ConvNet(nn.Module):
    """Two convs (one grouped, one strided) and a linear head: what SaRA adapts in a UNet, in small."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(torch.tanh(self.conv1(x))).mean((2, 3)))
'''
_conv_namespace: dict = {}
exec(CONV_NET, _conv_namespace)
ConvNet = _conv_namespace["ConvNet"]
CONV_TARGETS = ["conv1", "conv2", "head"]


def conv_model(seed: int = 0, dtype=TORCH64, ratio: float = 0.25):
    torch.manual_seed(seed)
    model = get_peft_model(ConvNet().to(dtype), hfx.SaraConfig(ratio=ratio, target_modules=CONV_TARGETS))
    for layer in model.modules():
        if isinstance(layer, SaraLinear):
            randomise_values(layer, seed=seed + 1, std=0.1)
    return model


def dense_conv_reference(model, x):
    """The formula by hand: every adapted kernel/matrix is W0 + D, D dense from the indices and values."""
    net = model.base_model.model
    w = {n: getattr(net, n).base_layer.weight + getattr(net, n).get_delta_weight("default").to(x.dtype)
         for n in CONV_TARGETS}  # fmt: skip
    h = torch.tanh(torch.nn.functional.conv2d(x, w["conv1"], net.conv1.base_layer.bias, padding=1))
    h = torch.nn.functional.conv2d(h, w["conv2"], None, stride=2, padding=1, groups=2)
    return torch.nn.functional.linear(h.mean((2, 3)), w["head"], net.head.base_layer.bias)


def test_conv2d_forward_and_merge_match_the_dense_float64_reference():
    model = conv_model()
    layer = model.base_model.model.conv2
    assert type(layer).__name__ == "SaraConv2d" and layer.shape == (8, 4 * 3 * 3)
    assert layer.sara_values["default"].numel() == round(0.25 * 8 * 36)
    x = torch.randn(2, 3, 8, 8, dtype=TORCH64, generator=torch.Generator().manual_seed(3))
    y = model(x)
    torch.testing.assert_close(y, dense_conv_reference(model, x), rtol=0, atol=1e-12)
    kernels = {n: getattr(model.base_model.model, n).base_layer.weight.clone() for n in CONV_TARGETS}
    model.merge_adapter()
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    for n, w in kernels.items():
        assert torch.equal(getattr(model.base_model.model, n).base_layer.weight, w), n


def test_conv2d_value_gradient_is_the_dense_kernel_gradient_at_the_indices():
    model = conv_model()
    layer = model.base_model.model.conv1
    x = torch.randn(2, 3, 8, 8, dtype=TORCH64, generator=torch.Generator().manual_seed(4))
    model(x).square().sum().backward()
    got = layer.sara_values["default"].grad
    kernel = (layer.base_layer.weight + layer.get_delta_weight("default").double()).requires_grad_()
    h = torch.tanh(torch.nn.functional.conv2d(x, kernel, layer.base_layer.bias, padding=1))
    net = model.base_model.model
    out = net.head(net.conv2(h).mean((2, 3)))
    (dense,) = torch.autograd.grad(out.square().sum(), kernel)
    torch.testing.assert_close(got, dense.reshape(-1)[layer.sara_indices["default"].long()], rtol=1e-10, atol=1e-12)
    assert layer.base_layer.weight.grad is None


def test_conv2d_training_adjustment_and_nuclear_norm():
    model = conv_model(dtype=torch.float32)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for step in range(30):
        loss = torch.nn.functional.mse_loss(model(x), target) + 5e-4 * sara_nuclear_norm(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        del loss  # no graph of an earlier step may be alive when the adjustment shrinks the values
        if step == 15:
            with torch.no_grad():
                before = model(x)
            adjust_sara_masks(model, opt)  # the frozen deltas keep the function
            with torch.no_grad():
                torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    assert losses[-1] < 0.7 * losses[0], losses
    layer = model.base_model.model.conv1
    assert torch.isfinite(layer.nuclear_norm("default")) and layer.nuclear_norm("default").requires_grad


def test_conv2d_save_then_load_in_a_fresh_process_gives_identical_outputs(tmp_path):
    model = conv_model(dtype=torch.float32).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "convnet.py").write_text(CONV_NET)
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import hfx  # registers SaRA with PEFT
        from peft import PeftModel
        from convnet import ConvNet
        torch.manual_seed(0)
        base = ConvNet()
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)), {str(tmp_path / "y.pt")!r})
    """)
    )
    subprocess.run([sys.executable, str(script)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_callback_warns_when_the_adjustment_falls_after_the_run(caplog):
    model = get_peft_model(tiny_lm(), lm_config())
    args = SimpleNamespace(deepspeed=None, fsdp=[])
    for cb, max_steps, warns in [(hfx.SaraCallback(adjust_step=10), 3, True), (hfx.SaraCallback(adjust_step=3), 3, False),
                                 (hfx.SaraCallback(), 3, False)]:  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            cb.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=max_steps), None, model=model)
        assert any("never happens" in r.getMessage() for r in caplog.records) == warns, cb.adjust_step
