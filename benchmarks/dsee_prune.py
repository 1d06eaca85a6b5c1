"""DSEE's sparse final weights: parameters and inference FLOPs before and after pruning (arXiv 2111.00160, Sec. 3.3).

Builds a randomly initialised BERT-base-shaped classifier (12 layers, 768 hidden, 12 heads) and a tiny-Llama-shaped
LM (4 layers, 256 hidden, 8 heads, 4 key/value heads), attaches a DSEE adapter (r=16, N=64 on query/value), gives
the adapter random values (a trained update's stand-in: scores for pruning need a non-zero dW), then measures

* ``unstructured``: ``hfx.dsee.prune(ratio=0.2)`` (paper default; adapter_ratio 0.2), merged;
* ``heads``: ``heads_per_layer = 25 %`` of the heads (3 of 12 on BERT-base), merged;
* ``both``.

Parameters: the merged model's parameter count, and its non-zero count. FLOPs, counted analytically per token for
the linear layers only (embeddings, norms, softmax and the attention score/value products excluded): a dense linear
costs ``2 * in * out`` FLOPs; with unstructured sparsity only the non-zero weights count (``2 * nnz``, what a
sparse kernel would execute; a dense GEMM saves nothing); a removed head removes its ``head_dim`` rows of q/k/v and
columns of o, and with it the per-token attention products ``4 * seq * head_dim`` (counted separately, at
``--seq`` tokens of context). Run: ``python benchmarks/dsee_prune.py [--seq 128]``.
"""

from __future__ import annotations

import argparse
import logging

import torch
from peft import get_peft_model
from torch import nn

import hfx
from hfx.tuners.dsee import prune


def bert_base():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2)).eval()


def tiny_llama():
    from hfx.testing import tiny_causal_lm

    return tiny_causal_lm("llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, seed=0)


def linear_flops(model: nn.Module, sparse: bool) -> int:
    """Per-token FLOPs of every nn.Linear: 2*in*out dense, 2*nnz if ``sparse``."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += 2 * (int(torch.count_nonzero(m.weight)) if sparse else m.weight.numel())
    return total


def attention_flops(model: nn.Module, seq: int) -> int:
    """Per-token attention products (QK^T and AV): 4 * seq * (sum of q widths over layers)."""
    total = 0
    for name, m in model.named_modules():
        if name.endswith(("attention.self.query", "self_attn.q_proj")) and isinstance(m, nn.Linear):
            total += 4 * seq * m.out_features
    return total


def measure(label: str, model: nn.Module, seq: int) -> dict:
    params = sum(p.numel() for p in model.parameters())
    nnz = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return {
        "model": label,
        "params": params,
        "nonzero": nnz,
        "linear_flops_dense": linear_flops(model, sparse=False),
        "linear_flops_sparse": linear_flops(model, sparse=True),
        "attn_flops": attention_flops(model, seq),
    }


def run(name: str, build, heads: int, seq: int) -> list[dict]:
    rows = [measure(f"{name} dense", build(), seq)]
    for variant in ("unstructured", "heads", "both"):
        model = get_peft_model(build(), hfx.DseeConfig(r=16, num_sparse=64, sparse_method="svd_residual"))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for n, p in model.named_parameters():
                if "dsee_" in n:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        kwargs = {
            "unstructured": {"ratio": 0.2},
            "heads": {"ratio": None, "heads_per_layer": heads},
            "both": {"ratio": 0.2, "heads_per_layer": heads},
        }[variant]
        prune(model, **kwargs)
        merged = model.merge_and_unload()
        if variant != "unstructured" and _mha(merged):  # GQA heads stay zeroed (counted as sparse)
            hfx.dsee.remove_pruned_heads(merged)
        rows.append(measure(f"{name} {variant}", merged, seq))
    return rows


def _mha(model: nn.Module) -> bool:
    cfg = model.config
    return getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) == cfg.num_attention_heads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=128, help="context length for the attention products")
    p.add_argument("--skip-bert", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    if not args.skip_bert:
        rows += run("bert-base", bert_base, heads=3, seq=args.seq)
    rows += run("tiny-llama", tiny_llama, heads=2, seq=args.seq)
    base = {}
    print(
        f"{'model':<24}{'params':>12}{'non-zero':>12}{'lin GFLOP/tok dense':>22}{'lin sparse':>12}"
        f"{'attn':>10}{'total (sparse) vs dense':>26}"
    )
    for r in rows:
        key = r["model"].split()[0]
        total = r["linear_flops_sparse"] + r["attn_flops"]
        base.setdefault(key, r["linear_flops_dense"] + r["attn_flops"])
        print(
            f"{r['model']:<24}{r['params']:>12,}{r['nonzero']:>12,}{r['linear_flops_dense'] / 1e9:>22.4f}"
            f"{r['linear_flops_sparse'] / 1e9:>12.4f}{r['attn_flops'] / 1e9:>10.4f}"
            f"{100 * (1 - total / base[key]):>24.1f} %"
        )


if __name__ == "__main__":
    main()
