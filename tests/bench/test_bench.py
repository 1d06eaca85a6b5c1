"""`hfx bench`: the run records, summaries, tables and plots, and tiny end-to-end runs of `hfx bench tuners` (incl.
resume) and `hfx bench speed` through the console entry point."""

from __future__ import annotations

import json
import math
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


def _refuse_constant(name: str):
    raise ValueError(f"not JSON: {name}")


def test_records_are_strict_json_and_nan_reads_as_unmeasured(tmp_path):
    """A NaN metric (memory unmeasured, no loss) was written as a bare NaN, which jq and strict parsers refuse; it is
    null now, and the summary, the paired table and the loss plot read null as not measured."""
    curve = [[1, 2.0], [2, float("nan")], [3, 1.0]]
    for seed, (acc, mem) in enumerate([(0.5, float("nan")), (0.7, 3.0)]):
        path = report.save_run(str(tmp_path), f"m-{seed}", {
            "bench": "tuners", "method": "lora", "seed": seed, "recipe": {}, "metrics": {"hard_accuracy": acc, "peak_memory_mb": mem,
            "final_loss": float("inf"), "trainable_params": 10, "easy_accuracy": 0.9, "forgetting": 0.0,
            "train_seconds": 1.0, "init_seconds": 0.1}, "loss_curve": curve,
        })  # fmt: skip
        record = json.loads(open(path).read(), parse_constant=_refuse_constant)
    assert record["metrics"]["final_loss"] is None and record["loss_curve"][1] == [2, None]
    runs = report.load_runs(str(tmp_path))
    summary = report.summarize(runs, "method", ["hard_accuracy", "peak_memory_mb", "final_loss"])
    assert summary["lora"]["peak_memory_mb"] == (3.0, 0.0) and math.isnan(summary["lora"]["final_loss"][0])
    text = tuners_report(str(tmp_path), ["lora"])
    assert "| lora | 2 |" in text and is_png(tmp_path / "loss_curves.png")


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
    os.remove(out / "runs" / "eva-seed1.json")
    # the record stores what the run was made with: the method's config, the versions, the model's fingerprint
    with open(out / "runs" / "lora-seed0.json") as f:
        lora = json.load(f)
    assert lora["method_config"]["config"]["class"] == "LoraConfig" and lora["method_config"]["config"]["r"] == 8
    assert set(lora["versions"]) == {"hfx", "torch", "transformers", "peft"}
    assert (
        len(lora["model_fingerprint"]["weights_sha256"]) == 64
        and len(lora["model_fingerprint"]["config_sha256"]) == 64
    )
    assert lora["hfx_code"] == report.code_digest()
    # made with another torch: refused (not silently replaced), naming the file and what differs
    lora["versions"]["torch"] = "0.0"
    with open(out / "runs" / "lora-seed0.json", "w") as f:
        json.dump(lora, f)
    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"a run was started: {a}"))
        with pytest.raises(SystemExit, match=r"lora-seed0\.json: versions\.torch: saved \"0\.0\", now") as err:
            main(args)
    assert "--force" in str(err.value) and "--out <another dir>" in str(err.value)


