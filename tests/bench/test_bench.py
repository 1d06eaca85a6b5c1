"""`hfx bench`: the run records, summaries, tables and plots, and tiny end-to-end runs of `hfx bench tuners` (incl.
resume) and `hfx bench speed` through the console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hfx.bench import report
from hfx.bench.trainers import _flatten
from hfx.bench.trainers import write_report as trainers_report
from hfx.bench.tuners import write_report as tuners_report
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
    # the seeds asked for only: a record of another seed in the folder is not averaged in (it was)
    assert "| constrained / method | 1 | 0.800 ± 0.000 |" in trainers_report(str(tmp_path), ["constrained"], seeds=[1])


def hfx_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-c", "from hfx.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_bench_tuners_tiny_and_resumable(tmp_path, monkeypatch):
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
    # resumable: finished runs are skipped (in this process, through the same entry point: no run may start)
    from hfx.cli import main

    stamp = os.path.getmtime(out / "runs" / "lora-seed0.json")
    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"a finished run was started again: {a}"))
        main(args)
    assert os.path.getmtime(out / "runs" / "lora-seed0.json") == stamp
    # a record of a seed not asked for is left out of the table (a copy of seed 0 labelled seed 1)
    record["seed"] = 1
    with open(out / "runs" / "eva-seed1.json", "w") as f:
        json.dump(record, f)
    assert "| eva | 1 |" in tuners_report(str(out), ["lora", "eva"], record["recipe"], record["model"], seeds=[0])
    assert "| eva | 2 |" in tuners_report(str(out), ["lora", "eva"], record["recipe"], record["model"])
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['nope'\]"):
        main(["bench", "tuners", "--methods", "lora,nope", "--model", model])


@pytest.mark.slow
def test_bench_speed_tiny(tmp_path):
    out = tmp_path / "speed"
    from hfx.cli import main

    # The driver runs here (the entry point is run as a command above); each method still gets its own process.
    main(["bench", "speed", "--shape", "tiny", "--methods", "lora,bone", "--rounds", "1", "--steps", "1",
          "--warmup", "0", "--seq", "16", "--bs", "2", "--out", str(out)])  # fmt: skip
    result = json.loads((out / "speed.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["lora", "bone"] and all(r["step_ms"] > 0 for r in result["rows"])
    assert "| bone |" in (out / "speed.md").read_text() and is_png(out / "speed.png")


def test_finished_runs_must_match_their_settings(tmp_path):
    """A record made with another recipe or model used to count as finished (and was averaged into the table, or
    crashed the loss-curve plot); now it is redone, and the report keeps only this recipe's runs."""
    out = str(tmp_path)
    short, long = {"max_steps": 2}, {"max_steps": 4}
    assert report.finished(out, "lora-seed0", recipe=short) is False
    for seed, recipe, curve in ((0, long, [[1, 2.0], [2, 1.5], [3, 1.2], [4, 1.0]]), (1, short, [[1, 2.0], [2, 1.8]])):
        report.save_run(out, f"lora-seed{seed}", {
            "bench": "tuners", "method": "lora", "seed": seed, "recipe": recipe, "model": "m", "env": {},
            "metrics": {k: 0.5 for k in ("hard_accuracy", "easy_accuracy", "forgetting", "final_loss",
                                         "trainable_params", "peak_memory_mb", "train_seconds", "init_seconds")},
            "loss_curve": curve,
        })  # fmt: skip
    assert report.finished(out, "lora-seed1", recipe=short, model="m") is True
    assert report.finished(out, "lora-seed0", recipe=short, model="m") is None  # other recipe: redo
    assert report.finished(out, "lora-seed1", recipe=short, model="other") is None  # other model: redo
    text = tuners_report(out, ["lora"], short, "m")
    assert "| lora | 1 |" in text and json.dumps(short) in text
    assert "| lora | 2 |" in tuners_report(out, ["lora"])  # no filter: both, curves of unequal length plotted


def test_trainers_plot_has_every_pair():
    """BVPO reports held-out preference accuracy (trace/rewards/accuracies); its bars were missing from the plot."""
    from hfx.bench.trainers import plot_points

    runs = [
        {"pair": p, "arm": a, "label": f"{p} / {a}", "seed": 0, "metrics": {k: 0.5}}
        for p, k in (("bvpo", "trace/rewards/accuracies"), ("gvm_raft", "accuracy")) for a in ("method", "baseline")
    ]  # fmt: skip
    assert [(p, a) for p, a, *_ in plot_points(runs, ["bvpo", "gvm_raft"])] == [
        ("bvpo", "method"), ("bvpo", "baseline"), ("gvm_raft", "method"), ("gvm_raft", "baseline")
    ]  # fmt: skip


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("tuners", ["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        ("tuners", ["--n-eval", "-3"], "--n-eval must be >= 1, got -3"),
        ("tuners", ["--seeds", "-1"], "--seeds must be >= 0"),
        ("tuners", ["--model", "/nonexistent"], "--model '/nonexistent' is not a saved model folder"),
        ("trainers", ["--model", "/nonexistent"], "--model '/nonexistent' is not a saved model folder"),
        ("speed", ["--methods", "lora,nope"], "--methods: unknown method(s) ['nope']"),
        ("speed", ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("speed", ["--device", "tpu"], "--device must be 'cpu' or 'cuda' (or 'cuda:N'), got 'tpu'"),
    ],
)
def test_bad_options_are_named_before_any_run(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as err:
        importlib.import_module(f"hfx.bench.{module}").main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_pretrained_base_replaces_a_damaged_cache_entry(tmp_path):
    """A cache folder without hfx_recipe.json (a partial copy, files deleted) was kept forever: every call retrained,
    threw the result away and returned the broken folder."""
    from transformers import AutoModelForCausalLM

    from hfx.testing.pretrained import BaseRecipe, pretrained_base

    recipe = BaseRecipe(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, n_train=8, max_steps=1,
                        batch_size=4)  # fmt: skip
    path = pretrained_base(recipe, cache=str(tmp_path), log=lambda s: None)
    for name in os.listdir(path):
        if name != "config.json":
            os.remove(os.path.join(path, name))
    logged = []
    again = pretrained_base(recipe, cache=str(tmp_path), log=logged.append)
    assert again == path and os.path.isfile(os.path.join(path, "hfx_recipe.json"))
    assert any("replacing the incomplete cache entry" in line for line in logged)
    AutoModelForCausalLM.from_pretrained(path)  # loads again


def test_pretrained_base_cache_follows_hfx_cache_then_xdg(monkeypatch, tmp_path):
    from hfx.testing.pretrained import cache_dir

    monkeypatch.delenv("HFX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "hfx")
    monkeypatch.setenv("HFX_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("HFX_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "hfx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_speed_on_cuda_without_cuda_is_named_before_any_run(capsys):
    """Every method's subprocess failed with a traceback, then the driver crashed in torch.cuda.get_device_name."""
    from hfx.bench.speed import main

    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--shape", "tiny"])
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["tuners", "trainers", "speed"])
def test_help_describes_the_sub_command_in_full_sentences(module, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"hfx.bench.{module}").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text and f"hfx bench {module}:" in text
    description = text.split(f"hfx bench {module}:", 2)[-1].split(" options:")[0]
    assert description.rstrip().endswith("."), description
