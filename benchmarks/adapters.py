"""One adapted linear layer, forward + backward: hfx's fused PaCA / Bone paths vs their unfused paths vs PEFT.

For each layer shape of a Llama-3.2-1B block (q/o: 2048→2048, gate/up: 2048→8192, down: 8192→2048) and T tokens:
median time of ``--reps`` forward+backward passes (input requires grad, as inside a network) after ``--warmup``,
over ``--sets`` input sets, and peak memory above the inputs (CUDA events / max allocated on a GPU; CPU: time only).
Trainable parameters are matched on square layers: LoRA r, PaCA 2r columns, Bone / MiSS 2r. Ratios against PEFT
LoRA and against each method's unfused path come from the same run.

    python benchmarks/adapters.py                                    # CPU, reduced shapes (fused paths skipped)
    python benchmarks/adapters.py --device cuda --tokens 4096 --out benchmarks/adapters-h100

End to end (whole model, AdamW step): ``hfx bench speed --device cuda --shape 1b --dtype bf16 --r 32
--methods lora,paca,paca_fused,bone,bone_fused``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

SHAPES_1B = {"q_proj": (2048, 2048), "up_proj": (2048, 8192), "down_proj": (8192, 2048)}
SHAPES_CPU = {"q_proj": (512, 512), "up_proj": (512, 1536), "down_proj": (1536, 512)}


def build(method: str, in_f: int, out_f: int, r: int, device: str, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import hfx

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(in_f, out_f, bias=False)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = One().to(device=device, dtype=dtype)
    base = method.removesuffix("_fused")
    if base == "frozen":
        model.requires_grad_(False)
        return model
    if base == "lora":
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"])
    elif base == "miss":
        try:
            from peft import MissConfig
        except ImportError:
            return "peft has no MiSS"
        cfg = MissConfig(r=2 * r, target_modules=["lin"])
    elif base == "paca":
        cfg = hfx.PacaConfig(r=2 * r, paca_alpha=2 * r, target_modules=["lin"])
    elif base == "bone":
        cfg = hfx.BoneConfig(r=2 * r, target_modules=["lin"])
    else:
        raise ValueError(method)
    return get_peft_model(model, cfg)


def measure(method: str, in_f: int, out_f: int, args) -> dict:
    import torch

    import hfx

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device == "cuda"
    fused = method.endswith("_fused")
    if fused and not cuda:
        return {"skipped": "fused paths are timed on CUDA only (CPU runs them in Triton's interpreter)"}
    model = build(method, in_f, out_f, args.r, args.device, dtype)
    if isinstance(model, str):
        return {"skipped": model}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times, peak = [], 0
    with hfx.fused_adapters(fused):
        for s in range(args.sets):
            g = torch.Generator(device="cpu").manual_seed(s)
            x = torch.randn(args.tokens, in_f, generator=g).to(args.device, dtype).requires_grad_()
            gy = torch.randn(args.tokens, out_f, generator=g).to(args.device, dtype)
            params = [p for p in model.parameters() if p.requires_grad]

            def step(x=x, gy=gy, params=params):
                y = model(x)
                return torch.autograd.grad(y, [x, *params], gy)

            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            for _ in range(args.warmup):
                step()
            for _ in range(args.reps):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    out = step()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b))
                else:
                    t0 = time.perf_counter()
                    out = step()
                    times.append(1000 * (time.perf_counter() - t0))
                del out
            if cuda:
                peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return {"ms": statistics.median(times), "peak_mib": peak / 2**20 if cuda else None, "trainable": trainable}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tokens", type=int, default=None, help="default: 4096 on CUDA, 512 on CPU")
    p.add_argument("--r", type=int, default=32, help="LoRA rank; PaCA/Bone/MiSS use 2r (equal parameters, square)")
    p.add_argument("--methods", default="frozen,lora,miss,paca,paca_fused,bone,bone_fused")
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="write <out>/adapters.json and adapters.md")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.tokens = args.tokens or (4096 if cuda else 512)
    shapes = SHAPES_1B if cuda else SHAPES_CPU
    rows = []
    for layer, (in_f, out_f) in shapes.items():
        for method in args.methods.split(","):
            row = {"layer": layer, "in": in_f, "out": out_f, "method": method, **measure(method, in_f, out_f, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    import torch

    meta = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
    }
    table = markdown(meta, rows)
    print("\n" + table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "adapters.json"), "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "adapters.md"), "w") as f:
            f.write(table + "\n")


def markdown(meta: dict, rows: list[dict]) -> str:
    a = meta["args"]
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}; {a['dtype']}, {a['tokens']} tokens, "
        f"LoRA r={a['r']}; median of {a['sets']} input sets × {a['reps']} passes.\n",
        "| layer | method | trainable | fwd+bwd ms | × LoRA | × unfused | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['layer']} | {r['method']} | – | – | – | – | {r['skipped'][:70]} |")
            continue
        same = [x for x in rows if x["layer"] == r["layer"] and "ms" in x]
        lora = next((x for x in same if x["method"] == "lora"), None)
        unfused = next((x for x in same if x["method"] == r["method"].removesuffix("_fused")), None)
        vs_lora = f"{r['ms'] / lora['ms']:.2f}" if lora else "–"
        vs_unfused = f"{r['ms'] / unfused['ms']:.2f}" if unfused and r["method"].endswith("_fused") else "–"
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(
            f"| {r['layer']} | {r['method']} | {r['trainable'] / 1e3:.0f} k | {r['ms']:.3f} | {vs_lora} | {vs_unfused} "
            f"| {peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
