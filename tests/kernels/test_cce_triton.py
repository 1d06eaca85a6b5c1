"""The Triton CCE kernels against the float64 PyTorch reference, option by option.

Without CUDA these run in Triton's interpreter on CPU tensors (float32 / float16; tests/conftest.py sets
``TRITON_INTERPRET=1``), so CI checks the very kernels the GPU runs. The ``gpu`` tests repeat the comparison in
bfloat16 on CUDA at a larger shape with the error budget of the issue (dE, dC relative error ≤ 1e-2).
"""

from __future__ import annotations

import pytest
import torch

import hfx
from hfx.kernels.cce import reference

triton_kernel = pytest.importorskip("hfx.kernels.cce.triton_kernel")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

OPTIONS = {
    "plain": {},
    "softcap": {"softcap": 3.0},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "temperature": {"temperature": 0.7},
    "all": {"softcap": 2.0, "label_smoothing": 0.2, "z_loss": 1e-2, "temperature": 1.3},
}


def make(n=(2, 19), h=24, v=70, dtype=torch.float32, seed=0, bias=True, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.3 if bias else None
    labels = torch.randint(0, v, n, generator=g)
    labels[..., :3] = IGNORE  # a "prompt"
    labels.view(-1)[7] = IGNORE
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight)]
    if b is not None:
        leaves.append(b.to(device=device, dtype=dtype).requires_grad_())
    return leaves, labels.to(device)


