"""DSEE's second stage: sparse final weights (arXiv 2111.00160, Sec. 3.3).

[`prune`] applies, to a model carrying a DSEE adapter,

* **global unstructured magnitude pruning** (the reference's ``prune.global_unstructured`` with L1 and its default
  ``prune_mode="ABS"``): the linear layers of the network that are *not* adapted (key, attention output, FFN, pooler;
  never the output head / classifier / ``modules_to_save``) are pruned together at ``ratio``, scored by ``|W0|``; the
  adapted layers (query, value) are pruned together at ``adapter_ratio``, scored by the magnitude of their update
  ``|dW| = |s (B A + S)|`` (``"abs"``; ``"wabs"`` scores ``|W0 + dW|``, ``"w"`` scores ``|W0|``). Exactly
  ``round(ratio * numel)`` entries of each group are pruned (global top-k, not a threshold).
* optionally **structured attention-head pruning**: per attention layer, the ``heads_per_layer`` heads with the lowest
  score ``sum_{rows of head h} (|dW_q| + |dW_v|)`` (``"abs"``; ``"wabs"`` adds ``|W_q| + |W_v|``) are pruned (the
  paper: 3 of 12 heads on BERT-base).

What happens physically: pruned entries of the base weights are **zeroed in place** (irreversible in memory: the
pre-prune values are not kept; reload the base model to undo), and every pruned layer keeps a boolean keep-mask
buffer ``dsee_prune_mask``. A DSEE layer multiplies its update by that mask in every forward (retraining) and in
``merge``, so ``merge_and_unload()`` gives weights that are exactly zero at every pruned entry. A pruned head is
zeroed: its rows of ``W_q`` (and bias), its columns of ``W_o``, and the rows of ``W_k``, ``W_v`` (and biases) of its
key/value head once every query head sharing it (GQA) is pruned; the head then contributes exactly nothing.
[`remove_pruned_heads`] physically removes those rows/columns from a merged model (multi-head attention only).

Masks are saved beside the adapter by [`save_pruning`] (``dsee_pruning.safetensors`` with one bit-packed mask per
pruned weight/bias, keyed by the module name in the base model, and ``dsee_pruning.json`` with the statistics and the
pruned heads; never pickle) and re-applied to a freshly loaded model with [`load_pruning`]. Both happen on their own
once a model is pruned: its DSEE configs get ``pruned=True`` and write the masks in every ``save_pretrained``
(so in every Trainer checkpoint), and ``PeftModel.load_adapter`` — which ``PeftModel.from_pretrained`` and the
Trainer's ``resume_from_checkpoint`` call — re-applies the masks it finds beside the adapter (a pruned adapter whose
masks are missing is an error, not an unpruned model).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import weakref
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from .._config import is_int, is_real
from .._loading import HUB_KEYS
from .config import DseeConfig
from .layer import DseeLinear

logger = logging.getLogger("hfx.dsee")

MASKS_FILE = "dsee_pruning.safetensors"
INFO_FILE = "dsee_pruning.json"
DEFAULT_RATIO = 0.2  # the paper's pruning_ratio and ad_pruning_ratio on BERT-base (GLUE scripts)
HEAD_EXCLUDE = ("lm_head", "classifier", "score", "qa_outputs")
_MASK = "dsee_prune_mask"
_BIAS_MASK = "dsee_prune_bias_mask"


def _norm(name: str) -> str:
    """Module name in the base model: without PEFT's ``base_model.model.`` prefix and ``.base_layer`` segments."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def _root(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_ratio(name: str, value: Optional[float]) -> None:
    if value is None:
        return
    if not is_real(value) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"`{name}` must be a number strictly between 0 and 1, got {value!r}.")


def _base_linear(module: nn.Module) -> nn.Linear:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _collect(model: nn.Module, exclude: tuple[str, ...]) -> tuple[dict[str, DseeLinear], dict[str, nn.Linear]]:
    """(adapted DSEE layers, other prunable linear layers), keyed by their normalised names."""
    root = _root(model)
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    adapted: dict[str, DseeLinear] = {}
    plain: dict[str, nn.Linear] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            skip.append(name)
            if isinstance(module, DseeLinear):
                adapted[_norm(name)] = module
            continue
        if isinstance(module, nn.Linear) and module is not head:
            short = _norm(name)
            if not any(short == e or short.endswith("." + e) or short.split(".")[-1] == e for e in exclude):
                plain[short] = module
    return adapted, plain


