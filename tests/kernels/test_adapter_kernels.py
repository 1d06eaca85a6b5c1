"""Fused PaCA / Bone layers (one Triton GEMM with the adapter folded into the weight loads).

Three layers of evidence: the kernels equal the dense-effective-weight reference (float64) in float32/float16;
the reference equals the tuner layers' own unfused forward and gradients; and with ``hfx.fused_adapters()`` a PEFT
model gives the same outputs, gradients and training losses as without, falling back where fusion is not exact.
On CPU the kernels run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hfx
from hfx.kernels.adapter import reference
from hfx.testing import saved_activation_bytes

kernels = pytest.importorskip("hfx.kernels.adapter.triton_kernel")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(t=37, i=40, o=24, r=5, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    x = torch.randn(2, t, i, generator=g, dtype=torch.float64)
    idx = torch.randperm(i, generator=g)[:r].sort().values
    gy = torch.randn(2, t, o, generator=g, dtype=torch.float64)
    cast = {"device": DEVICE, "dtype": dtype}
    return (
        x.to(**cast).requires_grad_(),
        w.to(**cast),
        None if b is None else b.to(**cast),
        idx.to(DEVICE),
        gy.to(**cast),
        g,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_paca_kernel_matches_reference(dtype, bias, scaling):
    x, w, b, idx, gy, g = inputs(dtype=dtype, bias=bias)
    orig = w[:, idx].clone()
    p = (orig.double().cpu() / scaling + 0.2 * torch.randn(orig.shape, generator=g, dtype=torch.float64)).float()
    p = p.to(DEVICE).requires_grad_()
    if b is not None:  # a trainable bias (e.g. bias="all"): its gradient comes back too
        b = b.detach().requires_grad_()
    y = kernels.paca_linear(x, w, b, p, orig, idx, scaling)
    assert y.dtype == dtype and y.shape == gy.shape
    grads = torch.autograd.grad(y, [x, p] + ([b] if b is not None else []), gy)
    x64, p64 = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y64 = reference.paca_linear(x64, w.double(), b64, p64, orig.double(), idx, scaling)
    refs = torch.autograd.grad(y64, [x64, p64] + ([b64] if b is not None else []), gy.double())
    assert rel(y, y64) < TOL[dtype]
    for got, want in zip(grads, refs, strict=True):
        assert rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_f,r", [(40, 8), (40, 6)])  # r dividing in_features, and a padded last chunk
def test_bone_kernel_matches_reference(dtype, bias, in_f, r):
    x, w, b, _, gy, g = inputs(i=in_f, dtype=dtype, bias=bias)
    block = (0.1 * torch.randn(r, w.shape[0], generator=g)).to(DEVICE).requires_grad_()
    if b is not None:  # a trainable bias: its gradient comes back too
        b = b.detach().requires_grad_()
    y = kernels.bone_linear(x, w, b, block)
    grads = torch.autograd.grad(y, [x, block] + ([b] if b is not None else []), gy)
    x64, blk64 = x.detach().double().requires_grad_(), block.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y64 = reference.bone_linear(x64, w.double(), b64, blk64)
    refs = torch.autograd.grad(y64, [x64, blk64] + ([b64] if b is not None else []), gy.double())
    assert rel(y, y64) < TOL[dtype]
    for got, want in zip(grads, refs, strict=True):
        assert rel(got, want) < TOL[dtype]


def test_kernel_errors_name_the_problem():
    x, w, b, idx, _, _ = inputs()
    block = torch.zeros(4, w.shape[0], device=DEVICE)
    with pytest.raises(ValueError, match="frozen base weight"):
        kernels.bone_linear(x, w.clone().requires_grad_(), b, block)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        kernels.bone_linear(x.double(), w.double(), None, block.double())


class One(nn.Module):
    def __init__(self, in_f: int = 40, out_f: int = 24, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.lin(x)


def _adapted(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = get_peft_model(One().to(dtype), cfg).to(DEVICE)
    with torch.no_grad():
        for _name, prm in model.named_parameters():
            if prm.requires_grad:
                prm.add_(0.2 * torch.randn_like(prm))
    return model, model.base_model.model.lin


def test_the_switch_takes_booleans_and_the_environment_variable_its_usual_spellings(monkeypatch):
    import hfx.kernels.adapter as adapter

    before = adapter.fused_adapters_enabled()
    with pytest.raises(TypeError, match=r"takes True or False, got 'false'"):  # bool("false") used to turn it on
        hfx.set_fused_adapters("false")
    assert adapter.fused_adapters_enabled() is before
    for value, on in (("true", True), ("ON", True), ("1", True), ("no", False), ("0", False), ("", False)):
        monkeypatch.setenv("HFX_FUSED_ADAPTERS", value)
        assert adapter._from_environment() is on, value
    monkeypatch.setenv("HFX_FUSED_ADAPTERS", "fast")  # used to be read as off, silently
    with pytest.raises(ValueError, match=r"HFX_FUSED_ADAPTERS must be 1/true/yes/on or 0/false/no/off, got 'fast'"):
        adapter._from_environment()


def test_reference_equals_the_tuner_layers_unfused_path():
    """The ground truth is the layers' own formula: same output and adapter gradient in float64."""
    x = torch.randn(3, 5, 40, dtype=torch.float64, device=DEVICE)
    model, layer = _adapted(hfx.PacaConfig(r=6, paca_alpha=12, target_modules=["lin"]))
    a = "default"
    p = layer.paca_w[a]
    want = model(x)
    (dp,) = torch.autograd.grad(want.square().sum(), [p])
    base = layer.get_base_layer()
    got = reference.paca_linear(
        x, base.weight, base.bias, p, layer.paca_orig[a], layer.paca_indices[a], layer.paca_scaling[a]
    )
    (dp_ref,) = torch.autograd.grad(got.square().sum(), [p])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dp_ref, dp)

    model, layer = _adapted(hfx.BoneConfig(r=8, target_modules=["lin"]))
    blk = layer.bone_block[a]
    want = model(x)
    (dblk,) = torch.autograd.grad(want.square().sum(), [blk])
    got = reference.bone_linear(x, base_w := layer.get_base_layer().weight, layer.get_base_layer().bias, blk)
    (dblk_ref,) = torch.autograd.grad(got.square().sum(), [blk])
    assert base_w.shape == (24, 40)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dblk_ref, dblk)


