"""DSEE (arXiv 2111.00160): selection, forward and merge against float64 references, gradients, pruning of the final
weights (unstructured and heads), save/load (fresh process), a tiny LM and a tiny BERT classifier, the Trainer."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import hfx
from hfx.testing import as_hub_cache, saved_activation_bytes
from hfx.tuners.dsee import DseeLinear, dsee_select, grebsmo, load_pruning, prune, remove_pruned_heads, save_pruning

TORCH64 = torch.float64


class One(nn.Module):
    def __init__(self, in_f: int, out_f: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_f, out_f)

    def forward(self, x):
        return self.lin(x)


def one_layer(in_f, out_f, cfg, seed=0, dtype=TORCH64):
    torch.manual_seed(seed)
    model = get_peft_model(One(in_f, out_f).to(dtype), cfg)
    return model, model.base_model.model.lin


def randomise(model: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "dsee_" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=TORCH64).to(p.dtype) * std)


def planted(m=64, n=48, rank=3, n_sparse=30, seed=0):
    """W = low-rank + sparse with planted large entries; returns (W, sorted planted flat indices)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=gen, dtype=TORCH64) @ torch.randn(rank, n, generator=gen, dtype=TORCH64)
    idx = torch.randperm(m * n, generator=gen)[:n_sparse].sort().values
    sparse = torch.zeros(m * n, dtype=TORCH64)
    signs = torch.randint(0, 2, (n_sparse,), generator=gen).to(TORCH64) * 2 - 1
    sparse[idx] = signs * (4 + torch.rand(n_sparse, generator=gen, dtype=TORCH64))
    return low + sparse.view(m, n), idx


# ---- selection -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["grebsmo", "svd_residual", "magnitude", "random"])
def test_selection_exactly_n_sorted_unique_and_ties(method):
    w, _ = planted()
    idx = dsee_select(w, 37, method, sparse_rank=3).long()
    assert idx.numel() == 37 and torch.equal(idx, torch.unique(idx))
    # ties everywhere (a constant / rank-1 matrix): still exactly N, never "everything >= the N-th value"
    flat = torch.ones(16, 12, dtype=TORCH64)
    tied = dsee_select(flat, 5, method, sparse_rank=2).long()
    assert tied.numel() == 5 and torch.unique(tied).numel() == 5
    assert dsee_select(flat, 16 * 12, method).numel() == 16 * 12


@pytest.mark.parametrize("method", ["grebsmo", "svd_residual", "magnitude"])
def test_selection_does_not_depend_on_the_weights_scale(method):
    """Omega is a property of W's structure: scaling W (trained LLM weights have RMS ~0.02, the planted test matrix
    ~1) selects the same entries. GreBsmo's threshold is relative to RMS(W); a threshold on mean(W^2) kept 64% of the
    selection at RMS 0.05."""
    w, _ = planted()
    ref = dsee_select(w, 30, method, sparse_rank=3)
    for c in (0.02, 3.0):
        assert torch.equal(dsee_select(c * w, 30, method, sparse_rank=3), ref), c


@pytest.mark.parametrize("method", ["grebsmo", "svd_residual"])
def test_decomposition_recovers_planted_sparse_support(method):
    w, truth = planted()
    idx = dsee_select(w, truth.numel(), method, sparse_rank=3).long()
    recall = torch.isin(idx, truth).float().mean()
    assert recall >= 0.9, recall
    if method == "grebsmo":
        low, sparse, history = grebsmo(w, 3)
        assert torch.equal(torch.nonzero(sparse.reshape(-1)).view(-1), truth)  # GreBsmo's S is the planted support
        assert history[-1] < 1e-6 * w.norm()  # and W = UV + S is recovered
        assert torch.linalg.matrix_rank(low) == 3


def test_magnitude_and_random_are_what_they_say():
    w, _ = planted()
    assert torch.equal(dsee_select(w, 50, "magnitude").long(), torch.topk(w.abs().reshape(-1), 50).indices.sort()[0])
    torch.manual_seed(1)
    a = dsee_select(w, 50, "random", seed=3, layer_name="a")
    torch.manual_seed(2)
    assert torch.equal(a, dsee_select(w, 50, "random", seed=3, layer_name="a"))  # seeded, not the global RNG
    assert not torch.equal(a, dsee_select(w, 50, "random", seed=3, layer_name="b"))  # differs between layers
    torch.manual_seed(5)
    g = dsee_select(w, 50, "grebsmo")
    torch.manual_seed(6)
    assert torch.equal(g, dsee_select(w, 50, "grebsmo"))


def test_auto_method_cutoff():
    cfg = hfx.DseeConfig()
    assert cfg.method_for(768, 768) == "grebsmo" and cfg.method_for(4096, 4096) == "svd_residual"
    assert hfx.DseeConfig(sparse_method="magnitude").method_for(8, 8) == "magnitude"


