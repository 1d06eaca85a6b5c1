"""LoRA-GA (hfx.LoraGAConfig + hfx.initialize): gradient estimate, paper A/B, offset, scale, export, resume, errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import get_peft_model

import hfx
from hfx.testing import tiny_causal_lm
from hfx.tuners.loraga import estimate_gradients, target_layers

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_base(dtype=torch.float32, hidden_size=32):
    return tiny_causal_lm(hidden_size=hidden_size, num_heads=4, num_kv_heads=2, dtype=dtype, seed=0)


def make_batches(vocab: int, n: int = 3, seed: int = 0, bsz: int = 2, seq: int = 9):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (bsz, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def dense_gradients(base, batches, names):
    """Reference: mean over batches of dL/dW by autograd on the weights themselves (no hooks)."""
    model = copy.deepcopy(base).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    for b in batches:
        model(**b).loss.backward()
    return {n: w.grad / len(batches) for n, w in weights.items()}


def base_name(peft_layer_name: str) -> str:
    return peft_layer_name.removeprefix("base_model.model.")


def align_signs(ref: torch.Tensor, got: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip each singular vector of ``got`` (rows for dim=0, columns for dim=1) to the sign of ``ref``."""
    dots = (ref * got).sum(dim=1 - dim, keepdim=True)
    return got * torch.sign(dots)


def probe(vocab):
    return torch.arange(5, 5 + 22).reshape(2, 11) % vocab


# ---------------------------------------------------------------- maths


def test_activation_gradient_equals_autograd_weight_gradient_float64():
    base = make_base(torch.float64)
    batches = make_batches(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=TARGETS))
    layers = target_layers(model, "default")
    grads, n = estimate_gradients(model, batches, layers)
    assert n == len(batches)
    ref = dense_gradients(base, batches, [base_name(name) for name, _ in layers])
    for name, _ in layers:
        torch.testing.assert_close(grads[name], ref[base_name(name)], rtol=1e-10, atol=1e-13)
    # the estimate touched no parameter gradient and left requires_grad as it was
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if "lora_" in n
    }


PERM = torch.randperm(6, generator=torch.Generator().manual_seed(hfx.LoraGAConfig().seed))  # 2r for r = 3


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
def test_factors_are_the_papers_formula_float64(direction):
    """A/B equal the paper's Algorithm 1 (stable scale) on the SVD of the dense autograd gradient."""
    r, gamma = 3, 16.0
    base = make_base(torch.float64)
    batches = make_batches(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=r, target_modules=TARGETS, direction=direction))
    hfx.initialize(model, batches, show_progress=False)
    idx = {
        "ArB2r": (list(range(r)), list(range(r, 2 * r))),
        "A2rBr": (list(range(r, 2 * r)), list(range(r))),
        "ArBr": (list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))),
        # the original code's random split of the 2r (A and B each took the same r before, as PEFT's do)
        "random": (PERM[:r].tolist(), PERM[r:].tolist()),
    }[direction]
    layers = target_layers(model, "default")
    ref = dense_gradients(base, batches, [base_name(name) for name, _ in layers])
    for name, layer in layers:
        G = ref[base_name(name)]
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        f = G.shape[0] ** 0.25 / gamma**0.5
        A_ref, B_ref = Vh[idx[0]] * f, U[:, idx[1]] * f
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(align_signs(A_ref, A, 0), A_ref, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(align_signs(B_ref, B, 1), B_ref, rtol=1e-7, atol=1e-9)
        if direction in ("ArB2r", "random"):
            # the paper's reason: one SGD step of (B, A) moves BA by B B^T G + G A^T A = f^2 * rank-2r SVD of G
            step = B @ B.T @ G + G @ A.T @ A
            best = U[:, : 2 * r] @ torch.diag(S[: 2 * r]) @ Vh[: 2 * r]
            torch.testing.assert_close(step, f**2 * best, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_output_unchanged_at_init(dtype, atol):
    """W' = W - s*B*A: the model function is unchanged at init (fp64 to 1e-12; fp32 to rounding: x W'^T + s (x A^T)
    B^T is not computed in the same order as x W^T, so it is not bitwise equal)."""
    base = make_base(dtype)
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        y0 = base(x).logits
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)
    layer = target_layers(model, "default")[0][1]
    assert layer.lora_B["default"].weight.abs().max() > 0  # a real init, not B = 0
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, y0, rtol=0, atol=atol)


