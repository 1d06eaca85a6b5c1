"""Export a saved Bone adapter as PEFT's MiSS (same maths), loadable by PEFT >= 0.17 without hfx."""

from __future__ import annotations

import json
import os
import shutil

from peft.utils import load_peft_weights
from safetensors.torch import save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def convert_to_miss(bone_dir: str, out_dir: str) -> str:
    """Rewrite ``bone_dir`` (a saved Bone adapter) as a MiSS adapter in ``out_dir``; returns ``out_dir``."""
    with open(os.path.join(bone_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type") != "BONE":
        raise ValueError(f"{bone_dir} holds a {config.get('peft_type')!r} adapter, not a Bone adapter.")
    if "bone_dropout" in config:
        config["miss_dropout"] = config.pop("bone_dropout")
    if config.get("bias") == "bone_only":
        config["bias"] = "MiSS_only"
    config["peft_type"] = "MISS"
    # PEFT's reader: adapter_model.safetensors, or the .bin of save_pretrained(safe_serialization=False), read with
    # torch.load(weights_only=True)
    weights = load_peft_weights(str(bone_dir), device="cpu")
    renamed = {k.replace(".bone_block", ".miss_block"): v.contiguous() for k, v in weights.items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(renamed, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    readme = os.path.join(bone_dir, "README.md")
    if os.path.exists(readme):
        shutil.copy(readme, os.path.join(out_dir, "README.md"))
    return out_dir