# ---- forward, merge, gradients ---------------------------------------------------------------------------------------
def test_forward_and_merge_match_float64_reference():
    cfg = hfx.DseeConfig(r=3, lora_alpha=6, num_sparse=20, target_modules=["lin"])
    model, layer = one_layer(12, 10, cfg)
    randomise(model)
    w0, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    a, bb = layer.dsee_A["default"].weight.detach(), layer.dsee_B["default"].weight.detach()
    idx, v = layer.dsee_s_indices["default"].long(), layer.dsee_s_values["default"].detach()
    s = torch.zeros(120, dtype=TORCH64)
    for i, val in zip(idx.tolist(), v.tolist()):
        s[i] += val
    delta = 2.0 * (bb @ a + s.view(10, 12))  # s = lora_alpha / r = 2 scales both terms
    x = torch.randn(3, 5, 12, dtype=TORCH64)
    torch.testing.assert_close(model(x), x @ (w0 + delta).T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta, rtol=1e-14, atol=1e-14)
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0 + delta, rtol=0, atol=1e-14)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-14)


def test_gradcheck_layer():
    cfg = hfx.DseeConfig(r=2, lora_alpha=4, num_sparse=7, target_modules=["lin"])
    model, layer = one_layer(5, 4, cfg)
    randomise(model)
    params = [layer.dsee_A["default"].weight, layer.dsee_B["default"].weight, layer.dsee_s_values["default"]]
    x = torch.randn(2, 3, 5, dtype=TORCH64, requires_grad=True)
    # gradcheck the input path; the parameter gradients against the closed forms dA = s B^T G, dB = s G A^T and
    # dv = s G[idx] with G = dL/dW, then gradcheck the sparse values on their own
    assert torch.autograd.gradcheck(lambda x: model(x), (x,))
    y = model(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)
    dw = g.reshape(-1, 4).T @ x.detach().reshape(-1, 5)  # dL/dW
    s = layer.dsee_scaling["default"]
    a, b = params[0].detach(), params[1].detach()
    torch.testing.assert_close(grads[0], s * b.T @ dw)
    torch.testing.assert_close(grads[1], s * dw @ a.T)
    torch.testing.assert_close(grads[2], s * dw.reshape(-1)[layer.dsee_s_indices["default"].long()])
    assert torch.autograd.gradcheck(
        lambda v: _with_values(layer, model, v, x.detach()), (params[2].detach().clone().requires_grad_(True),)
    )


