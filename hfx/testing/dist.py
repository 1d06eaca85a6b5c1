"""Launch multi-process jobs on CPU for tests: torchrun (gloo / DDP) and DeepSpeed ZeRO-3, 2 processes.

``accelerate launch --cpu --num_processes 2`` was seen to start one process only, so jobs start with
``torch.distributed.run``; DeepSpeed reads the same environment. Each rank of a job writes its results under an
output folder the test then reads; a failed job raises with the tail of its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def free_port() -> int:
    """A free TCP port on localhost for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_test_config(**overrides: Any) -> dict[str, Any]:
    """A DeepSpeed ZeRO-3 config that really shards even a tiny model.

    DeepSpeed keeps parameters below ``stage3_param_persistence_threshold`` (default 1e5 elements) whole on every
    rank, so a test model under a default ZeRO-3 config is never partitioned and the test proves nothing.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 1000,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
            "reduce_bucket_size": 1000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    config.update(overrides)
    return config


def deepspeed_cpu_state() -> Any:
    """Set up this rank's process group for a DeepSpeed job on CPU and return accelerate's ``PartialState``.

    gloo, because DeepSpeed's CPU accelerator would pick oneCCL, which torch does not ship; set up once, for the
    Trainer to reuse (``accelerator_config={"use_configured_state": True}``). DeepSpeed's communication backend would
    also JIT-compile its shared-memory all-reduce (C++, ~40 s on 2 cores at the first launch on a machine); only its
    inference all-reduce uses it, never ZeRO's collectives, so it is marked unavailable here.
    """
    import deepspeed.ops
    from accelerate import PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return PartialState(backend="gloo")


def run_distributed(
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    nproc: int = 2,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` CPU processes with torchrun; raise ``RuntimeError`` (with the log tail) on failure.

    The processes get ``HF_HUB_OFFLINE=1`` and DeepSpeed's CPU accelerator; one intra-op thread each, so that two
    ranks share two cores without oversubscription.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        f"--master_port={free_port()}",
        os.fspath(script),
        *args,
    ]
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if log_path is not None:
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{output[-6000:]}")
    return proc
