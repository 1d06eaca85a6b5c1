"""The shared sparse weight delta (hfx/tuners/_sparse.py) used by LIFT, DSEE and SaRA: both of its paths against a
dense float64 reference, and what it keeps for backward."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hfx
from hfx.testing import saved_activation_bytes
from hfx.tuners._sparse import _Plan, sparse_delta_linear

TORCH64 = torch.float64


def random_delta(m: int, n: int, nnz: int, n_frozen: int, seed: int = 0, rows: int | None = None):
    """Sorted int32 flat indices (``nnz`` trainable, ``n_frozen`` frozen, disjoint), float64 values; when ``rows`` is
    given, every entry lies in the first ``rows`` rows (so that entries share rows)."""
    gen = torch.Generator().manual_seed(seed)
    pool = (rows or m) * n
    perm = torch.randperm(pool, generator=gen)
    idx = perm[:nnz].sort().values.int()
    f_idx = perm[nnz : nnz + n_frozen].sort().values.int()
    values = torch.randn(nnz + n_frozen, generator=gen, dtype=TORCH64)
    return idx, f_idx, values[:nnz].clone(), values[nnz:].clone()


def dense(m: int, n: int, idx, values, f_idx, f_values) -> torch.Tensor:
    d = torch.zeros(m * n, dtype=TORCH64)
    d[idx.long()] += values
    d[f_idx.long()] += f_values
    return d.view(m, n)


@pytest.mark.parametrize(
    "m, n, nnz, n_frozen, rows, compact",
    [
        (40, 48, 6, 0, None, True),  # DSEE's residual: a few entries
        (40, 48, 6, 5, None, True),  # with frozen entries (LIFT's past deltas, SaRA's frozen set)
        (64, 64, 10, 4, 2, True),  # entries sharing rows: a 2 x <=14 block
        (40, 48, 30, 0, None, False),  # 30**2 > 40 * 48 / 8: the full-size D
        (6, 5, 8, 4, None, False),  # dense enough for the full-size D
        (64, 64, 400, 100, None, False),
    ],
)
def test_forward_and_gradients_match_dense_float64(m, n, nnz, n_frozen, rows, compact):
    idx, f_idx, v, fv = random_delta(m, n, nnz, n_frozen, rows=rows)
    assert (_Plan(idx, f_idx, (m, n)).rows is not None) == compact
    x = torch.randn(2, 3, n, dtype=TORCH64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    v.requires_grad_(True)
    y = sparse_delta_linear(x, v, idx, (m, n), (f_idx, fv))
    x_ref, v_ref = x.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    y_ref = x_ref @ dense(m, n, idx, v_ref, f_idx, fv).t()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: sparse_delta_linear(a, b, idx, (m, n), (f_idx, fv)), (x, v))


def test_compact_path_builds_only_the_touched_block(monkeypatch):
    """64 entries in a 512 x 512 layer: D is never built full size (that was 3 full-size GEMMs for 64 entries)."""
    import hfx.tuners._sparse as sparse

    shapes = []
    real = sparse.scatter_dense
    monkeypatch.setattr(sparse, "scatter_dense", lambda shape, *a, **k: shapes.append(shape) or real(shape, *a, **k))
    idx, f_idx, v, fv = random_delta(512, 512, 64, 0)
    x = torch.randn(4, 512, dtype=TORCH64, requires_grad=True)
    sparse_delta_linear(x, v.requires_grad_(True), idx, (512, 512), (f_idx, fv)).sum().backward()
    assert len(shapes) == 2 and all(r <= 64 and c <= 64 for r, c in shapes), shapes


def test_empty_delta():
    x = torch.randn(3, 7, dtype=TORCH64, requires_grad=True)
    v = torch.zeros(0, dtype=TORCH64, requires_grad=True)
    y = sparse_delta_linear(x, v, torch.zeros(0, dtype=torch.int32), (5, 7))
    assert y.shape == (3, 5) and not y.any()
    y.sum().backward()
    assert not x.grad.any() and v.grad.shape == (0,)


@pytest.mark.parametrize(
    "config",
    [
        hfx.LiftConfig(r=2, target_modules=["lin"]),
        hfx.SaraConfig(ratio=0.05, target_modules=["lin"]),
        hfx.DseeConfig(r=2, target_modules=["lin"]),
    ],
    ids=["lift", "sara", "dsee"],
)
def test_bf16_layer_keeps_no_fp32_copy_of_its_input(config):
    """The fp32 values of a bf16 layer: the sparse term saves the bf16 input the base layer saves too, instead of an
    fp32 copy (2x the input's bytes per layer). DSEE's LoRA part, like PEFT's LoRA, still saves an fp32 x for its A."""
    torch.manual_seed(0)
    frozen = nn.Sequential()
    frozen.add_module("lin", nn.Linear(64, 64))
    frozen = frozen.to(torch.bfloat16)
    model = get_peft_model(frozen, config)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    total = saved_activation_bytes(model, x, distinct=True)  # the base layer and the sparse term share x
    x_bytes = x.numel() * x.element_size()
    lora_extra = 8 * 64 * 4 + 8 * 2 * 4 if isinstance(config, hfx.DseeConfig) else 0  # fp32 x for A, A·x for B
    assert total <= x_bytes + lora_extra, (total, x_bytes)


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtypes of every matrix multiply run under it (forward and autograd's backward)."""

    OPS = {"mm", "addmm", "bmm", "matmul", "baddbmm"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "x_dtype, autocast, expected",
    [
        (torch.bfloat16, False, torch.bfloat16),  # a bf16 model, fp32 values: bf16 GEMMs (fp32 would be ~15x slower)
        (torch.float16, False, torch.float16),
        (torch.float32, True, torch.bfloat16),  # autocast: bf16 in forward and, kept on ctx, in backward too
        (torch.float32, False, torch.float32),
    ],
)
def test_gemms_run_in_the_model_or_autocast_dtype(x_dtype, autocast, expected):
    m, n = 48, 40
    idx, f_idx, v, fv = random_delta(m, n, 200, 20)  # full-size D
    v32, fv32 = v.float().requires_grad_(True), fv.float()
    x = torch.randn(6, n, generator=torch.Generator().manual_seed(2)).to(x_dtype).requires_grad_(True)
    mode = _MatmulDtypes()
    with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = sparse_delta_linear(x, v32, idx, (m, n), (f_idx, fv32))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    with mode:
        y.backward(g)
    assert len(mode.seen) == 3 and all(set(d) == {expected} for d in mode.seen), mode.seen
    assert y.dtype == expected and x.grad.dtype == x_dtype and v32.grad.dtype == torch.float32
    # against the float64 reference, within the compute dtype's rounding
    ref_x, ref_v = x.detach().double().requires_grad_(True), v.clone().requires_grad_(True)
    ref = ref_x @ dense(m, n, idx, ref_v, f_idx, fv).t()
    ref.backward(g.double())
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-5}[expected]
    for got, want in ((y, ref), (x.grad, ref_x.grad), (v32.grad, ref_v.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale)
