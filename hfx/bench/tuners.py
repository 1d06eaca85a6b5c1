"""``hfx bench tuners``: every tuner adapts the cached tiny base from easy to hard arithmetic at one recipe.

Each (method, seed) runs in its own subprocess (so its peak memory is its own): SFT with TRL's SFTTrainer on the
hard split with easy problems replayed (the README demo's recipe), the adapter sized to about PEFT LoRA r=8's
trainable parameters. Recorded: held-out accuracy on hard (the new skill) and easy (forgetting = before − after),
final train loss and the loss curve, trainable parameters, peak memory (CUDA: max allocated; CPU: the process's peak
RSS), training wall time, and init time (building the adapter, incl. EVA/LoRA-GA's data-driven initialisation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..compat import activation_checkpointing
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
    paired_table,
    plan_jobs,
    plot,
    require_plotting,
    save_run,
    split_names,
    summarize,
    versions,
)

__all__ = ["METHODS", "QUICK", "FULL", "TunerRecipe", "main", "run_one"]


@dataclass(frozen=True)
class TunerRecipe:
    """The fixed recipe every method gets (the learning rate of full fine-tuning is the one exception)."""

    max_steps: int = 350
    n_train: int = 4000
    replay: float = 1.0
    n_eval: int = 200
    batch_size: int = 32
    learning_rate: float = 5e-3
    full_learning_rate: float = 1e-3
    difficulty: str = "hard"
    logging_steps: int = 10


FULL = TunerRecipe()
QUICK = TunerRecipe(max_steps=60, n_train=960, n_eval=100, logging_steps=5)
TARGETS = "all-linear"


def _lora(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)


def sara_like_lora(model, lora_config, target_modules) -> Any:
    """A SaraConfig with the same number of trainable entries as ``lora_config`` on ``model``: that count over the
    targeted matrices' size as ``ratio`` (at most 0.5). Used by ``hfx bench tuners`` and ``hfx bench speed``."""
    from peft import get_peft_model

    import hfx

    probe = get_peft_model(_copy(model), lora_config)
    budget = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    linear = sum(m.weight.numel() for n, m in probe.named_modules() if n.endswith("base_layer"))
    del probe
    return hfx.SaraConfig(ratio=min(0.5, budget / linear), target_modules=target_modules)


def _sara(model) -> Any:
    # the same number of trainable entries as LoRA r=8: a ratio of each target matrix
    return sara_like_lora(model, _lora(), TARGETS)


def _copy(model):
    import copy

    return copy.deepcopy(model)


# name -> (config factory given the base model, needs hfx.initialize, callbacks factory)
METHODS: dict[str, tuple[Callable[[Any], Any], bool, Callable[[], list]]] = {
    "lora": (lambda m: _lora(), False, list),
    "full": (lambda m: None, False, list),
    "bone": (lambda m: __import__("hfx").BoneConfig(r=16, target_modules=TARGETS), False, list),
    "paca": (lambda m: __import__("hfx").PacaConfig(r=16, paca_alpha=32, target_modules=TARGETS), False, list),
    "lift": (
        lambda m: __import__("hfx").LiftConfig(r=8, filter_rank=8, target_modules=TARGETS, update_interval=40),
        False,
        lambda: [__import__("hfx").LiftRefreshCallback(show_progress=False)],
    ),
    "dsee": (lambda m: __import__("hfx").DseeConfig(r=8, lora_alpha=16, target_modules=TARGETS), False, list),
    "sara": (_sara, False, lambda: [__import__("hfx").SaraCallback()]),
    "eva": (lambda m: __import__("hfx").EvaConfig(r=8, lora_alpha=16, target_modules=TARGETS), True, list),
    "loraga": (lambda m: __import__("hfx").LoraGAConfig(r=8, lora_alpha=16, target_modules=TARGETS), True, list),
}


def method_config(method: str, config: Any) -> dict[str, Any]:
    """What a run of ``method`` is made with, as stored in its record and compared on resume: the PEFT config (None:
    full fine-tuning), whether hfx.initialize runs, and the callbacks."""
    _, needs_init, callbacks = METHODS[method]
    return jsonable({
        "config": None if config is None else {"class": type(config).__name__, **config.to_dict()},
        "initialize": needs_init,
        "callbacks": [type(c).__name__ for c in callbacks()],
    })  # fmt: skip