def _set_mask(module: nn.Module, keep: torch.Tensor, bias_keep: Optional[torch.Tensor] = None) -> None:
    """AND ``keep`` into the module's mask, zero its base weight (and bias rows) in place."""
    base = _base_linear(module)
    old = getattr(module, _MASK, None)
    keep = keep.to(base.weight.device) if old is None else (old & keep.to(old.device))
    if isinstance(module, DseeLinear):
        module.dsee_prune_mask = keep
    # also on the plain linear, so that the mask survives merge_and_unload() (and save_pruning works there)
    base.register_buffer(_MASK, keep, persistent=False)
    with torch.no_grad():
        base.weight.mul_(keep.to(base.weight.dtype))
        if bias_keep is not None and base.bias is not None:
            old_b = getattr(base, _BIAS_MASK, None)
            bias_keep = (
                bias_keep.to(base.bias.device).clone() if old_b is None else (old_b & bias_keep.to(old_b.device))
            )
            base.register_buffer(_BIAS_MASK, bias_keep, persistent=False)
            base.bias.mul_(bias_keep.to(base.bias.dtype))


def _keep(module: nn.Module) -> torch.Tensor:
    base = _base_linear(module)
    mask = getattr(module, _MASK, None)
    return torch.ones_like(base.weight, dtype=torch.bool) if mask is None else mask


def _global_prune(scores: dict[str, torch.Tensor], modules: dict[str, nn.Module], ratio: float) -> tuple[int, int]:
    """Prune exactly ``round(ratio * total)`` entries with the lowest scores across ``modules`` (already pruned
    entries count as pruned). Returns (pruned, total)."""
    if not scores:
        return 0, 0
    names = list(scores)
    flat = torch.cat([scores[n].float().reshape(-1).cpu() for n in names])
    total = flat.numel()
    k = int(round(float(ratio) * total))
    if k == 0:
        return 0, total
    if not bool((flat > 0).any()):
        logger.warning("DSEE prune: every score is zero (an untrained adapter?); the pruned entries are arbitrary.")
    prune_idx = torch.topk(flat, k, largest=False).indices
    keep_flat = torch.ones(total, dtype=torch.bool)
    keep_flat[prune_idx] = False
    start = 0
    for name in names:
        n = scores[name].numel()
        _set_mask(modules[name], keep_flat[start : start + n].view(scores[name].shape))
        start += n
    return k, total


def _attention_blocks(model: nn.Module) -> list[dict[str, Any]]:
    """Attention layers with q/k/v/o modules and head geometry: BERT-style (``query``/``key``/``value`` + the
    sibling ``output.dense``) and Llama/Qwen-style (``q_proj``/``k_proj``/``v_proj``/``o_proj``)."""
    blocks = []
    named = dict(model.named_modules())
    for name, module in named.items():
        children = module._modules
        if all(c in children for c in ("query", "key", "value")):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            o = named.get(f"{parent}.output.dense" if parent else "output.dense")
            if o is None:
                continue
            q, k, v = children["query"], children["key"], children["value"]
            num_heads = int(module.num_attention_heads)
            head_dim = _get_in_out_features(_base_linear(q))[1] // num_heads
        elif all(c in children for c in ("q_proj", "k_proj", "v_proj", "o_proj")):
            q, k, v, o = children["q_proj"], children["k_proj"], children["v_proj"], children["o_proj"]
            head_dim = int(module.head_dim)
            # from this layer's q_proj, not the config: layers may differ (Laguna's num_attention_heads_per_layer);
            # a q_proj that packs more than the queries (gated attention) fails the o_proj check of _check_head_layout
            num_heads = _get_in_out_features(_base_linear(q))[1] // head_dim
        else:
            continue
        num_kv = _get_in_out_features(_base_linear(k))[1] // head_dim
        blocks.append(
            {"name": _norm(name), "module": module, "q": q, "k": k, "v": v, "o": o}
            | {"num_heads": num_heads, "num_kv": num_kv, "head_dim": head_dim}
        )
    return blocks


