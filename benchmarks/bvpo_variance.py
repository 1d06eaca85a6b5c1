"""Per-step gradient variance of BVPO vs. trace-only DPO on the built-in task (the paper's core claim, Thm 1–2).

For K random mini-batches of the task's preference view with reasoning traces, take the gradient (all trainable
parameters) of the trace DPO loss ``g_t`` and of the empty-trace DPO loss ``g_e`` on the same prompts; BVPO's
gradient is ``g_c = α g_t + (1 − α) g_e``. The per-step variance is ``tr Cov(g) = E‖g − E g‖²`` over the batches.
Prints the variances, the ratio Var(BVPO) / Var(DPO), and the α* that the closed form (Thm 2, μ ≈ E g_t) picks.

    python benchmarks/bvpo_variance.py                        # tiny cached base, K=32 batches of 8 pairs
    python benchmarks/bvpo_variance.py --batches 64 --batch-size 16 --alpha 0.5 --write-results
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

import hfx
from hfx.compat import activation_checkpointing
from hfx.data import preference_dataset
from hfx.testing.pretrained import BaseRecipe, pretrained_base
from hfx.trainers import closed_form_alpha

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def variance(grads: torch.Tensor) -> float:
    """tr Cov over the rows of ``grads`` (K x P)."""
    return float(((grads - grads.mean(0)) ** 2).sum(1).mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the cached tiny base pre-trained on the built-in task")
    p.add_argument("--difficulty", default="easy")
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-results", action="store_true", help=f"append a section to {RESULTS}")
    args = p.parse_args(argv)
    t0 = time.time()

    path = args.model or pretrained_base(BaseRecipe())
    n = args.batches * args.batch_size
    data = preference_dataset(n, args.difficulty, seed=args.seed, think=True)
    config = hfx.BVPOConfig(
        output_dir="/tmp/hfx-bvpo-variance", bvpo_alpha=args.alpha, beta=args.beta, use_cpu=not torch.cuda.is_available(),
        bf16=False, **activation_checkpointing(False), report_to="none", per_device_train_batch_size=args.batch_size,
    )  # fmt: skip
    trainer = hfx.BVPOTrainer(path, args=config, train_dataset=data)
    model = trainer.model
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    order = torch.randperm(len(trainer.train_dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    g_t, g_e = [], []
    for k in range(args.batches):
        rows = [trainer.train_dataset[i] for i in order[k * args.batch_size : (k + 1) * args.batch_size]]
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        for view, store in (("trace", g_t), ("empty", g_e)):
            loss = trainer._compute_loss(model, batch[view], False)
            store.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    g_t, g_e = torch.stack(g_t), torch.stack(g_e)
    a = args.alpha
    g_c = a * g_t + (1 - a) * g_e
    var_t, var_e, var_c = variance(g_t), variance(g_e), variance(g_c)
    cross = float(((g_t - g_t.mean(0)) * (g_e - g_e.mean(0))).sum(1).mean())
    alpha_star = closed_form_alpha(var_t, var_e, cross, 0.0, g_e.mean(0) - g_t.mean(0))
    var_star = variance(alpha_star * g_t + (1 - alpha_star) * g_e) if alpha_star is not None else float("nan")
    cosine = float(torch.nn.functional.cosine_similarity(g_t.mean(0), g_e.mean(0), dim=0))
    result = {
        "var_dpo_trace": var_t,
        "var_empty": var_e,
        "var_bvpo": var_c,
        "ratio": var_c / var_t,
        "alpha": a,
        "alpha_star": alpha_star,
        "var_bvpo_alpha_star": var_star,
        "mean_grad_cosine": cosine,
        "params": g_t.shape[1],
        "seconds": round(time.time() - t0, 1),
    }
    print(f"[hfx] {args.batches} batches x {args.batch_size} pairs ({args.difficulty}), {g_t.shape[1]:,} parameters")
    print(f"[hfx] per-step gradient variance tr Cov(g): DPO (trace) {var_t:.4g} | empty trace {var_e:.4g} | "
          f"BVPO α={a} {var_c:.4g}")  # fmt: skip
    print(f"[hfx] Var(BVPO) / Var(DPO) = {var_c / var_t:.3f}; cos(E g_t, E g_e) = {cosine:.3f}")
    if alpha_star is not None:
        print(
            f"[hfx] closed-form α* (μ ≈ E g_t) = {alpha_star:.3f}: Var = {var_star:.4g} ({var_star / var_t:.3f} of DPO)"
        )
    print(f"[hfx] {result['seconds']:.0f} s")

    if args.write_results:
        command = (
            "python benchmarks/"
            + os.path.basename(__file__)
            + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
        )
        device = (
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
        section = f"""
## BVPO gradient variance

Per-step gradient variance (tr Cov over mini-batches, all {g_t.shape[1]:,} parameters) of trace-only DPO vs. BVPO
(`α·g_trace + (1 − α)·g_empty` on the same prompts) on the built-in task's preference view with traces
(`preference_dataset(think=True)`, {args.difficulty}), tiny cached base model, at the start of training.

| estimator | tr Cov(g) | vs. DPO |
|---|---|---|
| DPO on trace pairs | {var_t:.4g} | 1.000 |
| DPO on empty-trace pairs | {var_e:.4g} | {var_e / var_t:.3f} |
| BVPO, α = {a} | {var_c:.4g} | **{var_c / var_t:.3f}** |
| BVPO, closed-form α* = {alpha_star if alpha_star is not None else float("nan"):.3f} | {var_star:.4g} | {var_star / var_t:.3f} |

Measured ratio Var(BVPO, α = {a}) / Var(DPO) = **{var_c / var_t:.3f}** ({args.batches} batches of {args.batch_size} pairs;
cosine of the two mean gradients {cosine:.3f}). Device: {device}. Date: {datetime.date.today().isoformat()}.
Command: `{command.strip()}` ({result["seconds"]:.0f} s).
"""
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a", encoding="utf-8") as f:
            if new:
                f.write(
                    "# Benchmark results\n\nMeasured numbers from the scripts in `benchmarks/`, newest sections appended.\n"
                )
            f.write(section)
        print(f"[hfx] appended to {RESULTS}")
    return result


if __name__ == "__main__":
    main()