def test_layer_groups_match_single_pass():
    base = make_base()
    batches = make_batches(base.config.vocab_size)
    m1 = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=TARGETS))
    m2 = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=TARGETS, max_layers_per_pass=3))
    s1 = hfx.initialize(m1, batches, show_progress=False)["default"]
    s2 = hfx.initialize(m2, batches, show_progress=False)["default"]
    assert (s1["passes"], s2["passes"]) == (1, 3)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], rtol=0, atol=0)


def test_iters_limits_batches():
    base = make_base()
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=TARGETS, iters=2))
    s = hfx.initialize(model, iter(make_batches(base.config.vocab_size, n=5)), show_progress=False)["default"]
    assert s["batches"] == 2
    # the default takes a sample (64 batches), not the whole dataloader: that was an epoch of passes before training
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=TARGETS))
    s = hfx.initialize(model, make_batches(base.config.vocab_size, n=70, bsz=1, seq=5), show_progress=False)
    assert s["default"]["batches"] == 64


# ---------------------------------------------------------------- PEFT's LoRA-GA


def peft_loraga(base, batches, r, alpha, use_rslora):
    from peft import LoraConfig
    from peft import LoraGAConfig as PeftLoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    model = copy.deepcopy(base)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=PeftLoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16),
    )

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    preprocess_loraga(model, cfg, train_step)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_peft_scale_option_equals_peft_loraga(use_rslora):
    """scale="peft" reproduces PEFT's LoRA-GA (scale="stable") on the same data: same gradient, same A/B (up to the
    singular vectors' signs; q = min(4r, min(m, n)) covers every dimension here, so PEFT's svd_lowrank is exact),
    same offset, hence the same model. PEFT runs its SVD in fp32 (hfx in the gradient's dtype, fp64 here), so the
    tolerances are fp32's."""
    r = 2
    base = make_base(torch.float64, hidden_size=8)
    batches = make_batches(base.config.vocab_size)
    ref = peft_loraga(base, batches, r, 4, use_rslora)
    model = get_peft_model(
        copy.deepcopy(base),
        hfx.LoraGAConfig(r=r, lora_alpha=4, use_rslora=use_rslora, target_modules=TARGETS, scale="peft"),
    )
    hfx.initialize(model, batches, show_progress=False)
    for (name, layer), (name_ref, layer_ref) in zip(target_layers(model, "default"), target_layers(ref, "default")):
        assert name == name_ref
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        A_ref, B_ref = layer_ref.lora_A["default"].weight.detach(), layer_ref.lora_B["default"].weight.detach()
        torch.testing.assert_close(align_signs(A_ref, A, 0), A_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(align_signs(B_ref, B, 1), B_ref, rtol=1e-4, atol=1e-5)
        # the offset W - s*B*A is sign-invariant only up to the pairing; compare the full effective weight instead
        eff = layer.get_base_layer().weight + layer.scaling["default"] * B @ A
        eff_ref = layer_ref.get_base_layer().weight + layer_ref.scaling["default"] * B_ref @ A_ref
        torch.testing.assert_close(eff, eff_ref, rtol=0, atol=1e-6)
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-6)


def test_stable_scale_differs_from_peft_on_purpose():
    """hfx's default is the paper's stable scale: A and B both times d_out^(1/4)/sqrt(gamma), no singular values.
    PEFT's "stable" puts diag(S) into B and scales B only; the product's scale differs by ~sigma/f."""
    r, gamma = 2, 16.0
    base = make_base(torch.float64, hidden_size=8)
    batches = make_batches(base.config.vocab_size)
    ref = peft_loraga(base, batches, r, 4, True)
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=r, lora_alpha=4, target_modules=TARGETS))
    hfx.initialize(model, batches, show_progress=False)
    grads = dense_gradients(base, batches, [base_name(n) for n, _ in target_layers(model, "default")])
    for (name, layer), (_, layer_ref) in zip(target_layers(model, "default"), target_layers(ref, "default")):
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        A_ref, B_ref = layer_ref.lora_A["default"].weight.detach(), layer_ref.lora_B["default"].weight.detach()
        out = B.shape[0]
        f = out**0.25 / gamma**0.5
        S = torch.linalg.svdvals(grads[base_name(name)])
        # hfx: orthonormal rows/columns times f; PEFT: A orthonormal, B columns of norm sigma_{r+i} * f
        torch.testing.assert_close(A.norm(dim=1), torch.full((r,), f, dtype=A.dtype))
        torch.testing.assert_close(B.norm(dim=0), torch.full((r,), f, dtype=B.dtype))
        torch.testing.assert_close(A_ref.norm(dim=1), torch.ones(r, dtype=A.dtype), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B_ref.norm(dim=0), S[r : 2 * r] * f, rtol=1e-4, atol=1e-7)
    # both leave the output unchanged at init, so they differ only in what training does next
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-6)


