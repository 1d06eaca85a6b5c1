"""Peak memory and time of the loss path (forward + backward) — hfx CCE reference vs plain cross-entropy.

Each method runs in a fresh subprocess on the same random inputs (hidden N×H, weight V×H, labels N, all requiring
grad except labels): median wall time of ``--reps`` forward+backward passes after one warm-up, and memory as the
growth of the process's peak RSS over its RSS once the inputs exist (CPU; on CUDA, peak allocated over the inputs).
Ratios are against ``F.cross_entropy(hidden @ weight.T)`` measured in the same run.

    python benchmarks/bench_cce.py                          # CPU, N=2048 H=512 V=32768 fp32 (~1 minute on 2 cores)
    python benchmarks/bench_cce.py --device cuda --n 8192 --h 2304 --v 256000 --dtype bf16
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

METHODS = ("dense", "cce", "torch_lce")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import hfx

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=g).to(args.device, dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=g) / args.h**0.5).to(args.device, dtype).requires_grad_()
    labels = torch.randint(0, args.v, (args.n,), generator=g).to(args.device)

    if args.method == "dense":

        def step():
            return F.cross_entropy((hidden @ weight.T).float(), labels)
    elif args.method == "cce":

        def step():
            return hfx.linear_cross_entropy(hidden, weight, labels, chunk_bytes=args.chunk_bytes)
    elif args.method == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            return {"method": args.method, "skipped": "torch has no F.linear_cross_entropy"}
        options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None

        def step():
            return F.linear_cross_entropy(hidden, weight, labels, ignore_index=-100, options=options)
    else:
        raise ValueError(args.method)

    def fwd_bwd():
        hidden.grad = weight.grad = None
        loss = step()
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    loss = fwd_bwd()  # warm-up (also part of the peak)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fwd_bwd()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"method": args.method, "loss": loss, "time_s": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-bytes", type=int, default=None, help="CCE tile budget (default: hfx's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--method", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return

    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method] + [
            a
            for k, v in vars(args).items()
            if k not in ("method", "methods") and v is not None
            for a in (f"--{k.replace('_', '-')}", str(v))
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[method] = json.loads(out)
    dense = results["dense"]
    print(
        f"N={args.n} H={args.h} V={args.v} {args.dtype} on {args.device}; logits N×V fp32 = "
        f"{args.n * args.v * 4 / 2**20:.0f} MiB"
    )
    print("| method | fwd+bwd | peak memory over inputs | time vs dense | memory vs dense | loss |")
    print("|---|---|---|---|---|---|")
    for method, r in results.items():
        if "skipped" in r:
            print(f"| {method} | skipped: {r['skipped']} | | | | |")
            continue
        print(
            f"| {method} | {r['time_s'] * 1e3:.0f} ms | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{r['time_s'] / dense['time_s']:.2f}× | {r['peak_bytes'] / dense['peak_bytes']:.3f}× | {r['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
