"""Test-wide settings: never touch the Hub; GPU tests skip where there is no CUDA; without CUDA, Triton kernels
run in Triton's interpreter on CPU tensors (the variable must be set before any kernel is decorated)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def fake_hub(monkeypatch) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Stand-in for the Hub during ``push_to_hub``: maps each upload's ``path_in_repo`` (``"."`` for the root) to the
    files its folder held when the upload started, each with its (inode, mtime_ns, size): transformers starts the
    upload in the background inside ``_save_checkpoint``, so a file written or rewritten later races with it."""
    import transformers.trainer as tt

    pushed: dict[str, dict[str, tuple[int, int, int]]] = {}

    class Done:
        def is_done(self) -> bool:
            return True

        def done(self) -> bool:
            return True

    class Repo:
        repo_id = "user/hfx-test"

    def upload_folder(*, folder_path, path_in_repo=None, **kwargs):
        stats = {name: os.stat(os.path.join(folder_path, name)) for name in sorted(os.listdir(folder_path))}
        pushed[str(path_in_repo or ".")] = {n: (st.st_ino, st.st_mtime_ns, st.st_size) for n, st in stats.items()}
        return Done()

    def create_repo(*args, **kwargs):
        return Repo()

    if hasattr(tt, "hf_api"):  # newer transformers: one HfApi object
        api = SimpleNamespace(upload_folder=upload_folder, create_repo=create_repo)
        monkeypatch.setattr(tt, "hf_api", lambda: api)
    else:  # transformers 5.0: the module-level functions
        monkeypatch.setattr(tt, "upload_folder", upload_folder)
        monkeypatch.setattr(tt, "create_repo", create_repo)
    return pushed
