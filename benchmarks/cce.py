"""The loss path (linear layer + cross-entropy, forward + backward): hfx against every competitor installed.

One process per (method, regime) so that peak memory is the method's own; in it: ``--sets`` input sets (seeds),
``--warmup`` untimed passes, then ``--reps`` timed passes each (CUDA events on a GPU, ``perf_counter`` on CPU); the
median over all timed passes is reported, with peak memory above the inputs and the relative errors of dE and dC
against a float32 reference (hfx's PyTorch reference on the same inputs). Ratios are against the 3-GEMM floor
(logits, dE, dC as plain matmuls) measured in the same run.

Regimes (spec kernels_cce §5): ``flat`` — logits ~ N(0, 1), gradient filters work; ``spread`` — logits ~ N(0, 2.5²)
with the target boosted by +10, significant entries scattered, filters do not work.

    python benchmarks/cce.py                                   # CPU, small shape, fp32 (a few minutes on 2 cores)
    python benchmarks/cce.py --device cuda --shape gemma2 --out benchmarks/cce-h100   # N=8192 D=2304 V=256000 sc=30
    python benchmarks/cce.py --device cuda --shape llama3 --out benchmarks/cce-h100-llama

Competitors join when importable: ``torch.compile``, torch's ``F.linear_cross_entropy`` (no softcap: skipped where a
softcap is set), ``cut_cross_entropy`` (``cce``, and ``cce`` with ``filter_eps=None`` as ``cce_exact``), Liger's fused linear cross-entropy. The GPU
machine has no network: ``benchmarks/fetch_wheels.sh`` downloads their wheels here first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {  # N tokens, D hidden, V vocabulary, softcap
    "tiny": (256, 64, 2000, 30.0),
    "small": (1024, 256, 16384, 30.0),
    "gemma2": (8192, 2304, 256000, 30.0),
    "llama3": (8192, 4096, 128256, None),
}
METHODS = (
    "floor",
    "eager",
    "compile",
    "torch_lce",
    "cce",
    "cce_exact",
    "liger",
    "hfx_reference",
    "hfx",
    "hfx_filter",
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(n, d, v, regime, seed, device, dtype):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = 2.5 if regime == "spread" else 1.0
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * (scale / d**0.5)
    y = torch.randint(0, v, (n,), generator=g)
    if regime == "spread":  # boost the target logit by +10: e_i += 10 c_y / |c_y|²
        cy = c[y]
        e += 10.0 * cy / cy.square().sum(1, keepdim=True)
    return e.to(device, dtype), c.to(device, dtype), y.to(device)


def loss_fn(method: str, softcap: float | None):
    """A function (e, c, y) -> scalar loss, or a string saying why the method is unavailable."""
    import torch
    import torch.nn.functional as F

    import hfx

    def eager(e, c, y):
        z = (e @ c.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, y)

    if method == "eager":
        return eager
    if method == "compile":
        return torch.compile(eager)
    if method == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            return "torch has no F.linear_cross_entropy"
        if softcap is not None:
            return "F.linear_cross_entropy has no softcap"
        return lambda e, c, y: F.linear_cross_entropy(e, c, y, ignore_index=-100)
    if method in ("cce", "cce_exact"):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            return "cut_cross_entropy not installed"
        if method == "cce_exact":  # PyPI 25.1.x has no impl="cce_exact": the same kernels with the filter off
            return lambda e, c, y: cce(e, c, y, softcap=softcap, impl="cce", filter_eps=None)
        return lambda e, c, y: cce(e, c, y, softcap=softcap, impl="cce")
    if method == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return "liger_kernel not installed"
        mod = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
        return lambda e, c, y: mod(c, e, y)
    if method == "hfx_reference":
        return lambda e, c, y: hfx.linear_cross_entropy(e, c, y, softcap=softcap, impl="reference")
    if method in ("hfx", "hfx_filter"):
        from hfx.kernels.cce import available_impls

        if "triton" not in available_impls() or not torch.cuda.is_available():
            return "hfx's Triton kernel needs CUDA (and triton)"
        eps = "auto" if method == "hfx_filter" else None
        return lambda e, c, y: hfx.linear_cross_entropy(e, c, y, softcap=softcap, impl="triton", filter_eps=eps)
    raise ValueError(method)


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from hfx.kernels.cce import reference

    n, d, v, softcap = SHAPES[args.shape]
    if args.no_softcap:
        softcap = None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device == "cuda"
    row = {"method": args.method, "regime": args.regime}
    if args.method == "floor":
        fn = None
    else:
        fn = loss_fn(args.method, softcap)
        if isinstance(fn, str):
            return {**row, "skipped": fn}

    def timer():
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            return lambda: (end.record(), torch.cuda.synchronize(), start.elapsed_time(end))[-1]
        t0 = time.perf_counter()
        return lambda: 1000 * (time.perf_counter() - t0)

    times, errs, peak_extra, losses = [], {"dE": [], "dC": []}, 0, []
    for s in range(args.sets):
        e, c, y = make_inputs(n, d, v, args.regime, s, args.device, dtype)
        ref = None
        if fn is not None and not args.no_check:  # float32 reference gradients (chunked: no N×V buffer)
            e32, c32 = e.float().requires_grad_(), c.float().requires_grad_()
            loss32 = reference.linear_cross_entropy(e32, c32, y, softcap=softcap)
            ref = (loss32.item(), *torch.autograd.grad(loss32, [e32, c32]))
            del e32, c32
        e.requires_grad_()
        c.requires_grad_()
        if fn is None:
            dz = torch.randn(n, v, device=args.device, dtype=dtype)

            def step(e=e, c=c, dz=dz):
                z = e.detach() @ c.detach().T
                return z, dz @ c.detach(), dz.T @ e.detach()
        else:

            def step(e=e, c=c, y=y):
                loss = fn(e, c, y)
                de, dc = torch.autograd.grad(loss, [e, c])
                return loss, de, dc

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
        for _ in range(args.warmup):
            out = step()
            del out
        for _ in range(args.reps):
            stop = timer()
            out = step()
            times.append(stop())
            if fn is not None:
                losses.append(float(out[0]))
            last = out
            del out
        if cuda:
            peak_extra = max(peak_extra, torch.cuda.max_memory_allocated() - base)
        else:
            peak_extra = max(peak_extra, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
        if ref is not None:
            _, de, dc = last
            errs["dE"].append(((de.float() - ref[1]).norm() / ref[1].norm()).item())
            errs["dC"].append(((dc.float() - ref[2]).norm() / ref[2].norm()).item())
            row.setdefault("loss_err", []).append(abs(float(last[0]) - ref[0]) / abs(ref[0]))
        del last, e, c, y
    row.update(ms=statistics.median(times), ms_min=min(times), peak_mib=peak_extra / 2**20)
    if errs["dE"]:
        row.update(dE_err=max(errs["dE"]), dC_err=max(errs["dC"]), loss_err=max(row["loss_err"]))
    if args.method == "hfx_filter":
        from hfx.kernels.cce.triton_kernel import LAST_BACKWARD

        row["filter_density"] = LAST_BACKWARD["filter_density"]
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-softcap", action="store_true")
    p.add_argument("--regimes", default="flat,spread")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sets", type=int, default=3, help="input sets (seeds)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-check", action="store_true", help="skip the float32 reference gradients")
    p.add_argument("--out", default=None, help="write <out>/cce.json and cce.md (after every method)")
    p.add_argument("--method-timeout", type=float, default=None, help="seconds per (method, regime) process")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--regime", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.method:
        print(json.dumps(run_one(args)))
        return
    argv = sys.argv[1:] if argv is None else list(argv)
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    n, d, v, softcap = SHAPES[args.shape]
    meta = {
        "device": device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"N": n, "D": d, "V": v, "softcap": None if args.no_softcap else softcap},
        "args": vars(args),
        "command": "python benchmarks/cce.py " + " ".join(argv),
    }
    rows = []
    for regime in args.regimes.split(","):
        for method in args.methods.split(","):
            if method == "floor" and regime != args.regimes.split(",")[0]:
                continue  # the floor does not depend on the data
            cmd = [sys.executable, __file__, *argv, "--dtype", args.dtype, "--method", method, "--regime", regime]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.method_timeout)
            except subprocess.TimeoutExpired:
                rows.append({"method": method, "regime": regime, "skipped": f"timed out ({args.method_timeout:g} s)"})
            else:
                if proc.returncode != 0:
                    rows.append({"method": method, "regime": regime, "skipped": "failed: " + proc.stderr[-300:]})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(_line(rows[-1]), flush=True)
            _write(args.out, meta, rows)  # so that a run stopped from outside keeps what it measured
    print("\n" + markdown(meta, rows))


def _write(out: str | None, meta: dict, rows: list[dict]) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cce.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "cce.md"), "w") as f:
        f.write(markdown(meta, rows) + "\n")


def _line(r: dict) -> str:
    if "skipped" in r:
        return f"{r['method']:14s} {r['regime']:6s} skipped: {r['skipped']}"
    err = f"  dE {r['dE_err']:.1e} dC {r['dC_err']:.1e}" if "dE_err" in r else ""
    return f"{r['method']:14s} {r['regime']:6s} {r['ms']:9.2f} ms  {r['peak_mib']:9.1f} MiB{err}"


def markdown(meta: dict, rows: list[dict]) -> str:
    floor = next((r for r in rows if r["method"] == "floor" and "ms" in r), None)
    s = meta["shape"]
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}; N={s['N']} D={s['D']} V={s['V']} "
        f"softcap={s['softcap']}, {meta['args']['dtype']}; median of {meta['args']['sets']} input sets × "
        f"{meta['args']['reps']} passes after {meta['args']['warmup']} warm-up. Command: `{meta['command']}`\n",
        "| method | regime | fwd+bwd ms | × 3-GEMM floor | peak MiB over inputs | dE rel err | dC rel err | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['regime']} | – | – | – | – | – | {r['skipped'][:80]} |")
            continue
        ratio = f"{r['ms'] / floor['ms']:.2f}" if floor else "–"
        de = f"{r['dE_err']:.1e}" if "dE_err" in r else "–"
        dc = f"{r['dC_err']:.1e}" if "dC_err" in r else "–"
        note = f"filter kept {r['filter_density']:.0%} of tiles" if r.get("filter_density") is not None else ""
        lines.append(
            f"| {r['method']} | {r['regime']} | {r['ms']:.2f} | {ratio} | {r['peak_mib']:.1f} | {de} | {dc} | {note} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
