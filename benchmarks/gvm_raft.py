"""RAFT++ vs GVM-RAFT++ on the built-in task: held-out accuracy vs number of sampled completions (CPU, minutes).

Both runs start from the cached tiny base pre-trained on easy problems (``hfx.testing.pretrained``) and train with
RAFT++ on ``medium`` problems (2-3 steps), with the same budget of completions per round and the same optimizer
steps. GVM-RAFT++ additionally draws ``N'`` pilot samples per pool prompt each round; those are counted in its
x-axis ("sampled" = training + pilot completions), and their wall time is reported as the pilot overhead. The paper
(arXiv 2505.02391) reports ≈2× (N'=8) to ≈4× (N'=32) fewer update steps to a given accuracy on Qwen2.5-Math-1.5B.

    python benchmarks/gvm_raft.py                      # small default (a few minutes on 2 CPU cores)
    python benchmarks/gvm_raft.py --max-steps 24 --eval-every 4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import torch  # noqa: E402
from gvm_raft import build, evaluate, parse_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hfx.testing.pretrained import pretrained_base  # noqa: E402


class Curve(TrainerCallback):
    """Held-out accuracy every ``every`` optimizer steps, against the completions sampled so far."""

    def __init__(self, every: int, n_eval: int, difficulty: str):
        self.every, self.n_eval, self.difficulty = every, n_eval, difficulty
        self.trainer = None
        self.points: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every:
            return
        c = self.trainer._gvm_counters
        acc = evaluate(model, processing_class, self.n_eval, self.difficulty)
        self.points.append(
            {
                "step": state.global_step,
                "train_samples": c["train_samples"],
                "pilot_samples": c["pilot_samples"],
                "sampled": c["train_samples"] + c["pilot_samples"],
                "accuracy": acc,
            }
        )
        print(f"  step {state.global_step:3d}  sampled {self.points[-1]['sampled']:6d}  acc {acc:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="outputs/gvm_raft_bench.json")
    own, rest = p.parse_known_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_path = pretrained_base()
    results = []
    for seed in own.seeds:
        for uniform in (True, False):
            args = parse_args([*rest, "--seed", str(seed), *(["--uniform"] if uniform else [])])
            args.output_dir = os.path.join("outputs", "gvm_bench", f"{'raft' if uniform else 'gvm'}-{seed}")
            trainer = build(args, model_path)
            curve = Curve(own.eval_every, args.n_eval, args.difficulty)
            curve.trainer = trainer
            trainer.add_callback(curve)
            name = "RAFT++" if uniform else "GVM-RAFT++"
            print(f"[bench] {name} seed {seed}", flush=True)
            base_acc = evaluate(trainer.model, trainer.processing_class, args.n_eval, args.difficulty)
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
            c = trainer._gvm_counters
            results.append(
                {
                    "method": name,
                    "seed": seed,
                    "base_accuracy": base_acc,
                    "curve": curve.points,
                    "wall_s_including_evals": wall,
                    "pilot_s": c["pilot_seconds"],
                    "pilot_samples": c["pilot_samples"],
                    "train_samples": c["train_samples"],
                    "last_allocation": trainer.gvm_state.summary(),
                    "config": vars(args),
                }
            )
            print(
                f"[bench] {name}: base {base_acc:.3f} -> {curve.points[-1]['accuracy']:.3f}; pilot {c['pilot_seconds']:.1f}s "
                f"of {wall:.1f}s ({c['pilot_samples']} pilot + {c['train_samples']} training completions)",
                flush=True,
            )
    os.makedirs(os.path.dirname(own.out), exist_ok=True)
    with open(own.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"[bench] wrote {own.out}")


if __name__ == "__main__":
    main()