def _row_sums(module: nn.Module, mode: str, adapter: str) -> torch.Tensor:
    """Per-output-row score of a q or v projection: sum over the input dim of |dW| (+ |W| for 'wabs')."""
    base = _base_linear(module)
    score = torch.zeros(base.weight.shape[0], dtype=torch.float32, device=base.weight.device)
    if isinstance(module, DseeLinear) and adapter in module.dsee_A:
        score += module.get_delta_weight(adapter).abs().sum(dim=1).float()
    if mode == "wabs":
        score += base.weight.detach().abs().sum(dim=1).float()
    return score


def _check_head_layout(blk: dict[str, Any]) -> None:
    """q has H·d outputs, k and v H_kv·d with H_kv dividing H, o H·d inputs: the layout head pruning slices. Gated
    attention (Qwen3-Next, Qwen3.5: q_proj packs a gate with the queries, 2·H·d rows) and the like are refused."""
    h, h_kv, d = blk["num_heads"], blk["num_kv"], blk["head_dim"]
    q_out = _get_in_out_features(_base_linear(blk["q"]))[1]
    k_out, v_out = (_get_in_out_features(_base_linear(blk[key]))[1] for key in ("k", "v"))
    o_in = _get_in_out_features(_base_linear(blk["o"]))[0]
    if q_out != h * d or o_in != h * d or k_out != h_kv * d or v_out != h_kv * d or h_kv < 1 or h % h_kv:
        raise ValueError(
            f"DSEE head pruning: the attention layer {blk['name']!r} is not laid out as query heads of {d} that "
            f"o_proj reads back (q outputs {q_out}, o inputs {o_in}, k/v outputs {k_out}/{v_out}); e.g. gated "
            "attention packs a gate with the queries in q_proj. Head pruning does not support it: prune with "
            "heads_per_layer=0 (unstructured) instead. Nothing was pruned."
        )


def _prune_heads(model: nn.Module, heads_per_layer: int, mode: str, adapter: str) -> dict[str, list[int]]:
    blocks = _attention_blocks(model)
    if not blocks:
        raise ValueError(
            "DSEE head pruning found no attention layers (BERT-style query/key/value or q_proj/k_proj/v_proj/o_proj)."
        )
    for blk in blocks:  # every layer is checked before any is masked
        _check_head_layout(blk)
        if not 0 < heads_per_layer < blk["num_heads"]:
            raise ValueError(
                f"`heads_per_layer` must be between 1 and {blk['num_heads'] - 1} (the attention layer "
                f"{blk['name']!r} has {blk['num_heads']} heads), got {heads_per_layer}."
            )
    pruned: dict[str, list[int]] = {}
    scored = False  # any non-zero head score: with none, the "lowest" heads are just the first ones
    for blk in blocks:
        h, h_kv, d = blk["num_heads"], blk["num_kv"], blk["head_dim"]
        group = h // h_kv
        q_rows = _row_sums(blk["q"], mode, adapter).view(h, d).sum(dim=1)
        v_rows = _row_sums(blk["v"], mode, adapter).view(h_kv, d).sum(dim=1)
        score = (q_rows + v_rows.repeat_interleave(group) / group).cpu()
        scored = scored or bool((score > 0).any())
        heads = sorted(torch.argsort(score, stable=True)[:heads_per_layer].tolist())
        pruned[blk["name"]] = heads
        q_keep = torch.ones(h * d, dtype=torch.bool)
        for head in heads:
            q_keep[head * d : (head + 1) * d] = False
        kv_keep = torch.ones(h_kv * d, dtype=torch.bool)
        for g in range(h_kv):
            if all(x in heads for x in range(g * group, (g + 1) * group)):
                kv_keep[g * d : (g + 1) * d] = False
        for key, keep in (("q", q_keep), ("k", kv_keep), ("v", kv_keep)):
            weight = _base_linear(blk[key]).weight
            _set_mask(blk[key], keep[:, None].expand_as(weight).clone(), keep)
        o_weight = _base_linear(blk["o"]).weight
        _set_mask(blk["o"], q_keep[None, :].expand_as(o_weight).clone())
    if not scored:
        logger.warning(
            "DSEE head pruning: every head score is zero (an untrained adapter, or no DSEE adapter on the q/v "
            "projections); the first heads of each layer were pruned. Train first, adapt q/v, or use "
            "head_mode='wabs' (adds |W_q| + |W_v|)."
        )
    return pruned