def test_pruned_layer_matches_float64_and_keeps_no_dense_product():
    """After pruning, the update is s (B A + S) * M: checked against float64 closed forms, and autograd keeps no
    m x n tensor for it (it used to keep the dense masked product of every adapted layer)."""
    cfg = hfx.DseeConfig(r=2, lora_alpha=4, num_sparse=7, target_modules=["lin"])
    model, layer = one_layer(12, 10, cfg)
    randomise(model)
    prune(model, ratio=0.3)
    keep = layer.dsee_prune_mask
    assert 0 < int((~keep).sum()) < keep.numel()
    a, b = layer.dsee_A["default"].weight, layer.dsee_B["default"].weight
    s = layer.dsee_scaling["default"]
    w0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x = torch.randn(2, 3, 12, dtype=TORCH64, requires_grad=True)
    y = model(x)
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(y, x @ (w0 + delta).T + bias, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grad_x, grad_a, grad_b = torch.autograd.grad(y, (x, a, b), g)
    dw = (g.reshape(-1, 10).T @ x.detach().reshape(-1, 12)) * keep  # dL/dW on the kept entries
    torch.testing.assert_close(grad_x, g @ (w0 + delta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_a, s * b.detach().T @ dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, s * dw @ a.detach().T, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: model(t), (x,))
    saved = saved_activation_bytes(model, x.detach().requires_grad_(True), distinct=True)
    assert saved < 10 * 12 * 8, saved  # less than one m x n float64 tensor: x and a few per-token vectors


def test_pruned_retraining_under_zero3_is_a_clear_error():
    cfg = hfx.DseeConfig(r=2, lora_alpha=4, num_sparse=7, target_modules=["lin"])
    model, layer = one_layer(12, 10, cfg)
    prune(model, ratio=0.3)
    layer.dsee_A["default"].weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(NotImplementedError, match="ZeRO-3 is not supported.*'lin'.*ZeRO-1/2"):
        model(torch.randn(2, 12, dtype=TORCH64))


def _with_values(layer, model, v, x):
    from hfx.tuners._sparse import sparse_delta_linear

    s = layer.dsee_scaling["default"]
    return s * sparse_delta_linear(x, v, layer.dsee_s_indices["default"], (layer.out_features, layer.in_features))


def test_default_init_is_exactly_the_base_and_paper_init():
    cfg = hfx.DseeConfig(r=4, num_sparse=10, target_modules=["lin"])
    torch.manual_seed(0)
    base = One(16, 12)
    x = torch.randn(4, 16)
    y = base(x)
    model = get_peft_model(base, cfg)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    layer = model.base_model.model.lin
    a = layer.dsee_A["default"].weight
    assert layer.dsee_B["default"].weight.abs().sum() == 0 and layer.dsee_s_values["default"].abs().sum() == 0
    assert 0.01 < a.std() < 0.03  # N(0, 0.02^2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * (16 + 12) + 10
    assert cfg.r == 4 and hfx.DseeConfig().r == 16 and hfx.DseeConfig().num_sparse == 64


# ---- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_sparse": 0}, "num_sparse"),
        ({"num_sparse": 4, "density": 0.1}, "either"),
        ({"density": 1.5}, "density"),
        ({"r": 0}, "positive integer"),
        ({"sparse_method": "omp"}, "sparse_method"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"bias": "lora_only"}, "bias"),
        ({"grebsmo_threshold": float("inf")}, "grebsmo_threshold"),
        ({"grebsmo_threshold": float("nan")}, "grebsmo_threshold"),
        ({"lora_alpha": 0}, "lora_alpha"),  # scaling 0: the adapter could never learn
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": -5}, "lora_alpha"),
        ({"pruned": "yes"}, "pruned"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfx.DseeConfig(**kwargs)


def test_num_sparse_larger_than_matrix_and_unknown_targets():
    with pytest.raises(ValueError, match=r"num_sparse.*m \* n = 12"):
        get_peft_model(One(4, 3), hfx.DseeConfig(num_sparse=13, target_modules=["lin"]))
    with pytest.raises(ValueError, match="q_proj"):
        get_peft_model(One(4, 3), hfx.DseeConfig(target_modules=["q_proj"]))


def test_conv1d_target_names_conv1d_and_suggests_lora_not_all_linear():
    """On GPT-2 (transformers' Conv1D) DSEE named BERT's layers as the fix; 'all-linear' selects the same Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for targets in (["c_attn"], "all-linear"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
        with pytest.raises(TypeError) as err:
            get_peft_model(gpt2, hfx.DseeConfig(r=2, num_sparse=4, target_modules=targets))
        msg = str(err.value)
        assert "transformers' Conv1D (GPT-2 style" in msg and "Use LoRA instead (peft.LoraConfig" in msg, msg
        assert not any(isinstance(m, DseeLinear) for m in gpt2.modules())  # rolled back


# ---- a tiny BERT classifier ------------------------------------------------------------------------------------------
def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))


def bert_dsee(seed: int = 0, **kw):
    cfg = hfx.DseeConfig(**{"r": 4, "num_sparse": 16, "modules_to_save": ["classifier"], **kw})
    model = get_peft_model(tiny_bert(seed), cfg)
    randomise(model, std=0.05, seed=seed + 1)
    return model.eval()


def test_bert_default_targets_query_value_and_init():
    base = tiny_bert()
    with torch.no_grad():
        y = base(IDS).logits
    model = get_peft_model(base, hfx.DseeConfig(r=4, num_sparse=16, modules_to_save=["classifier"]))
    names = sorted(n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, DseeLinear))
    assert names == ["query", "query", "value", "value"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, y, rtol=0, atol=0)
    assert any("classifier" in n and p.requires_grad for n, p in model.named_parameters())


def test_unstructured_pruning_exact_sparsity_merge_zero_retrain_and_save(tmp_path):
    from transformers import BertForSequenceClassification

    model = bert_dsee()
    stats = prune(model, ratio=0.3, adapter_ratio=0.25)
    adapted = [m for m in model.modules() if isinstance(m, DseeLinear)]
    ad_total = sum(m.out_features * m.in_features for m in adapted)
    assert stats["adapter_total"] == ad_total and stats["adapter_pruned"] == round(0.25 * ad_total)
    assert sum(int((~m.dsee_prune_mask).sum()) for m in adapted) == round(0.25 * ad_total)
    assert stats["base_pruned"] == round(0.3 * stats["base_total"])
    # key/attention-output/FFN/pooler pruned by |W0|: exactly the smallest entries, jointly; the classifier untouched
    root = model.get_base_model()
    key = root.bert.encoder.layer[0].attention.self.key
    assert (key.weight == 0).sum() == (~key.dsee_prune_mask).sum() > 0
    assert not hasattr(root.classifier.modules_to_save["default"], "dsee_prune_mask")
    # adapted layers are scored by |dW| (ABS): every pruned entry's |dW| <= every kept one's
    deltas = torch.cat([m.get_delta_weight("default", masked=False).abs().reshape(-1) for m in adapted])
    masks = torch.cat([m.dsee_prune_mask.reshape(-1) for m in adapted])
    assert deltas[~masks].max() <= deltas[masks].min()
    # retraining keeps the pruned entries at exactly zero (the mask is enforced in the forward)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        model(input_ids=IDS, labels=torch.tensor([0, 1, 2])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        y = model(IDS).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(IDS).logits, y, atol=1e-5, rtol=1e-5)
    for m in [merged.bert.encoder.layer[i].attention.self for i in range(2)]:
        for lin in (m.query, m.value, m.key):
            assert torch.all(lin.weight[~lin.dsee_prune_mask] == 0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, y, atol=1e-5, rtol=1e-5)
    q = reloaded.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(q == 0, ~merged.bert.encoder.layer[0].attention.self.query.dsee_prune_mask)


def test_unmerge_after_pruning_is_exact():
    model = bert_dsee()
    prune(model, ratio=0.2)
    layer = next(m for m in model.modules() if isinstance(m, DseeLinear))
    w = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = model(IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-6, rtol=0)


def test_head_pruning_zeroes_lowest_heads_and_removal_gives_same_logits():
    model = bert_dsee()
    # the expected heads: lowest sum over rows of |dW_q| + |dW_v| per head
    expected = {}
    for i, layer in enumerate(model.get_base_model().bert.encoder.layer):
        sa = layer.attention.self
        score = sum(m.get_delta_weight("default").abs().sum(1).view(4, 8).sum(1) for m in (sa.query, sa.value))
        expected[f"bert.encoder.layer.{i}.attention.self"] = sorted(torch.argsort(score)[:1].tolist())
    stats = prune(model, ratio=None, heads_per_layer=1)
    assert stats["heads"] == expected
    sa = model.get_base_model().bert.encoder.layer[0].attention.self
    h = expected["bert.encoder.layer.0.attention.self"][0]
    rows = slice(8 * h, 8 * (h + 1))
    for lin in (sa.query.base_layer, sa.key, sa.value.base_layer):
        assert torch.all(lin.weight[rows] == 0) and torch.all(lin.bias[rows] == 0)
    o = model.get_base_model().bert.encoder.layer[0].attention.output.dense
    assert torch.all(o.weight[:, rows] == 0)
    with torch.no_grad():
        y = model(IDS).logits
        merged = model.merge_and_unload()
        assert torch.all(merged.bert.encoder.layer[0].attention.self.query.weight[rows] == 0)
        remove_pruned_heads(merged)
        sa = merged.bert.encoder.layer[0].attention.self
        assert sa.query.out_features == sa.key.out_features == sa.value.out_features == 24
        assert merged.bert.encoder.layer[0].attention.output.dense.in_features == 24
        torch.testing.assert_close(merged(IDS).logits, y, atol=1e-5, rtol=1e-5)


def test_an_adapter_added_after_pruning_saves_and_loads_with_the_masks(tmp_path):
    """A second adapter added to a pruned model trains on the pruned base; it used to be saved without the masks
    (its config not marked pruned), and loaded on its own it ran on the unpruned base (0.3 off in the logits)."""
    model = bert_dsee()
    prune(model, ratio=0.3)
    model.add_adapter("b", hfx.DseeConfig(r=4, num_sparse=16, modules_to_save=["classifier"]))
    model.set_adapter("b")
    randomise(model, std=0.05, seed=3)
    assert model.peft_config["b"].pruned
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert {"dsee_pruning.safetensors", "dsee_pruning.json"} <= set(os.listdir(tmp_path / "b"))
    alone = PeftModel.from_pretrained(tiny_bert(), tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(alone(IDS).logits, want, rtol=0, atol=1e-6)


def test_an_unpruned_hub_adapter_loaded_onto_a_pruned_model_fetches_no_masks(monkeypatch):
    """An adapter loaded onto a pruned model is marked pruned on load (so it saves with the masks); the load hook
    then took it for one saved pruned and tried to fetch masks from the Hub that were never saved."""
    import huggingface_hub

    from hfx.tuners.dsee.prune import apply_saved_pruning

    model = bert_dsee()
    prune(model, ratio=0.3)
    model.add_adapter("c", hfx.DseeConfig(r=4, num_sparse=16))  # what load_adapter("user/c", "c") injects
    assert model.peft_config["c"].pruned

    def no_download(*args, **kwargs):
        raise AssertionError(f"downloaded {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    assert apply_saved_pruning(model, "user/c", "c") is None


def test_head_pruning_reads_each_layers_own_head_count():
    """Layers with different head counts (as Laguna's num_attention_heads_per_layer: here 4 then 2 heads of 8) are
    pruned by their own q_proj, not by the config's num_attention_heads (which refused the 2-head layer)."""
    from torch import nn

    base = tiny_lm()  # 4 query heads of 8, 2 key/value heads
    attn = base.model.layers[1].self_attn
    hidden, d = base.config.hidden_size, attn.head_dim
    attn.q_proj, attn.o_proj = nn.Linear(hidden, 2 * d, bias=False), nn.Linear(2 * d, hidden, bias=False)
    attn.k_proj, attn.v_proj = nn.Linear(hidden, d, bias=False), nn.Linear(hidden, d, bias=False)
    model = get_peft_model(base, hfx.DseeConfig(r=2, num_sparse=8, target_modules=["q_proj", "v_proj"]))
    stats = prune(model, ratio=None, heads_per_layer=1, head_mode="wabs")
    assert sorted(stats["heads"]) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    q1 = model.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight
    (head,) = stats["heads"]["model.layers.1.self_attn"]
    assert q1.shape[0] == 2 * d and torch.all(q1[d * head : d * (head + 1)] == 0) and q1.abs().sum() > 0


def test_head_layouts_that_cannot_be_pruned_or_removed_are_refused_untouched():
    """Gated attention (Qwen3-Next: q_proj packs a gate with the queries, 2·H·d rows) used to count twice the heads,
    zero layer 0's q rows and then crash on o_proj; OLMo-2's q/k RMSNorm over all heads' features used to leave a
    model that failed in forward after remove_pruned_heads returned. Both are refused before any weight changes."""
    from transformers import Olmo2Config, Olmo2ForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    gated = Qwen3NextForCausalLM(
        Qwen3NextConfig(
            hidden_size=64, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=16,
            num_experts=2, num_experts_per_tok=1, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=64, layer_types=["full_attention", "full_attention"],
        )
    )  # fmt: skip
    model = get_peft_model(gated, hfx.DseeConfig(r=2, num_sparse=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"query heads of 16 that o_proj reads back \(q outputs 128, o inputs 64.*Nothing was pruned"
    ):
        prune(model, ratio=None, heads_per_layer=1, head_mode="wabs")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    olmo = Olmo2ForCausalLM(
        Olmo2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=64)
    )  # fmt: skip
    model = get_peft_model(olmo, hfx.DseeConfig(r=2, num_sparse=8, target_modules=["q_proj", "v_proj"]))
    prune(model, ratio=None, heads_per_layer=1, head_mode="wabs")
    merged = model.merge_and_unload()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        y = merged(ids).logits
        with pytest.raises(ValueError, match=r"q_norm \(\(32,\)\), k_norm \(\(32,\)\).*Nothing was removed"):
            remove_pruned_heads(merged)
        torch.testing.assert_close(merged(ids).logits, y, rtol=0, atol=0)  # still runs, unchanged


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": 0.2, "adapter_ratio": -0.1}, "adapter_ratio"),
        ({"ratio": None}, "Nothing to prune"),
        ({"ratio": None, "heads_per_layer": 4}, "heads_per_layer"),
        ({"mode": "l2"}, "mode"),
    ],
)
def test_prune_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune(bert_dsee(), **kwargs)


def test_prune_exclude_modules_as_one_name_and_unknown_adapter():
    """``exclude_modules="intermediate.dense"`` used to become a tuple of letters, which excluded nothing and pruned
    that layer in place; an unknown ``adapter_name`` used to score a zero update everywhere, silently."""
    model = bert_dsee()
    layer = model.get_base_model().bert.encoder.layer[0].intermediate.dense
    prune(model, ratio=0.5, exclude_modules="intermediate.dense")
    assert torch.count_nonzero(layer.weight) == layer.weight.numel()
    other = bert_dsee()
    prune(other, ratio=0.5, exclude_modules=("intermediate.dense",))
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name  # a string is the one-name list
    with pytest.raises(TypeError, match="`exclude_modules` must be a module name or a list"):
        prune(bert_dsee(), exclude_modules=3)
    with pytest.raises(ValueError, match=r"no DSEE adapter named 'defualt'; the model has \['default'\]"):
        prune(bert_dsee(), mode="wabs", adapter_name="defualt")


def test_head_pruning_with_all_zero_scores_warns(caplog):
    """An untrained adapter scores every head 0: the 'lowest' heads are the first ones, which is now said."""
    model = get_peft_model(tiny_bert(), hfx.DseeConfig(r=4, num_sparse=16, modules_to_save=["classifier"]))
    with caplog.at_level(logging.WARNING, logger="hfx.dsee"):
        stats = prune(model, ratio=None, heads_per_layer=1)
    assert set(map(tuple, stats["heads"].values())) == {(0,)}
    assert any("every head score is zero" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hfx.dsee"):
        prune(bert_dsee(), ratio=None, heads_per_layer=1)  # trained (randomised) update: no warning
    assert not any("every head score is zero" in r.getMessage() for r in caplog.records)


def test_prune_refuses_merged_and_non_dsee():
    model = bert_dsee()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        prune(model)
    with pytest.raises(ValueError, match="no DSEE layers"):
        prune(tiny_bert())


FRESH_LOAD = textwrap.dedent(
    """
    import sys, torch
    import hfx
    from peft import PeftModel
    sys.path.insert(0, sys.argv[3])
    from test_dsee import tiny_bert, IDS
    torch.manual_seed(987)  # another RNG state than the saving process
    model = PeftModel.from_pretrained(tiny_bert(), sys.argv[1]).eval()  # re-applies the saved masks itself
    with torch.no_grad():
        torch.save(model(IDS).logits, sys.argv[2])
    """
)


def test_save_pruned_adapter_then_load_in_fresh_process_gives_identical_logits(tmp_path):
    model = bert_dsee()
    prune(model, ratio=0.2, heads_per_layer=1)
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")  # writes the masks too: the model is pruned
    assert (tmp_path / "adapter" / "dsee_pruning.safetensors").exists()
    assert (tmp_path / "adapter" / "dsee_pruning.json").exists()
    assert not list((tmp_path / "adapter").glob("*.bin")) and not list((tmp_path / "adapter").glob("*.pt"))
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter"), str(tmp_path / "out.pt"), os.path.dirname(__file__)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), logits)
    # in-process too, and the explicit save_pruning / load_pruning pair (e.g. for a merged model), with the heads
    fresh = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
    save_pruning(model, tmp_path / "explicit")
    info = load_pruning(fresh, tmp_path / "explicit")
    assert info["heads"] == model.get_base_model()._dsee_pruning["heads"]


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1,), (7, 1, 3)])
def test_mask_packing_round_trip(shape):
    from hfx.tuners.dsee.prune import pack_mask, unpack_mask

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(ValueError, match="damaged"):
        unpack_mask(packed[:-1] if packed.numel() > 1 else torch.zeros(2, dtype=torch.uint8), shape)