def run(fn, leaves, labels, **kw):
    """Loss and gradients of ``fn`` (the reference runs in float64 on copies of the same values)."""
    bias = leaves[2] if len(leaves) == 3 else None
    loss = fn(leaves[0], leaves[1], labels, bias, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def reference64(leaves, labels, **kw):
    kw = {k: v for k, v in kw.items() if k not in ("filter_eps", "sort_vocab", "vocab_chunk", "_force_sparse")}
    copies = [t.detach().double().requires_grad_() for t in leaves]
    return run(reference.linear_cross_entropy, copies, labels, **kw)


def assert_rel_close(got, want, tol, what=""):
    for i, (a, b) in enumerate(zip(got, want)):
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{what} output {i}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_and_gradients_match_reference(dtype, bias, name):
    leaves, labels = make(dtype=dtype, bias=bias)
    opts = OPTIONS[name]
    got = run(triton_kernel.linear_cross_entropy, leaves, labels, vocab_chunk=32, **opts)
    assert got[0].dtype == torch.float32
    assert_rel_close(got, reference64(leaves, labels, **opts), TOL[dtype], name)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_shift_and_num_items(reduction):
    leaves, labels = make(bias=False)
    for kw in ({"shift": True}, {"shift": False}):
        got = triton_kernel.linear_cross_entropy(leaves[0], leaves[1], labels, reduction=reduction, **kw)
        want = reference.linear_cross_entropy(leaves[0], leaves[1], labels, reduction=reduction, **kw)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if reduction != "none":
        got = triton_kernel.linear_cross_entropy(leaves[0], leaves[1], labels, num_items_in_batch=9)
        want = reference.linear_cross_entropy(leaves[0], leaves[1], labels, num_items_in_batch=9)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_log_probs_and_ignored_positions():
    leaves, labels = make()
    got = triton_kernel.linear_log_probs(leaves[0], leaves[1], labels, leaves[2], shift=True, softcap=5.0)
    want = reference.linear_log_probs(leaves[0], leaves[1], labels, leaves[2], shift=True, softcap=5.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[..., -1] == 0).all() and (got[..., :2] == 0).all()
    # No valid token at all: NaN mean like F.cross_entropy, and a backward that runs.
    none = torch.full_like(labels, IGNORE)
    loss = triton_kernel.linear_cross_entropy(leaves[0], leaves[1], none)
    assert torch.isnan(loss)
    zero = triton_kernel.linear_cross_entropy(leaves[0], leaves[1], none, reduction="sum")
    zero.backward()
    assert float(zero) == 0.0 and (leaves[0].grad == 0).all()


def test_vocab_chunking_does_not_change_the_result():
    leaves, labels = make(v=100)
    one = run(triton_kernel.linear_cross_entropy, leaves, labels, softcap=4.0)
    assert triton_kernel.LAST_BACKWARD["vocab_chunk"] >= 100
    many = run(triton_kernel.linear_cross_entropy, leaves, labels, softcap=4.0, vocab_chunk=16)
    assert triton_kernel.LAST_BACKWARD["vocab_chunk"] == 16
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _peaked(shuffle: bool, v=96):
    """Inputs where only 32 vocabulary columns matter: the first 32, or 32 scattered ones (``shuffle``)."""
    leaves, labels = make(v=v, bias=True)
    b = leaves[2]
    order = torch.randperm(v, generator=torch.Generator().manual_seed(1)) if shuffle else torch.arange(v)
    order = order.to(b.device)
    live = (order < 32).nonzero().flatten()  # column j is live when order[j] < 32
    with torch.no_grad():
        b.copy_(torch.where(order < 32, 0.0, -80.0))  # exp(-80) ≈ 2e-35: negligible
    labels = torch.where(labels == IGNORE, labels, live[labels % 32])
    return leaves, labels


@pytest.mark.parametrize("sparse", [True, False])
def test_gradient_filter_skips_negligible_tiles_and_stays_exact_there(sparse):
    leaves, labels = _peaked(shuffle=False)
    want = reference64(leaves, labels)
    got = run(triton_kernel.linear_cross_entropy, leaves, labels, filter_eps=1e-6, _force_sparse=sparse)
    density = triton_kernel.LAST_BACKWARD["filter_density"]
    assert density is not None and density < 0.5, density  # 2 of 6 vocabulary tiles per token tile live
    assert_rel_close(got, want, TOL[torch.float32], "filtered")


def test_vocabulary_sort_groups_the_live_columns():
    leaves, labels = _peaked(shuffle=True)
    want = reference64(leaves, labels)
    got = run(
        triton_kernel.linear_cross_entropy, leaves, labels, filter_eps=1e-6, sort_vocab=False, _force_sparse=True
    )
    unsorted = triton_kernel.LAST_BACKWARD["filter_density"]
    assert_rel_close(got, want, TOL[torch.float32], "unsorted")
    got = run(triton_kernel.linear_cross_entropy, leaves, labels, filter_eps=1e-6, _force_sparse=True)
    sorted_density = triton_kernel.LAST_BACKWARD["filter_density"]
    assert_rel_close(got, want, TOL[torch.float32], "sorted")
    assert sorted_density < unsorted, (sorted_density, unsorted)


def test_filter_error_is_bounded_by_the_threshold():
    """Skipped tiles have |softmax − onehot| < eps everywhere, so each gradient entry moves by at most
    eps · (skipped terms) · max|other factor| — here with small but non-negligible probabilities in the skipped tiles."""
    leaves, labels = _peaked(shuffle=False)
    with torch.no_grad():
        leaves[2].clamp_(min=-9.0)  # probabilities ~1e-4 outside the first 32 columns: filtered, not zero
    eps = 1e-3
    want = reference64(leaves, labels)
    got = run(triton_kernel.linear_cross_entropy, leaves, labels, filter_eps=eps, _force_sparse=True)
    density = triton_kernel.LAST_BACKWARD["filter_density"]
    assert 0.0 < density < 1.0, density
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)  # the loss is never filtered
    h, w = (t.detach().double() for t in leaves[:2])
    n, v = h.shape[0] * h.shape[1], w.shape[0]
    assert (got[1].double() - want[1]).abs().max() <= eps * v * w.abs().max() / n
    assert (got[2].double() - want[2]).abs().max() <= eps * n * h.abs().max() / n
    assert (got[1].double() - want[1]).abs().max() > 0  # something was really skipped


@pytest.mark.parametrize(
    "options", [{"label_smoothing": 0.1}, {"z_loss": 0.5}, {"label_smoothing": 0.1, "z_loss": 0.5}]
)
def test_filter_counts_label_smoothing_and_z_loss(options):
    """The filter tested only |softmax − onehot|, so the ε/V smoothing term (here 1e-3 per entry, above filter_eps)
    and the z-loss factor were dropped from skipped tiles (dW rows of the dead columns came out exactly 0)."""
    leaves, labels = _peaked(shuffle=False)
    want = reference64(leaves, labels, **options)
    got = run(triton_kernel.linear_cross_entropy, leaves, labels, filter_eps=1e-4, _force_sparse=True, **options)
    if "label_smoothing" in options:  # ε/V ≈ 1e-3 ≥ filter_eps everywhere: nothing may be skipped
        assert triton_kernel.LAST_BACKWARD["filter_density"] == 1.0
    assert_rel_close(got, want, TOL[torch.float32], f"filtered {options}")


