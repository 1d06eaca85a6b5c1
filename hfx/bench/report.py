"""Run records (one JSON per run, resumable), mean ± std summaries, Markdown tables and matplotlib plots."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "environment",
    "finished",
    "load_runs",
    "mean_std",
    "run_path",
    "save_run",
    "summarize",
    "markdown_table",
    "plot",
]


def environment() -> dict[str, Any]:
    """Versions and device, stored in every run record."""
    import peft
    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
    }


def run_path(out: str, name: str) -> str:
    return os.path.join(out, "runs", f"{name}.json")


def save_run(out: str, name: str, record: dict[str, Any]) -> str:
    path = run_path(out, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)  # a run interrupted mid-write never looks finished
    return path


def finished(out: str, name: str, **expected: Any) -> bool | None:
    """Whether run ``name`` has a record in ``out`` made with the ``expected`` settings (e.g. ``recipe=...``,
    ``model=...``): True; no record: False; a record made with other settings: None (it must be redone)."""
    path = run_path(out, name)
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return True if all(record.get(k) == v for k, v in expected.items()) else None


def load_runs(out: str) -> list[dict[str, Any]]:
    folder = os.path.join(out, "runs")
    if not os.path.isdir(folder):
        return []
    runs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                runs.append(json.load(f))
    return runs


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


def plot(path: str, draw: Callable[[Any], None], figsize: tuple[float, float] = (6.0, 4.0)) -> str:
    """Draw with ``draw(ax)`` into a PNG at ``path`` (matplotlib, headless)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev extra
        raise ImportError("hfx bench writes PNG plots with matplotlib: pip install matplotlib (or hfx[dev])") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