def test_masks_file_is_bit_packed_and_version_1_bool_files_still_load(tmp_path):
    from safetensors.torch import save_file

    from hfx.tuners.dsee.prune import read_masks

    model = bert_dsee()
    prune(model, ratio=0.2, heads_per_layer=1)
    save_pruning(model, tmp_path / "v2")
    masks = read_masks(tmp_path / "v2")
    raw = (tmp_path / "v2" / "dsee_pruning.safetensors").read_bytes()
    data_bytes = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, header, data
    assert data_bytes == sum(-(-m.numel() // 8) for m in masks.values())  # 1 bit per entry (a bool is 8)
    for key, mask in masks.items():  # the masks in memory, bit for bit
        name, kind = key.rsplit(".", 1)
        module = model.get_base_model().get_submodule(name)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        assert torch.equal(mask, module._buffers["dsee_prune_mask" if kind == "weight" else "dsee_prune_bias_mask"])
    # an hfx from before packing wrote one bool per entry, without metadata shapes: it loads as before
    (tmp_path / "v1").mkdir()
    save_file(masks, str(tmp_path / "v1" / "dsee_pruning.safetensors"), metadata={"format": "hfx-dsee-pruning"})
    (tmp_path / "v1" / "dsee_pruning.json").write_text((tmp_path / "v2" / "dsee_pruning.json").read_text())
    old = read_masks(tmp_path / "v1")
    assert old.keys() == masks.keys() and all(torch.equal(old[k], masks[k]) for k in masks)
    fresh = bert_dsee()
    load_pruning(fresh, tmp_path / "v1")
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_pruned_adapter_from_the_hub_downloads_and_applies_its_masks(tmp_path, monkeypatch):
    """``PeftModel.from_pretrained("<user>/<repo>")`` of a pruned DSEE adapter fetches the masks with the adapter
    (through the Hub client, here from its offline cache) and gives the pruned model's logits; a repository without
    them is an error, not a silently unpruned model."""
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # tests/conftest.py: nothing here reaches the network
    model = bert_dsee()
    prune(model, ratio=0.2, heads_per_layer=1)
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    as_hub_cache(tmp_path / "adapter", tmp_path / "cache", "hfx-test/pruned-dsee")
    loaded = PeftModel.from_pretrained(tiny_bert(), "hfx-test/pruned-dsee").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)
    (tmp_path / "bare").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "bare" / f).write_bytes((tmp_path / "adapter" / f).read_bytes())
    as_hub_cache(tmp_path / "bare", tmp_path / "cache", "hfx-test/pruned-dsee-no-masks")
    # what a Trainer's pushes during training leave at the repository root: the message says where the masks are
    with pytest.raises(FileNotFoundError, match=r"saved from a pruned model, but its pruning masks(?s:.*)"
                       r"subfolder='last-checkpoint'"):  # fmt: skip
        PeftModel.from_pretrained(tiny_bert(), "hfx-test/pruned-dsee-no-masks")


