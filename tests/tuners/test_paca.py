"""PaCA (arXiv 2503.01905): the formulas against independent float64 references, gradients, memory, errors, PEFT
compatibility, a real LM, Trainer runs (loss drops, exact resume) and a bitsandbytes 4-bit base (QPaCA)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend
from torch import nn

import hfx
from hfx.testing import saved_activation_bytes
from hfx.tuners._quantized import restore_bnb_cpu_layout
from hfx.tuners.paca import PartialConnection, paca_column_indices
from hfx.tuners.paca import layer as paca_layer
from hfx.tuners.paca import model as paca_model

TORCH64 = torch.float64


# ---- independent references (explicit loops, float64) -------------------------------------------------------
def ref_effective_weight(w0: torch.Tensor, indices: torch.Tensor, p: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_eff: W0 with column indices[j] replaced by s * P[:, j] (the paper's definition)."""
    w = w0.clone()
    for j, c in enumerate(indices.tolist()):
        w[:, c] = scaling * p[:, j]
    return w


def ref_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y[..., o] = sum_i x[..., i] W[o, i] + b[o], by an explicit sum over the output rows."""
    cols = [(x * w[o]).sum(-1) for o in range(w.shape[0])]
    y = torch.stack(cols, dim=-1)
    return y if b is None else y + b


class One(nn.Module):
    def __init__(self, in_f: int, out_f: int, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.lin(x)


def one_layer(in_f, out_f, cfg, seed=0, dtype=TORCH64, bias=True, randomise=True):
    torch.manual_seed(seed)
    model = get_peft_model(One(in_f, out_f, bias).to(dtype), cfg)
    layer = model.base_model.model.lin
    if randomise:
        with torch.no_grad():
            for p in layer.paca_w.values():
                p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
    return model, layer


def cfg(**kw) -> hfx.PacaConfig:
    return hfx.PacaConfig(target_modules=["lin"], **kw)


# ---- exact maths -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_f,out_f,r,alpha,bias", [(12, 8, 4, 4, True), (13, 7, 5, 20, False), (6, 9, 6, 3, True)])
@pytest.mark.parametrize("shape", [(5,), (3, 4)])  # 2-D and 3-D inputs
def test_forward_matches_reference(in_f, out_f, r, alpha, bias, shape):
    model, layer = one_layer(in_f, out_f, cfg(r=r, paca_alpha=alpha), bias=bias)
    assert layer.paca_w["default"].dtype == TORCH64 and layer.paca_w["default"].shape == (out_f, r)
    w0 = layer.base_layer.weight.detach().clone()
    b = None if not bias else layer.base_layer.bias.detach().clone()
    idx = layer.paca_indices["default"]
    p = layer.paca_w["default"].detach().clone()
    x = torch.randn(*shape, in_f, dtype=TORCH64)
    w_eff = ref_effective_weight(w0, idx, p, alpha / r)
    expected = ref_linear(x, w_eff, b)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.get_delta_weight("default"), w_eff - w0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.paca_orig["default"], w0[:, idx], rtol=0, atol=0)
    # forward never writes into W0
    assert torch.equal(layer.base_layer.weight, w0)


def test_gradcheck_partial_connection():
    torch.manual_seed(0)
    idx = torch.tensor([0, 3, 4])
    x = torch.randn(2, 3, 6, dtype=TORCH64, requires_grad=True)
    p = torch.randn(5, 3, dtype=TORCH64, requires_grad=True)
    orig = torch.randn(5, 3, dtype=TORCH64)
    for scaling in (1.0, 2.5):
        assert torch.autograd.gradcheck(lambda x, p, s=scaling: PartialConnection.apply(x, p, orig, idx, s), (x, p))


def test_gradcheck_whole_layer():
    model, layer = one_layer(7, 5, cfg(r=3, paca_alpha=6))
    x = torch.randn(4, 7, dtype=TORCH64, requires_grad=True)
    p = layer.paca_w["default"]
    assert torch.autograd.gradcheck(lambda x, _p: model(x), (x, p))


@pytest.mark.parametrize("alpha", [4.0, 10.0])
def test_gradients_equal_dense_reference(alpha):
    """dP = s * (dense dW)[:, idx] and dx = g @ W_eff (spec §2(g)3); W0 gets no gradient."""
    r = 4
    model, layer = one_layer(10, 6, cfg(r=r, paca_alpha=alpha))
    s = alpha / r
    idx = layer.paca_indices["default"]
    x = torch.randn(3, 5, 10, dtype=TORCH64, requires_grad=True)
    g = torch.randn(3, 5, 6, dtype=TORCH64)
    (model(x) * g).sum().backward()

    w_eff = ref_effective_weight(
        layer.base_layer.weight.detach(), idx, layer.paca_w["default"].detach(), s
    ).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    (ref_linear(x_ref, w_eff, layer.base_layer.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(layer.paca_w["default"].grad, s * w_eff.grad[:, idx], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, g @ w_eff.detach(), rtol=1e-12, atol=1e-12)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


@pytest.mark.parametrize("alpha", [8, 16, 12, 24, 2.4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_is_exactly_the_base(alpha, dtype):
    """Identity at init, bit for bit, for any s (not only powers of two) and a half-precision base."""
    torch.manual_seed(0)
    base = One(24, 16).to(dtype)
    x = torch.randn(3, 5, 24).to(dtype)
    y0 = base(x)
    model = get_peft_model(base, cfg(r=8, paca_alpha=alpha))
    layer = model.base_model.model.lin
    assert layer.paca_w["default"].dtype == torch.float32  # P stays float32 on a half-precision base
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    # s * P is W0[:, idx] up to one rounding
    w0 = layer.base_layer.weight.float()[:, layer.paca_indices["default"]]
    torch.testing.assert_close(alpha / 8 * layer.paca_w["default"].detach(), w0, rtol=1e-6, atol=0)


# ---- column selection ------------------------------------------------------------------------------------------
def test_indices_unique_sorted_reproducible_and_per_layer():
    idx = paca_column_indices(100, 16, seed=0, layer_name="model.layers.0.q_proj")
    assert idx.dtype == torch.int64 and idx.shape == (16,)
    assert idx.unique().numel() == 16 and idx.min() >= 0 and idx.max() < 100
    assert torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, paca_column_indices(100, 16, seed=0, layer_name="model.layers.0.q_proj"))
    assert not torch.equal(idx, paca_column_indices(100, 16, seed=1, layer_name="model.layers.0.q_proj"))
    assert not torch.equal(idx, paca_column_indices(100, 16, seed=0, layer_name="model.layers.1.q_proj"))
    assert torch.equal(paca_column_indices(7, 7, 0, "x"), torch.arange(7))


def test_indices_independent_of_global_rng():
    """Different global seeds (as on different ranks) give the same columns; the global RNG is not advanced."""
    got = []
    for seed in (0, 1234):
        torch.manual_seed(seed)
        base = One(32, 8)
        state = torch.get_rng_state()
        model = get_peft_model(base, cfg(r=5))
        assert torch.equal(torch.get_rng_state(), state)
        got.append(model.base_model.model.lin.paca_indices["default"].clone())
    assert torch.equal(got[0], got[1])


def test_indices_are_saved_and_restored(tmp_path):
    model, layer = one_layer(16, 8, cfg(r=4, seed=3), dtype=torch.float32)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {
        "base_model.model.lin.paca_w",
        "base_model.model.lin.paca_indices",
        "base_model.model.lin.paca_orig",
    }
    # a different seed in a hand-edited config must not matter: the saved columns are used
    torch.manual_seed(0)
    other = get_peft_model(One(16, 8), cfg(r=4, seed=99))
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(other, {k: v for k, v in saved.items()})
    assert torch.equal(other.base_model.model.lin.paca_indices["default"], layer.paca_indices["default"])


# ---- memory ----------------------------------------------------------------------------------------------------
def test_saved_activation_is_t_times_r():
    """Only x[..., idx] (T x r) is kept for backward; LoRA keeps x (T x n). A frozen linear keeps no activation."""
    n, m, r, t = 64, 48, 8, 2 * 10
    x = torch.randn(2, 10, n, requires_grad=True)
    torch.manual_seed(0)
    frozen = One(n, m).requires_grad_(False)
    assert saved_activation_bytes(frozen, x) == 0
    paca = get_peft_model(One(n, m), cfg(r=r))
    assert saved_activation_bytes(paca, x) == t * r * 4
    lora = get_peft_model(One(n, m), LoraConfig(r=r, target_modules=["lin"]))
    assert saved_activation_bytes(lora, x) >= t * n * 4
    # bf16 input: saved in the input's dtype
    xb = x.detach().bfloat16().requires_grad_()
    assert saved_activation_bytes(paca.to(torch.bfloat16), xb) == t * r * 2


# ---- PEFT behaviour --------------------------------------------------------------------------------------------
def test_merge_replaces_columns_and_unmerge_restores_exactly():
    model, layer = one_layer(12, 6, cfg(r=4, paca_alpha=8), dtype=torch.float32)
    w0 = layer.base_layer.weight.detach().clone()
    idx = layer.paca_indices["default"]
    x = torch.randn(3, 12)
    y = model(x)
    model.merge_adapter()
    w = layer.base_layer.weight.detach()
    rest = torch.ones(12, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(w[:, rest], w0[:, rest])  # only the chosen columns change
    torch.testing.assert_close(w[:, idx], 2.0 * layer.paca_w["default"].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)  # exact: the overwritten columns are put back
    with model.disable_adapter():
        torch.testing.assert_close(model(x), x @ w0.T + layer.base_layer.bias, rtol=0, atol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-6)


def test_several_adapters_sharing_columns_add_their_updates():
    """Same seed and r on the same layer -> the same columns; active adapters add s*P - W0 each, like merging."""
    model, layer = one_layer(10, 6, cfg(r=4, paca_alpha=4))
    model.add_adapter("second", cfg(r=4, paca_alpha=8))
    model.add_adapter("third", cfg(r=3, seed=5))
    with torch.no_grad():
        layer.paca_w["second"].add_(torch.randn(6, 4, dtype=TORCH64))
        layer.paca_w["third"].add_(torch.randn(6, 3, dtype=TORCH64))
    assert torch.equal(layer.paca_indices["default"], layer.paca_indices["second"])
    w0, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    names = ["default", "second", "third"]
    model.base_model.set_adapter(names)
    w = w0.clone()
    for a in names:
        w = w + ref_effective_weight(w0, layer.paca_indices[a], layer.paca_w[a].detach(), layer.paca_scaling[a]) - w0
    x = torch.randn(2, 10, dtype=TORCH64)
    torch.testing.assert_close(model(x), ref_linear(x, w, b), rtol=1e-12, atol=1e-12)
    model.merge_adapter(names)
    torch.testing.assert_close(layer.base_layer.weight, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), ref_linear(x, w, b), rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)


def test_training_never_touches_base_and_forward_is_never_stale():
    """Spec §2(g)5: after optimizer steps, an eval pass, and with checkpointing, every forward equals the
    functional reference with the current P (the reference writes P into W on odd forwards only)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    model = get_peft_model(net, hfx.PacaConfig(r=3, paca_alpha=6, target_modules=["0", "2"]))
    base_w = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 12)

    def reference(x):
        h = x
        for mod in model.base_model.model:
            if isinstance(mod, paca_layer.PacaLinear):
                w = ref_effective_weight(
                    mod.base_layer.weight.detach(), mod.paca_indices["default"], mod.paca_w["default"].detach(), 2.0
                )
                h = h @ w.T + mod.base_layer.bias.detach()
            else:
                h = mod(h)
        return h

    for step in range(4):
        model.train()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2:
            model.eval()
            with torch.no_grad():
                model(x[:1])  # an eval pass in between
            model.train()
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in base_w:
            assert torch.equal(p, base_w[n]), n


LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lm(arch: str = "llama", **kw):
    from hfx.testing import tiny_causal_lm

    return tiny_causal_lm(arch, hidden_size=32, num_layers=2, seed=0, **kw)


def test_lm_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_lm(), hfx.PacaConfig(r=8, paca_alpha=16, target_modules=LM_TARGETS))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_forward_backward_merge_and_trainable_count(arch):
    base = tiny_lm(arch)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    shapes = {n: m.weight.shape for n, m in base.named_modules() if n.split(".")[-1] in LM_TARGETS}
    model = get_peft_model(base, hfx.PacaConfig(r=8, paca_alpha=32, target_modules=LM_TARGETS))
    assert sum(isinstance(m, paca_layer.PacaLinear) for m in model.modules()) == 2 * len(LM_TARGETS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(out_f * 8 for out_f, _ in shapes.values())  # sum of m * r
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)  # identity at init
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
        y = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, y, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, y, atol=0, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, ref, atol=0, rtol=0)


FRESH_LOAD = textwrap.dedent(
    """
    import sys, torch
    import hfx
    from peft import PeftModel
    from hfx.testing import tiny_causal_lm
    base = tiny_causal_lm(sys.argv[3], hidden_size=32, num_layers=2, seed=0)
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    ids = torch.load(sys.argv[2] + ".ids", weights_only=True)
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[2])
    """
)


