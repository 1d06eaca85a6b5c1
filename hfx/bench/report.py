"""Run records (one JSON per run, resumable), mean ± std summaries, Markdown tables and matplotlib plots."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "environment",
    "environments_text",
    "ensure_writable",
    "finished",
    "jsonable",
    "load_runs",
    "mean_std",
    "model_fingerprint",
    "code_digest",
    "paired",
    "plan_jobs",
    "run_status",
    "verdict",
    "versions",
    "run_path",
    "save_run",
    "write_json",
    "split_names",
    "summarize",
    "markdown_table",
    "plot",
    "require_plotting",
]


def versions() -> dict[str, str]:
    """The versions a run's numbers depend on; a saved run made with others is not reused."""
    import peft
    import torch
    import transformers

    import hfx

    return {
        "hfx": getattr(hfx, "__version__", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def environment() -> dict[str, Any]:
    """Versions and device, stored in every run record."""
    import torch
    import trl

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        **versions(),
        "trl": trl.__version__,
    }


_ENV_KEYS = ("device", "hfx", "torch", "transformers", "peft", "trl")


def environments_text(runs: Sequence[dict[str, Any]]) -> str:
    """One line per distinct environment (device and versions) among ``runs``, with its run count and dates: a
    table averaged over runs from different set-ups says so."""
    groups: dict[tuple, list[str]] = {}
    for run in runs:
        env = run.get("env") or {}
        groups.setdefault(tuple(env.get(k) for k in _ENV_KEYS), []).append(str(env.get("date", "?")))
    if not groups:
        return "Device: ?; no runs.\n"

    def line(key: tuple, dates: list[str]) -> str:
        env = dict(zip(_ENV_KEYS, key))
        libs = ", ".join(f"{k} {env[k]}" for k in _ENV_KEYS[1:] if env[k] is not None)
        when = dates[0] if len(set(dates)) == 1 else f"{min(dates)} to {max(dates)}"
        return f"Device: {env['device'] or '?'}; {libs or 'versions ?'}; {when}"

    if len(groups) == 1:
        ((key, dates),) = groups.items()
        return line(key, dates) + ".\n"
    lines = [f"{len(groups)} environments among these runs:"]
    lines += [f"- {line(key, dates)} ({len(dates)} runs)" for key, dates in groups.items()]
    return "\n".join(lines) + "\n"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON (sets sorted, enums and other objects as strings), so it compares equal to itself
    read back from a run record."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=str)
        return getattr(obj, "value", None) if hasattr(obj, "value") and not callable(obj.value) else str(obj)

    return json.loads(json.dumps(value, default=default, sort_keys=True))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(path: str | None) -> dict[str, Any] | None:
    """sha256 of a saved model folder's config.json and of its weight files' contents: a model re-saved at the same
    path (another base, retrained) does not pass for the one a run was made with."""
    if path is None:
        return None
    with open(os.path.join(path, "config.json"), "rb") as f:
        config_sha256 = hashlib.sha256(f.read()).hexdigest()
    weights = hashlib.sha256()
    names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    for name in names:
        weights.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                weights.update(block)
    return {"config_sha256": config_sha256, "weights_sha256": weights.hexdigest(), "weight_files": len(names)}


def code_digest(root: str | None = None) -> str:
    """sha256 of the ``.py`` files under ``root`` (hfx's own package by default; ``hfx bench trainers`` adds the
    examples it runs): hfx's version string does not change with its code, and a fix can change a method's results
    (records made with other code are kept, with a warning, see :func:`plan_jobs`)."""
    if root is None:
        import hfx

        root = os.path.dirname(os.path.abspath(hfx.__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def split_names(value: str, option: str, noun: str, known: Sequence[str], error: Callable[[str], Any]) -> list[str]:
    """The comma-separated names of ``option`` (e.g. ``--methods``); an empty or unknown one goes to ``error`` (the
    parser's, which exits), naming the choices."""
    names = value.split(",")
    if not all(n.strip() for n in names):
        error(f"{option} {value!r}: an empty {noun} name; give comma-separated names of {list(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        error(f"{option}: unknown {noun}(s) {unknown}; choose from {list(known)}")
    return names


def ensure_writable(folder: str, option: str, error: Callable[[str], Any]) -> None:
    """Create ``folder`` and write a probe file in it before any run, so that an unwritable ``--out`` is named at
    once, not after the work is done; ``error`` is the parser's ``error`` (it exits)."""
    probe = os.path.join(folder, f".hfx-write-probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        error(f"{option} {folder!r} is not writable ({err.strerror or err}); choose another folder")


def run_path(out: str, name: str) -> str:
    return os.path.join(out, "runs", f"{name}.json")


def finite_or_none(value: Any) -> Any:
    """``value`` with each NaN / ±inf float replaced by None (JSON's null): Python's bare ``NaN`` is not JSON, and
    jq, JavaScript and strict parsers refuse the file. The reports already read None as not measured."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str, value: Any) -> str:
    """Write ``value`` to ``path`` as strict JSON (non-finite floats as null), replacing the file atomically: an
    interrupted write never leaves a truncated file that looks finished."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(finite_or_none(value), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path


def save_run(out: str, name: str, record: dict[str, Any]) -> str:
    return write_json(run_path(out, name), record)


def _warn(message: str) -> None:
    print(f"[hfx bench] warning: {message}", file=sys.stderr, flush=True)


def _read_record(path: str) -> dict[str, Any] | None:
    """The record at ``path``; None, with a warning naming the file, where it cannot be read (truncated, corrupt)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        _warn(f"{path} cannot be read ({type(err).__name__}: {err}); it is left out, and redone where asked for")
        return None
    if not isinstance(record, dict):
        _warn(
            f"{path} is not a run record (a JSON {type(record).__name__}); it is left out, and redone where asked for"
        )
        return None
    return record


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(saved: Any, expected: Any, name: str) -> list[str]:
    """``name.key: saved X, now Y`` for each leaf where ``saved`` and ``expected`` differ."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(saved) | set(expected), key=str):
            if saved.get(k) != expected.get(k):
                out += differences(saved.get(k), expected.get(k), f"{name}.{k}")
        return out
    if saved == expected:
        return []
    return [f"{name}: saved {'(none)' if saved is None else _short(saved)}, now {_short(expected)}"]


def run_status(out: str, name: str, **expected: Any) -> tuple[bool | None, list[str]]:
    """Whether run ``name`` has a record in ``out`` made with the ``expected`` settings (e.g. ``recipe=...``,
    ``model=...``, ``versions=...``): ``(True, [])``; no record, or one that cannot be read (a warning names it):
    ``(False, [])``; a record made with other settings: ``(None, what differs)``."""
    path = run_path(out, name)
    if not os.path.exists(path):
        return False, []
    record = _read_record(path)
    if record is None:
        return False, []
    diffs = [d for k, v in expected.items() for d in differences(record.get(k), jsonable(v), k)]
    return (None, diffs) if diffs else (True, [])


def finished(out: str, name: str, **expected: Any) -> bool | None:
    """:func:`run_status` without the differences: True, False, or None (made with other settings)."""
    return run_status(out, name, **expected)[0]


def plan_jobs(
    out: str, jobs: Sequence[tuple[str, Any, dict[str, Any]]], force: bool, command: str, code: str | None = None
) -> list[Any]:
    """The jobs to run among ``(name, job, expected settings)``: all with ``force``; else those without a record.

    A record made with other settings is refused (``SystemExit`` naming each file and what differs): replacing it
    silently lost earlier results. Records made with other hfx code (``code``, by default :func:`code_digest`; none
    recorded counts as other) are kept, with a warning.
    """
    todo, refused, other_code = [], [], 0
    code = code or code_digest()
    for name, job, expected in jobs:
        done, diffs = run_status(out, name, **expected)
        if done and not force:
            record = _read_record(run_path(out, name)) or {}
            other_code += record.get("hfx_code") != code
            continue
        if done is None and not force:
            refused.append(f"  {run_path(out, name)}: " + "; ".join(diffs))
        todo.append(job)
    if refused:
        raise SystemExit(
            f"{command}: {len(refused)} saved run(s) in {out} were made with other settings, and this run would "
            "replace them:\n" + "\n".join(refused) + "\nUse --out <another dir> to keep both, delete those files, or "
            "--force to redo (replace) every run."
        )
    if other_code:
        _warn(f"{other_code} saved run(s) in {out} were made with other hfx code; they are kept (--force redoes them)")
    return todo


def load_runs(out: str) -> list[dict[str, Any]]:
    """Every readable record in ``out/runs``; one that cannot be read is skipped with a warning naming it."""
    folder = os.path.join(out, "runs")
    if not os.path.isdir(folder):
        return []
    runs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            record = _read_record(os.path.join(folder, name))
            if record is not None:
                runs.append(record)
    return runs


def paired(runs: Iterable[dict[str, Any]], key: str, a: str, b: str, metric: str, by: str = "seed") -> dict[str, Any]:
    """Paired differences ``a − b`` of ``metric`` between the runs with ``run[key] == a`` and ``== b`` that share
    ``run[by]`` (the seed): ``{"n", "diffs", "mean", "se"}``, se = sample std (n−1) / √n (nan for n < 2)."""
    side: dict[str, dict[Any, float]] = {a: {}, b: {}}
    for run in runs:
        if run.get(key) in side:
            value = run["metrics"].get(metric)
            if value is not None and not math.isnan(float(value)):
                side[run[key]][run.get(by)] = float(value)
    shared = sorted(set(side[a]) & set(side[b]), key=str)
    diffs = [side[a][s] - side[b][s] for s in shared]
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else math.nan
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "diffs": diffs, "mean": mean, "se": se}


def verdict(stats: dict[str, Any], direction: int) -> str:
    """The rule of benchmarks/RESULTS.md: "reproduced" when the paired mean difference is in the claimed direction
    (``direction`` +1: ``a`` above ``b``; −1: below) by more than 2 standard errors, "not reproduced" when it is in
    the opposite direction by more than 2 SE, otherwise (or with fewer than 2 pairs) "inconclusive"."""
    mean, se = stats["mean"], stats["se"]
    if stats["n"] < 2 or math.isnan(mean) or math.isnan(se):
        return "inconclusive"
    if direction * mean > 2 * se:
        return "reproduced"
    if -direction * mean > 2 * se:
        return "not reproduced"
    return "inconclusive"


def paired_table(
    runs: Sequence[dict[str, Any]], key: str, pairs: Sequence[tuple[str, str]], metrics: Sequence[tuple[str, int]]
) -> str:
    """Markdown: one row per ``(a, b)`` in ``pairs``, the paired (same-seed) difference a − b of each metric as
    ``mean ± SE (n)``."""
    head = "| a − b (same seed) | " + " | ".join(m for m, _ in metrics) + " |"
    rule = "|---|" + "---|" * len(metrics)
    rows = []
    for a, b in pairs:
        cells = []
        for metric, digits in metrics:
            st = paired(runs, key, a, b, metric)
            if st["n"] < 2:  # one pair has no standard error
                cells.append(f"{st['mean']:+.{digits}f} (1)" if st["n"] else "–")
            else:
                cells.append(f"{st['mean']:+.{digits}f} ± {st['se']:.{digits}f} ({st['n']})")
        rows.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows]) + "\n"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize(runs: Iterable[dict[str, Any]], key: str, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Group runs by ``run[key]`` and give ``(mean, std)`` of each metric plus the number of seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run[key], []).append(run)
    out = {}
    for name, rs in groups.items():
        out[name] = {"seeds": len(rs), **{m: mean_std([r["metrics"].get(m, math.nan) for r in rs]) for m in metrics}}
    return out


def _fmt(value: tuple[float, float], digits: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(
    summary: dict[str, dict[str, Any]], columns: Sequence[tuple[str, str, int]], first: str = "method"
) -> str:
    """``columns``: (metric key, header, decimals); one row per group, in insertion order."""
    head = f"| {first} | seeds | " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    rows = [
        f"| {name} | {s['seeds']} | " + " | ".join(_fmt(s[k], d) for k, _, d in columns) + " |"
        for name, s in summary.items()
    ]
    return "\n".join([head, rule, *rows]) + "\n"


PLOTTING_HINT = "hfx bench writes PNG plots with matplotlib, which is not installed: pip install 'hfx[bench]'"


def require_plotting(error: Callable[[str], Any]) -> None:
    """Check that matplotlib is there before any run (``error`` is the parser's, it exits): the plots are drawn
    last, and a missing matplotlib used to fail a benchmark after all its work was done."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        error(PLOTTING_HINT)


def plot(path: str, draw: Callable[[Any], None], figsize: tuple[float, float] = (6.0, 4.0)) -> str:
    """Draw with ``draw(ax)`` into a PNG at ``path`` (matplotlib, headless)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the bench and dev extras
        raise ImportError(PLOTTING_HINT) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