@pytest.mark.slow
def test_bench_speed_tiny(tmp_path):
    out = tmp_path / "speed"
    from hfx.cli import main

    # The driver runs here (the entry point is run as a command above); each method still gets its own process.
    main(["bench", "speed", "--shape", "tiny", "--methods", "lora,bone", "--rounds", "1", "--steps", "1",
          "--warmup", "0", "--seq", "16", "--bs", "2", "--out", str(out)])  # fmt: skip
    result = json.loads((out / "speed.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["lora", "bone"] and all(r["step_ms"] > 0 for r in result["rows"])
    assert all(r["mem_method"] == "gc+malloc_trim+clear_refs+VmHWM" for r in result["rows"])
    assert "| bone |" in (out / "speed.md").read_text() and is_png(out / "speed.png")


def test_finished_runs_must_match_their_settings(tmp_path):
    """A record made with another recipe or model used to count as finished (and was averaged into the table, or
    crashed the loss-curve plot); now it is redone, and the report keeps only this recipe's runs."""
    out = str(tmp_path / "out")
    model = tmp_path / "m"  # the report matches the model by its files (the path's spelling may differ)
    model.mkdir()
    (model / "config.json").write_text("{}")
    fingerprint = report.model_fingerprint(str(model))
    short, long = {"max_steps": 2}, {"max_steps": 4}
    assert report.finished(out, "lora-seed0", recipe=short) is False
    for seed, recipe, curve in ((0, long, [[1, 2.0], [2, 1.5], [3, 1.2], [4, 1.0]]), (1, short, [[1, 2.0], [2, 1.8]])):
        report.save_run(out, f"lora-seed{seed}", {
            "bench": "tuners", "method": "lora", "seed": seed, "recipe": recipe, "model": "m", "env": {},
            "model_fingerprint": fingerprint,
            "metrics": {k: 0.5 for k in ("hard_accuracy", "easy_accuracy", "forgetting", "final_loss",
                                         "trainable_params", "peak_memory_mb", "train_seconds", "init_seconds")},
            "loss_curve": curve,
        })  # fmt: skip
    assert report.finished(out, "lora-seed1", recipe=short, model="m") is True
    assert report.finished(out, "lora-seed0", recipe=short, model="m") is None  # other recipe: redo
    assert report.finished(out, "lora-seed1", recipe=short, model="other") is None  # other model: redo
    text = tuners_report(out, ["lora"], short, str(model) + "/")
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
        ("speed", ["--methods", ""], "--methods '': an empty method name"),
        ("tuners", ["--methods", ""], "--methods '': an empty method name"),
        ("tuners", ["--methods", "lora,nope"], "--methods: unknown method(s) ['nope']"),
        ("trainers", ["--pairs", "bvpo,"], "--pairs 'bvpo,': an empty pair name"),
        ("trainers", ["--pairs", "nope"], "--pairs: unknown pair(s) ['nope']"),
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


CHURN = r"""
import ctypes, json, sys
from hfx.bench.speed import cpu_memory_baseline, cpu_peak_bytes, rss_bytes

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
CHUNK, N = 64 * 1024, 3200  # 200 MiB in heap-sized chunks (below glibc's mmap threshold)

def allocate(pins=None):
    ptrs = []
    for _ in range(N):
        ptrs.append(libc.malloc(CHUNK))
        ctypes.memset(ptrs[-1], 1, CHUNK)  # resident
        if pins is not None:  # live memory between them: glibc cannot trim them off the heap's top
            pins.append(libc.malloc(CHUNK // 4))  # (too large for the small holes the imports left)
    return ptrs

before = rss_bytes()
pins = []
setup = allocate(pins)  # a tuner's set-up temporaries
for p in setup:
    libc.free(p)  # freed, but glibc keeps them resident
kept = rss_bytes() - before
start, method = cpu_memory_baseline()
train = allocate()  # the training loop reuses that memory
print(json.dumps({"kept": kept, "extra": cpu_peak_bytes(method) - start, "method": method}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc/self/clear_refs")
def test_speed_cpu_memory_counts_memory_a_tuner_set_up_freed():
    """LIFT, SaRA and DSEE free large temporaries in get_peft_model; glibc kept them resident, so they were counted in
    the baseline RSS and the training loop reused them: its growth over the baseline (with the lifetime ru_maxrss as
    peak) came out near 0 here, and LIFT/SaRA/DSEE at 0.75-0.92x LoRA's training memory instead of 0.94-1.12x."""
    proc = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kept"] > 150 * 2**20, result  # the situation: freed set-up memory still resident
    assert result["extra"] > 150 * 2**20, result  # the loop's 200 MiB are counted (the old measurement: ~0)
    assert result["method"] == "gc+malloc_trim+clear_refs+VmHWM"


def test_speed_cpu_memory_falls_back_without_clear_refs(monkeypatch):
    import builtins
    import resource

    from hfx.bench import speed

    def no_clear_refs(path, *args, **kwargs):
        if path == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(speed, "open", no_clear_refs, raising=False)
    start, method = speed.cpu_memory_baseline()
    assert method.endswith("+ru_maxrss") and start > 0
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert speed.cpu_peak_bytes(method, set_up_peak=lifetime - 1) == lifetime  # the loop set a new peak: measured
    # a loop below the set-up's peak leaves the lifetime peak where set-up put it: unmeasured, not set-up memory
    assert math.isnan(speed.cpu_peak_bytes(method, set_up_peak=lifetime))


@pytest.mark.parametrize("r", [4, 8])
def test_speed_sara_is_sized_to_lora_r_on_the_model(r):
    """SaRA was SaraConfig(ratio=0.05) whatever --r and the shape: at --r 4 it had 4x LoRA's parameters on the small
    shape (4.3x at the 1B shape); here, at the tiny shape, 0.45x LoRA r=4's."""
    import copy

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfx.bench.speed import SHAPES, method_configs

    hidden, inter, layers, heads, kv, vocab = SHAPES["tiny"]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    configs = method_configs(r)
    counts = {}
    for name in ("lora", "sara"):
        peft_model = get_peft_model(copy.deepcopy(model), configs[name](model))
        counts[name] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert counts["sara"] == pytest.approx(counts["lora"], rel=0.02), counts


def _fail_run(*args, **kwargs):
    pytest.fail(f"a run was started: {args}")


def _trainer_record(**changes):
    from hfx.bench.trainers import method_config

    record = {"bench": "trainers", "pair": "bvpo", "arm": "method", "label": "bvpo / method", "seed": 0,
              "quick": True, "model": None, "model_fingerprint": None,
              "method_config": method_config("bvpo", "method", True), "versions": report.versions(),
              "env": report.environment(), "metrics": {"trace/rewards/accuracies": 0.5}}  # fmt: skip
    return {**record, **changes}


def test_resume_compares_method_config_versions_and_model_files(tmp_path, capsys):
    """Resume compared only the recipe and the model's path: a record made with another method config, other library
    versions, or another model saved at the same path passed for finished."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"0" * 100)
    settings = {"recipe": {"max_steps": 2}, "model": str(model), "model_fingerprint": report.model_fingerprint(str(model)),
                "method_config": {"config": {"class": "LoraConfig", "r": 8}}, "versions": report.versions()}  # fmt: skip
    out = str(tmp_path / "out")
    report.save_run(out, "lora-seed0", {"method": "lora", **settings})
    assert report.run_status(out, "lora-seed0", **settings) == (True, [])
    for key, value, what in (
        ("method_config", {"config": {"class": "LoraConfig", "r": 16}}, "method_config.config.r: saved 8, now 16"),
        ("versions", {**settings["versions"], "peft": "0.0"}, 'versions.peft: saved "'),
    ):
        done, diffs = report.run_status(out, "lora-seed0", **{**settings, key: value})
        assert done is None and any(what in d for d in diffs), diffs
    (model / "config.json").write_text('{"hidden_size": 16}')  # another model re-saved at the same path
    done, diffs = report.run_status(
        out, "lora-seed0", **{**settings, "model_fingerprint": report.model_fingerprint(str(model))}
    )
    assert done is None and [d.split(":")[0] for d in diffs] == ["model_fingerprint.config_sha256"]
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"1" * 100)  # retrained: same config, same size, other weights
    done, diffs = report.run_status(
        out, "lora-seed0", **{**settings, "model_fingerprint": report.model_fingerprint(str(model))}
    )
    assert done is None and [d.split(":")[0] for d in diffs] == ["model_fingerprint.weights_sha256"]


def test_summaries_list_every_environment(tmp_path):
    """The summary header showed runs[0]["env"] only, also when the runs came from different machines or versions."""
    out = str(tmp_path)
    for seed, (device, torch_version) in enumerate(
        (("CPU (2 cores)", "2.13"), ("CPU (2 cores)", "2.13"), ("H100", "2.14"))
    ):
        env = {
            "device": device,
            "torch": torch_version,
            "transformers": "5",
            "peft": "0.2",
            "date": f"2026-12-0{seed + 1}",
        }
        for arm in ("method", "baseline"):
            report.save_run(out, f"bvpo-{arm}-seed{seed}", {
                "bench": "trainers", "pair": "bvpo", "arm": arm, "label": f"bvpo / {arm}", "seed": seed, "env": env,
                "metrics": {"trace/rewards/accuracies": 0.5 + 0.1 * seed + (arm == "method") * 0.01 * (seed + 1)},
            })  # fmt: skip
    text = trainers_report(out, ["bvpo"])
    assert "2 environments among these runs" in text
    assert "- Device: CPU (2 cores); torch 2.13, transformers 5, peft 0.2; 2026-12-01 to 2026-12-02 (4 runs)" in text
    assert "- Device: H100; torch 2.14, transformers 5, peft 0.2; 2026-12-03 (2 runs)" in text
    # the same-seed differences method − baseline 0.01, 0.02, 0.03: mean 0.02, SE 0.01 / sqrt(3) = 0.006
    assert "| method − baseline, paired: mean ± SE | 3 | +0.020 ± 0.006 |" in text
    one = report.environments_text([{"env": {"device": "cpu", "torch": "2", "date": "d"}}])
    assert one == "Device: cpu; torch 2; d.\n"


def test_paired_statistics_and_the_verdict_rule():
    """RESULTS.md's rule: reproduced when the same-seed mean difference is in the claimed direction by more than
    2 standard errors of the differences, not reproduced when in the opposite one, otherwise inconclusive."""

    def runs(a, b):
        return [
            {"method": m, "seed": s, "metrics": {"x": v}} for m, vs in (("a", a), ("b", b)) for s, v in enumerate(vs)
        ]

    # LIFT vs full FT, forgetting (lower is the claim): differences -0.010, +0.010, -0.025
    st = report.paired(runs([0.015, 0.010, 0.010], [0.025, 0.0, 0.035]), "method", "a", "b", "x")
    assert st["n"] == 3 and st["diffs"] == pytest.approx([-0.010, 0.010, -0.025])
    assert st["mean"] == pytest.approx(-0.025 / 3) and st["se"] == pytest.approx(0.0101379, rel=1e-4)
    assert report.verdict(st, -1) == "inconclusive"
    clear = report.paired(runs([1.0, 1.1, 1.3], [0.5, 0.7, 0.8]), "method", "a", "b", "x")  # +0.5, +0.4, +0.5
    assert report.verdict(clear, +1) == "reproduced" and report.verdict(clear, -1) == "not reproduced"
    # only seeds both sides have are paired; one pair is too few to judge
    single = report.paired(runs([1.0], [0.5, 0.7]), "method", "a", "b", "x")
    assert single["n"] == 1 and report.verdict(single, +1) == "inconclusive"


def test_a_record_of_other_settings_is_refused_not_replaced(tmp_path, monkeypatch):
    """A different recipe in the same --out used to redo the run and overwrite the earlier record (run names carry only
    the method and seed); now nothing runs, the file and the difference are named, and --force still redoes."""
    from hfx.bench.trainers import main

    out = tmp_path / "out"
    path = report.save_run(str(out), "bvpo-method-seed0", _trainer_record())
    before = open(path).read()
    monkeypatch.setattr(subprocess, "run", _fail_run)
    with pytest.raises(SystemExit) as err:
        main(["--pairs", "bvpo", "--seeds", "0", "--out", str(out)])  # not --quick
    message = str(err.value)
    assert "bvpo-method-seed0.json: quick: saved true, now false" in message
    assert "method_config.quick_flags" in message and "--out <another dir>" in message and "--force" in message
    assert open(path).read() == before
    started = []

    def fake_run_one(pair, arm, seed, quick, model):
        started.append(f"{pair}-{arm}-seed{seed}")
        return _trainer_record(arm=arm, quick=quick, label=f"{pair} / {arm}")

    monkeypatch.setattr("hfx.bench.trainers.run_one", fake_run_one)
    main(["--pairs", "bvpo", "--seeds", "0", "--out", str(out), "--force"])
    assert started == ["bvpo-method-seed0", "bvpo-baseline-seed0"]


def test_a_corrupt_record_is_redone_and_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    """A truncated or corrupt run JSON crashed every invocation (also with --force) with a bare JSONDecodeError."""
    from hfx.bench.trainers import main

    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    bad = out / "runs" / "bvpo-method-seed0.json"
    bad.write_text('{"bench": "trainers", "pair": "bv')  # interrupted copy
    (out / "runs" / "bvpo-baseline-seed0.json").write_bytes(b"\xff\xfe not utf-8")
    assert report.run_status(str(out), "bvpo-method-seed0", quick=True) == (False, [])
    assert report.load_runs(str(out)) == []
    err = capsys.readouterr().err
    assert (
        f"{bad} cannot be read (JSONDecodeError" in err
        and "bvpo-baseline-seed0.json cannot be read (UnicodeDecodeError" in err
    )
    started = []
    monkeypatch.setattr(subprocess, "run", _fail_run)
    monkeypatch.setattr(
        "hfx.bench.trainers.run_one",
        lambda pair, arm, seed, quick, model: started.append(arm) or _trainer_record(arm=arm, label=f"bvpo / {arm}"),
    )
    main(["--pairs", "bvpo", "--seeds", "0", "--quick", "--out", str(out)])
    assert started == ["method", "baseline"] and len(report.load_runs(str(out))) == 2


@pytest.mark.parametrize("module", ["tuners", "trainers", "speed"])
def test_an_unwritable_out_is_named_before_any_run(module, tmp_path, monkeypatch, capsys):
    """--out under a file (or without write permission) failed only when the first record or the report was written:
    after a run (tuners, trainers) or after all rounds (speed)."""
    import importlib

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["--out", str(blocker / "out")]
    if module == "tuners":
        argv += ["--methods", "lora", "--seeds", "0", "--model", save_tiny_model(tmp_path / "tiny", hidden_size=16)]
    if module == "trainers":
        argv += ["--pairs", "bvpo", "--seeds", "0"]
    if module == "speed":
        argv += ["--shape", "tiny", "--methods", "lora", "--rounds", "1"]
    monkeypatch.setattr(subprocess, "run", _fail_run)
    monkeypatch.setattr("hfx.bench.trainers.run_one", _fail_run)
    with pytest.raises(SystemExit) as err:
        importlib.import_module(f"hfx.bench.{module}").main(argv)
    assert err.value.code == 2 and f"--out '{blocker / 'out'}' is not writable" in capsys.readouterr().err


def test_speed_json_records_the_versions(tmp_path, monkeypatch):
    """speed.json had only the device, torch, args and date; the run JSONs of tuners/trainers carry the versions."""
    from hfx.bench import speed

    row = {"method": "lora", "trainable": 10, "step_ms": 1.0, "peak_gib": 1.0, "train_mem_gib": 0.5,
           "mem_method": "gc+malloc_trim+clear_refs+VmHWM", "loss": 1.0}  # fmt: skip
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, json.dumps(row), ""))
    speed.main(["--shape", "tiny", "--methods", "lora", "--rounds", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["versions"] == report.versions() and result["mem_method"] == [row["mem_method"]]
    assert "hfx " in (tmp_path / "speed.md").read_text() and "clear_refs+VmHWM" in (tmp_path / "speed.md").read_text()


def test_plan_jobs_skips_refuses_and_warns(tmp_path, capsys):
    """The resume plan shared by tuners and trainers: finished runs are skipped (the model is matched by its files,
    so another spelling of its path no longer refuses every record), a record made with other settings is refused
    with what differs, one made with other hfx code is kept with a warning, and --force redoes everything."""
    out = str(tmp_path)
    settings = {"recipe": {"max_steps": 2}, "model_fingerprint": {"config_sha256": "a"}}
    report.save_run(out, "lora-seed0", {**settings, "model": "/models/tiny", "hfx_code": report.code_digest()})
    report.save_run(out, "eva-seed0", {**settings, "model": "/models/tiny/", "hfx_code": "older"})
    report.save_run(out, "dsee-seed0", {**settings, "model": "/models/tiny"})  # made before records had a digest
    jobs = [("lora-seed0", "lora", settings), ("eva-seed0", "eva", settings), ("dsee-seed0", "dsee", settings),
            ("bone-seed0", "bone", settings)]  # fmt: skip
    assert report.plan_jobs(out, jobs, False, "hfx bench tuners") == ["bone"]
    assert "2 saved run(s) in" in capsys.readouterr().err  # eva's and dsee's, made with other code: kept
    other = {**settings, "recipe": {"max_steps": 3}}
    with pytest.raises(SystemExit, match=r"lora-seed0.json: recipe.max_steps: saved 2, now 3"):
        report.plan_jobs(out, [("lora-seed0", "lora", other)], False, "hfx bench tuners")
    assert report.plan_jobs(out, [("lora-seed0", "lora", other), *jobs], True, "x") == [
        "lora", "lora", "eva", "dsee", "bone"]  # fmt: skip


def _no_matplotlib(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))


@pytest.mark.parametrize("bench", ["tuners", "trainers", "speed"])
def test_missing_matplotlib_is_named_before_any_run(bench, tmp_path, monkeypatch, capsys):
    """matplotlib (hfx[bench]) is not a base dependency: a wheel install measured for minutes, then failed drawing the
    plots. The parser names the extra before any run now."""
    import importlib

    main = importlib.import_module(f"hfx.bench.{bench}").main
    _no_matplotlib(monkeypatch)
    monkeypatch.setattr(subprocess, "run", _fail_run)
    args = {"tuners": ["--methods", "lora"], "trainers": ["--pairs", "bvpo"], "speed": ["--methods", "lora"]}[bench]
    with pytest.raises(SystemExit) as err:
        main([*args, "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and "pip install 'hfx[bench]'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "runs")


def test_trainers_without_the_examples_says_what_to_install(tmp_path, monkeypatch, capsys):
    """From a wheel the example scripts are not there: it failed after set-up with 'use a clone' (a clone with a
    non-editable install failed the same way); the parser says an editable install of a clone is needed."""
    from hfx.bench.trainers import main

    monkeypatch.setattr("hfx.bench.trainers.EXAMPLES", str(tmp_path / "site-packages" / "examples"))
    monkeypatch.setattr(subprocess, "run", _fail_run)
    with pytest.raises(SystemExit) as err:
        main(["--pairs", "bvpo,masked_thought", "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "no bvpo.py, masked_thought.py" in message and "pip install -e <clone>" in message
