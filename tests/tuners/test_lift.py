"""LIFT (arXiv 2506.00772): selection and forward against float64 references, gradients, refresh, save, Trainer."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hfx
from hfx.tuners._sparse import remap_positions, sparse_delta_linear
from hfx.tuners.lift import LiftLinear, lift_select, refresh_lift_masks

TORCH64 = torch.float64
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- independent references (float64, full SVD, explicit sort) -------------------------------------------------
def ref_scores(weight: torch.Tensor, f: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(weight.to(TORCH64), full_matrices=False)
    return (u[:, :f] @ torch.diag(s[:f]) @ vh[:f]).abs().reshape(-1)


def ref_select(weight: torch.Tensor, k: int, f: int, largest: bool = True) -> torch.Tensor:
    """The k largest (or smallest: the reference code's REF-BUG 1) entries of |W_f|, as sorted flat indices."""
    order = torch.argsort(ref_scores(weight, f), descending=largest, stable=True)
    return order[:k].sort().values


def structured_weight(m: int, n: int, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    """A weight with a decaying spectrum (like trained LLM weights), so that its rank reduction means something."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=TORCH64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=TORCH64))
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=TORCH64).pow(-decay)
    return (u[:, :r] * s) @ v[:, :r].T


class One(nn.Module):
    def __init__(self, in_f: int, out_f: int, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.lin(x)


def one_layer(in_f, out_f, cfg, seed=0, dtype=TORCH64, weight=None):
    torch.manual_seed(seed)
    base = One(in_f, out_f).to(dtype)
    if weight is not None:
        with torch.no_grad():
            base.lin.weight.copy_(weight)
    model = get_peft_model(base, cfg)
    return model, model.base_model.model.lin


# ---- selection -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("f", [1, 4, 16])
@pytest.mark.parametrize("r", [1, 3])
def test_selection_matches_float64_bruteforce_largest(f, r):
    w = structured_weight(64, 48, seed=f + r, decay=0.7)
    k = (64 + 48) * r
    cfg = hfx.LiftConfig(r=r, filter_rank=f, svd="full", target_modules=["lin"])
    _, layer = one_layer(48, 64, cfg, weight=w)
    idx = layer.lift_indices["default"].long()
    expected = ref_select(w, k, f)
    assert idx.numel() == k == layer.lift_k["default"]
    assert torch.equal(idx, torch.unique(idx)) and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(idx, expected)
    # REF-BUG 1 regression: every selected entry scores at least as high as every unselected one (largest, not
    # smallest), and the selection is far from the reference code's smallest-k
    scores = ref_scores(w, f)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[idx] = True
    assert scores[chosen].min() >= scores[~chosen].max()
    smallest = ref_select(w, k, f, largest=False)
    assert torch.isin(idx, smallest).float().mean() < 0.05


def test_selection_in_float32_equals_float64():
    w = structured_weight(64, 48, seed=3, decay=0.7)
    a = lift_select(w.float(), 200, 8, svd="full").long()
    b = ref_select(w, 200, 8)
    assert (torch.isin(a, b).float().mean()) > 0.99


def test_budget_at_least_all_entries_selects_all():
    _, layer = one_layer(6, 5, hfx.LiftConfig(r=100, filter_rank=2, target_modules=["lin"]))
    assert torch.equal(layer.lift_indices["default"].long(), torch.arange(30))
    _, layer = one_layer(6, 5, hfx.LiftConfig(density=1.0, filter_rank=2, target_modules=["lin"]))
    assert layer.lift_k["default"] == 30


def test_density_budget():
    _, layer = one_layer(48, 64, hfx.LiftConfig(density=0.05, filter_rank=4, target_modules=["lin"]))
    assert layer.lift_k["default"] == round(0.05 * 64 * 48)


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_filter_rank_at_least_rank_is_plain_magnitude(svd):
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(64, 5, generator=gen, dtype=TORCH64) @ torch.randn(5, 48, generator=gen, dtype=TORCH64)
    full = torch.randn(64, 48, generator=gen, dtype=TORCH64)
    k = 300
    magnitude = torch.topk(full.abs().reshape(-1), k).indices.sort().values
    assert torch.equal(lift_select(full, k, 48, svd=svd).long(), magnitude)  # f >= min(m, n): W itself
    magnitude_low = torch.topk(low.abs().reshape(-1), k).indices.sort().values
    assert torch.equal(lift_select(low, k, 5, svd="full").long(), magnitude_low)  # f == rank(W)


def test_lowrank_and_full_svd_masks_overlap():
    """Jaccard overlap of the randomised and the exact selection on a weight with a decaying spectrum.

    Measured (512 x 256, f = 32, k = 5 %): niter 4 -> 0.99, niter 2 -> 0.97; a flat spectrum (i.i.d. Gaussian, no
    structure) gives much lower overlap for any SVD, which is expected and not a realistic weight.
    """
    w = structured_weight(512, 256, seed=0, decay=1.0).float()
    k = int(0.05 * w.numel())
    full = set(lift_select(w, k, 32, svd="full").tolist())
    for niter, threshold in ((4, 0.95), (2, 0.9)):
        low = set(lift_select(w, k, 32, svd="lowrank", niter=niter).tolist())
        assert len(low & full) / len(low | full) >= threshold, niter
    # rank 1, the smallest filter (measured 0.9997): the randomised path must not return W itself there
    full = set(lift_select(w, k, 1, svd="full").tolist())
    low = set(lift_select(w, k, 1).tolist())
    assert len(low & full) / len(low | full) >= 0.99
    assert low != set(lift_select(w, k, 512, svd="full").tolist())  # plain magnitude differs from the rank-1 pick
    # fixed seed: the randomised selection is reproducible whatever the global RNG state
    torch.manual_seed(123)
    a = lift_select(w, k, 32)
    torch.manual_seed(456)
    assert torch.equal(a, lift_select(w, k, 32))


# ---- forward and gradients --------------------------------------------------------------------------------------
def randomise_values(layer: LiftLinear, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in layer.lift_values.values():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * std)


def test_forward_and_merge_match_dense_float64_reference():
    model, layer = one_layer(12, 10, hfx.LiftConfig(r=1, filter_rank=3, target_modules=["lin"]))
    randomise_values(layer)
    w0 = layer.base_layer.weight.detach().clone()
    b = layer.base_layer.bias.detach().clone()
    idx = layer.lift_indices["default"].long()
    v = layer.lift_values["default"].detach().clone()
    delta = torch.zeros(10 * 12, dtype=TORCH64)
    for i, j in zip(idx.tolist(), range(len(v))):
        delta[i] += v[j]
    delta = delta.view(10, 12)
    x = torch.randn(3, 5, 12, dtype=TORCH64)
    torch.testing.assert_close(model(x), x @ (w0 + delta).T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0 + delta, rtol=0, atol=1e-15)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-15)


def test_gradcheck_sparse_delta_linear():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=gen, dtype=TORCH64, requires_grad=True)
    idx = torch.tensor([0, 3, 7, 8, 14, 19], dtype=torch.int32)
    v = torch.randn(6, generator=gen, dtype=TORCH64, requires_grad=True)
    frozen = (torch.tensor([1, 2], dtype=torch.int32), torch.randn(2, generator=gen, dtype=TORCH64))
    assert torch.autograd.gradcheck(lambda a, b: sparse_delta_linear(a, b, idx, (4, 5), frozen), (x, v))


def test_value_gradient_equals_dense_gradient_at_indices():
    model, layer = one_layer(16, 12, hfx.LiftConfig(r=1, filter_rank=3, target_modules=["lin"]))
    randomise_values(layer)
    x = torch.randn(4, 7, 16, dtype=TORCH64)
    target = torch.randn(4, 7, 12, dtype=TORCH64)
    (model(x) - target).pow(2).sum().backward()
    dense_w = (layer.base_layer.weight.detach() + layer.get_delta_weight("default")).requires_grad_(True)
    (x @ dense_w.T + layer.base_layer.bias.detach() - target).pow(2).sum().backward()
    idx = layer.lift_indices["default"].long()
    torch.testing.assert_close(layer.lift_values["default"].grad, dense_w.grad.reshape(-1)[idx])
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_entries_outside_mask_never_change():
    model, layer = one_layer(16, 12, hfx.LiftConfig(r=1, filter_rank=3, target_modules=["lin"]), dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(8, 16)
    w0 = layer.base_layer.weight.detach().clone()
    for _ in range(5):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.merge_adapter()
    changed = (layer.base_layer.weight.detach() != w0).reshape(-1)
    inside = torch.zeros_like(changed)
    inside[layer.lift_indices["default"].long()] = True
    assert changed.any() and not (changed & ~inside).any()


# ---- errors ------------------------------------------------------------------------------------------------------
def test_unknown_target_module():
    with pytest.raises(ValueError, match="q_proj"):
        get_peft_model(One(8, 8), hfx.LiftConfig(r=1, target_modules=["q_proj"]))


def test_non_linear_target():
    class WithEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lin = nn.Linear(8, 8)

    with pytest.raises(TypeError, match=r"'emb' of type Embedding.*only torch.nn.Linear"):
        get_peft_model(WithEmb(), hfx.LiftConfig(r=1, target_modules=["emb"]))


def test_conv1d_target_names_conv1d_and_suggests_lora_not_all_linear():
    """On GPT-2 (transformers' Conv1D) the error suggested 'all-linear', which selects the same Conv1D layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for targets in (["c_attn"], "all-linear"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
        with pytest.raises(TypeError) as err:
            get_peft_model(gpt2, hfx.LiftConfig(r=1, target_modules=targets))
        msg = str(err.value)
        assert "transformers' Conv1D (GPT-2 style" in msg and "Use LoRA instead (peft.LoraConfig" in msg, msg
        assert "or 'all-linear')" not in msg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 4, "density": 0.1}, "either `r`.*or `density`"),
        ({"density": 0.0}, r"density.*\(0, 1\]"),
        ({"density": 1.5}, r"density.*\(0, 1\]"),
        ({"density": "a"}, "density"),
        ({"r": 0}, "positive integer"),
        ({"filter_rank": 0}, "filter_rank"),
        ({"svd": "qr"}, "svd"),
        ({"update_interval": 0}, "update_interval"),
        ({"bias": "lora_only"}, "bias"),
        ({"target_modules": ".*lin", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfx.LiftConfig(**kwargs)


def test_default_budget_is_r_128():
    assert hfx.LiftConfig().r == 128 and hfx.LiftConfig(density=0.05).r is None


# ---- a real (tiny) causal LM --------------------------------------------------------------------------------------
def tiny_lm(arch: str = "llama", **kw):
    from hfx.testing import tiny_causal_lm

    return tiny_causal_lm(arch, hidden_size=32, num_layers=2, seed=0, **kw)


def lm_config(**kw) -> hfx.LiftConfig:
    return hfx.LiftConfig(**{"r": 2, "filter_rank": 4, "target_modules": LM_TARGETS, "show_progress": False, **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_forward_backward_merge(arch):
    base = tiny_lm(arch)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    model = get_peft_model(base, lm_config())
    layers = [m for m in model.modules() if isinstance(m, LiftLinear)]
    assert len(layers) == 2 * len(LM_TARGETS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(m.lift_k["default"] for m in layers)
    assert all(m.lift_k["default"] == (m.in_features + m.out_features) * 2 for m in layers)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)  # zero delta at init
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
        y = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)


# ---- refresh -------------------------------------------------------------------------------------------------------
def test_refresh_keeps_function_remaps_adam_state_and_keeps_step():
    torch.manual_seed(0)
    model = get_peft_model(tiny_lm(), lm_config())
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(ids).logits
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    layers = [m for m in model.modules() if isinstance(m, LiftLinear)]
    before = {
        id(m): (
            m.lift_indices["default"].clone(),
            m.lift_values["default"].detach().clone(),
            {k: v.clone() for k, v in opt.state[m.lift_values["default"]].items()},
        )
        for m in layers
    }
    with torch.no_grad():
        logits = model(ids).logits
    stats = refresh_lift_masks(model, opt, show_progress=False)
    assert 0 < stats["kept_fraction"] < 1 and stats["past_entries"] > 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)  # function unchanged
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
        # merge/unmerge take the refresh's frozen past deltas too (a merge without them was 0.37 off)
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=1e-6)
    for m in layers:
        old_idx, old_v, old_state = before[id(m)]
        new_idx = m.lift_indices["default"]
        p = m.lift_values["default"]
        assert new_idx.numel() == old_idx.numel() == p.numel()  # k unchanged
        state = opt.state[p]
        assert torch.equal(torch.as_tensor(state["step"]), torch.as_tensor(old_state["step"]))  # not reset
        kept, src = remap_positions(old_idx, new_idx)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][kept], old_state[key][src[kept]])
            assert not state[key][~kept].any()
        assert torch.equal(p.detach()[kept], old_v[src[kept]])  # kept entries keep their values
        # the mask is the selection on the current effective weight
        eff = m.base_layer.weight.detach() + m.get_delta_weight("default")
        assert torch.equal(new_idx, lift_select(eff, m.lift_k["default"], 4))
    # training goes on with the remapped state
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_refresh_refuses_a_quantized_optimizer_state_before_any_change():
    """bitsandbytes' 8-bit optimizers keep uint8 codes with per-block scales: moving codes without their scales gave
    the remapped entries wrong moments, silently. Refused before any mask changes."""
    model = get_peft_model(tiny_lm(), lm_config())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for p in params:  # the state layout of bnb's Adam8bit for a large parameter
        opt.state[p] = {"step": 3, "state1": torch.zeros(p.shape, dtype=torch.uint8), "absmax1": torch.ones(1)}
    layers = [m for m in model.modules() if isinstance(m, LiftLinear)]
    before = [m.lift_indices["default"].clone() for m in layers]
    with pytest.raises(ValueError, match=r"SGD keeps its state 'state1' quantized \(torch.uint8.*Nothing was changed"):
        refresh_lift_masks(model, opt, show_progress=False)
    assert all(torch.equal(m.lift_indices["default"], b) for m, b in zip(layers, before))


