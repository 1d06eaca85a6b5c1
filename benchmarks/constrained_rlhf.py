"""Constrained vs fixed-weight GRPO on the built-in task: does the constrained reward stay at its threshold?

Three rewards (examples/constrained_grpo.py): correctness (task), format, and brevity ``−tokens/40`` — a proxy that
over-optimises: pushed with a fixed weight the tiny model drops its working lines and correctness collapses. Arms,
all from the cached tiny base, same steps, same data, same seeds:

- ``fixed``: weights 1/1/1 (plain GRPO, ``normalize_then_sum``) — the overshooting baseline;
- ``no-brevity``: weights 1/1/0 — what correctness does without the proxy;
- ``constrained``: brevity ``<= θ`` (All-PPO, sigmoid multipliers) and format ``>= 0.9`` (μ-PPO);
- ``projected``: the same constraints with unbounded projected multipliers (classic Lagrangian).

Reported per arm: the brevity reward averaged over the last quarter of the steps against θ, the fraction of those
steps with brevity above ``θ + 0.02`` (violations), mean correctness over the same steps, held-out accuracy after.

    python benchmarks/constrained_rlhf.py                      # 120 steps, seeds 0 1 (~10 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from constrained_grpo import build, evaluate, parse_args  # noqa: E402

from hfx.testing.pretrained import pretrained_base  # noqa: E402

ARMS = {
    "fixed": ["--fixed"],
    "no-brevity": ["--fixed", "--weights", "1", "1", "0"],
    "constrained": [],
    "projected": ["--parametrization", "projected", "--lagrange-lr", "1", "--lagrange-init", "0", "0"],
}


def run(arm: str, seed: int, extra: list[str], model_path: str) -> dict:
    args = parse_args([*ARMS[arm], "--seed", str(seed), *extra])
    trainer = build(args, model_path)
    start = time.perf_counter()
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    tail = hist[-max(1, len(hist) // 4) :]
    brevity = [h["rewards/brevity_reward/mean"] for h in tail]
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "arm": arm,
        "seed": seed,
        "threshold": args.brevity,
        "brevity_curve": [h["rewards/brevity_reward/mean"] for h in hist],
        "correctness_curve": [h["rewards/correctness_reward/mean"] for h in hist],
        "brevity_tail": statistics.mean(brevity),
        "violations_tail": sum(b > args.brevity + 0.02 for b in brevity) / len(brevity),
        "correctness_tail": statistics.mean(h["rewards/correctness_reward/mean"] for h in tail),
        "accuracy": evaluate(model, trainer.processing_class, args.n_eval, args.difficulty),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default="outputs/constrained_rlhf_bench.json")
    own, rest = p.parse_known_args()
    model_path = pretrained_base()
    results = []
    for seed in own.seeds:  # interleaved: CPU noise hits every arm alike
        for arm in own.arms:
            r = run(arm, seed, rest, model_path)
            results.append(r)
            print(
                f"[bench] {arm:12s} seed {seed}: brevity(last 1/4) {r['brevity_tail']:+.3f} (θ {r['threshold']:+.2f}, "
                f"violations {r['violations_tail']:.0%}), correctness {r['correctness_tail']:.3f}, "
                f"held-out accuracy {r['accuracy']:.3f}, {r['seconds']:.0f}s",
                flush=True,
            )
    os.makedirs(os.path.dirname(own.out) or ".", exist_ok=True)
    with open(own.out, "w") as f:
        json.dump(results, f, indent=1)
    print("\n| arm | brevity, last 1/4 (θ) | steps violating | correctness, last 1/4 | held-out accuracy |")
    print("|---|---|---|---|---|")
    for arm in own.arms:
        rs = [r for r in results if r["arm"] == arm]

        def ms(key, rs=rs):
            vals = [r[key] for r in rs]
            return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.3f}"

        print(
            f"| {arm} | {ms('brevity_tail')} ({rs[0]['threshold']:+.2f}) | {ms('violations_tail')} | "
            f"{ms('correctness_tail')} | {ms('accuracy')} |"
        )


if __name__ == "__main__":
    main()
