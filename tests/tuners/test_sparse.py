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
        (64, 64, 10, 4, 2, True),  # entries sharing rows: 2 distinct rows, padded to a 14 x 14 block
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


def test_compact_path_compiles_into_one_graph():
    """The compact block's rows/columns have a length known from shapes alone (nonzero_static), so torch.compile
    keeps a DSEE-like delta in one graph (fullgraph=True) and the GPU never waits on a nonzero per layer and step:
    with nonzero, each adapted layer broke the graph (24 graphs for a tiny Llama with DSEE)."""
    idx, f_idx, v, fv = random_delta(64, 48, 6, 2)
    v = v.float().requires_grad_(True)
    x = torch.randn(3, 48, requires_grad=True)

    def f(a, b):
        return sparse_delta_linear(a, b, idx, (64, 48), (f_idx, fv.float()))

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y, y_ref = compiled(x, v), f(x, v)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    grads = torch.autograd.grad(y.square().sum(), (x, v))
    refs = torch.autograd.grad(y_ref.square().sum(), (x, v))
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


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
        self.flops: list[int] = []  # multiply-adds of each

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.OPS:
            mats = [a for a in args if isinstance(a, torch.Tensor)]
            self.seen.append(tuple(a.dtype for a in mats))
            self.flops.append(out.numel() * mats[-1].shape[-2])  # output entries x reduction length
        return out


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


GPU = "cuda"  # the device of the GPU test below (a CPU run of its logic sets "cpu")


def _bf16_cuda_copy(model: nn.Module) -> nn.Module:
    """``model`` on CUDA as a bf16 model with PEFT's fp32 adapters: frozen weights bf16, trainable ones and floating
    buffers fp32, index buffers and masks as they are."""
    import copy

    gpu = copy.deepcopy(model).to(GPU)
    with torch.no_grad():
        for p in gpu.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
        for mod in gpu.modules():
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    setattr(mod, name, buf.float())
    return gpu


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lift", "sara", "dsee", "dsee-pruned", "bat"])
def test_gpu_bf16_layer_runs_bf16_gemms_and_matches_float64(method):
    """On CUDA in bf16: every layer-sized GEMM of the sparse / masked / BAT terms runs in bf16 (tensor cores), and
    forward and gradients stay within bf16 rounding of a float64 CPU model with the same (bf16-rounded) weights."""
    from hfx.dsee import prune

    torch.manual_seed(0)
    cfg = {
        "lift": hfx.LiftConfig(r=8, target_modules=["lin"]),
        "sara": hfx.SaraConfig(ratio=0.05, target_modules=["lin"]),
        "dsee": hfx.DseeConfig(r=8, target_modules=["lin"]),
        "dsee-pruned": hfx.DseeConfig(r=8, target_modules=["lin"]),
        "bat": hfx.BoneConfig(r=16, init_weights="bat", target_modules=["lin"]),
    }[method]
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(512, 256))
    with torch.no_grad():  # the reference gets the weights the bf16 model will hold
        base.lin.weight.copy_(base.lin.weight.bfloat16().float())
        base.lin.bias.copy_(base.lin.bias.bfloat16().float())
    ref = get_peft_model(base.double(), cfg)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.copy_((0.02 * torch.randn(p.shape, dtype=torch.float64)).float().double())
    if method == "dsee-pruned":
        prune(ref, ratio=0.3)
    gpu = _bf16_cuda_copy(ref)
    x = torch.randn(4, 64, 512).bfloat16()
    x_gpu = x.to(GPU, copy=True).requires_grad_(True)
    mode = _MatmulDtypes()
    with mode:
        y = gpu(x_gpu)
        y.float().square().sum().backward()
    layer_flops = 4 * 64 * 512 * 256  # tokens x in x out
    big_fp32 = [(d, f) for d, f in zip(mode.seen, mode.flops) if f >= layer_flops // 4 and torch.float32 in d]
    assert y.dtype == torch.bfloat16 and not big_fp32, big_fp32  # small fp32 GEMMs (LoRA's A/B, BAT's dW) are fine
    assert any(f >= layer_flops // 4 and set(d) == {torch.bfloat16} for d, f in zip(mode.seen, mode.flops))
    x_ref = x.detach().double().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.square().sum().backward()
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.double().cpu(), y_ref.detach(), rtol=0, atol=2e-2 * scale)
    torch.testing.assert_close(
        x_gpu.grad.double().cpu(), x_ref.grad, rtol=0, atol=3e-2 * x_ref.grad.abs().max().item()
    )
    for (n, p), (_, q) in zip(gpu.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert p.grad.dtype == torch.float32, n
            torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=0, atol=3e-2 * q.grad.abs().max().item())


class _Two(nn.Module):
    """One linear layer of a chosen shape, named ``proj``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.proj(x)


FLAT_INDEX_TUNERS = {
    "sara": (lambda: hfx.SaraConfig(ratio=0.2, target_modules=["proj"]), "sara_shape"),
    "lift": (lambda: hfx.LiftConfig(r=2, target_modules=["proj"]), "lift_shape"),
}


@pytest.mark.parametrize("method", sorted(FLAT_INDEX_TUNERS))
@pytest.mark.parametrize(
    "other", [(64, 64), (16, 32)]
)  # (in, out): larger; transposed (LIFT's k = (m + n) r is the same)
def test_flat_index_adapter_refuses_a_base_of_another_shape(method, other, tmp_path):
    """Flat indices carry no shape: a SaRA adapter of a 16x32 layer used to load into a 64x64 one and train other
    entries, and a LIFT adapter loaded into the transposed layer (same k, same numel) without a word."""
    from peft import PeftModel

    make, key = FLAT_INDEX_TUNERS[method]
    get_peft_model(_Two(32, 16), make()).save_pretrained(tmp_path / "a")
    with pytest.raises(RuntimeError, match=rf"{key}.*saved for a weight of shape \(16, 32\).*here has \({other[1]}, "):
        PeftModel.from_pretrained(_Two(*other), tmp_path / "a")


@pytest.mark.parametrize("method", sorted(FLAT_INDEX_TUNERS))
def test_flat_index_adapter_without_a_saved_shape_still_loads(method, tmp_path, recwarn):
    """Adapters saved before hfx stored the shape load as before, with no missing-key warning; the shape is saved
    as a plain int64 pair, and low_cpu_mem_usage (meta-device build) loads it too."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    make, key = FLAT_INDEX_TUNERS[method]
    model = get_peft_model(_Two(32, 16), make())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "a")
    x = torch.randn(3, 32)
    expected = model(x)
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    (shape_key,) = [k for k in state if key in k]
    assert state[shape_key].tolist() == [16, 32] and state[shape_key].dtype == torch.int64
    for low_cpu in (False, True):
        loaded = PeftModel.from_pretrained(_Two(32, 16), tmp_path / "a", low_cpu_mem_usage=low_cpu)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    del state[shape_key]
    save_file(state, tmp_path / "a" / "adapter_model.safetensors")
    recwarn.clear()
    old = PeftModel.from_pretrained(_Two(32, 16), tmp_path / "a")
    torch.testing.assert_close(old(x), expected, rtol=0, atol=0)
    assert not [w for w in recwarn if "missing" in str(w.message).lower()]


