"""Pure-PyTorch chunked linear cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without the N×V logits.

This is the ground truth for hfx's CCE path and runs on any device. A custom :class:`torch.autograd.Function` walks
the (token chunk × vocabulary block) tiles of the logits, so the largest temporary is one tile, sized from a memory
budget in bytes:

* **forward** keeps, per token, only the log-sum-exp (merged across vocabulary blocks with ``logaddexp``), the
  target logit (an indexed dot product ``h_i · W[y_i]``) and, for label smoothing, the sum of the logits;
* **backward** recomputes each tile's logits, forms ``dL/dz = w_i·(p·(1 + 2·λ·lse) − (1−ε)·onehot(y) − ε/V)`` and
  the softcap chain rule, and accumulates ``dhidden``, ``dweight`` and ``dbias`` with one matmul each.

Ignored tokens (``ignore_index``) are dropped before the Function runs, so they cost nothing. Arithmetic is done
in float32 for bfloat16/float16 inputs (float64 stays float64, which is what the tests compare against).

Per-token loss, with ``z = softcap(h·Wᵀ + b) / temperature`` and ``lse = logsumexp(z)``::

    ℓ_i = lse_i − (1−ε)·z_{i,y_i} − (ε/V)·Σ_j z_ij + λ·lse_i²

which is ``F.cross_entropy(z, y, label_smoothing=ε)`` per token plus the z-loss ``λ·lse²`` (PaLM).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_CHUNK_BYTES", "ChunkPlan", "linear_cross_entropy", "linear_log_probs", "plan_chunks"]

#: Default memory budget for the chunk-sized temporaries (logit tiles, upcast weight blocks); env override
#: ``HFX_CCE_CHUNK_BYTES``.
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Logit-sized temporaries alive at once in one tile of the backward (logits, probabilities, gradient).
_TILE_TEMPORARIES = 3
# Keep at least this many tokens per chunk before splitting the vocabulary further (matmul efficiency).
_MIN_TOKEN_CHUNK = 32
_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class ChunkPlan:
    """Tile sizes for one call: ``token_chunk`` rows × ``vocab_chunk`` columns of logits at a time."""

    token_chunk: int
    vocab_chunk: int


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def plan_chunks(
    num_tokens: int,
    vocab_size: int,
    hidden_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype | None = None,
    chunk_bytes: int | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> ChunkPlan:
    """Derive tile sizes from a memory budget (bytes) instead of hard-coding them.

    The budget bounds the logit tiles (``_TILE_TEMPORARIES`` tiles of ``token_chunk × vocab_chunk`` elements in the
    compute dtype) and, when the weight must be upcast (bf16/fp16 → fp32), the upcast weight block plus its fp32
    gradient accumulator (``2 × vocab_chunk × hidden_size``). The vocabulary is split only when one token chunk of at
    least ``_MIN_TOKEN_CHUNK`` rows × V would not fit. Explicit ``token_chunk`` / ``vocab_chunk`` override the plan.
    """
    if chunk_bytes is None:
        chunk_bytes = int(os.environ.get("HFX_CCE_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    cdtype = _compute_dtype(dtype)
    elem = torch.finfo(cdtype).bits // 8
    tile_elems = max(1, chunk_bytes // (elem * _TILE_TEMPORARIES))
    num_tokens = max(1, num_tokens)

    if vocab_chunk is None:
        vocab_chunk = vocab_size
        if (weight_dtype or dtype) != cdtype:  # upcast weight block + its fp32 gradient accumulator
            vocab_chunk = min(vocab_chunk, max(1, chunk_bytes // (2 * hidden_size * elem)))
        rows = token_chunk or min(num_tokens, _MIN_TOKEN_CHUNK)
        vocab_chunk = min(vocab_chunk, max(1, tile_elems // rows))
    vocab_chunk = max(1, min(vocab_chunk, vocab_size))
    if token_chunk is None:
        token_chunk = max(1, tile_elems // vocab_chunk)
    token_chunk = max(1, min(token_chunk, num_tokens))
    return ChunkPlan(token_chunk=token_chunk, vocab_chunk=vocab_chunk)


def _tile_logits(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final logits of one tile, and ``tanh(u/s)`` when softcapping (needed for the chain rule)."""
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()
        z = t * softcap
    if temperature != 1.0:
        z = z.div_(temperature) if t is None else z.div(temperature)
    return z, t