# ---- tiny causal LMs --------------------------------------------------------------------------------------------------
def tiny_lm(arch: str = "llama", **kw):
    from hfx.testing import tiny_causal_lm

    return tiny_causal_lm(arch, hidden_size=32, num_layers=2, seed=0, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_default_targets_forward_backward_merge_and_gqa_heads(arch):
    base = tiny_lm(arch)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    model = get_peft_model(base, hfx.DseeConfig(r=2, num_sparse=32))
    layers = [m for m in model.modules() if isinstance(m, DseeLinear)]
    assert sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, DseeLinear)}) == [
        "q_proj",
        "v_proj",
    ]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(2 * (m.in_features + m.out_features) + 32 for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    randomise(model, std=0.02)
    with torch.no_grad():
        y = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    # GQA (4 query heads, 2 key/value heads): k/v rows are zeroed only when both heads of a group are pruned
    stats = prune(model, ratio=None, heads_per_layer=1)
    attn = model.get_base_model().model.layers[0].self_attn
    (h,) = stats["heads"]["model.layers.0.self_attn"]
    d = attn.head_dim
    assert torch.all(attn.q_proj.base_layer.weight[h * d : (h + 1) * d] == 0)
    assert torch.all(attn.o_proj.weight[:, h * d : (h + 1) * d] == 0)
    assert attn.k_proj.dsee_prune_mask.view(2, d, -1).all(dim=(1, 2)).tolist() == [True, True]
    again = prune(model, ratio=0.2)  # unstructured on top: masks combine, the heads stay pruned
    assert again["heads"] == stats["heads"] and torch.all(attn.o_proj.weight[:, h * d : (h + 1) * d] == 0)
    with torch.no_grad():
        y = model(ids).logits
        assert torch.isfinite(y).all()
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, y, atol=1e-5, rtol=1e-5)
    assert torch.all(merged.model.layers[0].self_attn.q_proj.weight[h * d : (h + 1) * d] == 0)


