"""Fused PaCA and Bone linear layers: one Triton GEMM with the adapter folded into the weight-tile loads.

Both adapters are a structured update of the frozen weight, ``W_eff = W0 + ΔW``, so the whole layer is one GEMM if
``ΔW`` is added to each ``W0`` tile as it is loaded — ``W0`` is never written (ZeRO/FSDP-safe), no dense ``ΔW`` is
formed, and neither the unfused path's second pass over ``x`` nor its output-sized add remains:

* PaCA: ``ΔW[:, i] = δ[:, slot(i)]`` for the ``r`` trained columns (``slot(i) = −1`` elsewhere), ``δ = s·P − W0[:, idx]``
  (``out × r``, tiny). Forward ``y = x·W_effᵀ``; backward ``dx = dy·W_eff`` (same kernel, transposed tile) and
  ``dP = s·dyᵀ·x[:, idx]`` — only ``x[:, idx]`` (``T × r``) is kept for backward, PaCA's memory saving.
* Bone: ``ΔW[o, i] = B[i mod r, o]`` (``B``: ``r × out``); forward and ``dx`` likewise, ``dB = fold_r(x)ᵀ·dy`` with
  ``fold_r(x)`` (``T × r``) the only saved activation.

Ground truth: :mod:`hfx.kernels.adapter.reference`. Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (CI).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_utils import INTERPRET, check_device, dot_precision, launch, supported_dtype

__all__ = ["bone_linear", "paca_linear"]

_BLOCK_M = 16 if INTERPRET else 128
_BLOCK_N = 16 if INTERPRET else 128
_BLOCK_K = 16 if INTERPRET else 64


def block_k(dtype: torch.dtype) -> int:
    """K tile: 64 for half precision; 32 for float32, whose 3-stage 128×128×64 pipeline would need 256 KiB of
    shared memory (over sm_90's 227 KiB — tests/kernels/aot_compile.py measures it)."""
    return _BLOCK_K if INTERPRET or dtype != torch.float32 else 32


_GROUP_M = 8
_WARPS = 8
_STAGES = 3

_PLAIN, _PACA, _BONE = 0, 1, 2


@triton.jit
def _adapted_mm_kernel(
    A,
    W,
    OUT,
    BIAS,
    DELTA,
    SLOT,
    M,
    N,
    K,
    OUT_F,
    R,
    stride_am,
    stride_w,
    stride_om,
    MODE: tl.constexpr,
    K_IS_IN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``OUT = A · W_effᵀ (+ bias)`` when ``K_IS_IN`` (forward: K = in, N = out), else ``OUT = A · W_eff`` (dx).

    ``W`` is ``out × in`` (row stride ``stride_w``). MODE 1 (PaCA) adds ``DELTA[o, SLOT[i]]`` where ``SLOT[i] ≥ 0``;
    MODE 2 (Bone) adds ``DELTA[i mod R, o]`` (``DELTA`` = B, ``R × OUT_F``).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # grouped ordering: programs sharing a W panel run together (L2 reuse)
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if K_IS_IN:  # tile rows are input features i, columns output features o
            i2 = offs_k[:, None]
            o2 = offs_n[None, :]
            mask_i = mask_k[:, None]
        else:  # tile rows are output features o, columns input features i
            i2 = offs_n[None, :]
            o2 = offs_k[:, None]
            mask_i = mask_n[None, :]
        tile_mask = mask_k[:, None] & mask_n[None, :]
        w = tl.load(W + o2.to(tl.int64) * stride_w + i2, mask=tile_mask, other=0.0)
        if MODE == 1:
            # the mask has the pointer's shape: Triton 3.2 broadcasts a mask to its pointer, never the other way
            slot = tl.load(SLOT + i2, mask=mask_i, other=-1)
            d = tl.load(DELTA + o2 * R + slot, mask=tile_mask & (slot >= 0), other=0.0)
            w = (w.to(tl.float32) + d.to(tl.float32)).to(W.dtype.element_ty)
        if MODE == 2:
            d = tl.load(DELTA + (i2 % R) * OUT_F + o2, mask=tile_mask, other=0.0)
            w = (w.to(tl.float32) + d.to(tl.float32)).to(W.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _adapted_mm(
    a: torch.Tensor,
    weight: torch.Tensor,
    *,
    mode: int,
    k_is_in: bool,
    delta: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    r: int = 1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a · W_effᵀ`` (``k_is_in``) or ``a · W_eff`` as one kernel launch; ``a`` is ``M × K``, contiguous rows."""
    out_f, in_f = weight.shape
    m, k = a.shape
    n = out_f if k_is_in else in_f
    if k != (in_f if k_is_in else out_f):
        raise ValueError(f"shape mismatch: input has {k} features, weight is {tuple(weight.shape)}")
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, _BLOCK_M) * triton.cdiv(n, _BLOCK_N),)
    dummy = weight
    launch(
        _adapted_mm_kernel, grid,
        a, weight, out, bias if bias is not None else dummy, delta if delta is not None else dummy,
        slot if slot is not None else dummy, m, n, k, out_f, r, a.stride(0), weight.stride(0), out.stride(0),
        MODE=mode, K_IS_IN=k_is_in, HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        BLOCK_K=block_k(a.dtype), GROUP_M=_GROUP_M, UPCAST=INTERPRET, PRECISION=dot_precision(a.dtype),
        num_warps=_WARPS, num_stages=_STAGES,
    )  # fmt: skip
    return out


def _check(x: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    check_device(x, weight)
    if not (supported_dtype(x.dtype) and supported_dtype(weight.dtype)):
        raise ValueError(
            f"fused {what} takes float32/float16/bfloat16 tensors, got x {x.dtype}, weight {weight.dtype}"
        )
    if weight.requires_grad:
        raise ValueError(f"fused {what} expects a frozen base weight (it computes no gradient for W0)")
    if weight.stride(1) != 1:
        raise ValueError(f"fused {what} needs a base weight with contiguous rows")


def _paca_delta(p: torch.Tensor, orig: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s·(P − W0[:, idx]/s)``, out × r, float32 (the tuner's ``_column_delta``)."""
    diff = p.float() - orig.float() / scaling if scaling != 1 else p.float() - orig.float()
    return (diff * scaling if scaling != 1 else diff).contiguous()


def _slots(indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse column map: ``slot[i] = j`` where ``indices[j] = i``, else −1 (int32, rebuilt rather than saved)."""
    slot = torch.full((in_features,), -1, dtype=torch.int32, device=indices.device)
    slot[indices] = torch.arange(indices.numel(), dtype=torch.int32, device=indices.device)
    return slot


class _PacaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p, orig, indices, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        delta = _paca_delta(p, orig, scaling)
        slot = _slots(indices, weight.shape[1])
        y = _adapted_mm(x2, weight, mode=_PACA, k_is_in=True, delta=delta, slot=slot, r=p.shape[1], bias=bias)
        ctx.save_for_backward(x2.index_select(1, indices), weight, p, orig, indices)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x_idx, weight, p, orig, indices = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        dx = dp = db = None
        if ctx.needs_input_grad[0]:
            delta = _paca_delta(p, orig, ctx.scaling)
            slot = _slots(indices, weight.shape[1])
            dx = _adapted_mm(g2, weight, mode=_PACA, k_is_in=False, delta=delta, slot=slot, r=p.shape[1])
            dx = dx.view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[3]:
            dp = g2.to(p.dtype).T @ x_idx.to(p.dtype)
            if ctx.scaling != 1:
                dp = dp * ctx.scaling
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(dim=0, dtype=torch.float32)
        return dx, None, db, dp, None, None, None


class _BoneLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, block):
        shape = x.shape
        r = block.shape[0]
        x2 = x.reshape(-1, shape[-1]).contiguous()
        blk = block.contiguous()
        y = _adapted_mm(x2, weight, mode=_BONE, k_is_in=True, delta=blk, r=r, bias=bias)
        pad = (-x2.shape[1]) % r
        folded = torch.nn.functional.pad(x2, (0, pad)) if pad else x2
        folded = folded.view(x2.shape[0], -1, r).sum(dim=1, dtype=torch.float32)  # fold_r(x), T × r
        ctx.save_for_backward(folded, weight, blk)
        ctx.has_bias = bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        folded, weight, blk = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        dx = dblk = db = None
        if ctx.needs_input_grad[0]:
            dx = _adapted_mm(g2, weight, mode=_BONE, k_is_in=False, delta=blk, r=blk.shape[0])
            dx = dx.view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[3]:
            dblk = (folded.T @ g2.float()).to(blk.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(dim=0, dtype=torch.float32)
        return dx, None, db, dblk


def _autocast_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The GEMM's operand dtype: autocast's when it is on (as ``F.linear`` would run), else the base weight's."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def paca_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    p: torch.Tensor,
    orig: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """PaCA layer ``x·W_effᵀ + b`` as one fused GEMM in the base weight's dtype (autocast's when it is on, like
    ``F.linear``); gradients for ``x``, ``P``, ``b``."""
    _check(x, weight, "PaCA")
    x, weight, bias = _autocast_inputs(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return _PacaLinear.apply(x, weight, bias, p, orig, indices, float(scaling))


def bone_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: torch.Tensor) -> torch.Tensor:
    """Bone layer ``x·(W0 + ΔW)ᵀ + b`` as one fused GEMM in the base weight's dtype (autocast's when it is on);
    gradients for ``x``, ``B``, ``b``."""
    _check(x, weight, "Bone")
    x, weight, bias = _autocast_inputs(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return _BoneLinear.apply(x, weight, bias, block)