def test_refresh_refuses_merged_layer():
    model = get_peft_model(tiny_lm(), lm_config())
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        refresh_lift_masks(model, show_progress=False)


FRESH_LOAD = textwrap.dedent(
    """
    import sys, torch
    import hfx
    from peft import PeftModel
    from hfx.testing import tiny_causal_lm
    torch.manual_seed(987)  # another RNG state than the saving process
    base = tiny_causal_lm("llama", hidden_size=32, num_layers=2, seed=0)
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    ids = torch.load(sys.argv[2] + ".ids", weights_only=True)
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[2])
    """
)


def test_save_after_refresh_then_load_in_fresh_process_gives_identical_logits(tmp_path):
    model = get_peft_model(tiny_lm(), lm_config())
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            refresh_lift_masks(model, opt, show_progress=False)
    assert sum(m.lift_past_indices["default"].numel() for m in model.modules() if isinstance(m, LiftLinear)) > 0
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save(ids, tmp_path / "out.pt.ids")
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        timeout=300,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), logits)


# ---- the HF Trainer: refresh timing, resume, loss drops ---------------------------------------------------------------
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


def test_trainer_refresh_timing_and_resume_gives_same_losses(tmp_path):
    def build():
        return get_peft_model(tiny_lm(initializer_range=0.2), lm_config(update_interval=2))

    cb = hfx.LiftRefreshCallback(show_progress=False)
    trainer = make_trainer(build(), tmp_path / "run", 6, cb, save_steps=3)
    trainer.train()
    assert [s for s, _ in cb.history] == [2, 4, 6]  # after optimizer steps 2, 4, 6: (t + 1) % 2 == 0, t 0-based
    assert any(stats["kept_fraction"] < 1 for _, stats in cb.history)  # the mask really moved
    full = losses_of(trainer)
    assert len(full) == 6

    cb2 = hfx.LiftRefreshCallback(show_progress=False)
    resumed = make_trainer(build(), tmp_path / "resumed", 6, cb2, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    again = losses_of(resumed)
    assert [s for s, _ in cb2.history] == [4, 6]
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # 1-3 restored from the checkpoint's log history
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, again, full)


