"""LoRA-GA's data-driven step, run by ``hfx.initialize``: gradient estimate from activations, SVD, A/B, offset.

Gradient estimate. The weight gradient of a linear layer y = x W^T + b is dL/dW = dY^T X (summed over tokens). hfx
computes it from a forward hook on each target base layer (its input X) and a tensor hook on that layer's output
(dY), never from ``weight.grad``: the frozen base weight is never asked for a gradient, which is what works under
DeepSpeed ZeRO-3 (parameter gradients of partitioned weights were seen to fail even when gathered; activation
gradients do not depend on the partitioning). Every parameter's ``requires_grad`` is switched off during the
estimate; a forward pre-hook makes each target's input require grad, so autograd computes only activation
gradients. The estimate is the mean over batches of each batch's gradient (each batch's loss is the model's own,
usually a token mean), summed over processes with ``all_reduce`` together with the batch count, so N processes give
the single-process result on the union of their batches.

Memory. One m x n accumulator (fp32; fp64 for fp64 weights) per target layer of the current pass, plus the
activations autograd keeps for one batch. ``max_layers_per_pass=k`` bounds the accumulators to k layers at a time
by running one pass over the batches per group of k layers; after each pass only A/B (r x (m+n) per layer) are kept.
The offset (and the A/B writes) happen after all passes, so every pass sees the same (base) model.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn

from hfx.initialize import mark_initialized
from hfx.tuners._batches import BUILD_BATCHES, check_batch

from .config import LoraGAConfig


def _conv1d_cls() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_main() -> bool:
    return not _is_distributed() or torch.distributed.get_rank() == 0


def _partitioned(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The DeepSpeed ZeRO-3 partitioned parameters among ``params`` (empty when DeepSpeed is not in use)."""
    return [p for p in params if hasattr(p, "ds_id")]


@contextmanager
def _gathered(params: list[nn.Parameter], modifier_rank: int | None):
    """Gather ZeRO-3 partitioned ``params`` for the block (a no-op without partitioned parameters)."""
    parts = _partitioned(params)
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield


