"""The generic tuner matrix every hfx tuner passes: the ground of PEFT's ``TestPeftCustomModel``.

Save/load, config round trip, merge (plain, safe, idempotent, several adapters), merge_and_unload, unload,
disable, multiple adapters, set/delete adapter, fp16/bf16 forward, only-adapter-params-updated. A new tuner adds
one line to ``CASES`` (config class + kwargs giving a non-identity adapter).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import hfx
from hfx.tuners.lift import refresh_lift_masks

# (config class, kwargs with a random non-zero init, kwargs with the default init)
CASES = [
    pytest.param(hfx.BoneConfig, {"r": 4, "init_weights": False}, {"r": 4}, id="bone"),
    pytest.param(hfx.BoneConfig, {"r": 5, "init_weights": False}, {"r": 5}, id="bone-partial-block"),
    pytest.param(hfx.BoneConfig, {"r": 4, "init_weights": "bat"}, {"r": 4, "init_weights": "bat"}, id="bat"),
    pytest.param(hfx.LiftConfig, {"r": 1, "filter_rank": 4}, {"r": 1, "filter_rank": 4}, id="lift"),
    pytest.param(hfx.DseeConfig, {"r": 2, "num_sparse": 8}, {"r": 2, "num_sparse": 8}, id="dsee"),
    pytest.param(
        hfx.PacaConfig, {"r": 6, "paca_alpha": 12, "init_weights": False}, {"r": 6, "paca_alpha": 12}, id="paca"
    ),
    pytest.param(hfx.SaraConfig, {"ratio": 0.25}, {"ratio": 0.25}, id="sara"),
]
TARGETS = ["lin0", "lin1", "lin2"]


class MLP(nn.Module):
    """Small model with linear layers whose sizes are multiples of 4 (so BAT fits) plus a non-target layer."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32, bias=bias)
        self.lin1 = nn.Linear(32, 24, bias=bias)
        self.lin2 = nn.Linear(24, 8, bias=bias)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin2(torch.tanh(self.lin1(torch.relu(self.lin0(x))))))