def _count(model: nn.Module) -> dict[str, int]:
    """Parameters of the base model (adapter parameters and modules_to_save copies excluded) and their non-zeros."""
    total = nonzero = 0
    for name, p in model.named_parameters():
        if "dsee_" in name or ".modules_to_save." in name:
            continue
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"params_total": total, "params_nonzero": nonzero}


@torch.no_grad()
def prune(
    model: nn.Module,
    ratio: Optional[float] = DEFAULT_RATIO,
    adapter_ratio: Optional[float] = None,
    mode: str = "abs",
    heads_per_layer: int = 0,
    head_mode: str = "abs",
    adapter_name: Optional[str] = None,
    exclude_modules: str | tuple[str, ...] = HEAD_EXCLUDE,
) -> dict[str, Any]:
    """Prune the final weights of a DSEE model (see the module docstring); returns and logs the statistics.

    Args:
        model: A ``PeftModel`` (or a model with DSEE layers injected) carrying a DSEE adapter, not merged.
        ratio: Fraction of the non-adapted linear weights pruned globally by ``|W0|`` (paper: 0.2); ``None`` skips
            unstructured pruning. Must be in (0, 1).
        adapter_ratio: Fraction of the adapted weights pruned globally by ``mode``'s score; defaults to ``ratio``.
        mode: Score of the adapted weights: ``"abs"`` (``|dW|``, the paper's default), ``"wabs"`` (``|W0 + dW|``),
            ``"w"`` (``|W0|``).
        heads_per_layer: Attention heads to prune per layer (0: none; the paper prunes 3 of 12 on BERT-base).
        head_mode: Head score: ``"abs"`` (``|dW_q| + |dW_v|``) or ``"wabs"`` (adds ``|W_q| + |W_v|``).
        adapter_name: The DSEE adapter whose update is scored (default: the active one).
        exclude_modules: Linear layers (a name or suffix, or a list of them) never pruned; the output embedding is
            never pruned either.

    Returns:
        ``{"ratio", "adapter_ratio", "base_pruned", "base_total", "adapter_pruned", "adapter_total", "heads",
        "linear_total", "linear_zeros", "linear_sparsity", "params_total", "params_nonzero", "sparsity"}``.
    """
    _check_ratio("ratio", ratio)
    adapter_ratio = ratio if adapter_ratio is None else adapter_ratio
    _check_ratio("adapter_ratio", adapter_ratio)
    if mode not in ("abs", "wabs", "w"):
        raise ValueError(f"`mode` must be 'abs', 'wabs' or 'w', got {mode!r}.")
    if head_mode not in ("abs", "wabs"):
        raise ValueError(f"`head_mode` must be 'abs' or 'wabs', got {head_mode!r}.")
    if not is_int(heads_per_layer, 0):
        raise ValueError(f"`heads_per_layer` must be a non-negative integer, got {heads_per_layer!r}.")
    if ratio is None and heads_per_layer == 0:
        raise ValueError("Nothing to prune: give a `ratio` in (0, 1) and/or `heads_per_layer` > 0.")
    if isinstance(
        exclude_modules, str
    ):  # one name, as PEFT's exclude_modules takes it (tuple() split it into letters)
        exclude_modules = (exclude_modules,)
    try:
        exclude_modules = tuple(exclude_modules)
    except TypeError:
        raise TypeError(
            f"`exclude_modules` must be a module name or a list of names (or suffixes), got {exclude_modules!r}."
        ) from None
    adapted, plain = _collect(model, exclude_modules)
    if not adapted:
        raise ValueError("hfx.dsee.prune: the model has no DSEE layers; wrap it with get_peft_model(DseeConfig()).")
    layers = list(adapted.values())
    if adapter_name is None:
        active = layers[0].active_adapters
        if len(active) != 1:
            raise ValueError(f"hfx.dsee.prune: pass `adapter_name`; {len(active)} adapters are active.")
        adapter_name = active[0]
    names = sorted({name for layer in layers for name in layer.dsee_A})
    if adapter_name not in names:  # it used to score a zero update in every layer, silently with mode="wabs"
        raise ValueError(f"hfx.dsee.prune: no DSEE adapter named {adapter_name!r}; the model has {names}.")
    for layer in layers:
        if layer.merged:
            raise ValueError(f"Cannot prune while {layer._describe()} is merged; call unmerge_adapter() first.")
        if layer.quantization_backend is not None:
            raise ValueError(
                f"Cannot prune the quantized {layer._describe()}: pruning edits the base weights; prune the model "
                "before quantizing it."
            )
    for module in [*layers, *plain.values()]:
        if hasattr(_base_linear(module).weight, "ds_id"):
            raise ValueError(
                "hfx.dsee.prune edits the frozen base weights and is not supported under DeepSpeed ZeRO-3; prune on "
                "a single process (or with ZeRO-0/1/2) and retrain from there."
            )

    stats: dict[str, Any] = {"ratio": ratio, "adapter_ratio": adapter_ratio, "mode": mode, "heads": {}}
    if heads_per_layer:
        stats["heads"] = _prune_heads(model, heads_per_layer, head_mode, adapter_name)
        stats["heads_per_layer"] = heads_per_layer
    if ratio is not None:
        base_scores = {}
        for name, module in plain.items():
            base_scores[name] = module.weight.detach().abs().float().masked_fill(~_keep(module), -1.0)
        stats["base_pruned"], stats["base_total"] = _global_prune(base_scores, plain, ratio)
        ad_scores = {}
        for name, layer in adapted.items():
            w0 = layer.get_base_layer().weight.detach().float()
            if adapter_name in layer.dsee_A:
                delta = layer.get_delta_weight(adapter_name, masked=False).float()
            else:
                delta = torch.zeros_like(w0)
            score = {"abs": delta, "wabs": w0 + delta, "w": w0}[mode].abs()
            ad_scores[name] = score.masked_fill(~_keep(layer), -1.0)
        stats["adapter_pruned"], stats["adapter_total"] = _global_prune(ad_scores, adapted, adapter_ratio)
    linear = [_base_linear(m).weight for m in [*adapted.values(), *plain.values()]]
    stats["linear_total"] = sum(w.numel() for w in linear)
    stats["linear_zeros"] = sum(int((w == 0).sum()) for w in linear)
    stats["linear_sparsity"] = stats["linear_zeros"] / max(stats["linear_total"], 1)
    stats.update(_count(model))
    stats["sparsity"] = 1 - stats["params_nonzero"] / max(stats["params_total"], 1)
    root = _root(model)
    previous = getattr(root, "_dsee_pruning", None) or {}
    heads = {**previous.get("heads", {}), **stats["heads"]}
    stats["heads"] = heads
    root._dsee_pruning = {"heads": heads, "stats": stats}
    _record_pruned(model)
    logger.info(
        "DSEE prune: linear sparsity %.4f (%d of %d zero), %d base parameters, %d non-zero (%.4f sparse), heads %s",
        stats["linear_sparsity"],
        stats["linear_zeros"],
        stats["linear_total"],
        stats["params_total"],
        stats["params_nonzero"],
        stats["sparsity"],
        {k: v for k, v in heads.items()} or "none",
    )
    return stats


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 bits (8 entries per byte, flat, little-endian in each byte): 1/8 of the bool size."""
    flat = mask.detach().reshape(-1).to("cpu", torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Inverse of [`pack_mask`]: the bool mask of ``shape``."""
    numel = math.prod(int(d) for d in shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 8):
        raise ValueError(
            f"a packed pruning mask of shape {tuple(shape)} needs {-(-numel // 8)} uint8 bytes, got "
            f"{packed.numel()} {packed.dtype}; the masks file is damaged or not hfx's."
        )
    bits = (packed[:, None] & _BIT_WEIGHTS) != 0
    return bits.reshape(-1)[:numel].reshape(tuple(int(d) for d in shape))


