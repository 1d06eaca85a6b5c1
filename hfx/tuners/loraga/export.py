"""Saving LoRA-GA as a plain LoRA adapter for the original base weights, and loading it back for training.

LoRA-GA trains ``W' + s*B*A`` with ``W' = W - s*B_0*A_0`` (the offset made at init). Relative to the original W the
trained update is ``s*(B_t A_t - B_0 A_0) = s*[B_t, -B_0] [A_t; A_0]``: a rank-2r LoRA with the same scaling (spec
§3 LoRA-GA step 6). ``LoraGAConfig.save_pretrained`` (which ``PeftModel.save_pretrained`` calls right after writing
the adapter weights, so it covers ``Trainer.save_model`` and checkpoints too) rewrites the saved rank-r weights in
place as that rank-2r LoRA and writes a plain ``LoraConfig`` (r -> 2r, alpha adjusted), which stock PEFT loads
onto the original base without hfx.

The export is lossless: its first r ranks are the trained A_t/B_t and its last r ranks the init (A_0, -B_0). So
loading it into a LoRA-GA model (Trainer's resume from checkpoint calls ``load_adapter``) splits it again: a load
pre-hook on each LoRA-GA layer keeps the first half as the adapter and moves the base-weight offset to the saved
init's, so training continues from exactly the saved state.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import LoraGAConfig

SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
METADATA_KEY = "hfx_loraga_export"


def _keys(layer_name: str) -> tuple[str, str]:
    return f"{layer_name}.lora_A.weight", f"{layer_name}.lora_B.weight"


def rewrite_saved_weights(save_directory: str, config: LoraGAConfig) -> bool:
    """Rewrite the rank-r adapter weights in ``save_directory`` as the rank-2r LoRA relative to the original base.

    Returns whether weights were found and rewritten (False: no weights file, e.g. a config-only save).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    st_path, bin_path = os.path.join(save_directory, SAFETENSORS), os.path.join(save_directory, BIN)
    if os.path.exists(st_path):
        with safe_open(st_path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get(METADATA_KEY):
            return True  # already the export (config saved twice)
    elif os.path.exists(bin_path):
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        return False
    missing = []
    for name, (B0, A0) in config._loraga_init.items():
        ka, kb = _keys(name)
        if ka not in state or kb not in state:
            missing.append(ka)
            continue
        A_t, B_t = state[ka], state[kb]
        if A_t.shape[0] != A0.shape[0]:
            raise RuntimeError(f"LoRA-GA export: {ka} has {A_t.shape[0]} ranks, the init {A0.shape[0]}.")
        state[ka] = torch.cat([A_t, A0.to(A_t.dtype)], dim=0).contiguous()
        state[kb] = torch.cat([B_t, -B0.to(B_t.dtype)], dim=1).contiguous()
    if missing:
        raise RuntimeError(
            f"LoRA-GA export: the saved adapter lacks {missing[:3]} (of {len(missing)}); cannot write it relative to "
            "the original base weights."
        )
    if os.path.exists(st_path):
        save_file(state, st_path, metadata={"format": "pt", METADATA_KEY: "relative_to_base"})
    else:
        torch.save(state, bin_path)
    return True


def install_load_hook(layer: nn.Module, name: str, adapter_name: str, config: LoraGAConfig) -> None:
    """On ``load_state_dict`` (e.g. ``load_adapter`` when resuming), accept the rank-2r export for this layer."""
    from .init import reoffset

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        ka, kb = f"{prefix}lora_A.{adapter_name}.weight", f"{prefix}lora_B.{adapter_name}.weight"
        if ka not in state_dict or kb not in state_dict:
            return
        r = module.r[adapter_name]
        A, B = state_dict[ka], state_dict[kb]
        if A.shape[0] != 2 * r or B.shape[1] != 2 * r:
            return
        old = config._loraga_init.get(name)
        new = (-B[:, r:].detach().to("cpu").clone(), A[r:].detach().to("cpu").clone())
        if old is not None:
            reoffset(module, adapter_name, old, new)
            config._loraga_init[name] = new
        state_dict[ka] = A[:r].contiguous()
        state_dict[kb] = B[:, :r].contiguous()

    handles = getattr(layer, "_hfx_loraga_hooks", {})
    if adapter_name not in handles:
        handles[adapter_name] = layer._register_load_state_dict_pre_hook(hook, with_module=True)
        layer._hfx_loraga_hooks = handles


def _no_lora_conversion(adapter_name: str = "default") -> bool:
    warnings.warn(
        "A LoRA-GA model cannot go through peft.convert_to_lora / save_as_lora: its base weights carry the init "
        "offset (W - s*B_0*A_0), so the converted LoRA would be relative to the offset base and give other outputs on "
        "the original one. LoRA-GA's save_pretrained already writes a plain LoRA (rank 2r) for the original base "
        "weights; load that with PeftModel.from_pretrained, then convert or combine it if you need to.",
        UserWarning,
        stacklevel=2,
    )
    return False


def refuse_lora_conversion(layer: nn.Module) -> None:
    """Make PEFT's ``convert_to_lora`` refuse this offset layer (it would export s*B*A against the offset base)."""
    layer.supports_lora_conversion = _no_lora_conversion


def read_export_init(
    path: str, layers: list[tuple[str, nn.Module]], adapter_name: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The init (B_0, A_0) of each layer from an adapter saved with ``export="relative_to_base"``."""
    from peft.utils import load_peft_weights

    try:
        state: dict[str, Any] = load_peft_weights(path, device="cpu")
    except (OSError, ValueError) as err:  # a missing folder is tried as a Hub repo id (HFValidationError)
        raise ValueError(
            f"LoRA-GA init_from={path!r}: no saved adapter weights there ({err}). Pass the directory that "
            "save_pretrained or the Trainer wrote (it holds adapter_model.safetensors)."
        ) from err
    out = {}
    for name, layer in layers:
        ka, kb = _keys(name)
        if ka not in state:
            raise ValueError(f"LoRA-GA init_from={path!r}: no {ka} in the saved adapter.")
        r = layer.r[adapter_name]
        A, B = state[ka], state[kb]
        if A.shape[0] != 2 * r:
            raise ValueError(
                f"LoRA-GA init_from={path!r}: {ka} has {A.shape[0]} ranks; expected the rank-2r export (2r={2 * r}). "
                + (
                    "A checkpoint saved with export='mutated_base' holds only the trained rank-r weights, not the "
                    "init they started from: resume it by running hfx.initialize(model, <the batches of the run that "
                    "saved it>) (same seed) instead of init_from, then trainer.train(resume_from_checkpoint=...)."
                    if A.shape[0] == r
                    else ""
                )
            )
        out[name] = (-B[:, r:].clone(), A[r:].clone())
    return out
