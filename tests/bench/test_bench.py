"""`hfx bench`: the run records, summaries, tables and plots, and tiny end-to-end runs of `hfx bench tuners` (incl.
resume) and `hfx bench speed` through the console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hfx.bench import report
from hfx.bench.trainers import _flatten
from hfx.bench.trainers import write_report as trainers_report
from hfx.testing import save_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_summary_table_and_plot(tmp_path):
    for seed, acc in enumerate([0.5, 0.7, 0.9]):
        report.save_run(str(tmp_path), f"a-{seed}", {"method": "a", "metrics": {"acc": acc, "n": 10}})
    report.save_run(str(tmp_path), "b-0", {"method": "b", "metrics": {"acc": 0.2, "n": 20}})
    runs = report.load_runs(str(tmp_path))
    assert len(runs) == 4 and not [p for p in os.listdir(tmp_path / "runs") if p.endswith(".tmp")]
    summary = report.summarize(runs, "method", ["acc", "n"])
    assert summary["a"]["seeds"] == 3 and summary["a"]["acc"] == pytest.approx((0.7, 0.2))
    assert summary["b"]["acc"] == (0.2, 0.0)
    table = report.markdown_table(summary, [("acc", "accuracy", 2), ("n", "params", 0)])
    assert "| a | 3 | 0.70 ± 0.20 | 10 ± 0 |" in table and "| b | 1 | 0.20 ± 0.00 | 20 ± 0 |" in table
    path = report.plot(str(tmp_path / "p.png"), lambda ax: ax.plot([0, 1], [1, 0]))
    assert is_png(path)


def test_trainers_report_from_records(tmp_path):
    metrics: dict[str, float] = {}
    _flatten("", {"accuracy": 0.5, "nested": {"x": 1}, "flag": True, "name": "s"}, metrics)
    assert metrics == {"accuracy": 0.5, "nested/x": 1.0}
    for arm, accs in (("method", [0.6, 0.8]), ("baseline", [0.4, 0.4])):
        for seed, acc in enumerate(accs):
            report.save_run(str(tmp_path), f"constrained-{arm}-{seed}", {
                "bench": "trainers", "pair": "constrained", "arm": arm, "label": f"constrained / {arm}", "seed": seed,
                "env": {"device": "cpu"}, "metrics": {"accuracy": acc},
            })  # fmt: skip
    text = trainers_report(str(tmp_path), ["constrained"])
    assert (
        "| constrained / method | 2 | 0.700 ± 0.141 |" in text
        and "| constrained / baseline | 2 | 0.400 ± 0.000 |" in text
    )
    assert is_png(tmp_path / "trainers.png")


def hfx_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-c", "from hfx.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_bench_tuners_tiny_and_resumable(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", hidden_size=32)
    out = tmp_path / "bench"
    args = ["bench", "tuners", "--methods", "lora,eva", "--seeds", "0", "--max-steps", "2", "--n-train", "32",
            "--n-eval", "4", "--model", model, "--out", str(out)]  # fmt: skip
    proc = hfx_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("lora-seed0", "eva-seed0"):
        with open(out / "runs" / f"{name}.json") as f:
            record = json.load(f)
        m = record["metrics"]
        assert record["method"] == name.split("-")[0] and record["env"]["torch"]
        assert m["trainable_params"] > 0 and m["peak_memory_mb"] > 0 and m["train_seconds"] > 0
        assert 0 <= m["hard_accuracy"] <= 1 and len(record["loss_curve"]) == 2 and m["init_seconds"] >= 0
    assert "| lora | 1 |" in (out / "summary.md").read_text() and "| eva | 1 |" in proc.stdout
    for png in ("loss_curves.png", "accuracy_vs_params.png", "time_memory.png"):
        assert is_png(out / png)
    # resumable: finished runs are skipped
    stamp = os.path.getmtime(out / "runs" / "lora-seed0.json")
    again = hfx_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and os.path.getmtime(out / "runs" / "lora-seed0.json") == stamp
    bad = hfx_cli("bench", "tuners", "--methods", "lora,nope", "--model", model, cwd=tmp_path)
    assert bad.returncode != 0 and "unknown method(s) ['nope']" in bad.stderr


@pytest.mark.slow
def test_bench_speed_tiny(tmp_path):
    out = tmp_path / "speed"
    proc = hfx_cli("bench", "speed", "--shape", "tiny", "--methods", "lora,bone", "--rounds", "1", "--steps", "1",
                   "--warmup", "0", "--seq", "16", "--bs", "2", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "speed.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["lora", "bone"] and all(r["step_ms"] > 0 for r in result["rows"])
    assert "| bone |" in (out / "speed.md").read_text() and is_png(out / "speed.png")