def test_weights_scale_is_the_original_codes_formula_float64():
    """scale="weightS": the orthonormal A/B of the gradient times mean_i sqrt(sigma_i(W0) / s), i < r, with sigma_i the
    base weight's singular values (independent SVDs of the dense weight and the dense autograd gradient)."""
    r, alpha = 2, 4
    base = make_base(torch.float64)
    batches = make_batches(base.config.vocab_size)
    config = hfx.LoraGAConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, scale="weightS")
    model = get_peft_model(copy.deepcopy(base), config)
    hfx.initialize(model, batches, show_progress=False)
    layers = target_layers(model, "default")
    grads = dense_gradients(base, batches, [base_name(n) for n, _ in layers])
    s = alpha / r**0.5
    for name, layer in layers:
        W0 = base.get_submodule(base_name(name)).weight.detach()
        factor = (torch.linalg.svdvals(W0)[:r] / s).sqrt().mean()
        U, _, Vh = torch.linalg.svd(grads[base_name(name)], full_matrices=False)
        A_ref, B_ref = Vh[:r] * factor, U[:, r : 2 * r] * factor
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(align_signs(A_ref, A, 0), A_ref, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(align_signs(B_ref, B, 1), B_ref, rtol=1e-7, atol=1e-10)
        # and the offset keeps the function: W0' + s*B*A == W0
        W = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(W + s * B @ A, W0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale,alpha,clipped", [("unit", 8, True), ("stable", 0.25, False)])
def test_norm_clip_bounds_the_offset_by_the_weight(scale, alpha, clipped):
    """norm_clip: where max|s*B*A| > max|W0| (every layer with scale="unit" and s = 8/sqrt(2)), A and B shrink by
    sqrt(max|W0| / max|s*B*A|), so the offset's largest entry equals W0's; where it is below (the stable scale with
    s = 0.25/sqrt(2): 4-6x below on every layer), nothing changes. The output is unchanged at init either way."""
    r = 2
    base = make_base(torch.float64)
    batches = make_batches(base.config.vocab_size)
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        y0 = base(x).logits
    s = alpha / r**0.5
    models = {}
    for clip in (False, True):
        config = hfx.LoraGAConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, scale=scale, norm_clip=clip)
        models[clip] = get_peft_model(copy.deepcopy(base), config)
        hfx.initialize(models[clip], batches, show_progress=False)
    pairs = zip(target_layers(models[False], "default"), target_layers(models[True], "default"))
    for (name, plain), (_, layer) in pairs:
        W0 = base.get_submodule(base_name(name)).weight.detach()
        A0, B0 = plain.lora_A["default"].weight.detach(), plain.lora_B["default"].weight.detach()
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        ratio = W0.abs().max() / (s * B0 @ A0).abs().max()
        assert bool(ratio < 1) == clipped, (name, float(ratio))
        if clipped:
            torch.testing.assert_close(A, A0 * ratio.sqrt(), rtol=1e-12, atol=0)
            torch.testing.assert_close(B, B0 * ratio.sqrt(), rtol=1e-12, atol=0)
            torch.testing.assert_close((s * B @ A).abs().max(), W0.abs().max(), rtol=1e-12, atol=0)
        else:
            assert torch.equal(A, A0) and torch.equal(B, B0)
    with torch.no_grad():
        torch.testing.assert_close(models[True](x).logits, y0, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- saving, loading, resuming


def train_steps(model, batches, steps=4, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_export_reloads_on_original_base_in_stock_peft(tmp_path):
    """save_pretrained writes the rank-2r LoRA for the ORIGINAL base; a fresh process with stock PEFT only (hfx is
    never imported) reproduces the trained model's logits."""
    base = make_base()
    base.save_pretrained(tmp_path / "base")
    batches = make_batches(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    hfx.initialize(model, batches, show_progress=False)
    train_steps(model, batches)
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        logits = model(x).logits
        assert (logits - base(x).logits).abs().max() > 1e-2  # it trained
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"x": x, "logits": logits}, tmp_path / "expected.pt")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["use_rslora"] is True
    assert cfg["lora_alpha"] == pytest.approx(8 * 2**0.5)
    assert not {"direction", "scale", "stable_gamma", "export", "iters"} & set(cfg)
    script = textwrap.dedent(
        f"""
        import sys, warnings, torch
        warnings.simplefilter("error", UserWarning)  # e.g. unknown config keys would warn
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        exp = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            err = (model(exp["x"]).logits - exp["logits"]).abs().max().item()
        assert not any(m == "hfx" or m.startswith("hfx.") for m in sys.modules), "hfx was imported"
        print("ERR", err)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("ERR")[-1])
    assert err < 1e-4, err


def test_convert_to_lora_is_refused_and_the_export_converts(tmp_path):
    """PEFT's save_as_lora on a LoRA-GA model exported s*B*A against the offset base (0.69 off on logits of 0.70 on
    the original base); it is refused with the way round, and the saved export (a plain LoRA) converts exactly."""
    import peft
    from peft import PeftModel

    base = make_base()
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)
    train_steps(model, make_batches(base.config.vocab_size, seed=1))
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        y = model.eval()(x).logits
    with pytest.warns(UserWarning, match="init offset"), pytest.raises(TypeError, match="do not support LoRA"):
        peft.save_as_lora(tmp_path / "converted", model, rank=1.0)
    model.save_pretrained(tmp_path / "export")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export")
    with pytest.warns(UserWarning, match="already a LoRA"):  # PEFT's own note; the conversion itself is exact
        peft.save_as_lora(tmp_path / "converted", reloaded, rank=1.0)
    converted = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted").eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, y, rtol=0, atol=1e-4)


def test_loading_an_export_into_a_differently_initialised_model_moves_the_offset(tmp_path):
    """load_adapter of a saved export into a model whose own LoRA-GA init differs (initialised on other batches)
    takes the saved init: the base offset moves from the model's init to the saved one (W += s(B0 A0 - B0' A0')),
    so the model computes exactly what the saved one did, and saves the same export again."""
    base = make_base(torch.float64)
    vocab = base.config.vocab_size
    config = hfx.LoraGAConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    saved = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    hfx.initialize(saved, make_batches(vocab), show_progress=False)
    train_steps(saved, make_batches(vocab, seed=1))
    saved.save_pretrained(tmp_path / "a")
    other = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    hfx.initialize(other, make_batches(vocab, seed=7), show_progress=False)  # another init, another offset
    x = probe(vocab)
    with torch.no_grad():
        assert (other(x).logits - saved.eval()(x).logits).abs().max() > 1e-3
    other.load_adapter(str(tmp_path / "a"), adapter_name="default", is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x).logits, saved(x).logits, rtol=0, atol=1e-10)
    for (_, mine), (_, theirs) in zip(target_layers(other, "default"), target_layers(saved, "default")):
        torch.testing.assert_close(mine.get_base_layer().weight, theirs.get_base_layer().weight, rtol=0, atol=1e-12)
    other.save_pretrained(tmp_path / "b")
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)


def test_mutated_base_export_is_the_rank_r_adapter(tmp_path):
    base = make_base()
    batches = make_batches(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=4, target_modules=TARGETS, export="mutated_base"))
    hfx.initialize(model, batches, show_progress=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    # those weights fit a fresh LoRA-GA adapter, but mean something only on the offset base: loading them into one
    # hfx.initialize never ran on (resume without it) used to give another model without a word
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = load_peft_weights(str(tmp_path), device="cpu")
    config = hfx.LoraGAConfig(r=4, target_modules=TARGETS, export="mutated_base")
    fresh = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    with pytest.warns(UserWarning, match=r"valid only on the offset base(?s:.*)run hfx.initialize\(model, "):
        set_peft_model_state_dict(fresh, saved)
    again = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    hfx.initialize(again, batches, show_progress=False)  # the way to resume such a checkpoint: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        set_peft_model_state_dict(again, saved)
    x = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=1e-6)
    # init_from cannot rebuild the init from it, and says so
    with pytest.raises(ValueError, match="export='mutated_base' holds only the trained rank-r weights"):
        hfx.initialize(get_peft_model(copy.deepcopy(base), copy.deepcopy(config)), [], init_from=str(tmp_path))


def test_trainer_checkpoint_resume(tmp_path):
    """hfx.initialize(model, trainer.get_train_dataloader()) before train(); the checkpoints hold the plain rank-2r
    export; resuming from one (fresh model, same init) continues to the same result as an uninterrupted run."""
    from transformers import Trainer, TrainingArguments

    base = make_base()
    vocab = base.config.vocab_size
    rows = [
        {"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in make_batches(vocab, n=4) for i in (0, 1)
    ]

    def collate(feats):
        return {k: torch.stack([f[k] for f in feats]) for k in feats[0]}

    def run(out, max_steps, resume=None, init_from=None):
        model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=max_steps,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            save_steps=2,
            save_strategy="steps",
            report_to=[],
            use_cpu=True,
            seed=0,
            logging_steps=1,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        if init_from is None:
            hfx.initialize(model, trainer.get_train_dataloader(), show_progress=False)
        else:  # rebuild the training state from the checkpoint alone: no gradient estimate
            hfx.initialize(model, [], init_from=init_from, show_progress=False)
        trainer.train(resume_from_checkpoint=resume)
        model.eval()
        with torch.no_grad():
            return model(probe(vocab)).logits

    full = run(tmp_path / "full", 4)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8
    resumed = run(tmp_path / "resumed", 4, resume=str(ckpt))
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-5)
    resumed2 = run(tmp_path / "resumed2", 4, resume=str(ckpt), init_from=str(ckpt))
    torch.testing.assert_close(resumed2, full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- errors


def fresh(**kw):
    base = make_base()
    return base, get_peft_model(base, hfx.LoraGAConfig(r=2, target_modules=TARGETS, **kw))


def test_error_empty_dataloader():
    _, model = fresh()
    with pytest.raises(ValueError, match="no batches"):
        hfx.initialize(model, torch.utils.data.DataLoader([]), show_progress=False)


def test_error_batches_without_labels():
    base, model = fresh()
    batches = [{"input_ids": b["input_ids"]} for b in make_batches(base.config.vocab_size)]
    with pytest.raises(ValueError, match="labels"):
        hfx.initialize(model, batches, show_progress=False)
    # nothing was changed: the model can still be initialised
    hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)


def _base_weights(model):
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in target_layers(model, "default")}


def test_error_zero_gradient_when_no_token_is_labelled():
    """All labels -100 give a zero gradient, whose SVD is arbitrary: that init used to be accepted silently."""
    base, model = fresh()
    batches = make_batches(base.config.vocab_size)
    masked = [dict(b, labels=torch.full_like(b["labels"], -100)) for b in batches]
    before = _base_weights(model)
    with pytest.raises(ValueError, match=r"gradient of layer '.*q_proj' is exactly zero.*labelled tokens\? Check"):
        hfx.initialize(model, masked, show_progress=False)
    assert all(torch.equal(w, before[n]) for n, w in _base_weights(model).items())  # nothing was offset
    hfx.initialize(model, batches, show_progress=False)  # and the model can still be initialised


def test_error_non_finite_gradient_names_the_layer():
    """A batch with inf activations gave a bare torch._LinAlgError from linalg.svd."""
    base, model = fresh()
    batches = make_batches(base.config.vocab_size)

    def poison(module, args, out):
        return out * float("inf") if torch.equal(args[0], batches[1]["input_ids"]) else None

    handle = model.get_base_model().model.embed_tokens.register_forward_hook(poison)
    before = _base_weights(model)
    with pytest.raises(ValueError, match=r"gradient of layer '.*q_proj' has non-finite values.*dtype"):
        hfx.initialize(model, batches, show_progress=False)
    handle.remove()
    assert all(torch.equal(w, before[n]) for n, w in _base_weights(model).items())


def test_resume_without_initialize_names_init_from_and_loading_does_not_warn(tmp_path):
    """A checkpoint (the rank-2r export) loaded into a LoRA-GA adapter never initialised failed with PEFT's bare
    size mismatch; the error now names the documented call. After that call (init_from), neither loading nor
    training warns about a missing initialisation."""
    base = make_base()
    batches = make_batches(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=TARGETS))
    hfx.initialize(model, batches, show_progress=False)
    model.save_pretrained(tmp_path)  # what a Trainer checkpoint holds
    restarted = get_peft_model(copy.deepcopy(base), hfx.LoraGAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(
        RuntimeError, match=r"never initialised.*hfx\.initialize\(model, \[\], init_from=<checkpoint>\)"
    ):
        restarted.load_adapter(str(tmp_path), "default", is_trainable=True)
    hfx.initialize(restarted, [], init_from=str(tmp_path), show_progress=False)
    assert not hfx.needs_initialization(restarted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restarted.load_adapter(str(tmp_path), "default", is_trainable=True)
        restarted.train()
        restarted(**batches[0])
    assert not [w for w in caught if "initialisation" in str(w.message)]
    ids = probe(base.config.vocab_size)
    model.eval(), restarted.eval()
    with torch.no_grad():
        torch.testing.assert_close(restarted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_training_without_initialize_warns():
    base, model = fresh()
    model.train()
    with pytest.warns(UserWarning, match=r"'default' \(LoraGAConfig\) is training without .* hfx\.initialize"):
        model(**make_batches(base.config.vocab_size, n=1)[0])


def test_error_batches_without_model_inputs():
    base, model = fresh()
    with pytest.raises(ValueError, match="no model inputs"):
        hfx.initialize(model, [{"labels": torch.zeros(2, 3, dtype=torch.long)}], show_progress=False)
    with pytest.raises(TypeError, match="dicts of model inputs"):
        hfx.initialize(model, [torch.zeros(2, 3, dtype=torch.long)], show_progress=False)
    # a GRPO/RLOO dataloader yields lists of prompt rows: the error says how to build batches instead
    with pytest.raises(TypeError, match=r"got list\. A GRPO/RLOO trainer's dataloader yields raw prompt rows"):
        hfx.initialize(model, [[{"prompt": "2+2="}]], show_progress=False)


def test_error_preference_batches_say_how_to_build_labelled_ones():
    """A DPO collator's batch (input_ids, completion_mask, no labels): the error names that trainer kind and the fix
    (it said to use the training collator's batches, which is what the user had passed)."""
    base, model = fresh()
    ids = make_batches(base.config.vocab_size, n=1)[0]["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids)}
    with pytest.raises(ValueError, match=r"carry no 'labels'.*a DPO one has no language-model labels.*set to -100"):
        hfx.initialize(model, [batch], show_progress=False)


def test_error_model_that_is_not_a_peft_model():
    """Adapters injected without a PeftModel (inject_adapter_in_model; transformers' add_adapter) save through
    transformers, which writes the config before the weights: the rank-2r export could not be written (a reload on
    the original base was 0.83 off), so LoRA-GA refuses at initialize."""
    from peft import inject_adapter_in_model

    base = make_base()
    model = inject_adapter_in_model(hfx.LoraGAConfig(r=2, target_modules=TARGETS), base)
    with pytest.raises(TypeError, match=r"LoRA-GA needs the PeftModel from peft\.get_peft_model"):
        hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)


def test_error_quantised_target_names_layer_type():
    base, model = fresh()
    layer = target_layers(model, "default")[0][1]
    layer.get_base_layer().weight.quant_state = object()  # what bitsandbytes' 4-bit weights carry
    with pytest.raises(TypeError, match=r"quantised weight of .*q_proj.*Linear"):
        hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)


def test_error_rank_too_large_and_double_init():
    base = make_base(hidden_size=8)
    model = get_peft_model(base, hfx.LoraGAConfig(r=8, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"2r <= min.*too large for .*q_proj \(r=8, 8x8\).*`rank_pattern`"):
        hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)
    # checked before the gradient pass: no batch is read (it used to fail after the whole pass)
    read = []

    def batches():
        for b in make_batches(base.config.vocab_size):
            read.append(b)
            yield b

    model = get_peft_model(make_base(hidden_size=8), hfx.LoraGAConfig(r=8, target_modules=TARGETS))
    with pytest.raises(ValueError, match="2r <= min"):
        hfx.initialize(model, batches(), show_progress=False)
    assert read == []
    base, model = fresh()
    hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)
    with pytest.raises(RuntimeError, match="already initialised"):
        hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)