def target_layers(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """``(name, lora_layer)`` for each LoRA layer carrying ``adapter_name``; raises on targets LoRA-GA cannot offset."""
    from peft.tuners.lora import LoraLayer

    conv1d = _conv1d_cls()
    supported = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    layers = []
    for name, module in peft_model.named_modules():
        # a LoRA Embedding keeps its adapter in lora_embedding_A: it carries the adapter too, and must get the error
        if not isinstance(module, LoraLayer) or (
            adapter_name not in module.lora_A and adapter_name not in getattr(module, "lora_embedding_A", {})
        ):
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        quantised = (
            getattr(module, "quantization_backend", None) is not None
            or (weight is not None and (hasattr(weight, "quant_state") or not weight.dtype.is_floating_point))
            or type(base).__module__.split(".")[0] in ("bitsandbytes", "hqq", "torchao", "auto_gptq", "gptqmodel")
        )
        if quantised:
            raise TypeError(
                f"LoRA-GA cannot offset the quantised weight of {name!r} ({type(base).__module__}."
                f"{type(base).__name__}): the init writes W - s*B*A into the frozen weight, which needs a float "
                "weight. Estimate and initialise on a float (fp32/bf16) copy of the model, or exclude the layer "
                "from target_modules."
            )
        if not isinstance(base, supported):
            raise TypeError(
                f"LoRA-GA supports nn.Linear and Conv1D targets; {name!r} is {type(base).__name__}. "
                "Exclude it from target_modules."
            )
        layers.append((name, module))
    if not layers:
        raise ValueError(f"LoRA-GA: adapter {adapter_name!r} has no LoRA layers to initialise.")
    return layers


def _check_batch(batch: Any, forward_params: set[str] | None) -> Mapping[str, Any]:
    return check_batch(batch, forward_params, "LoRA-GA", "'input_ids' (and 'labels' for the loss)")


def _loss(peft_model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = peft_model(**moved)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "LoRA-GA needs a loss from the model to estimate gradients, and the model returned none: the batches "
            f"(keys {sorted(batch)}) carry no 'labels'. Use an SFT/LM training collator's batches (which add "
            f"labels). {BUILD_BATCHES}"
        )
    return loss


def _forward_params(peft_model: nn.Module) -> set[str] | None:
    try:
        params = inspect.signature(peft_model.get_base_model().forward).parameters
    except (TypeError, ValueError, AttributeError):  # pragma: no cover
        return None
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


def _device(peft_model: nn.Module) -> torch.device:
    return next(iter(peft_model.parameters())).device


def estimate_gradients(
    peft_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: list[tuple[str, nn.Module]],
    *,
    iters: int | None = None,
    show_progress: bool = False,
    desc: str = "LoRA-GA gradient",
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean over batches (and processes) of dL/dW for each layer in ``layers``, from activation hooks.

    Returns ``({name: G (out x in)}, number of batches over all processes)``. Runs in eval mode (no dropout, so the
    estimate is deterministic) with all adapters disabled, i.e. the gradient of the base model's loss.
    """
    accs: dict[str, torch.Tensor | None] = {name: None for name, _ in layers}
    hooks = []

    def pre_hook(module, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    def accumulate(name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(acc_dtype)
        xx = x.reshape(-1, x.shape[-1]).to(acc_dtype)
        update = g.T @ xx
        accs[name] = update if accs[name] is None else accs[name].add_(update)

    def fwd_hook(name, module, args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(accumulate, name, args[0].detach()))

    for name, layer in layers:
        base = layer.get_base_layer()
        hooks.append(base.register_forward_pre_hook(pre_hook))
        hooks.append(base.register_forward_hook(partial(fwd_hook, name)))

    forward_params = _forward_params(peft_model)
    device = _device(peft_model)
    flags = {p: p.requires_grad for p in peft_model.parameters()}
    was_training = peft_model.training
    count = 0
    total = iters if iters is not None else (len(batches) if hasattr(batches, "__len__") else None)
    progress = None
    if show_progress and _is_main():
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc=desc, leave=False)
    try:
        for p in flags:
            p.requires_grad_(False)
        peft_model.eval()
        with ExitStack() as stack:
            stack.enter_context(
                peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else nullcontext()
            )
            # ZeRO-3: the base weights are partitioned and no DeepSpeed engine (which fetches them per module) exists
            # yet, so gather them for the estimate. Only activations are differentiated; no weight gradient exists.
            stack.enter_context(_gathered(list(flags), modifier_rank=None))
            for batch in batches:
                if iters is not None and count >= iters:
                    break
                batch = _check_batch(batch, forward_params)
                with torch.enable_grad():
                    loss = _loss(peft_model, batch, device)
                    if not loss.requires_grad:
                        raise RuntimeError("LoRA-GA: the loss does not depend on any target layer.")
                    loss.backward()
                count += 1
                if progress is not None:
                    progress.update(1)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        peft_model.train(was_training)
        if progress is not None:
            progress.close()

    grads: dict[str, torch.Tensor] = {}
    counts = torch.tensor([float(count)], dtype=torch.float64, device=device)
    if _is_distributed():
        torch.distributed.all_reduce(counts)
    n_total = int(counts.item())
    if n_total == 0:
        raise ValueError("LoRA-GA: no batches to estimate the gradient from (the dataloader is empty).")
    for name, layer in layers:
        g = accs[name]
        if g is None:  # no batch on this rank (or the layer never ran): contribute zeros to the sum
            base = layer.get_base_layer()
            out_f, in_f = _out_in(base)
            dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
            g = torch.zeros(out_f, in_f, dtype=dtype, device=device)
        if _is_distributed():
            torch.distributed.all_reduce(g)
        grads[name] = g.div_(n_total)
    return grads, n_total


def check_gradient(name: str, grad: torch.Tensor, n_batches: int) -> None:
    """Refuse a gradient estimate whose SVD would give no meaningful init: all zero (any singular vectors would do,
    so the init would be arbitrary) or non-finite (``linalg.svd`` fails on it). ``grad`` is already summed over
    processes, so every process decides alike."""
    if not bool(torch.isfinite(grad).all()):
        raise ValueError(
            f"LoRA-GA: the estimated gradient of layer {name!r} has non-finite values (inf/NaN) after {n_batches} "
            "batches, so it has no SVD; nothing was changed. Check the batches' inputs and labels (a non-finite "
            "activation or loss in any batch poisons the mean) and the model's dtype: fp16 overflows, estimate on "
            "a bf16/fp32 model."
        )
    if not bool(grad.any()):
        raise ValueError(
            f"LoRA-GA: the estimated gradient of layer {name!r} is exactly zero over {n_batches} batches, so its "
            "singular vectors (the init) would be arbitrary; nothing was changed. Do the batches have labelled tokens? "
            "Check the batches' labels: with every label at the ignore index (-100) the loss has no gradient. If "
            "the layer does not affect the loss, exclude it from target_modules."
        )


def _out_in(base: nn.Module) -> tuple[int, int]:
    conv1d = _conv1d_cls()
    if conv1d is not None and isinstance(base, conv1d):
        return base.weight.shape[1], base.weight.shape[0]
    return base.out_features, base.in_features


def _direction_indices(direction: str, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if direction == "ArB2r":
        return torch.arange(r), torch.arange(r, 2 * r)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(r)
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed))  # the original's random split
    return perm[:r], perm[r:]


def _svd_method(config: LoraGAConfig, shape: torch.Size) -> str:
    if config.svd == "auto":
        return "full" if min(shape) <= 4096 else "lowrank"
    return config.svd


def _seeded_svd_lowrank(matrix: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``torch.svd_lowrank`` (q = min(4r, m, n), niter 4) under ``seed``, leaving the global generators as they were
    (``manual_seed`` seeds CUDA too, so its generator is forked as well)."""
    with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=min(4 * r, *matrix.shape), niter=4)


def _top_singular_values(weight: torch.Tensor, r: int, config: LoraGAConfig) -> torch.Tensor:
    """The r largest singular values of ``weight`` (exact, or ``svd_lowrank`` as the original's ``weightS``)."""
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if _svd_method(config, w.shape) == "full":
        return torch.linalg.svdvals(w)[:r]
    return _seeded_svd_lowrank(w, r, config.seed)[1][:r]


def loraga_factors(
    grad: torch.Tensor, r: int, scaling: float, config: LoraGAConfig, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B (out x r), A (r x in), S)`` from the gradient ``grad`` (out x in) as in the paper (Algorithm 1).

    A and B are singular vectors of ``grad`` (split by ``config.direction``) times the ``config.scale`` factor; S are
    the singular values (descending). Each singular pair's sign is fixed (largest entry of u_i positive). ``weight``
    (the base weight, either orientation) is needed by ``scale="weightS"`` and ``norm_clip``.
    """
    m, n = grad.shape
    if 2 * r > min(m, n):
        raise ValueError(
            f"LoRA-GA needs 2r <= min(out, in) to take 2r singular vectors; r={r} for a {m}x{n} weight. Lower r."
        )
    if weight is None and (config.scale == "weightS" or config.norm_clip):
        raise ValueError("LoRA-GA: scale='weightS' and norm_clip need the base weight; pass weight=.")
    method = _svd_method(config, grad.shape)
    if method == "full":
        U, S, Vh = torch.linalg.svd(grad, full_matrices=False)
    else:
        U, S, V = _seeded_svd_lowrank(grad, r, config.seed)
        Vh = V.T
    # Canonical signs (sklearn's svd_flip): the largest-magnitude entry of each u_i is positive, so the init does not
    # depend on the SVD backend or on the summation order of the gradient (e.g. across processes).
    signs = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1
    U, Vh = U * signs, Vh * signs[:, None]
    a_idx, b_idx = _direction_indices(config.direction, r, config.seed)
    A = Vh[a_idx].clone()
    B = U[:, b_idx].clone()
    factor = m**0.25 / math.sqrt(config.stable_gamma)
    if config.scale == "stable":
        A, B = A * factor, B * factor
    elif config.scale == "peft":
        B = B * S[b_idx] * factor
    elif config.scale == "gd":
        A, B = A / scaling, B / scaling
    elif config.scale == "weightS":
        factor = float((_top_singular_values(weight, r, config) / scaling).sqrt().mean())
        A, B = A * factor, B * factor
    if config.norm_clip:
        ratio = float(weight.detach().abs().max()) / float((scaling * (B @ A)).abs().max())
        if ratio < 1:
            A, B = A * math.sqrt(ratio), B * math.sqrt(ratio)
    return B, A, S


def apply_factors(layer: nn.Module, adapter_name: str, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Write A, B into the LoRA layer and offset its frozen weight: W <- W - s*B*A (computed in fp32, fp64 for fp64
    weights, from A/B already cast to the adapter dtype). Returns the (B, A) actually written (adapter dtype)."""
    base = layer.get_base_layer()
    lora_A = layer.lora_A[adapter_name].weight
    lora_B = layer.lora_B[adapter_name].weight
    s = layer.scaling[adapter_name]
    weight = base.weight
    conv1d = _conv1d_cls()
    transposed = conv1d is not None and isinstance(base, conv1d)
    with _gathered([weight, lora_A, lora_B], modifier_rank=0):
        A = A.to(device=lora_A.device, dtype=lora_A.dtype)
        B = B.to(device=lora_B.device, dtype=lora_B.dtype)
        acc = torch.float64 if torch.float64 in (weight.dtype, A.dtype) else torch.float32
        offset = s * (B.to(acc) @ A.to(acc))
        if transposed:
            offset = offset.T
        with torch.no_grad():
            lora_A.copy_(A)
            lora_B.copy_(B)
            weight.copy_((weight.to(acc) - offset.to(weight.device)).to(weight.dtype))
    return B, A


def reoffset(
    layer: nn.Module, adapter_name: str, old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]
) -> None:
    """Move the frozen weight's offset from init ``old`` (B0, A0) to ``new``: W <- W + s*(B0 A0 - B0' A0')."""
    if all(torch.equal(o.cpu(), n.cpu()) for o, n in zip(old, new)):
        return
    base = layer.get_base_layer()
    weight = base.weight
    s = layer.scaling[adapter_name]
    conv1d = _conv1d_cls()
    with _gathered([weight], modifier_rank=0):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dev = weight.device
        delta = s * (old[0].to(dev, acc) @ old[1].to(dev, acc) - new[0].to(dev, acc) @ new[1].to(dev, acc))
        if conv1d is not None and isinstance(base, conv1d):
            delta = delta.T
        with torch.no_grad():
            weight.copy_((weight.to(acc) + delta).to(weight.dtype))


