"""Every Triton kernel compiles for the H100/H200 (sm_90) on this CPU-only machine, with the tile sizes its launcher
uses: Triton's compiler and ptxas lower them to cubin with tensor-core MMAs (wgmma), no register spills, and shared
memory within sm_90's 227 KiB per block (a float32 Bone tile once needed 256 KiB: it would not have launched). The
interpreter tests check the numbers; this checks what the interpreter cannot (types, lowering, resources)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
KNOWN_UNPIPELINED = ("_block_sparse_mm_kernel", "fp32")

SM90_SHARED_PER_BLOCK = 227 * 1024  # opt-in maximum dynamic shared memory per block on H100/H200
SCRIPT = os.path.join(os.path.dirname(__file__), "aot_compile.py")


def test_kernels_compile_for_sm90_with_tensor_cores_no_spills_and_shared_memory_that_fits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    # one process per dtype, side by side (compilation is CPU-bound and single-threaded)
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, "--arch", "90", "--dtypes", dtype],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for dtype in ("bf16", "fp32")
    ]
    outputs = [p.communicate() for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    stdout = "".join(out for out, _ in outputs)
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    assert {r["kernel"] for r in rows} == {
        "_forward_kernel", "_grad_logits_kernel", "_block_sparse_mm_kernel", "_adapted_mm_kernel"
    }  # fmt: skip
    for r in rows:
        assert r["cubin_bytes"] > 0, r
        assert r["wgmma"] > 0, r  # Hopper tensor-core MMA, not a scalar fallback
        assert r["local_mem_ops"] == 0, r  # no register spills to local memory
        assert r["shared_bytes"] <= SM90_SHARED_PER_BLOCK, r
    # the K loop is software-pipelined (cp.async), not load-then-wait. Triton 3.2 (torch 2.6) does not pipeline the
    # float32 block-sparse kernel (2 stages, data-dependent tile indices); only that row is let off there.
    unpipelined = [r for r in rows if r["async_copies"] == 0]
    if unpipelined and all(
        r["triton"].startswith("3.2.") and (r["kernel"], r["dtype"]) == KNOWN_UNPIPELINED for r in unpipelined
    ):
        pytest.xfail("Triton 3.2 does not software-pipeline the float32 block-sparse kernel")
    assert not unpipelined, unpipelined