def _without_autocast(fn):
    """Run an autograd ``forward``/``backward`` with autocast off: the arithmetic is in the compute dtype by design,
    and under autocast the forward's tile GEMMs ran in bfloat16 while the target logit and the backward stayed in
    float32, so ``softmax - onehot`` no longer summed to zero (a biased gradient)."""

    @functools.wraps(fn)
    def run(ctx, tensor, *args):
        with torch.autocast(tensor.device.type, enabled=False):
            return fn(ctx, tensor, *args)

    return run


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses (M,) of the M valid tokens; see the module docstring for the formula."""

    @staticmethod
    @_without_autocast
    def forward(ctx, hidden, weight, bias, labels, softcap, temperature, label_smoothing, z_loss, plan):
        cdtype = _compute_dtype(hidden.dtype)
        m, v = hidden.shape[0], weight.shape[0]
        lse = torch.full((m,), -math.inf, dtype=cdtype, device=hidden.device)
        zsum = torch.zeros((m,), dtype=cdtype, device=hidden.device) if label_smoothing else None
        for v0 in range(0, v, plan.vocab_chunk):
            w = weight[v0 : v0 + plan.vocab_chunk].to(cdtype)
            b = None if bias is None else bias[v0 : v0 + plan.vocab_chunk].to(cdtype)
            for t0 in range(0, m, plan.token_chunk):
                z, _ = _tile_logits(hidden[t0 : t0 + plan.token_chunk].to(cdtype), w, b, softcap, temperature)
                t1 = t0 + z.shape[0]
                lse[t0:t1] = torch.logaddexp(lse[t0:t1], torch.logsumexp(z, dim=1))
                if zsum is not None:
                    zsum[t0:t1] += z.sum(dim=1)
                del z

        # Target logits: an indexed dot product h_i · W[y_i] (+ b[y_i]), in token chunks (the gather is chunk × H).
        zy = torch.empty((m,), dtype=cdtype, device=hidden.device)
        for t0 in range(0, m, plan.token_chunk):
            y = labels[t0 : t0 + plan.token_chunk]
            u = (hidden[t0 : t0 + plan.token_chunk].to(cdtype) * weight[y].to(cdtype)).sum(dim=1)
            if bias is not None:
                u = u + bias[y].to(cdtype)
            if softcap is not None:
                u = torch.tanh(u / softcap) * softcap
            zy[t0 : t0 + y.shape[0]] = u / temperature

        loss = lse - (1.0 - label_smoothing) * zy
        if zsum is not None:
            loss = loss - (label_smoothing / v) * zsum
        if z_loss:
            loss = loss + z_loss * lse.square()

        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (softcap, temperature, label_smoothing, z_loss, plan)
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        softcap, temperature, eps, z_loss, plan = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cdtype = lse.dtype
        m, v = hidden.shape[0], weight.shape[0]

        g = grad_loss.to(cdtype)  # dL/dℓ_i
        p_scale = (g * (1.0 + 2.0 * z_loss * lse)).unsqueeze(1) if z_loss else g.unsqueeze(1)
        onehot_scale = g * (1.0 - eps)
        smooth = (g * (eps / v)).unsqueeze(1) if eps else None
        dh = torch.zeros((m, hidden.shape[1]), dtype=cdtype, device=hidden.device) if need_h else None
        direct_w = weight.dtype == cdtype
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros((v,), dtype=cdtype, device=hidden.device) if need_b else None

        for v0 in range(0, v, plan.vocab_chunk):
            v1 = min(v, v0 + plan.vocab_chunk)
            w = weight[v0:v1].to(cdtype)
            b = None if bias is None else bias[v0:v1].to(cdtype)
            dw_blk = None
            if need_w:
                dw_blk = (
                    dw[v0:v1] if direct_w else torch.zeros((v1 - v0, weight.shape[1]), dtype=cdtype, device=w.device)
                )
            for t0 in range(0, m, plan.token_chunk):
                t1 = min(m, t0 + plan.token_chunk)
                h = hidden[t0:t1].to(cdtype)
                z, t = _tile_logits(h, w, b, softcap, temperature)
                # dL/dz = w·(1 + 2λ·lse)·softmax − w·(1−ε)·onehot − w·ε/V   (z is overwritten in place)
                dz = z.sub_(lse[t0:t1].unsqueeze(1)).exp_().mul_(p_scale[t0:t1])
                if smooth is not None:
                    dz.sub_(smooth[t0:t1])
                y = labels[t0:t1]
                # the label's column, where it lies in this chunk; elsewhere −0.0 into column 0 (exact: x + (−0) = x),
                # so that no host sync (hit.any(), boolean indexing) stalls a GPU at every tile
                hit = (y >= v0) & (y < v1)
                col = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
                dz.scatter_add_(1, col, torch.where(hit, -onehot_scale[t0:t1], -0.0).to(dz.dtype).unsqueeze(1))
                if temperature != 1.0:
                    dz.div_(temperature)
                if t is not None:  # d(s·tanh(u/s))/du = 1 − tanh²
                    dz.mul_(1.0 - t.square_())
                if need_h:
                    dh[t0:t1].addmm_(dz, w)
                if need_w:
                    dw_blk.addmm_(dz.T, h)
                if need_b:
                    db[v0:v1] += dz.sum(dim=0)
                del z, dz, t
            if need_w and not direct_w:
                dw[v0:v1] = dw_blk
        return (
            None if dh is None else dh.to(hidden.dtype),
            dw,
            None if db is None else db.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_and_flatten(hidden, weight, labels, bias, ignore_index, shift, shift_labels=None):
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"expected hidden (..., H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden has {hidden.shape[-1]} features but weight is {tuple(weight.shape)} (V, H)"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer class indices, got dtype {labels.dtype} (probability targets are not supported)"
        )
    if labels.dtype not in (torch.int32, torch.int64):  # uint8 would index as a mask, int16 is no index dtype
        labels = labels.long()
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match the vocabulary size {vocab} of weight")
    if isinstance(shift, bool) or shift is None:
        offset = int(bool(shift))
    elif isinstance(shift, int) and shift >= 0:
        offset = shift
    else:
        raise ValueError(
            f"shift must be a bool (True: score position t against label t+1, as transformers' ForCausalLMLoss) or "
            f"an int k >= 0 (label t+k, as cut_cross_entropy), got {shift!r}"
        )
    if offset:
        if labels.dim() < 1:
            raise ValueError("shift needs labels with a sequence dimension")
        pad = labels.new_full((*labels.shape[:-1], min(offset, labels.shape[-1])), ignore_index)
        labels = torch.cat([labels[..., offset:], pad], dim=-1)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    bad = valid & ((flat_labels < 0) | (flat_labels >= vocab))
    if bool(bad.any()):
        offending = flat_labels[bad][:5].tolist()
        raise ValueError(
            f"labels out of range for a vocabulary of {vocab} (weight has {vocab} rows): e.g. {offending}; "
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}"
        )
    return hidden.reshape(-1, hidden.shape[-1]), flat_labels, valid, labels.shape


def _check_options(reduction, softcap, label_smoothing, z_loss, temperature, num_items_in_batch):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not 0 < softcap < math.inf:
        raise ValueError(f"softcap must be a positive finite number or None (no capping), got {softcap}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError(
            "num_items_in_batch normalises a summed loss; it cannot be combined with reduction='none' "
            "(use reduction='mean' or 'sum', or divide the per-token losses yourself)"
        )


def check_filter_eps(filter_eps: float | str | None) -> float | str | None:
    """Validate the Triton kernel's ``filter_eps`` here too, so that a bad value is refused on every device alike
    (the reference is exact and does not use it)."""
    if filter_eps is None or filter_eps == "auto":
        return filter_eps
    if isinstance(filter_eps, (str, bool)) or not isinstance(filter_eps, (int, float)) or not 0 < filter_eps < 1:
        raise ValueError(f"filter_eps must be None, 'auto' or a float in (0, 1), got {filter_eps!r}")
    return float(filter_eps)


def _per_token(
    hidden,
    weight,
    labels,
    bias,
    *,
    ignore_index,
    shift,
    softcap,
    temperature,
    label_smoothing,
    z_loss,
    chunk_bytes,
    token_chunk,
    vocab_chunk,
):
    h, y, valid, out_shape = _check_and_flatten(hidden, weight, labels, bias, ignore_index, shift)
    h_valid = h[valid]
    plan = plan_chunks(
        h_valid.shape[0],
        weight.shape[0],
        weight.shape[1],
        dtype=hidden.dtype,
        weight_dtype=weight.dtype,
        chunk_bytes=chunk_bytes,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )
    per_valid = _LinearCrossEntropyFunction.apply(
        h_valid,
        weight,
        bias,
        y[valid],
        None if softcap is None else float(softcap),
        float(temperature),
        float(label_smoothing),
        float(z_loss),
        plan,
    )
    return per_valid, valid, out_shape


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool | int = False,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising the logits.

    Defaults match ``F.cross_entropy(hidden @ weight.T + bias, labels)`` (``ignore_index=-100``, ``reduction="mean"``,
    no shift); the result is float32 for half-precision inputs (accumulated in fp32), else the input dtype.

    Args:
        hidden: ``(..., H)`` hidden states.
        weight: ``(V, H)`` classifier (``lm_head.weight``).
        labels: integer classes with shape ``hidden.shape[:-1]``; ``ignore_index`` entries contribute nothing.
        bias: optional ``(V,)`` bias.
        reduction: ``"mean"`` (over non-ignored tokens), ``"sum"`` or ``"none"`` (shape of ``labels``, 0 where
            ignored).
        shift: next-token prediction as in transformers' ``ForCausalLMLoss``: position t is scored against
            ``labels[..., t + 1]`` and the last position is ignored; an int k scores it against ``labels[..., t + k]``
            (the last k positions ignored), as ``cut_cross_entropy``'s integer shift.
        softcap: Gemma-2 style ``softcap · tanh(logits / softcap)`` applied before the softmax.
        label_smoothing: ε as in ``F.cross_entropy``.
        z_loss: λ of the auxiliary ``λ · logsumexp(logits)²`` term (per token, reduced like the loss).
        temperature: logits are divided by it (after the softcap).
        num_items_in_batch: when given, the summed loss is divided by it — transformers' gradient-accumulation
            normalisation (``fixed_cross_entropy``); not allowed with ``reduction="none"``.
        chunk_bytes: memory budget for the chunk temporaries (default ``DEFAULT_CHUNK_BYTES`` or
            ``$HFX_CCE_CHUNK_BYTES``); ``token_chunk`` / ``vocab_chunk`` override the derived tile sizes.
    """
    _check_options(reduction, softcap, label_smoothing, z_loss, temperature, num_items_in_batch)
    per_valid, valid, out_shape = _per_token(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        shift=shift,
        softcap=softcap,
        temperature=temperature,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_bytes=chunk_bytes,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )
    return _reduce(per_valid, valid, out_shape, reduction, num_items_in_batch)


def _reduce(per_valid, valid, out_shape, reduction, num_items_in_batch):
    """Per-valid-token losses to the requested reduction (shared with the Triton path)."""
    if reduction == "none":
        return per_valid.new_zeros(valid.shape).masked_scatter(valid, per_valid).view(out_shape)
    total = per_valid.sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / per_valid.shape[0]  # 0/0 = nan with no valid token, like F.cross_entropy


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool | int = False,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Per-token ``log p(label)`` under ``softmax(softcap(hidden @ weight.T + bias) / temperature)``, differentiable.

    What DPO / GRPO need from the LM head, without the N×V logits. Returns a tensor shaped like ``labels`` (float32
    for half inputs), 0 at ignored positions (and at the last ``shift`` positions).
    """
    _check_options("none", softcap, 0.0, 0.0, temperature, None)
    per_valid, valid, out_shape = _per_token(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        shift=shift,
        softcap=softcap,
        temperature=temperature,
        label_smoothing=0.0,
        z_loss=0.0,
        chunk_bytes=chunk_bytes,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )
    return (-per_valid).new_zeros(valid.shape).masked_scatter(valid, -per_valid).view(out_shape)
