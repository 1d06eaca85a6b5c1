"""``hfx bench trainers``: each hfx trainer against its own baseline, same budget, same seeds, on the built-in task.

Every pair runs one of the repository's example scripts twice per seed — once with the method, once with the
baseline's flags (everything else equal) — each in its own process, and reads the ``hfx_result.json`` the example
writes (its ``after`` metrics). Needs a clone of the repository installed with ``pip install -e`` (the examples are
scripts beside the package, not package modules). A new trainer joins with one :data:`PAIRS` entry.

What a seed varies follows the example: the BVPO and Masked Thought examples pre-train their tiny base with
the run's seed, the GRPO examples (constrained, dynamic weighting, GVM) start from the seed-0 base; within a pair the
method and its baseline always share the base, so each pair's comparison is like for like, but the seed spread of
the first kind also includes the base's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from . import help_description
from .report import (
    code_digest,
    ensure_writable,
    environment,
    environments_text,
    jsonable,
    load_runs,
    markdown_table,
    model_fingerprint,
    paired,
    plan_jobs,
    plot,
    require_plotting,
    save_run,
    split_names,
    summarize,
    versions,
)

__all__ = ["PAIRS", "Pair", "main"]

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


@dataclass(frozen=True)
class Pair:
    """A method and its baseline: one example script, two sets of flags; ``quick`` is added for ``--quick``."""

    script: str
    method: list[str]
    baseline: list[str]
    quick: list[str] = field(default_factory=list)
    claim: str = ""


PAIRS: dict[str, Pair] = {
    "masked_thought": Pair(
        "masked_thought.py", ["--mask-rate", "0.2"], ["--mask-rate", "0"],
        ["--max-steps", "60", "--n-train", "960", "--n-eval", "100"],
        "masking part of the chain of thought in the inputs beats plain SFT (paper: +~1-5 points on GSM8K)",
    ),
    "bvpo": Pair(
        "bvpo.py", ["--alpha", "0.5"], ["--alpha", "1.0"], ["--max-steps", "30", "--n-eval", "64"],
        "mixing the empty-trace preference loss (α = 0.5) beats DPO on the traces alone (α = 1)",
    ),
    "gvm_raft": Pair(
        "gvm_raft.py", [], ["--uniform"], ["--max-steps", "8", "--n-eval", "64"],
        "GVM's allocation reaches a given accuracy in fewer steps than uniform RAFT++ (paper: 2-4x)",
    ),
    "constrained": Pair(
        "constrained_grpo.py", [], ["--fixed"], ["--max-steps", "60", "--n-eval", "64"],
        "the constrained reward stays at its threshold where fixed weights over-optimise it",
    ),
    "dynamic_weights": Pair(
        "dynamic_weights_grpo.py", ["--weighting", "gradient"], ["--weighting", "fixed"],
        ["--max-steps", "16", "--n-eval", "64"],
        "dynamic weights reach Pareto-dominant objective vectors vs fixed linear scalarisation",
    ),
}  # fmt: skip


# the held-out accuracy each pair's example reports (BVPO: preference accuracy on held-out trace pairs)
PLOT_KEYS = ("accuracy", "hard", "correctness", "trace/rewards/accuracies")


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix.rstrip("/")] = float(value)


def method_config(pair: str, arm: str, quick: bool) -> dict[str, Any]:
    """What one arm of a pair runs, as stored in its record and compared on resume: the example and its flags."""
    spec = PAIRS[pair]
    return {
        "script": spec.script,
        "flags": list(spec.method if arm == "method" else spec.baseline),
        "quick_flags": list(spec.quick) if quick else [],
    }


def run_one(pair: str, arm: str, seed: int, quick: bool, model: str | None) -> dict[str, Any]:
    """Run one arm of a pair in a subprocess; the record holds the example's ``after`` metrics."""
    spec = PAIRS[pair]
    script = os.path.join(EXAMPLES, spec.script)
    flags = spec.method if arm == "method" else spec.baseline
    with tempfile.TemporaryDirectory(prefix=f"hfx-bench-{pair}-{arm}-{seed}-") as out_dir:  # the example's saved model
        cmd = [
            sys.executable,
            script,
            *flags,
            *(spec.quick if quick else []),
            "--seed",
            str(seed),
            "--output-dir",
            out_dir,
        ]
        if model:
            cmd += ["--model", model]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{proc.stdout[-4000:]}\nhfx bench trainers: run {pair}/{arm} failed (exit code "
                             f"{proc.returncode}; the end of its output is above)")  # fmt: skip
        with open(os.path.join(out_dir, "hfx_result.json"), encoding="utf-8") as f:
            result = json.load(f)
    metrics: dict[str, float] = {}
    _flatten("", result.get("after", {}), metrics)
    return {
        "bench": "trainers",
        "pair": pair,
        "arm": arm,
        "label": f"{pair} / {arm}",
        "seed": seed,
        "quick": quick,
        "model": model,
        "model_fingerprint": model_fingerprint(model),
        "method_config": method_config(pair, arm, quick),
        "versions": versions(),
        "hfx_code": trainers_code(),
        "command": cmd,
        "env": environment(),
        "metrics": metrics,
    }