def test_filter_with_small_smoothing_skips_within_the_threshold():
    """ε/V below filter_eps: dead tiles are skipped again, and each gradient entry moves by at most eps-sized terms."""
    leaves, labels = _peaked(shuffle=False)
    options = {"label_smoothing": 1e-4}  # ε/V ≈ 1e-6
    want = reference64(leaves, labels, **options)
    got = run(triton_kernel.linear_cross_entropy, leaves, labels, filter_eps=1e-4, _force_sparse=True, **options)
    assert triton_kernel.LAST_BACKWARD["filter_density"] < 0.5
    h, w = (t.detach().double() for t in leaves[:2])
    n, v = h.shape[0] * h.shape[1], w.shape[0]
    assert (got[1].double() - want[1]).abs().max() <= 1e-4 * v * w.abs().max() / n
    assert (got[2].double() - want[2]).abs().max() <= 1e-4 * h.abs().max()


@pytest.mark.parametrize("sparse", [False, True])
def test_float16_gradients_do_not_underflow_under_a_small_upstream_gradient(sparse):
    """A mean over many tokens (or ``num_items_in_batch`` over accumulated micro-batches) makes the upstream gradient
    ~1e-5: float16 ``softmax · g`` then underflowed (6x the error of the same loss computed in float32 before the
    final cast). dL/du is now stored per unit of a power-of-two scale and multiplied back in float32."""
    leaves, labels = make(n=(1, 64), h=32, v=512, dtype=torch.float16, bias=True)
    scale = 2.0**-10

    def grads(fn, ls, **kw):
        return torch.autograd.grad(fn(ls[0], ls[1], labels, ls[2], **kw) * scale, ls)

    want = grads(reference.linear_cross_entropy, [t.detach().double().requires_grad_() for t in leaves])
    floor = grads(reference.linear_cross_entropy, leaves)  # fp32 maths, fp16 results: the rounding no kernel avoids
    got = grads(triton_kernel.linear_cross_entropy, leaves, filter_eps=1e-6, _force_sparse=sparse)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for i, what in enumerate(("dE", "dC", "db")):
        assert rel(got[i], want[i]) <= 1.3 * rel(floor[i], want[i]) + 1e-4, what


def test_non_contiguous_bias():
    """The kernels read the bias with stride 1: a strided view gave a wrong loss (5.33 instead of 5.90)."""
    leaves, labels = make(bias=False)
    g = torch.Generator().manual_seed(3)
    wide = (torch.randn(2 * leaves[1].shape[0], generator=g) * 0.5).to(DEVICE).requires_grad_()
    leaves = [*leaves, wide[::2]]
    got = run(triton_kernel.linear_cross_entropy, leaves, labels)
    assert_rel_close(got, reference64(leaves, labels), TOL[torch.float32], "strided bias")


def test_minus_inf_bias_over_whole_vocabulary_tiles():
    """A −inf bias (a banned-token mask) over a whole tile made the online log-sum-exp exp(−inf − (−inf)) = NaN."""
    leaves, labels = make(v=70)
    with torch.no_grad():
        leaves[2][:48] = -float("inf")  # the first three 16-wide tiles (and a whole forward split) are all −inf
    labels = torch.where(labels == IGNORE, labels, 48 + labels % 22)
    got = run(triton_kernel.linear_cross_entropy, leaves, labels, reduction="sum")
    want = reference64(leaves, labels, reduction="sum")
    assert all(torch.isfinite(t).all() for t in got[:2])
    assert_rel_close(got[:3], want[:3], TOL[torch.float32], "-inf bias")


def test_mixed_dtypes_are_not_sent_to_the_kernel():
    """tl.dot takes no mixed operands (compiling failed on sm_90 for e.g. a float32 head under bf16 activations),
    so "auto" leaves them to the reference and impl="triton" says what to do."""
    leaves, labels = make()
    h, w = leaves[0], leaves[1].detach().half()
    assert not triton_kernel.supports(h, w)
    with pytest.raises(ValueError, match="of one dtype"):
        hfx.linear_cross_entropy(h, w, labels, impl="triton")
    assert triton_kernel.supports(h, w.float())