def test_save_then_load_in_fresh_process_gives_identical_logits(tmp_path):
    model = get_peft_model(tiny_lm("qwen2"), hfx.PacaConfig(r=8, paca_alpha=16, target_modules=LM_TARGETS, seed=7))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save(ids, tmp_path / "out.pt.ids")
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter"), str(tmp_path / "out.pt"), "qwen2"],
        check=True,
        env=env,
        timeout=300,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), logits)


# ---- real Trainer runs -----------------------------------------------------------------------------------------
def _trainer(model, out_dir, max_steps, save_steps=None):
    from transformers import Trainer, TrainingArguments

    from hfx.data import sft_dataset
    from hfx.testing import build_tokenizer

    tok = build_tokenizer()
    rows = sft_dataset(64, difficulty="easy", seed=0, format="text")
    data = [{"input_ids": tok(r["text"])["input_ids"]} for r in rows]

    def collate(features):
        batch = tok.pad({"input_ids": [f["input_ids"] for f in features]}, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collate)


def _paca_lm():
    # Tied embeddings stay frozen; with the default 0.02 init std their logits are too small to fit anything (see
    # tests/tuners/test_bone.py::test_training_run_loss_drops), so use a wider init.
    base = tiny_lm("llama", initializer_range=0.2)
    return get_peft_model(base, hfx.PacaConfig(r=8, paca_alpha=16, target_modules=LM_TARGETS))


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_run_loss_drops_and_resume_gives_the_same_next_losses(tmp_path):
    full = _trainer(_paca_lm(), tmp_path / "full", max_steps=24)
    full.train()
    losses = _losses(full)
    assert len(losses) == 24 and losses[-1] < 0.8 * losses[0], losses
    # the base weights did not move
    fresh = tiny_lm("llama", initializer_range=0.2).state_dict()
    base_now = full.model.get_base_model().state_dict()
    for k, v in fresh.items():
        key = k.replace(".weight", ".base_layer.weight") if k.split(".")[-2] in LM_TARGETS else k
        assert torch.equal(base_now[key], v), k

    first = _trainer(_paca_lm(), tmp_path / "ckpt", max_steps=6, save_steps=3)
    first.train()
    resumed = _trainer(_paca_lm(), tmp_path / "ckpt", max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-3"))
    after = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert _losses(first)[:3] == losses[:3]
    torch.testing.assert_close(torch.tensor(after), torch.tensor(losses[3:6]), rtol=1e-5, atol=1e-6)


# ---- errors ----------------------------------------------------------------------------------------------------
def test_r_larger_than_in_features_names_layer_shape_and_valid_r():
    with pytest.raises(ValueError) as err:
        one_layer(8, 6, cfg(r=9))
    msg = str(err.value)
    assert "'lin'" in msg and "in_features=8" in msg and "out_features=6" in msg and "1 <= r <= 8" in msg


def test_unknown_target_module():
    with pytest.raises(ValueError, match="q_proj"):
        get_peft_model(One(8, 8), hfx.PacaConfig(r=4, target_modules=["q_proj"]))


def test_non_linear_target():
    class WithEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lin = nn.Linear(8, 8)

    with pytest.raises(TypeError, match=r"'emb' of type Embedding.*only torch.nn.Linear"):
        get_peft_model(WithEmb(), hfx.PacaConfig(r=4, target_modules=["emb"]))


def test_conv1d_target_names_conv1d_and_suggests_lora_not_all_linear():
    """On GPT-2 (transformers' Conv1D) the error suggested 'all-linear', which selects the same Conv1D layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for targets in (["c_attn"], "all-linear"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
        with pytest.raises(TypeError) as err:
            get_peft_model(gpt2, hfx.PacaConfig(r=4, target_modules=targets))
        msg = str(err.value)
        assert "transformers' Conv1D (GPT-2 style" in msg and "Use LoRA instead (peft.LoraConfig" in msg, msg
        assert "or 'all-linear')" not in msg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "positive integer"),
        ({"r": 2.5}, "positive integer"),
        ({"paca_alpha": 0}, "paca_alpha"),
        ({"paca_alpha": float("nan")}, "`paca_alpha` must be a finite number > 0"),  # NaN/inf were accepted
        ({"paca_alpha": float("inf")}, "`paca_alpha` must be a finite number > 0"),
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"seed": "a"}, "seed"),
        ({"bias": "lora_only"}, "bias"),
        ({"target_modules": ".*lin", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfx.PacaConfig(**kwargs)


class FakeGPTQLinear(nn.Module):
    """Stands in for a forward-only quantized linear layer (GPTQ/AWQ/EETQ): the weight cannot be de-quantized."""

    def __init__(self, in_f, out_f):
        super().__init__()
        self.in_features, self.out_features = in_f, out_f
        self.register_buffer("qweight", torch.zeros(in_f // 8, out_f, dtype=torch.int32))
        self.weight = self.qweight

    def forward(self, x):
        return x[..., : self.out_features]


def test_forward_only_quantized_layer_is_refused(monkeypatch):
    def fake_resolve(layer, **kwargs):
        return ForwardOnlyQuantizationBackend("gptq") if isinstance(layer, FakeGPTQLinear) else None

    monkeypatch.setattr(paca_layer, "resolve_quantization_backend", fake_resolve)
    monkeypatch.setattr(paca_model, "resolve_quantization_backend", fake_resolve)

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = FakeGPTQLinear(16, 16)

    with pytest.raises(TypeError, match=r"'lin'.*FakeGPTQLinear.*'gptq'.*cannot be de-quantized"):
        get_peft_model(Q(), hfx.PacaConfig(r=4, target_modules=["lin"]))


# ---- bitsandbytes 4-bit base (QPaCA) ----------------------------------------------------------------------------
def _q4_model():
    import bitsandbytes as bnb  # installed with the dev extra; a missing one must fail, not skip

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = dense.bias
    q = q.to("cpu")  # quantizes

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = q

        def forward(self, x):
            return self.lin(x)

    return Q()


def test_qpaca_forward_gradients_and_untouched_4bit_storage():
    model = get_peft_model(_q4_model(), hfx.PacaConfig(r=8, paca_alpha=16, target_modules=["lin"]))
    layer = model.base_model.model.lin
    assert layer.quantization_backend is not None and layer.quantization_backend.backend_name == "bnb 4bit"
    storage = layer.base_layer.weight.detach().clone()
    w_deq = layer.get_base_weight().double()
    idx = layer.paca_indices["default"]
    assert torch.equal(layer.paca_orig["default"].double(), w_deq[:, idx])
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y0 = layer.base_layer(x)
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)  # identity at init

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.base_layer.weight, storage)  # the 4-bit storage is bit-identical after training
    # forward = dequant(W4) with the columns replaced by s * P
    w_eff = ref_effective_weight(w_deq, idx, layer.paca_w["default"].detach().double(), 2.0)
    expected = x.double() @ w_eff.T + layer.base_layer.bias.double()
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    # saved activations: x[..., idx] only (the 4-bit matmul keeps no activation)
    xg = x.clone().requires_grad_()
    assert saved_activation_bytes(model, xg) == 10 * 8 * 4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_qpaca_merge_warns_and_unmerge_restores_4bit_storage(mode):
    """In eval mode bitsandbytes >= 0.50 repacks the 4-bit weight for AVX512-BF16 CPUs at the first forward; the
    merge de-quantized that layout as if it were the standard one (outputs off by ~1) before hfx undid it."""
    model = get_peft_model(_q4_model(), hfx.PacaConfig(r=8, target_modules=["lin"]))
    model.train(mode == "train")
    layer = model.base_model.model.lin

    def stored():  # the 4-bit storage in bitsandbytes' standard layout
        restore_bnb_cpu_layout(layer.get_base_layer())
        return layer.base_layer.weight.detach().clone()

    x = torch.randn(4, 64)
    with torch.no_grad():
        layer.paca_w["default"].add_(0.02 * torch.randn(32, 8))  # a trained-looking update
        y = model(x)
        storage = stored()
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        assert not torch.equal(stored(), storage)
        torch.testing.assert_close(model(x), y, rtol=0.1, atol=0.1)  # 4-bit rounding of the new columns
        model.unmerge_adapter()
        assert torch.equal(stored(), storage)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_merge_into_8bit_base_then_unmerge_or_disable_restores_it_exactly():
    """bitsandbytes 8-bit moves its int8 data and scales from the weight to the layer state at the first forward,
    and re-quantizing resets that state: unmerge used to put back only the weight, leaving a base without its
    scales (outputs off by hundreds)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(16, 32)
    q = bnb.nn.Linear8bitLt(16, 32, has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = dense.bias
    base = One(16, 32)
    base.lin = q.to("cpu")  # quantizes
    model = get_peft_model(base, hfx.PacaConfig(r=4, target_modules=["lin"], init_weights=False)).eval()
    assert model.base_model.model.lin.quantization_backend.backend_name == "bnb 8bit"
    x = torch.randn(3, 16)
    with torch.no_grad():
        with model.disable_adapter():
            base_out = model(x)  # the first forward moves the int8 data and scales to the layer state
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        with model.disable_adapter():  # unmerges
            torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