def test_training_run_loss_drops(tmp_path):
    """A real trainer.train() run with mask refreshes: the loss goes down (wide init, as in test_bone)."""
    model = get_peft_model(tiny_lm(initializer_range=0.2), lm_config(r=4, update_interval=10))
    cb = hfx.LiftRefreshCallback(show_progress=False)
    trainer = make_trainer(model, tmp_path, 30, cb, lr=1e-2, n=128)
    trainer.train()
    losses = [v for _, v in sorted(losses_of(trainer).items())]
    assert [s for s, _ in cb.history] == [10, 20, 30]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_refresh_callback_refuses_deepspeed_fsdp_and_quantized(monkeypatch):
    from types import SimpleNamespace

    model = get_peft_model(tiny_lm(), lm_config(update_interval=2))
    cb = hfx.LiftRefreshCallback()
    state = SimpleNamespace(global_step=0)
    with pytest.raises(ValueError, match="DeepSpeed.*update_interval=None"):
        cb.on_train_begin(SimpleNamespace(deepspeed="ds.json", fsdp=[]), state, None, model=model)
    with pytest.raises(ValueError, match="FSDP.*update_interval=None"):
        cb.on_train_begin(SimpleNamespace(deepspeed=None, fsdp=["full_shard"]), state, None, model=model)
    layer = next(m for m in model.modules() if isinstance(m, LiftLinear))
    monkeypatch.setattr(layer, "quantization_backend", SimpleNamespace(backend_name="bnb 4bit"))
    with pytest.raises(ValueError, match="quantized.*update_interval=None"):
        cb.on_train_begin(SimpleNamespace(deepspeed=None, fsdp=[]), state, None, model=model)
    # a static mask is fine anywhere
    static = get_peft_model(tiny_lm(), lm_config(update_interval=None))
    cb.on_train_begin(SimpleNamespace(deepspeed="ds.json", fsdp=[]), state, None, model=static)


