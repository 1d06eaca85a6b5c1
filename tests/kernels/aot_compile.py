"""Compile every hfx Triton kernel for a CUDA architecture without a GPU (run in a subprocess by test_aot_compile).

Triton's compiler and ptxas lower the kernels to PTX and cubin for ``--arch`` (default sm_90, the H100/H200) in a
representative bf16 and fp32 configuration each; that catches type errors, unsupported constructs and register
spills that the interpreter cannot see. Prints one JSON line per kernel: MMA instructions used, local-memory
(spill) accesses, shared memory.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel is decorated

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402

from hfx.kernels.adapter import triton_kernel as adapter  # noqa: E402
from hfx.kernels.cce import triton_kernel as cce  # noqa: E402

_ALIGNED_INTS = {"D", "K", "N", "OUT_F", "stride_e", "stride_c", "stride_dz", "stride_am", "stride_ak", "stride_bk",
                 "stride_om", "stride_w", "stride_live"}  # fmt: skip


def compile_kernel(fn, types: dict, consts: dict, arch: int) -> dict:
    consts = dict(consts)
    options = {"num_warps": cce._WARPS, "num_stages": consts.pop("num_stages", cce._STAGES)}
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in consts else types[n] for n in names}
    # What Triton's JIT specialises at real shapes (Gemma-2 / Llama-3: every size and stride a multiple of 16, torch
    # allocations 16-byte aligned): without these hints loads cannot be vectorised or pipelined (cp.async).
    aligned = [n for n in names if n not in consts and (types[n].startswith("*") or n in _ALIGNED_INTS)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    if "constexprs" in inspect.signature(ASTSource).parameters:  # newer Triton (3.6 on the GPU image, 3.9 here)
        src = ASTSource(
            fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs
        )
    else:  # Triton 3.2 (torch 2.6): constexprs by name, outside the signature; hints through the backend's descriptor
        from triton.backends.compiler import AttrsDescriptor

        hints = AttrsDescriptor.from_hints({names.index(n): 16 for n in aligned})
        src = ASTSource(fn, {n: t for n, t in signature.items() if n not in consts}, dict(consts), hints)
    kernel = triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    return {
        "kernel": fn.fn.__name__,
        "triton": triton.__version__,
        "consts": {k: v for k, v in consts.items() if k.startswith(("HAS", "MODE", "K_IS", "PRECISION"))},
        "cubin_bytes": len(kernel.asm["cubin"]),
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "local_mem_ops": ptx.count("ld.local") + ptx.count("st.local"),
        "shared_bytes": kernel.metadata.shared,
        "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local"),
        "num_stages": options["num_stages"],
    }


def jobs(dtype: str):
    """The kernels with the tile sizes their launchers use for ``dtype`` on a GPU."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    prec = None if dtype != "fp32" else "tf32"
    p = "*" + dtype
    tiles = dict(BLOCK_M=cce._BLOCK_M, BLOCK_V=cce._BLOCK_V, BLOCK_D=cce.block_d(torch_dtype), UPCAST=False,
                 PRECISION=prec)  # fmt: skip
    row_stats = {k: "*fp32" for k in ("PART_MAX", "PART_SUM", "PART_ZY", "PART_ZSUM", "COLSUM")}
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    yield (
        cce._forward_kernel,
        {"E": p, "C": p, "B": p, "Y": "*i64", **row_stats, **ints("M", "V", "D", "stride_e", "stride_c", "v_per_split"),
         "softcap": "fp32", "inv_temp": "fp32"},
        dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTH=True, HAS_COLSUM=True, **tiles),
    )  # fmt: skip
    yield (
        cce._grad_logits_kernel,
        {"E": p, "C": p, "B": p, "Y": "*i64", "LSE": "*fp32", "P_SCALE": "*fp32", "Y_SCALE": "*fp32", "SMOOTH": "*fp32",
         "PERM": "*i64", "DZ": p, "FLAGS": "*i32",
         **ints("M", "D", "c0", "c1", "stride_e", "stride_c", "stride_dz", "stride_flags"),
         "softcap": "fp32", "inv_temp": "fp32", "filter_eps": "fp32",
         "filter_y": "fp32", "filter_smooth": "fp32", "filter_z": "fp32"},
        dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTH=True, HAS_PERM=True, HAS_FILTER=True, **tiles),
    )  # fmt: skip
    block_n, stages = cce.sparse_mm_config(torch_dtype)
    yield (
        cce._block_sparse_mm_kernel,
        {"A": p, "Bm": p, "OUT": "*fp32", "LIVE": "*i32", "COUNT": "*i32", "B_ROWS": "*i64", "OUT_ROWS": "*i64",
         "SCALE": "*fp32", **ints("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_om", "stride_live")},
        dict(ACCUMULATE=True, HAS_B_ROWS=True, HAS_OUT_ROWS=True, HAS_SCALE=True, BLOCK_M=cce._BLOCK_V, BLOCK_N=block_n,
             BLOCK_K=cce._BLOCK_M, UPCAST=False, PRECISION=prec, num_stages=stages),
    )  # fmt: skip
    for mode, k_is_in in ((1, True), (1, False), (2, True), (2, False)):
        yield (
            adapter._adapted_mm_kernel,
            {"A": p, "W": p, "OUT": p, "BIAS": p, "DELTA": "*fp32", "SLOT": "*i32",
             **ints("M", "N", "K", "OUT_F", "R", "stride_am", "stride_w", "stride_om")},
            dict(MODE=mode, K_IS_IN=k_is_in, HAS_BIAS=True, BLOCK_M=adapter._BLOCK_M, BLOCK_N=adapter._BLOCK_N,
                 BLOCK_K=adapter.block_k(torch_dtype), GROUP_M=adapter._GROUP_M, UPCAST=False, PRECISION=prec),
        )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()
    for dtype in args.dtypes.split(","):
        for fn, types, consts in jobs(dtype):
            print(json.dumps({"dtype": dtype, **compile_kernel(fn, types, consts, args.arch)}), flush=True)


if __name__ == "__main__":
    main()