def initialize_loraga(
    peft_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    adapter_name: str = "default",
    *,
    show_progress: bool = True,
    init_from: str | None = None,
) -> dict[str, Any]:
    """``hfx.initialize`` for a ``LoraGAConfig`` adapter; returns a summary dict.

    ``init_from``: a directory saved by ``save_pretrained`` (export ``relative_to_base``) of this model; take the
    initial A_0/B_0 from it instead of estimating (no batches needed): the way to rebuild the training state, e.g.
    before ``trainer.train(resume_from_checkpoint=...)``.
    """
    from peft import PeftModel

    from .export import install_load_hook, read_export_init, refuse_lora_conversion

    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, LoraGAConfig):
        raise TypeError(f"adapter {adapter_name!r} is not a LoraGAConfig adapter.")
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"LoRA-GA needs the PeftModel from peft.get_peft_model(base, LoraGAConfig(...)); got "
            f"{type(peft_model).__name__} with adapters from transformers' add_adapter or "
            "peft.inject_adapter_in_model. Such a model saves through transformers, which writes adapter_config.json "
            "before the weights, so the adapter could not be exported relative to the original base weights and a "
            "reload onto that base would give other outputs."
        )
    if config._loraga_init:
        raise RuntimeError(
            f"LoRA-GA: adapter {adapter_name!r} is already initialised (its base weights carry the offset); build "
            "the model again to re-initialise."
        )
    # set below by every init; kept on the model since the offset outlives the adapter (e.g. delete_adapter)
    offset_by = list(getattr(peft_model, "_hfx_loraga_offset_by", []))
    if offset_by:
        raise RuntimeError(
            f"LoRA-GA: adapter {offset_by[0]!r} of this model is already LoRA-GA-initialised, so the base weights carry "
            f"its offset; initialising {adapter_name!r} too would offset them again, which changes {offset_by[0]!r}'s "
            f"outputs and makes {adapter_name!r} save relative to an offset base. Use one LoRA-GA adapter per model: "
            f"save {offset_by[0]!r}, then build {adapter_name!r} on a freshly loaded base model."
        )
    start = time.perf_counter()
    layers = target_layers(peft_model, adapter_name)
    others = sorted({o for _, layer in layers for o in layer.lora_A if o != adapter_name})
    if others:
        warnings.warn(
            f"LoRA-GA[{adapter_name}]: the offset W <- W - s*B*A goes into base weights that adapter(s) {others} share, "
            "so their outputs change, and they save relative to the offset base. Initialise LoRA-GA on a model "
            "without other adapters on its target layers.",
            stacklevel=3,
        )
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    summary: dict[str, Any] = {"method": "lora_ga", "layers": len(layers)}
    if init_from is not None:
        factors = read_export_init(init_from, layers, adapter_name)
        summary.update(batches=0, passes=0, init_from=init_from)
    else:
        # checked before the gradient pass (it used to fail after it, naming no layer)
        too_big = []
        for name, layer in layers:
            m, n = _out_in(layer.get_base_layer())
            if 2 * layer.r[adapter_name] > min(m, n):
                too_big.append(f"{name} (r={layer.r[adapter_name]}, {m}x{n})")
        if too_big:
            raise ValueError(
                "LoRA-GA needs 2r <= min(out, in) to take 2r singular vectors; too large for "
                + ", ".join(too_big[:6])
                + (f" and {len(too_big) - 6} more" if len(too_big) > 6 else "")
                + ". Lower `r`, or give these layers a smaller rank in `rank_pattern`."
            )
        per_pass = config.max_layers_per_pass or len(layers)
        groups = [layers[i : i + per_pass] for i in range(0, len(layers), per_pass)]
        if len(groups) > 1 and iter(batches) is batches:
            raise TypeError(
                "LoRA-GA with max_layers_per_pass needs re-iterable batches (a DataLoader or a list), not an iterator."
            )
        captured = []
        n_batches = 0
        needs_weight = config.scale == "weightS" or config.norm_clip
        for i, group in enumerate(groups):
            desc = "LoRA-GA gradient" + (f" (pass {i + 1}/{len(groups)})" if len(groups) > 1 else "")
            grads, n_batches = estimate_gradients(
                peft_model, batches, group, iters=config.iters, show_progress=show_progress, desc=desc
            )
            for name, layer in group:
                g = grads.pop(name)
                check_gradient(name, g, n_batches)
                weight = layer.get_base_layer().weight if needs_weight else None
                with _gathered([weight], modifier_rank=None) if needs_weight else nullcontext():
                    B, A, S = loraga_factors(g, layer.r[adapter_name], layer.scaling[adapter_name], config, weight)
                if _is_distributed():  # identical inputs give identical SVDs, but make sure: rank 0's wins
                    B, A = B.contiguous(), A.contiguous()
                    torch.distributed.broadcast(B, 0)
                    torch.distributed.broadcast(A, 0)
                total = float((S.double() ** 2).sum())
                captured.append(float((S[: 2 * layer.r[adapter_name]].double() ** 2).sum()) / total if total else 0.0)
                factors[name] = (B, A)
                del g
        summary.update(
            batches=n_batches,
            passes=len(groups),
            grad_energy_top2r=sum(captured) / len(captured),
        )
    peft_model._hfx_loraga_offset_by = [adapter_name]
    for name, layer in layers:
        B, A = apply_factors(layer, adapter_name, *factors[name])
        config._loraga_init[name] = (B.detach().cpu().clone(), A.detach().cpu().clone())
        install_load_hook(layer, name, adapter_name, config)
        refuse_lora_conversion(layer)
    mark_initialized(config)
    summary.update(
        direction=config.direction,
        scale=config.scale,
        rank=config.r,
        time_s=round(time.perf_counter() - start, 3),
    )
    if show_progress and _is_main():
        energy = summary.get("grad_energy_top2r")
        extra = f", top-2r gradient energy {energy:.1%}" if energy is not None else ""
        print(
            f"LoRA-GA[{adapter_name}]: {len(layers)} layers, r={config.r}, {summary['batches']} batches, "
            f"direction {config.direction}, scale {config.scale}{extra}, {summary['time_s']:.2f}s"
        )
    return summary