# ---- bitsandbytes 4-bit base --------------------------------------------------------------------------------------
def test_lift_on_bitsandbytes_4bit_forward_only():
    import bitsandbytes as bnb  # installed with the dev extra; a missing one must fail, not skip

    torch.manual_seed(0)
    dense = nn.Linear(16, 32)
    q = bnb.nn.Linear4bit(16, 32, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = dense.bias
    q = q.to("cpu")  # quantizes

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = q

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(Q(), hfx.LiftConfig(r=1, filter_rank=4, target_modules=["lin"], update_interval=None))
    layer = model.base_model.model.lin
    assert layer.quantization_backend is not None
    w_deq = layer.get_base_weight().float()
    assert torch.equal(layer.lift_indices["default"], lift_select(w_deq, 48, 4))  # selected on the de-quantized W
    randomise_values(layer)
    x = torch.randn(3, 16)
    expected = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert layer.lift_values["default"].grad is not None
    with pytest.raises(ValueError, match="quantized.*unmerged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="quantized.*update_interval=None"):
        refresh_lift_masks(model, show_progress=False)


def test_lm_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_lm(), lm_config())
        randomise_values_all(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def randomise_values_all(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def test_refresh_callback_warns_when_no_refresh_fits_in_the_run(caplog):
    """update_interval past max_steps used to leave the mask static without a word."""
    from types import SimpleNamespace

    model = get_peft_model(tiny_lm(), lm_config(update_interval=2))
    args = SimpleNamespace(deepspeed=None, fsdp=[])
    for global_step, max_steps, warns in [(0, 1, True), (0, 2, False), (4, 5, True), (4, 6, False)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            hfx.LiftRefreshCallback().on_train_begin(args, SimpleNamespace(global_step=global_step,
                                                     max_steps=max_steps), None, model=model)  # fmt: skip
        assert any("mask stays static" in r.getMessage() for r in caplog.records) == warns, (global_step, max_steps)