def save_pruning(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the pruning masks (``dsee_pruning.safetensors``: each mask bit-packed, [`pack_mask`], keyed
    ``<module>.weight`` / ``.bias``, shapes in its metadata) and the statistics and pruned heads
    (``dsee_pruning.json``) to ``directory``; next to a saved adapter. 1 bit per weight entry, not a byte."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}

    def add(key: str, mask: torch.Tensor) -> None:
        tensors[key] = pack_mask(mask)
        shapes[key] = list(mask.shape)

    for name, module in model.named_modules():
        mask = module._buffers.get(_MASK) if _MASK in module._buffers else None
        if mask is not None and not name.endswith(".base_layer"):  # a DSEE layer's base holds the same mask
            add(f"{_norm(name)}.weight", mask)
        bias_mask = module._buffers.get(_BIAS_MASK) if _BIAS_MASK in module._buffers else None
        if bias_mask is not None:
            add(f"{_norm(name)}.bias", bias_mask)
    if not tensors:
        raise ValueError("hfx.dsee.save_pruning: the model has not been pruned (no pruning masks found).")
    os.makedirs(directory, exist_ok=True)
    metadata = {"format": "hfx-dsee-pruning", "packing": "bits", "shapes": json.dumps(shapes)}
    save_file(tensors, os.path.join(directory, MASKS_FILE), metadata=metadata)
    info = getattr(_root(model), "_dsee_pruning", None) or {}
    with open(os.path.join(directory, INFO_FILE), "w") as f:
        json.dump({"format": "hfx-dsee-pruning", "version": 2, **info}, f, indent=2, default=str)


def read_masks(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The bool masks of a ``dsee_pruning.safetensors``: bit-packed (version 2) or plain bool (version 1)."""
    from safetensors import safe_open

    path = os.path.join(directory, MASKS_FILE)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        stored = {key: f.get_tensor(key) for key in f.keys()}
    if metadata.get("packing") != "bits":  # version 1: one bool per entry
        return stored
    shapes = json.loads(metadata.get("shapes", "{}"))
    missing = sorted(stored.keys() - shapes.keys())
    if missing:
        raise ValueError(f"hfx.dsee: {path} has packed masks without a shape: {missing[:5]}; the file is damaged.")
    return {key: unpack_mask(packed, shapes[key]) for key, packed in stored.items()}


@torch.no_grad()
def load_pruning(model: nn.Module, directory: str | os.PathLike) -> dict[str, Any]:
    """Re-apply masks written by [`save_pruning`] to ``model`` (a base model, a ``PeftModel`` with DSEE, or a merged
    model): zero the pruned entries in place and set the DSEE layers' masks. Returns the saved JSON info."""
    masks = read_masks(directory)
    with open(os.path.join(directory, INFO_FILE)) as f:
        info = json.load(f)
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        short = _norm(name)
        if isinstance(module, DseeLinear) or (isinstance(module, nn.Linear) and short not in modules):
            modules[short] = module
    missing = sorted({k.rsplit(".", 1)[0] for k in masks} - modules.keys())
    if missing:
        raise ValueError(f"hfx.dsee.load_pruning: the model has no linear layers named {missing[:5]}.")
    # every mask is checked before any weight changes: a bad last mask used to leave the model half-pruned
    for key, mask in masks.items():
        name, kind = key.rsplit(".", 1)
        base = _base_linear(modules[name])
        target = base.weight if kind == "weight" else base.bias if kind == "bias" else None
        if kind not in ("weight", "bias") or target is None:
            what = f"kind {kind!r} (weight or bias)" if kind not in ("weight", "bias") else "a bias, which has none"
            raise ValueError(f"hfx.dsee.load_pruning: {os.path.join(directory, MASKS_FILE)} has a mask {key!r} for "
                             f"{what}; the file is damaged or was made for another model.")  # fmt: skip
        if mask.shape != target.shape:
            raise ValueError(
                f"Pruning mask {key} has shape {tuple(mask.shape)}, the {kind} {tuple(target.shape)}; the masks file "
                "was made for another model."
            )
    for key, mask in masks.items():
        name, kind = key.rsplit(".", 1)
        if kind == "weight":
            _set_mask(modules[name], mask.bool())
    for key, mask in masks.items():
        name, kind = key.rsplit(".", 1)
        if kind == "bias":
            base = _base_linear(modules[name])
            base.register_buffer(_BIAS_MASK, mask.bool().to(base.bias.device), persistent=False)
            base.bias.mul_(mask.to(base.bias.dtype))
    _root(model)._dsee_pruning = {"heads": info.get("heads", {}), "stats": info.get("stats", {})}
    _record_pruned(model)
    return info


def _record_pruned(model: nn.Module) -> None:
    """Mark the DSEE configs of ``model`` as pruned, so that their ``save_pretrained`` writes the masks too."""
    for config in (getattr(model, "peft_config", None) or {}).values():
        if isinstance(config, DseeConfig):
            config.pruned = True
            config._pruned_model = weakref.ref(model)


def _saved_config_says_pruned(directory: str) -> bool:
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("pruned", False))


# where the masks of a Trainer run pushed to the Hub are: its pushes during training copy a fixed list of model files
# (not these) to the repository root
_PUSH_HINT = (
    " A Trainer with push_to_hub uploads only the model files to the repository root while it trains: the masks "
    "reach the root with the final trainer.push_to_hub(), and every checkpoint folder has them (last-checkpoint/ "
    "with hub_strategy='checkpoint': load with subfolder='last-checkpoint')."
)


def apply_saved_pruning(peft_model: nn.Module, model_id: str | os.PathLike, adapter_name: str, **hub_kwargs: Any):
    """After ``load_adapter(model_id, adapter_name)``: re-apply the pruning masks saved beside a DSEE adapter.

    Returns the saved pruning info, or None when the adapter is not DSEE or was saved unpruned. Raises when the
    adapter was saved pruned (``"pruned": true`` in its config) but the masks are not there.
    """
    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, DseeConfig):
        return None
    subfolder = hub_kwargs.get("subfolder")
    local = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    if os.path.isdir(local):
        if os.path.isfile(os.path.join(local, MASKS_FILE)):
            return load_pruning(peft_model, local)
        if _saved_config_says_pruned(local) or (config.pruned and not _is_pruned(peft_model)):
            raise FileNotFoundError(
                f"The DSEE adapter in {local} was saved from a pruned model, but {MASKS_FILE} is missing there: "
                "without the masks the base model would run unpruned. Copy the adapter folder whole (with "
                f"{MASKS_FILE} and {INFO_FILE}), or re-apply the masks with hfx.dsee.load_pruning(model, <folder>)."
                + _PUSH_HINT
            )
        return None
    if not config.pruned or getattr(config, "_pruned_on_load", False):  # saved unpruned (see DseeModel.inject_adapter)
        return None
    from huggingface_hub import hf_hub_download

    download = {k: v for k, v in hub_kwargs.items() if k in HUB_KEYS}
    try:
        masks = hf_hub_download(str(model_id), MASKS_FILE, **download)
        hf_hub_download(str(model_id), INFO_FILE, **download)
    except Exception as err:  # noqa: BLE001 - re-raised with what is missing and why it matters
        raise FileNotFoundError(
            f"The DSEE adapter {model_id!r} was saved from a pruned model, but its pruning masks ({MASKS_FILE}, "
            f"{INFO_FILE}) could not be fetched: {err}." + _PUSH_HINT
        ) from err
    return load_pruning(peft_model, os.path.dirname(masks))


