"""The pure-PyTorch CCE reference (``hfx.linear_cross_entropy`` / ``hfx.linear_log_probs``) against dense oracles:
``F.cross_entropy(hidden @ weight.T + bias)`` in float64 for every option combination, torch's own
``F.linear_cross_entropy`` where the options overlap, and a memory check that the N×V logits never exist."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import hfx
from hfx.kernels.cce import plan_chunks

IGNORE = -100


def make(n=(3, 7), h=6, v=23, dtype=torch.float64, seed=0, bias=True, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, n, generator=g)
    if ignore:
        labels[..., :2] = IGNORE  # a "prompt"
        labels.view(-1)[5] = IGNORE
    return hidden, weight, b, labels


def dense(
    hidden,
    weight,
    labels,
    bias=None,
    *,
    reduction="mean",
    shift=False,
    softcap=None,
    label_smoothing=0.0,
    z_loss=0.0,
    temperature=1.0,
    num_items_in_batch=None,
):
    """The oracle: full logits, then F.cross_entropy (+ z-loss), transformers-style shift."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    if shift:
        labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), IGNORE)], dim=-1)
    z2, y = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    per = F.cross_entropy(z2, y, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
    valid = y != IGNORE
    if z_loss:
        per = per + z_loss * torch.logsumexp(z2, dim=-1).square() * valid
    if reduction == "none":
        return per.view(labels.shape)
    if num_items_in_batch is not None:
        return per.sum() / num_items_in_batch
    return per.sum() if reduction == "sum" else per.sum() / valid.sum()


def check(kwargs, *, bias=True, ignore=True, n=(3, 7), chunks=None, atol=1e-10):
    hidden, weight, b, labels = make(n=n, bias=bias, ignore=ignore)
    got = hfx.linear_cross_entropy(hidden, weight, labels, b, **kwargs, **(chunks or {}))
    want = dense(hidden, weight, labels, b, **kwargs)
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-9)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    cot = torch.randn_like(want) if want.dim() else torch.tensor(1.7, dtype=want.dtype)
    g_got = torch.autograd.grad(got, inputs, cot)
    g_want = torch.autograd.grad(want, inputs, cot)
    for name, a, c in zip(("hidden", "weight", "bias"), g_got, g_want):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, atol=atol, rtol=1e-9, msg=name)


OPTIONS = list(
    itertools.product(
        ["mean", "sum", "none"], [False, True], [None, 2.5], [0.0, 0.15], [0.0, 1e-2], [False, True], [False, True]
    )
)


@pytest.mark.parametrize(("reduction", "shift", "softcap", "label_smoothing", "z_loss", "bias", "ignore"), OPTIONS)
def test_matches_dense_float64(reduction, shift, softcap, label_smoothing, z_loss, bias, ignore):
    kwargs = dict(reduction=reduction, shift=shift, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss)
    # tiles that split both tokens and the vocabulary, with ragged last tiles
    check(kwargs, bias=bias, ignore=ignore, chunks=dict(token_chunk=4, vocab_chunk=5))


@pytest.mark.parametrize(
    "chunks", [None, dict(token_chunk=1, vocab_chunk=1), dict(token_chunk=100, vocab_chunk=7), dict(chunk_bytes=1024)]
)
def test_chunkings_agree(chunks):
    check(dict(softcap=3.0, label_smoothing=0.1, z_loss=1e-3, shift=True), chunks=chunks)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_temperature_and_num_items_in_batch(reduction):
    check(dict(reduction=reduction, temperature=0.7, num_items_in_batch=9))
    check(dict(reduction=reduction, num_items_in_batch=torch.tensor(31)))