def _count_kernel_calls(monkeypatch):
    calls = {"n": 0}
    original = kernels._adapted_mm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "_adapted_mm", counting)
    return calls


@pytest.mark.parametrize(
    "cfg",
    [
        hfx.PacaConfig(r=6, paca_alpha=12, target_modules=["lin"]),
        hfx.BoneConfig(r=8, target_modules=["lin"]),
    ],
    ids=["paca", "bone"],
)
def test_fused_layer_equals_unfused_layer(cfg, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(3, 5, 40, device=DEVICE)
    model, _ = _adapted(cfg, dtype=torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    xs = x.clone().requires_grad_()
    want = model(xs)
    want_grads = torch.autograd.grad(want.square().sum(), [xs, *trainable])
    assert calls["n"] == 0
    xf = x.clone().requires_grad_()
    with hfx.fused_adapters():
        got = model(xf)
        got_grads = torch.autograd.grad(got.square().sum(), [xf, *trainable])
    assert calls["n"] == 2  # forward and dx, one launch each
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert not hfx.kernels.fused_adapters_enabled()  # the context manager restores the switch


@pytest.mark.parametrize("method", ["paca", "bone"])
def test_fused_layer_follows_autocast_like_the_unfused_one(method, monkeypatch):
    """Under autocast the fused GEMM runs in autocast's dtype, as the base layer's ``F.linear`` does unfused."""
    seen = []
    original = kernels._adapted_mm
    monkeypatch.setattr(
        kernels, "_adapted_mm", lambda a, w, **kw: seen.append((a.dtype, w.dtype)) or original(a, w, **kw)
    )
    cfg = (
        hfx.PacaConfig(r=6, target_modules=["lin"])
        if method == "paca"
        else hfx.BoneConfig(r=8, target_modules=["lin"])
    )
    model, _ = _adapted(cfg, dtype=torch.float32)
    x = torch.randn(3, 5, 40, device=DEVICE)
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    with torch.autocast(DEVICE, dtype=half):
        want = model(x)
        with hfx.fused_adapters():
            got = model(x)
    assert seen == [(half, half)]  # the GEMM ran in autocast's dtype
    assert got.dtype == want.dtype == half  # the layers return what the base layer does (autocast's), as LoRA
    assert rel(got, want) < 1e-2


def test_fused_paca_keeps_only_the_partial_activation():
    n, m, r, t = 64, 48, 8, 20
    x = torch.randn(2, 10, n, requires_grad=True, device=DEVICE)
    torch.manual_seed(0)
    paca = get_peft_model(One(n, m), hfx.PacaConfig(r=r, target_modules=["lin"])).to(DEVICE)
    with hfx.fused_adapters():
        saved = saved_activation_bytes(paca, x)
    assert saved == t * r * 4  # x[..., idx] only, as on the unfused path


def test_fused_path_falls_back_where_it_is_not_exact(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(2, 3, 40, device=DEVICE)
    with hfx.fused_adapters():
        for cfg in (
            hfx.BoneConfig(r=8, target_modules=["lin"], init_weights="bat"),  # BAT: weight-dependent update
            hfx.BoneConfig(r=8, target_modules=["lin"], bone_dropout=0.1),  # dropout on the adapter input
        ):
            model, _ = _adapted(cfg, dtype=torch.float32)
            model(x)
        model, layer = _adapted(hfx.PacaConfig(r=4, target_modules=["lin"]), dtype=torch.float32)
        model.base_model.model.lin.get_base_layer().weight.requires_grad_(True)  # a trainable base
        model(x)
        model.base_model.model.lin.get_base_layer().weight.requires_grad_(False)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
        model(x.double().float())  # back on the fused path once unmerged
    assert calls["n"] == 1
    torch.testing.assert_close(merged, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["paca", "bone"])
def test_training_with_fused_adapters_and_triton_cce_tracks_the_reference(method, monkeypatch):
    """A tiny Llama, adapter on every linear layer, three AdamW steps: fused adapters + Triton CCE give the reference
    path's losses step for step (float32 here; bf16 tolerance on the GPU test below)."""
    calls = _count_kernel_calls(monkeypatch)
    losses = {"reference": _train(method, fused=False)}
    assert calls["n"] == 0
    losses["fused"] = _train(method, fused=True)
    # 3 steps x (7 adapted linear layers forward + dx for the 4 whose input needs a gradient: q/k/v read the
    # normalised embeddings of a frozen base, so autograd asks them for no dx)
    assert calls["n"] == 3 * (7 + 4)
    assert losses["reference"][-1] < losses["reference"][0]
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["reference"]), atol=1e-4, rtol=1e-4)


def _train(method: str, fused: bool, steps: int = 3, dtype=torch.float32) -> list[float]:
    from hfx.testing import tiny_causal_lm

    base = tiny_causal_lm(hidden_size=32, num_layers=1, seed=0).to(device=DEVICE, dtype=dtype)
    cfg = (
        hfx.PacaConfig(r=8, paca_alpha=8, target_modules="all-linear")
        if method == "paca"
        else hfx.BoneConfig(r=8, target_modules="all-linear")
    )
    model = hfx.use_cce(get_peft_model(base, cfg), impl="triton" if fused else "reference")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out_losses = []
    with hfx.fused_adapters(fused):
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out_losses.append(loss.item())
    return out_losses


# --- GPU (bf16; skipped without CUDA) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["paca", "bone"])
def test_gpu_bf16_kernels_match_reference(method):
    x, w, b, idx, gy, g = inputs(t=512, i=1024, o=768, r=32, dtype=torch.bfloat16)
    if method == "paca":
        orig = w[:, idx].clone()
        p = (orig.float() + 0.05 * torch.randn(orig.shape, device=DEVICE)).requires_grad_()
        y = kernels.paca_linear(x, w, b, p, orig, idx, 1.0)
        ref_args = (p, orig, idx, 1.0)
        ref_fn = reference.paca_linear
        leaf = p
    else:
        leaf = (0.02 * torch.randn(32, w.shape[0], device=DEVICE)).requires_grad_()
        y = kernels.bone_linear(x, w, b, leaf)
        ref_args = (leaf,)
        ref_fn = reference.bone_linear
    dx, dleaf = torch.autograd.grad(y, [x, leaf], gy)
    x32 = x.detach().float().requires_grad_()
    leaf32 = leaf.detach().float().requires_grad_()
    args32 = tuple(leaf32 if a is leaf else a for a in ref_args)
    y32 = ref_fn(x32, w.float(), b.float(), *args32)
    dx32, dleaf32 = torch.autograd.grad(y32, [x32, leaf32], gy.float())
    for got, want in ((y, y32), (dx, dx32), (dleaf, dleaf32)):
        assert rel(got, want) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["paca", "bone"])
def test_gpu_bf16_training_tracks_the_reference(method):
    ref = _train(method, fused=False, steps=6, dtype=torch.bfloat16)
    got = _train(method, fused=True, steps=6, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=5e-2, rtol=2e-2)