def plot_points(runs: list[dict[str, Any]], pairs: list[str]) -> list[tuple[str, str, str, float, float]]:
    """``(pair, arm, metric, mean, std)`` for each arm that reports one of :data:`PLOT_KEYS`, in plot order."""
    points = []
    for pair in pairs:
        for arm in ("method", "baseline"):
            rs = [r for r in runs if r["pair"] == pair and r["arm"] == arm]
            key = next((k for k in PLOT_KEYS if rs and k in rs[0]["metrics"]), None)
            if key is not None:
                mean, std = summarize(rs, "label", [key])[f"{pair} / {arm}"][key]
                points.append((pair, arm, key, mean, std))
    return points


def trainers_code() -> str:
    """hfx's code digest together with that of the examples this bench runs."""
    return code_digest() + ":" + code_digest(EXAMPLES)


def write_report(
    out: str, pairs: list[str], quick: bool | None = None, model: str | None = None, seeds: list[int] | None = None
) -> str:
    """Markdown summary + plot from the run records in ``out`` of ``pairs`` (and, when ``quick`` is given, of those
    settings only; when ``seeds`` is given, of those seeds only); returns the Markdown."""
    runs = [
        r
        for r in load_runs(out)
        if r.get("bench") == "trainers"
        and r["pair"] in pairs
        and (
            quick is None
            or (r.get("quick") == quick and r.get("model_fingerprint") == jsonable(model_fingerprint(model)))
        )
        and (seeds is None or r.get("seed") in seeds)
    ]
    runs.sort(key=lambda r: (pairs.index(r["pair"]), r["arm"] != "method", r["seed"]))
    parts = []
    for pair in pairs:
        rs = [r for r in runs if r["pair"] == pair]
        if not rs:
            continue
        keys = sorted({k for r in rs for k in r["metrics"]})
        summary = summarize(rs, "label", keys)
        table = markdown_table(summary, [(k, k, 3) for k in keys], "arm")
        cells = []
        for k in keys:
            st = paired(rs, "arm", "method", "baseline", k)
            cells.append(
                "–"
                if not st["n"]
                else f"{st['mean']:+.3f} (1)"
                if st["n"] < 2
                else f"{st['mean']:+.3f} ± {st['se']:.3f}"
            )
        n = paired(rs, "arm", "method", "baseline", keys[0])["n"] if keys else 0
        table += f"| method − baseline, paired: mean ± SE | {n} | " + " | ".join(cells) + " |\n"
        parts.append(f"### {pair}\n\nClaim: {PAIRS[pair].claim}.\n\n" + table)
    text = (
        environments_text(runs)
        + "± is the sample standard deviation over seeds; the last row of each table is the same-seed difference"
        " method − baseline, mean ± its standard error.\n\n" + "\n".join(parts)
    )
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)

    def bars(ax):
        points = plot_points(runs, pairs)
        labels = [f"{pair}\n{arm}" for pair, arm, _, _, _ in points]
        values, errors = [p[3] for p in points], [p[4] for p in points]
        ax.bar(range(len(labels)), values, yerr=errors, color=["tab:blue", "tab:grey"] * (len(labels) // 2 + 1))
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
        ax.set(ylabel="held-out accuracy", title="Each method (blue) vs its baseline (grey)")

    if runs:
        plot(os.path.join(out, "trainers.png"), bars, figsize=(8.0, 4.0))
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hfx bench trainers", description=help_description(__doc__))
    p.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated, of: " + ", ".join(PAIRS))
    p.add_argument("--quick", action="store_true", help="short runs (the pair's quick flags)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="default: bench_results/trainers[-quick]")
    p.add_argument("--model", default=None, help="base model path (default: each example's cached tiny base)")
    p.add_argument("--force", action="store_true", help="redo runs whose JSON exists")
    args = p.parse_args(argv)
    if any(seed < 0 for seed in args.seeds):
        p.error(f"--seeds must be >= 0, got {args.seeds}")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r} is not a saved model folder (no config.json); hfx bench does not use the hub")
    pairs = split_names(args.pairs, "--pairs", "pair", list(PAIRS), p.error)
    missing = [PAIRS[pair].script for pair in pairs if not os.path.isfile(os.path.join(EXAMPLES, PAIRS[pair].script))]
    if missing:
        p.error(
            f"it runs the repository's example scripts, which are not part of an installed package: {EXAMPLES} has "
            f"no {', '.join(sorted(set(missing)))}. Install a clone of the repository in editable mode "
            "(pip install -e <clone>); hfx bench tuners and speed run from any install"
        )
    require_plotting(p.error)
    out = args.out or os.path.join("bench_results", "trainers-quick" if args.quick else "trainers")
    ensure_writable(out, "--out", p.error)
    from tqdm.auto import tqdm

    settings = {"quick": args.quick, "model_fingerprint": model_fingerprint(args.model), "versions": versions()}
    jobs = plan_jobs(
        out,
        [
            (
                f"{pair}-{arm}-seed{seed}",
                (pair, arm, seed),
                {**settings, "method_config": method_config(pair, arm, args.quick)},
            )
            for seed in args.seeds
            for pair in pairs
            for arm in ("method", "baseline")
        ],
        args.force,
        "hfx bench trainers",
        trainers_code(),
    )
    bar = tqdm(jobs, desc="hfx bench trainers", unit="run")
    for pair, arm, seed in bar:
        name = f"{pair}-{arm}-seed{seed}"
        bar.set_postfix_str(name)
        save_run(out, name, run_one(pair, arm, seed, args.quick, args.model))
    print(write_report(out, pairs, args.quick, args.model, args.seeds))
    print(f"[hfx bench] runs, summary.md and trainers.png in {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