# ---- the HF Trainer ----------------------------------------------------------------------------------------------------
def make_trainer(model, out_dir, max_steps, save_steps=None, lr=1e-2, n=64):
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
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collate)


def losses_of(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def lm_dsee():
    cfg = hfx.DseeConfig(r=4, num_sparse=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    return get_peft_model(tiny_lm(initializer_range=0.2), cfg)


def test_training_run_loss_drops(tmp_path):
    trainer = make_trainer(lm_dsee(), tmp_path, 30, lr=1e-2, n=128)
    trainer.train()
    losses = [v for _, v in sorted(losses_of(trainer).items())]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_resume_gives_same_next_losses_with_sparse_entries_restored(tmp_path):
    trainer = make_trainer(lm_dsee(), tmp_path / "run", 4, save_steps=2)
    trainer.train()
    full = losses_of(trainer)
    saved = trainer.model.state_dict()
    from safetensors.torch import load_file

    ckpt = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert any("dsee_s_values" in k for k in ckpt) and any("dsee_s_indices" in k for k in ckpt)
    assert any(v.abs().sum() > 0 for k, v in ckpt.items() if "dsee_s_values" in k)  # the sparse entries trained
    resumed = make_trainer(lm_dsee(), tmp_path / "resumed", 4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    again = losses_of(resumed)
    for step in (3, 4):
        assert again[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, again, full)
    for k, v in resumed.model.state_dict().items():
        if "dsee_s_" in k:
            torch.testing.assert_close(v, saved[k], rtol=1e-6, atol=1e-7)


def test_pruned_retraining_resumes_from_a_checkpoint_with_its_masks(tmp_path):
    """The masks were non-persistent buffers that only an explicit save_pruning wrote: a Trainer checkpoint of the
    retraining held none, and resuming on a fresh model retrained the unpruned base silently."""
    model = lm_dsee()
    make_trainer(model, tmp_path / "stage1", 3).train()
    prune(model, ratio=0.3, heads_per_layer=1)
    trainer = make_trainer(model, tmp_path / "run", 4, save_steps=2)
    trainer.train()
    full = losses_of(trainer)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "dsee_pruning.safetensors").exists() and (ckpt / "dsee_pruning.json").exists()
    fresh = lm_dsee()
    resumed = make_trainer(fresh, tmp_path / "resumed", 4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    again = losses_of(resumed)
    for step in (3, 4):
        assert again[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, again, full)
    masks = {n: b for n, b in model.named_buffers() if n.endswith("dsee_prune_mask")}
    got = dict(fresh.named_buffers())
    assert masks and all(torch.equal(got[n], b) for n, b in masks.items())
    assert fresh.peft_config["default"].pruned


def test_pruned_adapter_without_its_masks_is_an_error(tmp_path):
    model = bert_dsee()
    prune(model, ratio=0.2)
    model.save_pretrained(tmp_path / "adapter")
    import json

    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["pruned"] is True
    os.remove(tmp_path / "adapter" / "dsee_pruning.safetensors")
    with pytest.raises(FileNotFoundError, match="saved from a pruned model"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    unpruned = bert_dsee()
    unpruned.save_pretrained(tmp_path / "plain")  # an unpruned adapter writes no masks and loads as before
    assert not (tmp_path / "plain" / "dsee_pruning.safetensors").exists()
    PeftModel.from_pretrained(tiny_bert(), tmp_path / "plain")


def test_pruned_adapter_loads_with_its_masks_through_transformers(tmp_path):
    """transformers' own entry points (``model.load_adapter``, ``AutoModelForCausalLM.from_pretrained(<adapter>)``)
    re-apply the masks as PeftModel.from_pretrained does; they used to load the adapter onto the unpruned base."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hfx.testing import save_tiny_model

    base_dir = save_tiny_model(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), hfx.DseeConfig(r=2, num_sparse=8))
    randomise(model, std=0.1)
    prune(model, ratio=0.5)
    ids = torch.arange(1, 30, 4)[None]
    with torch.no_grad():
        ref = model.eval()(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    for how in ("load_adapter", "from_pretrained"):
        if how == "load_adapter":
            loaded = AutoModelForCausalLM.from_pretrained(base_dir)
            loaded.load_adapter(str(tmp_path / "adapter"))
        else:
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
        k_proj = loaded.get_submodule("model.layers.0.self_attn.k_proj")
        assert (k_proj.weight == 0).float().mean() > 0.3, how  # pruned (k_proj has no adapter; its zeros are masks)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, ref), how
    # a state dict carries no masks: said, not silently unpruned
    loaded = AutoModelForCausalLM.from_pretrained(base_dir)
    config = copy.deepcopy(model.peft_config["default"])
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="carries no pruning masks"):
        loaded.load_adapter(peft_config=config, adapter_state_dict=state)
    os.remove(tmp_path / "adapter" / "dsee_pruning.safetensors")
    with pytest.raises(FileNotFoundError, match="saved from a pruned model"):
        AutoModelForCausalLM.from_pretrained(base_dir).load_adapter(str(tmp_path / "adapter"))


def test_pruned_config_pickles_and_copies_without_the_model():
    import copy
    import pickle

    model = bert_dsee()
    prune(model, ratio=0.2)
    config = model.peft_config["default"]
    assert config._pruned_model() is model
    for clone in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert clone.pruned and clone._pruned_model is None


def test_a_masks_file_that_does_not_fit_is_refused_before_any_weight_changes(tmp_path):
    """Each mask used to be checked when its turn came, after the earlier ones had zeroed their weights (a half-pruned
    model); a bias mask's shape was never checked ([1] broadcast over the whole bias), nor a bias-less layer."""
    from safetensors.torch import save_file

    from hfx.testing import tiny_causal_lm
    from hfx.tuners.dsee.prune import read_masks

    model = bert_dsee()
    prune(model, ratio=0.2)
    save_pruning(model, tmp_path / "good")
    masks = read_masks(tmp_path / "good")
    info = (tmp_path / "good" / "dsee_pruning.json").read_text()
    last = sorted(k for k in masks if k.endswith(".weight") and masks[k].shape[0] != masks[k].shape[1])[-1]
    bias = next(k for k in masks if k.endswith(".weight")).replace(".weight", ".bias")

    def bad(name: str, **changed) -> str:
        (tmp_path / name).mkdir()
        save_file({**masks, **changed}, str(tmp_path / name / "dsee_pruning.safetensors"))  # the unpacked format
        (tmp_path / name / "dsee_pruning.json").write_text(info)
        return str(tmp_path / name)

    cases = [
        (bad("wrong_shape", **{last: masks[last].T.contiguous()}), rf"Pruning mask {last} has shape"),
        (bad("bias_shape", **{bias: torch.zeros(1, dtype=torch.bool)}), rf"Pruning mask {bias} has shape \(1,\)"),
        (bad("kind", **{last.replace(".weight", ".scale"): masks[last].clone()}), r"kind 'scale' \(weight or bias\)"),
    ]
    for folder, match in cases:
        fresh = bert_dsee()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            load_pruning(fresh, folder)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    llama = get_peft_model(tiny_causal_lm(), hfx.DseeConfig(r=2, num_sparse=8, target_modules=["q_proj"]))
    prune(llama, ratio=0.2)
    save_pruning(llama, tmp_path / "llama")
    masks, info = read_masks(tmp_path / "llama"), (tmp_path / "llama" / "dsee_pruning.json").read_text()
    key = next(iter(masks)).replace(".weight", ".bias")
    with pytest.raises(ValueError, match=rf"a mask '{key}' for a bias, which has none"):
        load_pruning(get_peft_model(tiny_causal_lm(), hfx.DseeConfig(r=2, num_sparse=8, target_modules=["q_proj"])),
                     bad("no_bias", **{key: torch.ones(64, dtype=torch.bool)}))  # fmt: skip