def test_init_from_a_missing_folder_names_the_argument(tmp_path):
    _, model = fresh()
    with pytest.raises(ValueError, match=r"LoRA-GA init_from='.*nope': no saved adapter weights there"):
        hfx.initialize(model, [], init_from=str(tmp_path / "nope"), show_progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="scale"):
        hfx.LoraGAConfig(scale="bogus")
    with pytest.raises(ValueError, match="direction"):
        hfx.LoraGAConfig(direction="bogus")
    with pytest.raises(ValueError, match="dora"):
        hfx.LoraGAConfig(use_dora=True)
    with pytest.raises(ValueError, match=r"LoraGAConfig\.r must be an integer >= 1, got 2\.5"):
        hfx.LoraGAConfig(r=2.5)
    with pytest.raises(ValueError, match=r"rank_pattern ranks must be integers >= 1, got \{'v_proj': 2\.0\}"):
        hfx.LoraGAConfig(rank_pattern={"v_proj": 2.0})
    for gamma in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="stable_gamma"):
            hfx.LoraGAConfig(stable_gamma=gamma)
    for bad in ("8", 0, 2.5, True):  # a string from a CLI / YAML, zero, a float, a bool: named, not a raw TypeError
        with pytest.raises(ValueError, match=r"LoraGAConfig\.iters must be an int >= 1 or None"):
            hfx.LoraGAConfig(iters=bad)
        with pytest.raises(ValueError, match=r"LoraGAConfig\.max_layers_per_pass must be an int >= 1 or None"):
            hfx.LoraGAConfig(max_layers_per_pass=bad)
    with pytest.raises(ValueError, match=r"LoraGAConfig\.stable_gamma must be a finite number"):
        hfx.LoraGAConfig(stable_gamma="16")
    with pytest.raises(ValueError, match=r"LoraGAConfig\.seed must be an int"):
        hfx.LoraGAConfig(seed="0")
    with pytest.raises(ValueError, match=r"LoraGAConfig\.norm_clip must be True or False, got 'yes'"):
        hfx.LoraGAConfig(norm_clip="yes")
    assert hfx.LoraGAConfig(iters=4, max_layers_per_pass=1, stable_gamma=64).iters == 4
    assert hfx.LoraGAConfig().peft_type.value == "LORA" and hfx.LoraGAConfig().use_rslora