def make_base(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def randomise(model: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Add small random values to an adapter's trainable parameters (many tuners start as the identity; a zero
    adapter proves nothing). Index buffers and other non-trainable adapter state are left as they are."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_config[adapter].peft_type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}" in name and prefix in name and p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def make_peft(cfg_cls, kwargs, seed: int = 0, adapter: str = "default"):
    model = get_peft_model(make_base(seed), cfg_cls(target_modules=TARGETS, **kwargs), adapter_name=adapter)
    randomise(model, adapter, seed=seed + 1)
    return model.eval()


X = torch.randn(6, 16, generator=torch.Generator().manual_seed(123))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg_cls,kw,default_kw", CASES)
class TestTunerMatrix:
    def test_default_init_is_identity(self, cfg_cls, kw, default_kw):
        base = make_base()
        y0 = base(X)
        model = get_peft_model(copy.deepcopy(base), cfg_cls(target_modules=TARGETS, **default_kw))
        torch.testing.assert_close(model(X), y0, rtol=0, atol=0)

    def test_adapter_changes_output(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        with model.disable_adapter():
            y_base = model(X)
        assert not torch.allclose(model(X), y_base, atol=1e-4)

    def test_merge_layers(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        base_weights = _weights(model.get_base_model())
        y = model(X)
        model.merge_adapter()
        assert all(m.merged for m in model.modules() if isinstance(m, BaseTunerLayer))
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
        for n, w in _weights(model.get_base_model()).items():
            torch.testing.assert_close(w, base_weights[n], atol=1e-5, rtol=1e-5)

    def test_add_adapter_while_merged(self, cfg_cls, kw, default_kw):
        """LIFT, SaRA and DSEE select a new adapter's entries on the base weight: while another adapter was merged,
        that weight held its update too, and the selection silently depended on it. It is now the selection of the
        unmerged layer (as PEFT LoRA's init does not depend on what is merged either)."""
        model = make_peft(cfg_cls, kw)
        plain = make_peft(cfg_cls, kw)
        y = model(X).detach()
        model.merge_adapter()
        model.add_adapter("b", cfg_cls(target_modules=TARGETS, **kw))
        plain.add_adapter("b", cfg_cls(target_modules=TARGETS, **kw))
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
        got, want = (
            get_peft_model_state_dict(model, adapter_name="b"),
            get_peft_model_state_dict(plain, adapter_name="b"),
        )
        assert got.keys() == want.keys()
        for key in got:  # the same entries selected (and, for Bone/PaCA/BAT, the same seeded init)
            if not got[key].is_floating_point():
                assert torch.equal(got[key], want[key]), key

    def test_load_adapter_while_merged(self, cfg_cls, kw, default_kw, tmp_path):
        """Merge one adapter, load another to switch to (an inference pattern): a refusal of adds while merged broke
        this; the loaded adapter's saved entries and values give its saved output."""
        model = make_peft(cfg_cls, kw)
        model.add_adapter("b", cfg_cls(target_modules=TARGETS, **kw))
        randomise(model, "b", seed=5)
        model.set_adapter("b")
        want = model(X).detach()
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(make_base(), tmp_path).eval()
        loaded.merge_adapter()
        loaded.load_adapter(tmp_path / "b", "b")
        loaded.unmerge_adapter()
        loaded.set_adapter("b")
        torch.testing.assert_close(loaded(X), want, atol=1e-6, rtol=1e-6)

    def test_merge_under_inference_mode_then_train(self, cfg_cls, kw, default_kw):
        """A merged pass under ``torch.inference_mode()`` (a fast eval or generate) used to rebind Bone, BAT, LIFT and
        DSEE base weights to inference tensors: the next training backward failed ("Inference tensors cannot be
        saved for backward")."""
        model = make_peft(cfg_cls, kw)
        y = model(X).detach()
        with torch.inference_mode():
            model.merge_adapter()
            torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
            model.unmerge_adapter()
        assert not any(p.is_inference() for p in model.parameters())
        model.train()
        model(X).pow(2).sum().backward()
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.eval()
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)

    def test_non_contiguous_base_weight(self, cfg_cls, kw, default_kw):
        """A base weight stored column-major (e.g. a transposed checkpoint tensor): LIFT and SaRA failed in
        ``.view(-1)`` when selecting, merging and refreshing."""
        base = make_base()
        with torch.no_grad():
            for lin in (base.lin0, base.lin1):
                lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())
        assert not base.lin1.weight.is_contiguous()
        ref_base = make_base()
        torch.manual_seed(1)  # the same random init (DSEE's A) for both
        ref = get_peft_model(ref_base, cfg_cls(target_modules=TARGETS, **default_kw))
        torch.manual_seed(1)
        model = get_peft_model(base, cfg_cls(target_modules=TARGETS, **default_kw))
        randomise(ref), randomise(model)  # the same non-zero adapter
        y = model(X)
        # the same selection (indices, masks) as a contiguous base, exactly; the same output up to the rounding of a
        # matmul over the other memory layout (BLAS sums in another order there, with 2 threads on some CPUs)
        got, want = get_peft_model_state_dict(model), get_peft_model_state_dict(ref)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        torch.testing.assert_close(y, ref(X), rtol=1e-6, atol=1e-6)
        base_weights = _weights(model.get_base_model())
        model.merge_adapter()
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        for n, w in _weights(model.get_base_model()).items():
            torch.testing.assert_close(w, base_weights[n], atol=1e-6, rtol=1e-6)
        if cfg_cls is hfx.LiftConfig:
            refresh_lift_masks(model)
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)

    def test_safe_merge(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        y = model(X)
        model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(model(X), y, atol=1e-5, rtol=1e-5)

    def test_safe_merge_refuses_non_finite(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lin1" in n and p.requires_grad).fill_(float("inf"))
        with pytest.raises(ValueError, match="non-finite"):
            model.merge_adapter(safe_merge=True)

    def test_merge_is_idempotent(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        model.merge_adapter()
        merged = _weights(model.get_base_model())
        with pytest.warns(UserWarning, match="[Aa]lready merged"):
            model.merge_adapter()
        for n, w in _weights(model.get_base_model()).items():
            torch.testing.assert_close(w, merged[n], rtol=0, atol=0)

    def test_merge_several_adapters(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        model.add_adapter("other", cfg_cls(target_modules=TARGETS, **kw))
        randomise(model, "other", seed=7)
        model.base_model.set_adapter(["default", "other"])
        y_both = model(X)
        model.set_adapter("default")
        assert not torch.allclose(model(X), y_both, atol=1e-4)
        model.base_model.set_adapter(["default", "other"])
        model.merge_adapter(["default", "other"])
        torch.testing.assert_close(model(X), y_both, atol=1e-5, rtol=1e-5)

    def test_merge_and_unload(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        y = model(X)
        merged = model.merge_and_unload()
        assert isinstance(merged, MLP)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        torch.testing.assert_close(merged(X), y, atol=1e-5, rtol=1e-5)

    def test_unload(self, cfg_cls, kw, default_kw):
        y_base = make_base()(X)
        model = make_peft(cfg_cls, kw)
        plain = model.unload()
        assert isinstance(plain, MLP)
        torch.testing.assert_close(plain(X), y_base, rtol=0, atol=0)

    def test_disable_adapter(self, cfg_cls, kw, default_kw):
        y_base = make_base()(X)
        model = make_peft(cfg_cls, kw)
        y = model(X)
        with model.disable_adapter():
            torch.testing.assert_close(model(X), y_base, rtol=0, atol=0)
        torch.testing.assert_close(model(X), y, rtol=0, atol=0)
        # disabling a merged adapter unmerges it first
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(X), y_base, atol=1e-5, rtol=1e-5)

    def test_save_and_load(self, cfg_cls, kw, default_kw, tmp_path):
        model = make_peft(cfg_cls, kw)
        y = model(X)
        model.save_pretrained(tmp_path)
        assert (tmp_path / "adapter_model.safetensors").exists()
        assert not (tmp_path / "adapter_model.bin").exists()
        loaded = PeftModel.from_pretrained(make_base(), tmp_path).eval()
        torch.testing.assert_close(loaded(X), y, rtol=0, atol=0)
        # the saved file holds exactly the adapter parameters, nothing of the base model
        from safetensors.torch import load_file

        keys = set(load_file(tmp_path / "adapter_model.safetensors"))
        prefix = hfx_key_prefix(cfg_cls)
        n_trainable = sum(1 for _, p in model.named_parameters() if p.requires_grad)
        # persistent adapter state (index buffers, ...) is saved too, under the tuner's prefix
        params = {n for n, _ in model.named_parameters()}
        n_buffers = sum(1 for k in model.state_dict() if prefix in k and ".default" in k and k not in params)
        assert len(keys) == n_trainable + n_buffers and all(prefix in k for k in keys)

    def test_save_selected_adapters_and_load_multiple(self, cfg_cls, kw, default_kw, tmp_path):
        model = make_peft(cfg_cls, kw)
        model.add_adapter("other", cfg_cls(target_modules=TARGETS, **kw))
        randomise(model, "other", seed=7)
        y_default = model(X)
        model.set_adapter("other")
        y_other = model(X)
        model.save_pretrained(tmp_path)  # writes default at the root, "other" in a sub-folder
        assert (tmp_path / "other" / "adapter_model.safetensors").exists()
        loaded = PeftModel.from_pretrained(make_base(), tmp_path).eval()
        loaded.load_adapter(tmp_path / "other", adapter_name="other")
        torch.testing.assert_close(loaded(X), y_default, rtol=0, atol=0)
        loaded.set_adapter("other")
        torch.testing.assert_close(loaded(X), y_other, rtol=0, atol=0)

    def test_config_round_trip(self, cfg_cls, kw, default_kw, tmp_path):
        cfg = cfg_cls(target_modules=TARGETS, **kw)
        cfg.save_pretrained(tmp_path)
        loaded = PeftConfig.from_pretrained(tmp_path)
        assert type(loaded) is cfg_cls
        assert loaded.to_dict() == cfg.to_dict()

    def test_set_and_delete_adapter(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        model.add_adapter("other", cfg_cls(target_modules=TARGETS, **kw))
        randomise(model, "other", seed=7)
        # a freshly added adapter is not trainable until it is activated
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
        model.set_adapter("other")
        y_other = model(X)
        assert all(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)
        model.delete_adapter("default")
        assert model.active_adapters == ["other"]
        assert not any(".default" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(X), y_other, rtol=0, atol=0)

    def test_delete_inactive_adapter(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        y = model(X)
        model.add_adapter("other", cfg_cls(target_modules=TARGETS, **kw))
        model.delete_adapter("other")
        assert not any(".other" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(X), y, rtol=0, atol=0)

    def test_only_adapter_params_updated(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw).train()
        before = _weights(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            loss = model(X).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        after = _weights(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(hfx_key_prefix(cfg_cls) in n for n in trainable)
        for n in before:
            changed = not torch.equal(before[n], after[n])
            assert changed == (n in trainable), n

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_forward(self, cfg_cls, kw, default_kw, dtype):
        ref = make_peft(cfg_cls, kw)
        y = ref(X)
        model = copy.deepcopy(ref).to(dtype)
        out = model(X.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), y, atol=5e-2, rtol=5e-2)
        # merging a half-precision adapter on CPU goes through float32 and stays close
        model.merge_adapter()
        torch.testing.assert_close(model(X.to(dtype)).float(), y, atol=5e-2, rtol=5e-2)

    def test_output_dtype_under_autocast_is_the_base_layers(self, cfg_cls, kw, default_kw):
        """Under autocast an adapted layer returns what its base layer returns (autocast's dtype), merged or not, as
        LoRA does. It returned the input's dtype: float32 unmerged, bfloat16 merged on an fp32 model, and an fp16
        model under bf16 autocast (Trainer(bf16=True) on a float16 model) failed in autocast's type promotion."""
        model = make_peft(cfg_cls, kw)
        layer = model.base_model.model.lin1
        x = torch.randn(6, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unmerged = layer(x)
            model.merge_adapter()
            merged = layer(x)
            model.unmerge_adapter()
        assert unmerged.dtype == merged.dtype == torch.bfloat16
        torch.testing.assert_close(unmerged.float(), merged.float(), atol=5e-2, rtol=5e-2)
        half = copy.deepcopy(model).half().train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.tanh(half.base_model.model.lin1(x.half()))
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        grads = [p.grad for p in half.base_model.model.lin1.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    def test_autocast_adapter_dtype(self, cfg_cls, kw, default_kw):
        # PEFT's default: adapters on a bf16 base are kept in float32
        base = make_base().to(torch.bfloat16)
        model = get_peft_model(base, cfg_cls(target_modules=TARGETS, **kw))
        dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
        assert dtypes == {torch.float32}
        assert model(X.to(torch.bfloat16)).dtype == torch.bfloat16
        # autocast_adapter_dtype=False: the adapter follows the base, as LoRA's does (PaCA kept float32), and the
        # model is still the base at init
        base = make_base().to(torch.bfloat16)
        y0 = base(X.to(torch.bfloat16))
        model = get_peft_model(base, cfg_cls(target_modules=TARGETS, **default_kw), autocast_adapter_dtype=False)
        dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
        assert dtypes == {torch.bfloat16}, dtypes
        torch.testing.assert_close(model(X.to(torch.bfloat16)), y0, rtol=0, atol=0)

    def test_load_with_low_cpu_mem_usage(self, cfg_cls, kw, default_kw, tmp_path):
        model = make_peft(cfg_cls, kw)
        y = model(X)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(make_base(), tmp_path, low_cpu_mem_usage=True).eval()
        assert not any(p.device.type == "meta" for p in loaded.parameters())
        torch.testing.assert_close(loaded(X), y, rtol=0, atol=0)

    def test_inject_adapter_in_model(self, cfg_cls, kw, default_kw):
        from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

        ref = make_peft(cfg_cls, kw)
        state = get_peft_model_state_dict(ref)
        plain = inject_adapter_in_model(cfg_cls(target_modules=TARGETS, **kw), make_base())
        set_peft_model_state_dict(plain, state)
        torch.testing.assert_close(plain(X), ref(X), rtol=0, atol=0)

    def test_inference_mode_load_is_frozen(self, cfg_cls, kw, default_kw, tmp_path):
        make_peft(cfg_cls, kw).save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(make_base(), tmp_path)
        assert not any(p.requires_grad for p in loaded.parameters())
        trainable = PeftModel.from_pretrained(make_base(), tmp_path, is_trainable=True)
        assert any(p.requires_grad for p in trainable.parameters())

    def test_mixed_adapter_batch(self, cfg_cls, kw, default_kw):
        # each row through its own adapter; "other" adapts only lin0/lin1, so lin2 is the base layer for its rows
        model = make_peft(cfg_cls, kw)
        model.add_adapter("other", cfg_cls(target_modules=TARGETS[:2], **kw))
        randomise(model, "other", seed=7)
        with model.disable_adapter():
            y_base = model(X)
        y_default = model(X)
        model.set_adapter("other")
        y_other = model(X)
        model.set_adapter("default")
        names = ["default", "other", "__base__", "other", "default", "__base__"]
        out = model(X, adapter_names=names)
        expected = {"default": y_default, "other": y_other, "__base__": y_base}
        for row, name in enumerate(names):
            torch.testing.assert_close(out[row], expected[name][row], rtol=0, atol=1e-6)
        assert model.active_adapters == ["default"]
        torch.testing.assert_close(model(X), y_default, rtol=0, atol=0)  # nothing left behind
        torch.testing.assert_close(model(X, adapter_names=["other"] * len(X)), y_other, rtol=0, atol=1e-6)

    def test_mixed_adapter_batch_errors(self, cfg_cls, kw, default_kw):
        model = make_peft(cfg_cls, kw)
        names = ["default", "__base__"] * 3
        with pytest.raises(ValueError, match="non-existing adapter.*typo"):
            model(X, adapter_names=["default", "typo"] * 3)
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            model(X, adapter_names=names[:4])
        with pytest.raises(TypeError, match="list of adapter names"):
            model(X, adapter_names="default")
        model.train()
        with pytest.raises(ValueError, match="training mode"):
            model(X, adapter_names=names)
        model.eval().merge_adapter()
        with pytest.raises(ValueError, match="merged adapters"):
            model(X, adapter_names=names)

    def test_save_as_lora(self, cfg_cls, kw, default_kw, tmp_path):
        # every hfx tuner is additive, so PEFT's converter writes a plain LoRA; at full energy it is the same model
        import peft  # convert_to_lora / save_as_lora exist in every supported PEFT (>= 0.20)

        model = make_peft(cfg_cls, kw)
        y = model(X)
        peft.save_as_lora(tmp_path, model, rank=1.0)
        lora = PeftModel.from_pretrained(make_base(), tmp_path).eval()
        assert lora.peft_config["default"].peft_type == peft.PeftType.LORA
        torch.testing.assert_close(lora(X), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg_cls,kw",
    [(hfx.BoneConfig, {"r": 4, "init_weights": False}), (hfx.PacaConfig, {"r": 6, "init_weights": False})],
)
def test_convert_to_lora_is_exact_at_rank_r(cfg_cls, kw):
    # Bone's dW is a tiled block and PaCA's lives on r columns: both have rank <= r, so a rank-r LoRA is exact
    import peft
    from peft import set_peft_model_state_dict

    model = make_peft(cfg_cls, kw)
    config, state = peft.convert_to_lora(model, rank=kw["r"])
    assert all(t.shape[0] == kw["r"] for k, t in state.items() if "lora_A" in k)
    lora = get_peft_model(make_base(), config)
    set_peft_model_state_dict(lora, state)
    torch.testing.assert_close(lora.eval()(X), model(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_cls,kw,default_kw", CASES)
def test_unmatched_target_modules_error_lists_the_linear_layers(cfg_cls, kw, default_kw):
    """PEFT's 'Target modules ... not found' named only what was asked for; the error now lists what there is."""
    with pytest.raises(ValueError, match=r"not found in the base model.*named 'lin0', 'lin1', 'lin2'.*target_modules"):
        get_peft_model(make_base(), cfg_cls(target_modules=["lin_0"], **default_kw))


@pytest.mark.parametrize("cfg_cls,kw,default_kw", CASES)
def test_add_weighted_adapter_names_the_method_and_the_conversion(cfg_cls, kw, default_kw):
    """PEFT's add_weighted_adapter is LoRA-only; on an hfx adapter the lookup used to fall through to the base model
    ("'MLP' object has no attribute 'add_weighted_adapter'"). The error names the method and the way round it."""
    model = make_peft(cfg_cls, kw)
    method = cfg_cls.__name__.removesuffix("Config")
    with pytest.raises(NotImplementedError, match=rf"{method} adapters have no add_weighted_adapter.*convert_to_lora"):
        model.add_weighted_adapter(["default"], [1.0], "merged")


def test_convert_to_lora_refuses_pruned_dsee():
    import peft

    from hfx.dsee import prune

    model = make_peft(hfx.DseeConfig, {"r": 2, "num_sparse": 8})
    assert model.base_model.supports_lora_conversion()
    prune(model, ratio=0.3)
    with pytest.warns(UserWarning, match="pruned DSEE model cannot be converted to LoRA.*sparse"):
        assert not model.base_model.supports_lora_conversion()
    with pytest.raises(TypeError, match="do not support LoRA conversion"), pytest.warns(UserWarning, match="pruned"):
        peft.convert_to_lora(model, rank=4)


def hfx_key_prefix(cfg_cls) -> str:
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    return PEFT_TYPE_TO_PREFIX_MAPPING[cfg_cls().peft_type]


def test_cases_cover_every_registered_hfx_tuner():
    """A tuner registered by hfx but missing from CASES would skip the matrix; fail instead."""
    from hfx._registry import registered_types

    covered = {c.values[0]().peft_type.value for c in CASES}
    assert set(registered_types()) <= covered, set(registered_types()) - covered