def expected_method_configs(methods: list[str], model_path: str) -> dict[str, dict[str, Any]]:
    """:func:`method_config` of each method on the base at ``model_path`` (loaded once, here: SaRA's ratio and EVA's
    layers depend on the model), for the resume check before any run."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return {m: method_config(m, METHODS[m][0](model)) for m in methods}


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(method: str, seed: int, recipe: TunerRecipe, model_path: str) -> dict[str, Any]:
    """Adapt the base at ``model_path`` with ``method`` (in this process) and return the run record."""
    import torch
    from datasets import concatenate_datasets
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    import hfx
    from hfx.data import accuracy, generate_problems, sft_dataset

    factory, needs_init, callbacks = METHODS[method]
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    evals = {d: generate_problems(recipe.n_eval, d, seed=1, split="test") for d in ("easy", recipe.difficulty)}

    def evaluate(m) -> dict[str, float]:
        m.eval()
        out = {d: accuracy(m, tokenizer, problems) for d, problems in evals.items()}
        m.train()
        return out

    before = evaluate(model)
    train = sft_dataset(recipe.n_train, recipe.difficulty, seed=seed, split="train")
    n_replay = int(recipe.replay * recipe.n_train)
    if n_replay:
        train = concatenate_datasets([train, sft_dataset(n_replay, "easy", seed=seed + 7)])
    train = train.shuffle(seed=seed)
    t0 = time.perf_counter()
    config = factory(model)
    described = method_config(method, config)  # before get_peft_model, which may fill the config in
    if config is not None:
        model = get_peft_model(model, config)
    init_seconds = time.perf_counter() - t0
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix=f"hfx-bench-{method}-{seed}-"),  # removed after training
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.full_learning_rate if config is None else recipe.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, recipe.max_steps // 20),
        logging_steps=max(1, min(recipe.logging_steps, recipe.max_steps // 4)),
        save_strategy="no",
        report_to="none",
        seed=seed,
        **activation_checkpointing(False),
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=False,  # the per-run progress bar
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    for callback in callbacks():
        trainer.add_callback(callback)
    if needs_init:
        t1 = time.perf_counter()
        hfx.initialize(trainer.model, trainer.get_train_dataloader())
        init_seconds += time.perf_counter() - t1
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t2 = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    train_seconds = time.perf_counter() - t2
    after = evaluate(trainer.model)
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    tail = [loss for _, loss in curve[-3:]]
    hard = recipe.difficulty
    return {
        "bench": "tuners",
        "method": method,
        "seed": seed,
        "recipe": asdict(recipe),
        "model": model_path,
        "model_fingerprint": model_fingerprint(model_path),
        "method_config": described,
        "versions": versions(),
        "hfx_code": code_digest(),
        "env": environment(),
        "metrics": {
            "hard_accuracy": after[hard],
            "easy_accuracy": after["easy"],
            "hard_before": before[hard],
            "easy_before": before["easy"],
            "forgetting": before["easy"] - after["easy"],
            "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "trainable_params": trainable,
            "peak_memory_mb": _peak_memory_mb(),
            "train_seconds": train_seconds,
            "init_seconds": init_seconds,
        },
        "loss_curve": curve,
    }


COLUMNS = [
    ("hard_accuracy", "hard acc.", 3),
    ("easy_accuracy", "easy acc.", 3),
    ("forgetting", "forgetting (easy)", 3),
    ("final_loss", "final loss", 3),
    ("trainable_params", "trainable params", 0),
    ("peak_memory_mb", "peak memory (MB)", 0),
    ("train_seconds", "train time (s)", 1),
    ("init_seconds", "init time (s)", 2),
]


PAIRED_METRICS = [("hard_accuracy", 3), ("forgetting", 3), ("final_loss", 3)]


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def write_report(
    out: str,
    methods: list[str],
    recipe: dict[str, Any] | None = None,
    model: str | None = None,
    seeds: list[int] | None = None,
) -> str:
    """Markdown summary + plots from the run records in ``out`` of ``methods`` (and, when given, of this ``recipe``,
    ``model`` and ``seeds`` only: records of other settings or seeds are never averaged in); returns the Markdown."""
    runs = [
        r
        for r in load_runs(out)
        if r.get("bench") == "tuners"
        and r["method"] in methods
        and (recipe is None or r.get("recipe") == recipe)
        and (model is None or r.get("model_fingerprint") == jsonable(model_fingerprint(model)))  # files, not path
        and (seeds is None or r.get("seed") in seeds)
    ]
    runs.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    summary = summarize(runs, "method", [k for k, _, _ in COLUMNS])
    recipe = runs[0]["recipe"] if runs else {}
    text = environments_text(runs) + f"Recipe: {json.dumps(recipe)}\n\n" + markdown_table(summary, COLUMNS)
    others = [m for m in summary if m != "lora"]
    if "lora" in summary and others:
        text += (
            "\nPaired differences against LoRA (same seed): mean ± standard error (number of pairs); ± above is the"
            " sample standard deviation over seeds.\n\n"
            + paired_table(runs, "method", [(m, "lora") for m in others], PAIRED_METRICS)
        )
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)

    def curves(ax):
        for name in summary:
            rs = [r for r in runs if r["method"] == name]
            steps = [s for s, _ in min((r["loss_curve"] for r in rs), key=len)]
            # a non-finite loss is saved as null (strict JSON): plotted as a gap
            mean = [sum(_nan_if_none(r["loss_curve"][i][1]) for r in rs) / len(rs) for i in range(len(steps))]
            ax.plot(steps, mean, label=name)
        ax.set(xlabel="step", ylabel="train loss (mean over seeds)", yscale="log", title="Loss curves")
        ax.legend(fontsize=7)

    def scatter(ax):
        for name, s in summary.items():
            ax.errorbar(s["trainable_params"][0], s["hard_accuracy"][0], yerr=s["hard_accuracy"][1], fmt="o")
            ax.annotate(name, (s["trainable_params"][0], s["hard_accuracy"][0]), fontsize=8)
        ax.set(xlabel="trainable parameters", ylabel="hard accuracy", xscale="log", title="Accuracy vs parameters")

    def bars(ax):
        names = list(summary)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [summary[n]["train_seconds"][0] for n in names], 0.4, label="train time (s)")
        ax2 = ax.twinx()
        ax2.bar([i + 0.2 for i in x], [summary[n]["peak_memory_mb"][0] for n in names], 0.4, color="tab:orange",
                label="peak memory (MB)")  # fmt: skip
        ax.set_xticks(list(x), names, rotation=30, fontsize=8)
        ax.set(ylabel="train time (s)", title="Time (blue) and peak memory (orange)")
        ax2.set(ylabel="peak memory (MB)")

    if runs:
        plot(os.path.join(out, "loss_curves.png"), curves)
        plot(os.path.join(out, "accuracy_vs_params.png"), scatter)
        plot(os.path.join(out, "time_memory.png"), bars, figsize=(7.0, 4.0))
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hfx bench tuners", description=help_description(__doc__))
    p.add_argument("--quick", action="store_true", help=f"short recipe ({QUICK.max_steps} steps, fewer eval problems)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="default: bench_results/tuners[-quick]")
    p.add_argument("--model", default=None, help="base model path (default: the cached tiny base, built once)")
    p.add_argument("--force", action="store_true", help="redo runs whose JSON exists")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run in this process
    args = p.parse_args(argv)
    methods = split_names(args.methods, "--methods", "method", list(METHODS), p.error)
    for option in ("max_steps", "n_train", "n_eval"):
        value = getattr(args, option)
        if value is not None and value < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if any(seed < 0 for seed in args.seeds):
        p.error(f"--seeds must be >= 0, got {args.seeds}")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r} is not a saved model folder (no config.json); hfx bench does not use the hub")
    if args.one:
        spec = json.loads(args.one)
        record = run_one(spec["method"], spec["seed"], TunerRecipe(**spec["recipe"]), spec["model"])
        save_run(spec["out"], spec["name"], record)
        return
    recipe = QUICK if args.quick else FULL
    overrides = {"max_steps": args.max_steps, "n_train": args.n_train, "n_eval": args.n_eval}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or os.path.join("bench_results", "tuners-quick" if args.quick else "tuners")
    ensure_writable(out, "--out", p.error)
    require_plotting(p.error)
    from tqdm.auto import tqdm

    from hfx.testing.pretrained import pretrained_base

    model = args.model or pretrained_base()
    configs = expected_method_configs(methods, model)
    # the model is matched by its files (fingerprint), not by how its path is spelled
    settings = {"recipe": asdict(recipe), "model_fingerprint": model_fingerprint(model), "versions": versions()}
    jobs = plan_jobs(
        out,
        [
            (f"{m}-seed{seed}", (m, seed), {**settings, "method_config": configs[m]})
            for seed in args.seeds
            for m in methods
        ],
        args.force,
        "hfx bench tuners",
    )  # seeds outermost: CPU noise hits every method alike
    bar = tqdm(jobs, desc="hfx bench tuners", unit="run")
    for method, seed in bar:
        name = f"{method}-seed{seed}"
        bar.set_postfix_str(name)
        spec = {"method": method, "seed": seed, "recipe": asdict(recipe), "model": model, "out": out, "name": name}
        cmd = [sys.executable, "-m", "hfx.bench.tuners", "--one", json.dumps(spec)]
        proc = subprocess.run(cmd)  # its output (the run's own progress bar, warnings, errors) goes to the terminal
        if proc.returncode != 0:
            raise SystemExit(f"hfx bench tuners: run {name} failed (exit code {proc.returncode}; its error is above)")
    print(write_report(out, methods, asdict(recipe), model, args.seeds))
    print(f"[hfx bench] runs, summary.md and plots in {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