def test_error_second_loraga_adapter_and_warning_for_shared_layers():
    """A second LoRA-GA init would offset the shared base again (changing the first adapter's outputs and making the
    second save relative to an offset base): it raises, and leaves the first adapter's outputs as they were."""
    from peft import LoraConfig

    base, model = fresh()
    batches = make_batches(base.config.vocab_size)
    hfx.initialize(model, batches, show_progress=False)
    ids = probe(base.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.add_adapter("other", hfx.LoraGAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(RuntimeError, match=r"'default' of this model is already LoRA-GA-initialised.*one LoRA-GA"):
        hfx.initialize(model, batches, adapter_names=["other"], show_progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    model.delete_adapter("default")  # its offset stays in the base weights: still refused
    with pytest.raises(RuntimeError, match=r"'default' of this model is already LoRA-GA-initialised"):
        hfx.initialize(model, batches, adapter_names=["other"], show_progress=False)

    # a plain LoRA adapter on the same layers sees the offset: warned, by name
    base, model = fresh()
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"adapter\(s\) \['plain'\] share"):
        hfx.initialize(model, batches, adapter_names=["default"], show_progress=False)


def test_error_embedding_target_is_named_not_skipped():
    """A LoRA Embedding keeps its adapter in lora_embedding_A; it used to be skipped silently (left at PEFT's
    default init) instead of getting the unsupported-target error."""
    base = make_base()
    model = get_peft_model(base, hfx.LoraGAConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        hfx.initialize(model, make_batches(base.config.vocab_size), show_progress=False)