@pytest.mark.parametrize(
    "config, key",
    [
        (hfx.LiftConfig(r=2, target_modules=["lin"]), "lift_indices"),
        (hfx.SaraConfig(ratio=0.05, target_modules=["lin"]), "sara_indices"),
        (hfx.DseeConfig(r=2, target_modules=["lin"]), "dsee_s_indices"),
        (hfx.PacaConfig(r=4, target_modules=["lin"]), "paca_indices"),
    ],
    ids=["lift", "sara", "dsee", "paca"],
)
def test_loaded_indices_that_do_not_fit_the_weight_are_a_load_error(config, key, tmp_path):
    """A damaged or edited adapter file used to load, then fail in the first forward with a bare IndexError (a
    device-side assert on a GPU); a negative DSEE index went to the weight's last entry, silently."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    def base():
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("lin", nn.Linear(16, 12))
        return model

    get_peft_model(base(), config).save_pretrained(tmp_path / "good")
    state = load_file(tmp_path / "good" / "adapter_model.safetensors")
    name = next(k for k in state if key in k)
    size = 16 if key == "paca_indices" else 12 * 16
    good = state[name]
    cases = {
        "out of range": (torch.cat([good[:-1], good.new_tensor([size])]), rf"indices from \d+ to {size}, outside"),
        "negative": (torch.cat([good.new_tensor([-1]), good[1:]]), r"indices from -1 to"),
        "unsorted": (good.flip(0).contiguous(), "not sorted and unique"),
        "length": (good[:-1].contiguous(), rf"{good.numel() - 1} indices for {good.numel()} values"),
    }
    if key == "paca_indices":  # a fixed-size buffer: torch's own size-mismatch load error says it already
        del cases["length"]
    for case, (indices, match) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        (folder / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
        save_file({**state, name: indices}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(RuntimeError, match=rf"layer 'lin'.*, adapter 'default': .*{key}.default and .*" + match):
            PeftModel.from_pretrained(base(), str(folder))
    PeftModel.from_pretrained(base(), str(tmp_path / "good"))  # the file as saved loads
    # a good file under a config of another size is torch's size mismatch, not "damaged" (the file's own pairs fit)
    if key == "sara_indices":  # SaRA's values take the file's length: the saved selection wins, by design
        return
    other = {"lift_indices": dict(r=3), "dsee_s_indices": dict(num_sparse=20), "paca_indices": dict(r=5)}[key]
    model = get_peft_model(base(), type(config)(**{**config.to_dict(), **other, "peft_type": config.peft_type}))
    with pytest.raises(RuntimeError, match="size mismatch") as err:
        model.load_adapter(str(tmp_path / "good"), adapter_name="default")
    assert "damaged" not in str(err.value)