def _is_pruned(model: nn.Module) -> bool:
    return any(m._buffers.get(_MASK) is not None for m in model.modules())  # a DSEE layer registers it as None


def install_load_hook() -> None:
    """Wrap ``PeftModel.load_adapter`` once so that it re-applies saved DSEE pruning masks; transformers'
    ``PeftAdapterMixin.load_adapter`` (which ``AutoModelForCausalLM.from_pretrained(<adapter folder>)`` uses too) is
    wrapped in :mod:`hfx.tuners._loading`. Other adapters are untouched."""
    from peft import PeftModel

    from .._loading import install_transformers_load_hook

    original = PeftModel.load_adapter
    if not getattr(original, "_hfx_dsee_pruning", False):

        @functools.wraps(original)
        def load_adapter(self, model_id, adapter_name, *args, **kwargs):
            result = original(self, model_id, adapter_name, *args, **kwargs)
            apply_saved_pruning(self, model_id, adapter_name, **kwargs)
            return result

        load_adapter._hfx_dsee_pruning = True
        PeftModel.load_adapter = load_adapter
    install_transformers_load_hook()


@torch.no_grad()
def remove_pruned_heads(model: nn.Module) -> dict[str, list[int]]:
    """Physically remove the pruned heads of a **merged** model (after ``merge_and_unload()``): slice the rows of
    q/k/v (weights and biases) and the columns of o. Multi-head attention only (no grouped key/value heads, and no
    other parameter over all heads' features, such as OLMo-2's q/k norms: those are refused before any change). The
    result runs and computes exactly what the zeroed model computes, but no longer matches its config's shapes, so
    it is for inference and measurement, not for ``from_pretrained``. Returns the removed heads per layer."""
    info = getattr(_root(model), "_dsee_pruning", None) or {}
    heads = info.get("heads") or {}
    if not heads:
        raise ValueError("hfx.dsee.remove_pruned_heads: no pruned heads recorded on this model.")
    blocks = {b["name"]: b for b in _attention_blocks(model)}
    for layer_name in heads:  # every layer is checked before any is sliced
        blk = blocks.get(layer_name)
        if blk is None:
            raise ValueError(f"hfx.dsee.remove_pruned_heads: no attention layer {layer_name!r} in the model.")
        if any(isinstance(blk[k], BaseTunerLayer) for k in ("q", "k", "v", "o")):
            raise ValueError("hfx.dsee.remove_pruned_heads needs a merged model: call merge_and_unload() first.")
        if blk["num_kv"] != blk["num_heads"]:
            raise ValueError(
                f"hfx.dsee.remove_pruned_heads supports multi-head attention only; {layer_name!r} has "
                f"{blk['num_heads']} query and {blk['num_kv']} key/value heads (the pruned heads stay zeroed)."
            )
        _check_head_layout(blk)
        width = blk["num_heads"] * blk["head_dim"]
        qkvo = {id(blk[k]) for k in ("q", "k", "v", "o")}
        across = [
            f"{child_name} ({tuple(p.shape)})"
            for child_name, child in blk["module"].named_children()
            if id(child) not in qkvo
            for p in child.parameters()
            if p.numel() == width and width != blk["head_dim"]
        ]
        if across:  # OLMo-2's q/k RMSNorm over all heads' features, Cohere's qk LayerNorm of (heads, head_dim)
            raise ValueError(
                f"hfx.dsee.remove_pruned_heads: {layer_name!r} has parameters over all {blk['num_heads']} heads' "
                f"features ({', '.join(across)}), which slicing q/k/v/o would leave the old size; it cannot remove "
                "heads there (the pruned heads stay zeroed, which computes the same). Nothing was removed."
            )
    for layer_name, pruned in heads.items():
        blk = blocks[layer_name]
        d, h = blk["head_dim"], blk["num_heads"]
        keep_heads = [x for x in range(h) if x not in pruned]
        rows = torch.cat([torch.arange(x * d, (x + 1) * d) for x in keep_heads])
        module = blk["module"]
        names = ("query", "key", "value") if "query" in module._modules else ("q_proj", "k_proj", "v_proj")
        for child in names:
            old = module._modules[child]
            new = nn.Linear(old.in_features, rows.numel(), bias=old.bias is not None)
            new = new.to(old.weight.device, old.weight.dtype)
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
            module._modules[child] = new
        o = blk["o"]
        new_o = nn.Linear(rows.numel(), o.out_features, bias=o.bias is not None).to(o.weight.device, o.weight.dtype)
        new_o.weight.copy_(o.weight[:, rows])
        if o.bias is not None:
            new_o.bias.copy_(o.bias)
        parent_name, _, child_name = [n for n, m in model.named_modules() if m is o][0].rpartition(".")
        model.get_submodule(parent_name)._modules[child_name] = new_o
        if hasattr(module, "num_attention_heads"):
            module.num_attention_heads = len(keep_heads)
        if hasattr(module, "all_head_size"):
            module.all_head_size = rows.numel()
    return heads
