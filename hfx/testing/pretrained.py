"""A tiny base model pre-trained once on the built-in task's easy problems, cached on disk.

The demo and the benchmarks adapt this base to harder problems; training it from scratch takes about a minute and a
half on a 2-core CPU, so it is cached under ``$HFX_CACHE`` (default ``$XDG_CACHE_HOME/hfx``, i.e. ``~/.cache/hfx``),
keyed by its recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..compat import activation_checkpointing
from .tokenizer import tokenizer_fingerprint

_RECIPE_VERSION = 1


@dataclass(frozen=True)
class BaseRecipe:
    """How the cached base is trained: model shape, data and optimisation (full fine-tuning from random init).

    The defaults (a 4-layer, 64-wide Llama, ~0.25 M parameters, 900 steps of batch 32) reach ~95 % on held-out easy
    problems in about 90 s on a 2-core CPU; a 128-wide model is ~1.6x slower per step and worse at equal time.
    """

    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    difficulty: str = "easy"
    n_train: int = 5000
    max_steps: int = 900
    learning_rate: float = 3e-3
    batch_size: int = 32
    seed: int = 0

    def key(self) -> str:
        payload = {"recipe": dataclasses.asdict(self), "tokenizer": tokenizer_fingerprint(), "v": _RECIPE_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> str:
    """``$HFX_CACHE``, else ``hfx`` under ``$XDG_CACHE_HOME`` (default ``~/.cache``), as huggingface_hub does."""
    if os.environ.get("HFX_CACHE"):
        return os.environ["HFX_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "hfx")


def pretrained_base(
    recipe: BaseRecipe = BaseRecipe(),
    cache: str | None = None,
    *,
    log: Callable[[str], None] = print,
) -> str:
    """Path of the base model trained by ``recipe`` (tokenizer included); trains and caches it if missing.

    Safe under ``accelerate launch``: every process takes part in training (it is an ordinary Trainer run), the
    main process writes the result to a temporary folder and renames it into place, the others wait.
    """
    from accelerate import PartialState
    from trl import SFTConfig, SFTTrainer

    from hfx.data import sft_dataset

    from .models import save_tiny_model

    path = os.path.join(cache or cache_dir(), f"base-{recipe.arch}-{recipe.key()}")
    if os.path.isfile(os.path.join(path, "hfx_recipe.json")):
        return path
    state = PartialState()
    log(
        f"[hfx] pre-training the tiny base on {recipe.n_train} {recipe.difficulty} problems ({recipe.max_steps} steps); "
        f"cached afterwards in {path}"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hfx-base-init-") as init_dir:
        init_path = save_tiny_model(
            os.path.join(init_dir, "init"),
            recipe.arch,
            hidden_size=recipe.hidden_size,
            num_layers=recipe.num_layers,
            num_heads=recipe.num_heads,
            num_kv_heads=recipe.num_kv_heads,
            seed=recipe.seed,
        )
        with tempfile.TemporaryDirectory(prefix="hfx-base-run-") as run_dir:
            args = SFTConfig(
                output_dir=run_dir,
                max_steps=recipe.max_steps,
                per_device_train_batch_size=max(1, recipe.batch_size // state.num_processes),
                learning_rate=recipe.learning_rate,
                lr_scheduler_type="cosine",
                warmup_steps=max(1, recipe.max_steps // 20),
                weight_decay=0.0,
                logging_steps=max(1, recipe.max_steps // 10),
                save_strategy="no",
                report_to="none",
                seed=recipe.seed,
                bf16=False,
                **activation_checkpointing(False),
                use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0,
                disable_tqdm=True,
            )
            trainer = SFTTrainer(
                model=init_path,
                args=args,
                train_dataset=sft_dataset(recipe.n_train, recipe.difficulty, seed=recipe.seed, split="train"),
            )
            trainer.train()
            tmp = path + ".tmp"
            if state.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            trainer.save_model(tmp)
            if state.is_main_process:
                trainer.processing_class.save_pretrained(tmp)
                with open(os.path.join(tmp, "hfx_recipe.json"), "w") as f:
                    json.dump(dataclasses.asdict(recipe), f, indent=2)
                if os.path.isfile(os.path.join(path, "hfx_recipe.json")):  # another run finished first
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    if os.path.isdir(path):  # an incomplete or damaged entry (no hfx_recipe.json): replace it
                        log(f"[hfx] replacing the incomplete cache entry {path}")
                        shutil.rmtree(path)
                    os.replace(tmp, path)
            state.wait_for_everyone()
    return path
