"""Offline stand-ins for Hub repositories: a saved folder laid out as the Hub client's cache, so that loading
``"<user>/<repo>"`` in offline mode (``HF_HUB_OFFLINE=1``) resolves to it. Tests of Hub loading paths use it."""

from __future__ import annotations

import os
import shutil

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def as_hub_cache(folder: str | os.PathLike[str], cache: str | os.PathLike[str], repo_id: str) -> str:
    """Copy ``folder`` into ``cache`` as the Hub client caches a downloaded model repository ``repo_id`` (its
    ``main`` ref at one snapshot, replaced by a second call for the same id). The caller points the Hub client at
    ``cache`` (e.g. ``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))``, or
    ``cache_dir=``); this function changes no global setting. Returns the snapshot folder."""
    root = os.path.join(str(cache), f"models--{repo_id.replace('/', '--')}")
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)
    snapshot = os.path.join(root, "snapshots", COMMIT)
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(str(folder), snapshot)
    return snapshot