def test_dispatch_and_errors(monkeypatch):
    leaves, labels = make()
    h, w, b = leaves
    auto = hfx.linear_cross_entropy(h, w, labels, b, impl="auto")
    want = reference.linear_cross_entropy(h, w, labels, b)
    torch.testing.assert_close(auto, want, atol=1e-5, rtol=1e-5)
    # filter options are accepted by the dispatcher whatever implementation it picks
    hfx.linear_cross_entropy(h, w, labels, b, impl="auto", filter_eps="auto")
    got = hfx.linear_cross_entropy(h, w, labels, b, impl="triton")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="filter_eps"):
        hfx.linear_cross_entropy(h, w, labels, b, impl="triton", filter_eps=2.0)
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int"):
        hfx.linear_cross_entropy(h, w, labels, b, impl="triton", vocab_chunk=0)
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        hfx.linear_cross_entropy(h, w, labels, b, impl="triton", chunk_bytes=-1)
    with pytest.raises(ValueError, match=r"impl='reference' \(float64"):
        hfx.linear_cross_entropy(h.double(), w.double(), labels, impl="triton")
    with pytest.raises(ValueError, match="labels out of range"):
        hfx.linear_cross_entropy(h, w[:10], labels.clamp(max=40), impl="triton")
    with pytest.raises(ValueError, match="softcap"):
        hfx.linear_cross_entropy(h, w, labels, impl="triton", softcap=-1.0)
    # $HFX_CCE_IMPL overrides "auto" (here: force the kernel on CPU, which the interpreter runs)
    real, calls = triton_kernel._per_token, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_kernel, "_per_token", counting)
    monkeypatch.setenv("HFX_CCE_IMPL", "triton")
    hfx.linear_cross_entropy(h, w, labels, b)
    assert calls == [1]
    monkeypatch.setenv("HFX_CCE_IMPL", "cuda")
    with pytest.raises(ValueError, match="HFX_CCE_IMPL"):
        hfx.linear_cross_entropy(h, w, labels, b)


def test_use_cce_with_triton_trains_like_the_reference():
    """A few optimizer steps of a tiny Llama with ``use_cce(impl="triton")`` track the reference path's losses."""
    from hfx.testing import tiny_causal_lm

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    losses = {}
    for impl in ("reference", "triton"):
        model = hfx.use_cce(tiny_causal_lm(hidden_size=32, num_layers=1, seed=0).to(DEVICE).train(), impl=impl)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        run_losses = []
        for _ in range(3):
            out = model(input_ids=ids, labels=ids)
            assert out.logits is None
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            run_losses.append(out.loss.item())
        losses[impl] = run_losses
    assert losses["reference"][-1] < losses["reference"][0]
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]), atol=1e-5, rtol=1e-5)


# --- GPU (bf16 at a mid-size shape; skipped without CUDA) ------------------------------------------------------


def _gpu_inputs(n, d, v, regime, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e = torch.randn(n, d, device="cuda", generator=g) / d**0.5
    c = torch.randn(v, d, device="cuda", generator=g)
    if regime == "spread":
        c = c * 2.5
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    return e.bfloat16().requires_grad_(), c.bfloat16().requires_grad_(), y


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["flat", "spread"])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_gpu_bf16_matches_fp32_reference(regime, filter_eps):
    e, c, y = _gpu_inputs(2048, 512, 32000, regime)
    loss = hfx.linear_cross_entropy(e, c, y, impl="triton", softcap=30.0, filter_eps=filter_eps)
    de, dc = torch.autograd.grad(loss, [e, c])
    e32, c32 = e.detach().float().requires_grad_(), c.detach().float().requires_grad_()
    want = reference.linear_cross_entropy(e32, c32, y, softcap=30.0)
    de32, dc32 = torch.autograd.grad(want, [e32, c32])
    assert abs(loss.item() - want.item()) <= 1e-3 * abs(want.item())
    for got, ref in ((de, de32), (dc, dc32)):
        err = ((got.float() - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, err


@pytest.mark.gpu
def test_gpu_auto_dispatches_to_triton():
    e, c, y = _gpu_inputs(256, 128, 1000, "flat")
    assert "triton" in hfx.kernels.cce.available_impls()
    assert hfx.kernels.cce._select("auto", e, c, {}) is triton_kernel  # not only equal results: the kernel is chosen
    got = hfx.linear_cross_entropy(e, c, y)  # auto
    want = hfx.linear_cross_entropy(e, c, y, impl="reference")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