def test_2d_inputs_and_no_valid_tokens():
    check(dict(), n=(17,))
    hidden, weight, b, labels = make(n=(2, 3))
    labels[:] = IGNORE
    loss = hfx.linear_cross_entropy(hidden, weight, labels, b)
    assert torch.isnan(loss)  # like F.cross_entropy's mean over nothing
    total = hfx.linear_cross_entropy(hidden, weight, labels, b, reduction="sum")
    assert total.item() == 0
    total.backward()  # still connected to the graph
    assert hidden.grad is not None and not hidden.grad.any()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_other_integer_label_dtypes_are_class_indices(dtype):
    """uint8 labels used to be read as a boolean mask (an IndexError about "the shape of the mask"), int16 ones
    failed as a bare IndexError."""
    hidden, weight, b, labels = make(n=(2, 5))
    labels = labels.clamp_min(0)  # no ignore_index: uint8 cannot hold -100
    want = hfx.linear_cross_entropy(hidden, weight, labels, b)
    torch.testing.assert_close(hfx.linear_cross_entropy(hidden, weight, labels.to(dtype), b), want, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch_linear_cross_entropy(reduction, label_smoothing, bias):
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch has no F.linear_cross_entropy (added in torch 2.13)")
    hidden, weight, b, labels = make(bias=bias)
    h2, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    got = hfx.linear_cross_entropy(h2, weight, y, b, reduction=reduction, label_smoothing=label_smoothing)
    want = F.linear_cross_entropy(
        h2, weight, y, linear_bias=b, reduction=reduction, ignore_index=IGNORE, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    for a, c in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(dtype):
    hidden, weight, b, labels = make(n=(4, 16), h=32, v=300, dtype=dtype)
    loss = hfx.linear_cross_entropy(hidden, weight, labels, b, softcap=10.0, vocab_chunk=64, token_chunk=16)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert [g.dtype for g in grads] == [dtype] * 3
    ref = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    want = dense(ref[0], ref[1], labels, ref[2], softcap=10.0)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(want, ref)):
        torch.testing.assert_close(g.double(), r, atol=2e-3, rtol=2e-2)


def test_autocast_does_not_change_the_arithmetic():
    """Under bfloat16 autocast the forward's tile GEMMs ran in bfloat16 and the rest in float32: lse then came from
    other logits than the backward's softmax, and the bias gradient (Σ softmax − onehot = 0 per token) was 1e-2
    off. The reference computes in its compute dtype under autocast too: the same loss and gradients as without."""
    hidden, weight, b, labels = make(n=(4, 16), h=64, v=500, dtype=torch.float32, ignore=False)
    with torch.no_grad():
        hidden.mul_(4.0)
    plain = hfx.linear_cross_entropy(hidden, weight, labels, b, impl="reference")
    want = torch.autograd.grad(plain, (hidden, weight, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hfx.linear_cross_entropy(hidden, weight, labels, b, impl="reference")
    got = torch.autograd.grad(loss, (hidden, weight, b))
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert abs(float(got[2].sum())) < 1e-5


def test_frozen_weight_gets_no_gradient_work():
    hidden, weight, b, labels = make()
    weight.requires_grad_(False)
    b.requires_grad_(False)
    loss = hfx.linear_cross_entropy(hidden, weight, labels, b)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None and b.grad is None
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(dense(hidden, weight, labels, b), hidden)[0])


# ------------------------------------------------------------------------------------------------------------------
# log-probabilities


@pytest.mark.parametrize(
    ("shift", "softcap", "temperature", "bias"),
    list(itertools.product([False, True], [None, 2.0], [1.0, 0.6], [False, True])),
)
def test_log_probs_match_dense(shift, softcap, temperature, bias):
    hidden, weight, b, labels = make(bias=bias)
    got = hfx.linear_log_probs(
        hidden, weight, labels, b, shift=shift, softcap=softcap, temperature=temperature, token_chunk=5, vocab_chunk=6
    )
    want = -dense(hidden, weight, labels, b, reduction="none", shift=shift, softcap=softcap, temperature=temperature)
    assert got.shape == labels.shape
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    cot = torch.randn_like(want)
    for a, c in zip(torch.autograd.grad(got, inputs, cot), torch.autograd.grad(want, inputs, cot)):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# memory: the N×V logits never exist


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fn", ["loss", "log_probs"])
def test_logits_never_materialised(fn):
    n, h, v = 512, 16, 8192  # N·V = 4M elements dominate everything else (N·H = 8k, V·H = 128k)
    hidden, weight, b, labels = make(n=(n,), h=h, v=v, dtype=torch.float32)
    budget = 3 * 4 * 64 * 1024  # three fp32 tiles of 64k elements
    plan = plan_chunks(n, v, h, chunk_bytes=budget)
    assert plan.token_chunk * plan.vocab_chunk <= 64 * 1024
    with LargestTensor() as mode:
        if fn == "loss":
            out = hfx.linear_cross_entropy(
                hidden, weight, labels, b, z_loss=1e-3, label_smoothing=0.1, chunk_bytes=budget
            )
        else:
            out = hfx.linear_log_probs(hidden, weight, labels, b, chunk_bytes=budget).sum()
        out.backward()
    assert mode.largest < n * v // 8, f"a tensor of {mode.largest} elements was created (N·V = {n * v})"
    assert mode.largest >= plan.token_chunk * plan.vocab_chunk  # the mode did see the tiles
    with LargestTensor() as mode:  # and the dense path does build N·V
        dense(hidden, weight, labels, b).backward()
    assert mode.largest >= n * v


def test_plan_from_budget():
    # whole vocabulary fits with many tokens: no vocabulary split
    p = plan_chunks(4096, 1000, 64, chunk_bytes=12 * 1000 * 128)
    assert (
        p == plan_chunks(4096, 1000, 64, chunk_bytes=12 * 1000 * 128)
        and p.vocab_chunk == 1000
        and p.token_chunk == 128
    )
    # a budget below 32 tokens × V splits the vocabulary
    p = plan_chunks(4096, 100_000, 64, chunk_bytes=12 * 32 * 1000)
    assert p.token_chunk >= 32 and p.vocab_chunk == 1000
    # half-precision weights bound the upcast weight block as well
    p = plan_chunks(4096, 100_000, 4096, dtype=torch.bfloat16, chunk_bytes=2**26)
    assert p.vocab_chunk * 4096 * 4 * 2 <= 2**26
    # larger budgets give larger tiles; never more tokens than there are
    assert plan_chunks(10, 50, 8, chunk_bytes=2**30).token_chunk == 10
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_chunks(10, 50, 8, chunk_bytes=0)


# ------------------------------------------------------------------------------------------------------------------
# errors


def test_clear_errors():
    hidden, weight, b, labels = make()
    with pytest.raises(ValueError, match="labels shape"):
        hfx.linear_cross_entropy(hidden, weight, labels[:, :-1], b)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        hfx.linear_cross_entropy(hidden, weight[:, :-1], labels, b)
    bad = labels.clone()
    bad[0, 3] = weight.shape[0]  # one past the vocabulary
    with pytest.raises(ValueError, match="out of range for a vocabulary of 23"):
        hfx.linear_cross_entropy(hidden, weight, bad, b)
    with pytest.raises(ValueError, match="out of range"):
        hfx.linear_cross_entropy(hidden, weight[:10], labels.clamp(max=15), b[:10])
    with pytest.raises(ValueError, match="bias shape"):
        hfx.linear_cross_entropy(hidden, weight, labels, b[:-1])
    with pytest.raises(ValueError, match="reduction='none'"):
        hfx.linear_cross_entropy(hidden, weight, labels, reduction="none", num_items_in_batch=4)
    with pytest.raises(ValueError, match="reduction must be"):
        hfx.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        hfx.linear_cross_entropy(hidden, weight, labels, softcap=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        hfx.linear_cross_entropy(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="probability targets"):
        hfx.linear_cross_entropy(hidden, weight, labels.double(), b)
    with pytest.raises(ValueError, match="impl must be"):
        hfx.linear_cross_entropy(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match=r"impl='reference' \(float64"):
        hfx.linear_cross_entropy(hidden, weight, labels, impl="triton")


def test_dispatch_falls_back_to_reference_on_cpu():
    """float32 CPU tensors, which the kernel could take under the interpreter: "auto" still picks the reference."""
    from hfx.kernels import cce

    assert cce.available_impls()[0] == "reference"
    hidden, weight, b, labels = make(dtype=torch.float32)
    assert cce._select("auto", hidden, weight, {}) is cce.reference
    torch.testing.assert_close(
        hfx.linear_cross_entropy(hidden, weight, labels, b, impl="auto"),
        hfx.linear_cross_entropy(hidden, weight, labels, b, impl="reference"),
    )


@pytest.mark.parametrize("k", [2, 3, 7, 9])
def test_integer_shift_scores_position_t_against_label_t_plus_k(k):
    """cut_cross_entropy's integer shift; shift=2 used to act as shift=True (label t+1) silently."""
    hidden, weight, b, labels = make(ignore=False)
    got = hfx.linear_cross_entropy(hidden, weight, labels, b, shift=k, reduction="sum")
    logits = hidden @ weight.T + b
    if k >= labels.shape[-1]:
        want = torch.zeros((), dtype=torch.float64)
    else:
        want = F.cross_entropy(logits[:, :-k].reshape(-1, weight.shape[0]), labels[:, k:].reshape(-1), reduction="sum")
    torch.testing.assert_close(got, want)
    lp = hfx.linear_log_probs(hidden, weight, labels, b, shift=k)
    assert (lp[:, max(0, labels.shape[-1] - k) :] == 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shift": -1}, "shift must be a bool"),
        ({"shift": 1.5}, "shift must be a bool"),
        ({"softcap": float("inf")}, "softcap must be a positive finite"),
        ({"z_loss": float("nan")}, "z_loss must be a finite"),
        ({"temperature": float("inf")}, "temperature must be a finite"),
        ({"filter_eps": 5.0}, "filter_eps must be None, 'auto' or a float in"),  # kernel-only, refused on CPU too
        ({"filter_eps": "high"}, "filter_eps must be None, 'auto' or a float in"),
    ],
)
def test_bad_option_values_are_refused_on_every_device(kwargs, message):
    hidden, weight, b, labels = make()
    with pytest.raises(ValueError, match=message):
        hfx.linear_cross_entropy(hidden, weight, labels, b, **kwargs)
