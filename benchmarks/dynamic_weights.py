"""Dynamic reward weighting vs fixed-weight linear scalarisation on the built-in task (CPU, ~10 minutes).

Every run starts from the cached tiny base pre-trained on easy problems (``hfx.testing.pretrained``) and trains GRPO on
``medium`` problems for the same number of steps with three objectives: correctness, format and a length penalty
beyond ``--target-tokens`` (shorter than the base's solutions, so correctness and length conflict). Runs:

- ``balanced``: TRL GRPO, fixed weights 1/3 each; ``accuracy``: fixed 0.5/0.25/0.25 (the paper's baselines);
- ``gradient``: hfx gradient-based weights (mirror descent from 1/3 each);
- ``hypervolume``: hfx hypervolume-guided step size (weights 1/3 each).

The final held-out objective vector (greedy decoding) of each run is reported, with which runs Pareto-dominate which.
The paper (arXiv 2509.11452) reports Pareto-dominant fronts in fewer steps for Qwen3-8B / DeepSeek-7B on math.

    python benchmarks/dynamic_weights.py                          # defaults: 32 steps, lr 5e-5, seeds 0 and 1
    python benchmarks/dynamic_weights.py --seeds 0 --max-steps 16 --learning-rate 1e-4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from dynamic_weights_grpo import build, objectives, parse_args  # noqa: E402

from hfx.testing.pretrained import pretrained_base  # noqa: E402

RUNS = {
    "balanced": ["--weighting", "fixed", "--weights", "0.3333333", "0.3333333", "0.3333334"],
    "accuracy": ["--weighting", "fixed", "--weights", "0.5", "0.25", "0.25"],
    "gradient": ["--weighting", "gradient"],
    "hypervolume": ["--weighting", "hypervolume"],
}
KEYS = ("correctness", "format", "length")


def dominates(a: dict, b: dict) -> bool:
    return all(a[k] >= b[k] for k in KEYS) and any(a[k] > b[k] for k in KEYS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", nargs="+", default=list(RUNS))
    p.add_argument("--out", default="outputs/dynamic_weights_bench.json")
    own, rest = p.parse_known_args()
    defaults = ["--max-steps", "32", "--learning-rate", "5e-5", "--n-eval", "128"]  # also the example's defaults
    model_path = pretrained_base()
    results: dict = {"before": None, "runs": {}}
    for seed in own.seeds:
        for name in own.runs:
            args = parse_args(
                [*defaults, *RUNS[name], *rest, "--seed", str(seed), "--output-dir", f"outputs/dynw_{name}"]
            )
            if results["before"] is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                base = AutoModelForCausalLM.from_pretrained(model_path)
                tok = AutoTokenizer.from_pretrained(model_path)
                results["before"] = objectives(base, tok, args.n_eval, args.difficulty, args.target_tokens)
                print(f"before: {results['before']}", flush=True)
            trainer = build(args, model_path)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            point = objectives(
                trainer.model, trainer.processing_class, args.n_eval, args.difficulty, args.target_tokens
            )
            point.update(seconds=seconds, weights=trainer.reward_weights.tolist())
            if args.weighting == "hypervolume":
                point["r_pareto"] = [h["dynamic_weights/r_pareto"] for h in trainer.state.log_history if "loss" in h]
            results["runs"][f"{name}/seed{seed}"] = point
            print(f"{name} seed {seed}: {point}", flush=True)
    print("\n| run | seed | correctness | format | length reward | tokens | final weights | dominates |")
    print("|---|---|---|---|---|---|---|---|")
    for key, pt in results["runs"].items():
        name, seed = key.split("/")
        beaten = [k.split("/")[0] for k, q in results["runs"].items() if k.endswith(seed) and dominates(pt, q)]
        weights = "/".join(f"{w:.2f}" for w in pt["weights"])
        print(f"| {name} | {seed[4:]} | {pt['correctness']:.3f} | {pt['format']:.3f} | {pt['length']:.3f} | "
              f"{pt['tokens']:.1f} | {weights} | {', '.join(beaten) or '-'} |")  # fmt: skip
    os.makedirs(os.path.dirname(own.out) or ".", exist_ok=True)
    with open(own.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
