"""Triton CCE: linear cross-entropy without the N×V logits, lock-free, with the reference's options.

Same signature and results as :func:`hfx.kernels.cce.reference.linear_cross_entropy` (softcap, temperature, label
smoothing, z-loss, ignore_index, shift, reductions, ``num_items_in_batch``), plus ``filter_eps`` / ``sort_vocab``.

* **Forward** — one kernel over (token block × vocabulary split): each program computes its logit tiles with a
  K-loop over H (``tl.dot``, fp32 accumulator), applies bias/softcap/temperature in the epilogue and keeps a running
  max and sum of exponentials, the target logit and (label smoothing) the logit sum. Each split writes its partial
  row statistics to its own slot, merged afterwards with a log-sum-exp: no locks, no atomics, deterministic, and no
  logit is ever stored.
* **Backward** — per vocabulary chunk (a memory budget, ``chunk_bytes``): one kernel recomputes the chunk's logit
  tiles and writes ``dL/du`` (softmax − one-hot, with every option's terms and chain rules) for the chunk only; then
  ``dh += dU · W_c`` into an fp32 accumulator and ``dW_c = dUᵀ · h``. Each row of ``dW`` is produced by one GEMM that
  reduces over all tokens in fp32 registers and is written once — fp32 accumulation of ``dW`` without locks,
  atomics or an fp32 copy of ``dW``. The GEMMs are cuBLAS (dense) or, with ``filter_eps``, a Triton block-sparse
  GEMM that skips every (token × vocabulary) tile whose ``|softmax − onehot|`` stays below ``filter_eps`` (CCE's
  gradient filter), with the vocabulary sorted by mean logit so that negligible columns share tiles. In float16,
  ``dL/du`` is stored per unit of a power-of-two scale of the upstream gradient (:func:`grad_scale`) and the GEMM
  results are scaled back in fp32, so a ~1/N upstream gradient does not underflow it without a GradScaler.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (float32/float16; CI tests them against the
reference).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from .._triton_utils import INTERPRET, check_device, device_supports, dot_precision, launch, supported_dtype, tanh
from . import reference
from .reference import DEFAULT_CHUNK_BYTES

__all__ = ["linear_cross_entropy", "linear_log_probs", "supports"]

# Row offsets are widened to int64 before they meet a stride: V·H or N·V elements can pass 2^31 (e.g. V = 256k at
# H = 8192). Tile sizes: one configuration (the interpreter cannot autotune over several); GPU tuning is open (RESULTS.md).
_BLOCK_M = 16 if INTERPRET else 128
_BLOCK_V = 16 if INTERPRET else 128
_BLOCK_D = 16 if INTERPRET else 64
_BLOCK_N = 16 if INTERPRET else 128  # output columns (H) of the block-sparse GEMM


def block_d(dtype: torch.dtype) -> int:
    """K tile (over H) of the logit kernels: 64 for half precision, 32 for float32 (shared memory, as above)."""
    return _BLOCK_D if INTERPRET or dtype != torch.float32 else 32


_WARPS = 8
_STAGES = 3
# Use the block-sparse GEMMs when at most this fraction of the tiles survives the filter, cuBLAS otherwise.
_SPARSE_MAX_DENSITY = 0.5

#: Diagnostics of the last backward (for benchmarks): the fraction of gradient tiles the filter kept (None without
#: a filter) and the vocabulary chunk used.
LAST_BACKWARD: dict[str, Any] = {"filter_density": None, "vocab_chunk": None}


def supports(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether these inputs can run on the kernels: device, and one dtype for both (``tl.dot`` takes no mixed
    operands, e.g. a float32 head under bfloat16 autocast; the reference handles those)."""
    on_device = hidden.is_cuda or (INTERPRET and hidden.device.type == "cpu")
    dtypes_ok = supported_dtype(hidden.dtype) and hidden.dtype == weight.dtype
    return on_device and dtypes_ok and device_supports(hidden) and device_supports(weight)


@triton.jit
def _logit_tile(
    E,
    C,
    B,
    stride_e,
    stride_c,
    offs_m,
    mask_m,
    cols,
    mask_v,
    D,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits ``z = softcap(e·cᵀ + b) / T`` of one tile (−inf outside the vocabulary) and ``tanh(u/s)``."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        e = tl.load(
            E + offs_m[:, None].to(tl.int64) * stride_e + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        c = tl.load(
            C + cols[None, :].to(tl.int64) * stride_c + offs_d[:, None],
            mask=mask_v[None, :] & mask_d[:, None],
            other=0.0,
        )
        if UPCAST:
            e = e.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(e, c, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        t = tanh(acc / softcap)
        acc = t * softcap
    z = acc * inv_temp
    z = tl.where(mask_v[None, :], z, -float("inf"))
    return z, t


@triton.jit
def _forward_kernel(
    E,
    C,
    B,
    Y,
    PART_MAX,
    PART_SUM,
    PART_ZY,
    PART_ZSUM,
    COLSUM,
    M,
    V,
    D,
    stride_e,
    stride_c,
    v_per_split,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_COLSUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial row statistics of one (token block, vocabulary split): max, Σexp, target logit, Σz."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    y = tl.load(Y + offs_m, mask=mask_m, other=-1)
    run_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask_v = cols < v_end
        z, _ = _logit_tile(
            E, C, B, stride_e, stride_c, offs_m, mask_m, cols, mask_v, D, softcap, inv_temp,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )  # fmt: skip
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # While every logit so far is −inf (a −inf bias over a whole tile), exp(−inf − (−inf)) would be NaN.
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
        run_max = new_max
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if HAS_SMOOTH:
            zsum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
        if HAS_COLSUM:  # column sums of the logits, for the vocabulary sort of the filtered backward
            tl.atomic_add(
                COLSUM + cols, tl.sum(tl.where(mask_m[:, None] & mask_v[None, :], z, 0.0), axis=0), mask=mask_v
            )
    out = pid_s * M + offs_m
    tl.store(PART_MAX + out, run_max, mask=mask_m)
    tl.store(PART_SUM + out, run_sum, mask=mask_m)
    tl.store(PART_ZY + out, zy, mask=mask_m)
    if HAS_SMOOTH:
        tl.store(PART_ZSUM + out, zsum, mask=mask_m)


@triton.jit
def _grad_logits_kernel(
    E,
    C,
    B,
    Y,
    LSE,
    P_SCALE,
    Y_SCALE,
    SMOOTH,
    PERM,
    DZ,
    FLAGS,
    M,
    D,
    c0,
    c1,
    stride_e,
    stride_c,
    stride_dz,
    stride_flags,
    softcap,
    inv_temp,
    filter_eps,
    filter_y,
    filter_smooth,
    filter_z,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dL/du`` for the vocabulary chunk ``[c0, c1)`` (in sorted order with ``PERM``) and its tile filter flags.

    ``dL/dz = P_SCALE·softmax − Y_SCALE·onehot − SMOOTH`` (per row: g·(1+2λ·lse), g·(1−ε), g·ε/V), then ``/T`` and
    ``·(1 − tanh²)`` back to the pre-softcap logit ``u``. The filter flags a tile when some entry of ``dL/dz`` per
    unit of upstream gradient, ``(1+2λ·lse)·softmax − (1−ε)·onehot − ε/V`` (``filter_z``, ``filter_y``,
    ``filter_smooth``), reaches ``filter_eps``: label smoothing and z-loss count, not only ``softmax − onehot``.
    """
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    pos = c0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = pos < c1
    if HAS_PERM:
        cols = tl.load(PERM + pos, mask=mask_v, other=0)
    else:
        cols = pos
    z, t = _logit_tile(
        E, C, B, stride_e, stride_c, offs_m, mask_m, cols, mask_v, D, softcap, inv_temp,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
    )  # fmt: skip
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    y = tl.load(Y + offs_m, mask=mask_m, other=-1)
    p = tl.exp(z - lse[:, None])
    is_y = cols[None, :] == y[:, None]
    valid = mask_m[:, None] & mask_v[None, :]
    if HAS_FILTER:
        target = tl.where(is_y, filter_y, 0.0) + filter_smooth
        err = tl.where(valid, tl.abs(p * (1.0 + filter_z * lse[:, None]) - target), 0.0)
        keep = tl.max(tl.max(err, axis=1), axis=0) >= filter_eps
        tl.store(FLAGS + pid_m * stride_flags + pid_v, keep.to(tl.int32))
    p_scale = tl.load(P_SCALE + offs_m, mask=mask_m, other=0.0)
    y_scale = tl.load(Y_SCALE + offs_m, mask=mask_m, other=0.0)
    dz = p * p_scale[:, None] - tl.where(is_y, y_scale[:, None], 0.0)
    if HAS_SMOOTH:
        dz -= tl.load(SMOOTH + offs_m, mask=mask_m, other=0.0)[:, None]
    dz = dz * inv_temp
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(valid, dz, 0.0)
    rel = pos - c0
    tl.store(DZ + offs_m[:, None].to(tl.int64) * stride_dz + rel[None, :], dz.to(DZ.dtype.element_ty), mask=valid)


@triton.jit
def _block_sparse_mm_kernel(
    A,
    Bm,
    OUT,
    LIVE,
    COUNT,
    B_ROWS,
    OUT_ROWS,
    SCALE,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_om,
    stride_live,
    ACCUMULATE: tl.constexpr,
    HAS_B_ROWS: tl.constexpr,
    HAS_OUT_ROWS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``OUT[m] (+)= SCALE · Σ_k A[m, k] · B[k]`` over the live k-tiles of each m-tile only.

    ``LIVE[m, :COUNT[m]]`` lists the k-tiles whose filter flag is set (a compacted list, so the loop has no branch
    and Triton can pipeline its loads). ``B_ROWS`` gathers B's rows (the sorted vocabulary), ``OUT_ROWS`` scatters the
    output rows; each output tile is owned by one program (no atomics).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    count = tl.load(COUNT + pid_m)
    for j in range(0, count):
        kt = tl.load(LIVE + pid_m * stride_live + j)
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if HAS_B_ROWS:
            rows = tl.load(B_ROWS + offs_k, mask=mask_k, other=0)
        else:
            rows = offs_k
        b = tl.load(
            Bm + rows[:, None].to(tl.int64) * stride_bk + offs_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_SCALE:  # in fp32, before the cast to OUT's dtype (float16 gradients: see the backward's scale)
        acc = acc * tl.load(SCALE)
    if HAS_OUT_ROWS:
        out_rows = tl.load(OUT_ROWS + offs_m, mask=mask_m, other=0)
    else:
        out_rows = offs_m
    ptrs = OUT + out_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


def _mm_into_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32 and ``a``/``b`` possibly half precision (no upcast copy on CUDA)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        try:  # fp32 output of a half-precision GEMM, accumulated in place (torch >= 2.8 on CUDA)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError):  # older torch: the chunk's product in the input dtype
            acc += torch.mm(a, b)
    else:
        acc.addmm_(a.float(), b.float())


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32 from half-precision operands (fp32 output of the GEMM on CUDA, an upcast elsewhere)."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch
            pass
    return torch.mm(a.float(), b.float())


def grad_scale(g: torch.Tensor) -> torch.Tensor:
    """The power of two at or below ``max |g|``, in [2^-126, 1], as a one-element float32 tensor.

    float16 ``dL/du`` is stored per unit of this scale and the GEMM results are multiplied back in float32: with a
    mean over N tokens (or ``num_items_in_batch`` over accumulated micro-batches) the upstream gradient is ~1/N and
    ``softmax · g`` would underflow float16 (smallest subnormal 6e-8) at a large vocabulary. A power of two makes the
    division exact; capped at 1, so no row's ``dL/du`` gets smaller than unscaled. bfloat16 and float32 share
    float32's exponent range and are not scaled.
    """
    amax = g.abs().amax().reshape(1).clamp(2.0**-126, 1.0)  # NaN stays NaN: torch.where below gives 1
    return torch.where(torch.isfinite(amax), torch.exp2(torch.floor(torch.log2(amax))), torch.ones_like(amax))


def sparse_mm_config(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_stages) of the block-sparse GEMM: its K tile is a whole 128-wide filter tile, so float32 needs
    narrower N tiles and 2 stages to stay within sm_90's shared memory (tests/kernels/aot_compile.py)."""
    if INTERPRET or dtype != torch.float32:
        return _BLOCK_N, _STAGES
    return 64, 2


def live_tiles(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flags`` (m-tiles × k-tiles, 0/1): the indices of its set entries first (int32), and their count."""
    order = torch.sort(flags.to(torch.int8), dim=1, descending=True, stable=True).indices.to(torch.int32)
    return order.contiguous(), flags.sum(dim=1, dtype=torch.int32)


def _block_sparse_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    flags: torch.Tensor,
    *,
    block_m: int,
    block_k: int,
    accumulate: bool,
    b_rows: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """``out[out_rows] (+)= scale · a @ b[b_rows]`` skipping the tiles of ``a`` whose flag is 0 (``flags``: m-tiles ×
    k-tiles); ``scale`` is a one-element float32 tensor (no host sync)."""
    m, k = a.shape
    n = b.shape[1]
    block_n, stages = sparse_mm_config(a.dtype)
    live, count = live_tiles(flags)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    launch(
        _block_sparse_mm_kernel, grid,
        a, b, out, live, count,
        b_rows if b_rows is not None else live, out_rows if out_rows is not None else live,
        scale if scale is not None else live,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), out.stride(0), live.stride(0),
        ACCUMULATE=accumulate, HAS_B_ROWS=b_rows is not None, HAS_OUT_ROWS=out_rows is not None,
        HAS_SCALE=scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=INTERPRET, PRECISION=dot_precision(a.dtype),
        num_warps=_WARPS, num_stages=stages,
    )  # fmt: skip


def _vocab_chunk(m: int, v: int, elem: int, chunk_bytes: int | None, vocab_chunk: int | None) -> int:
    """Columns of ``dL/du`` held at once: the memory budget over ``m`` rows, a multiple of the tile width."""
    if vocab_chunk is None:
        budget = int(chunk_bytes if chunk_bytes is not None else _default_chunk_bytes())
        vocab_chunk = budget // max(1, m * elem)
    vocab_chunk = max(_BLOCK_V, (int(vocab_chunk) // _BLOCK_V) * _BLOCK_V)
    return min(vocab_chunk, triton.cdiv(v, _BLOCK_V) * _BLOCK_V)


def _default_chunk_bytes() -> int:
    return int(os.environ.get("HFX_CCE_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))


def _num_splits(m: int, v: int, device: torch.device) -> int:
    """Vocabulary splits of the forward so that the grid fills the GPU (a few programs per SM)."""
    if device.type != "cuda":
        return min(4, triton.cdiv(v, _BLOCK_V))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(1, triton.cdiv(m, _BLOCK_M)))
    return max(1, min(want, triton.cdiv(v, _BLOCK_V)))


class _TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses (M,) of the M valid tokens; see :mod:`hfx.kernels.cce.reference` for the formula."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, temperature, label_smoothing, z_loss, options):
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()  # the kernels read it with stride 1
        m, d = hidden.shape
        v = weight.shape[0]
        filter_eps, sort_vocab = options["filter_eps"], options["sort_vocab"]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        splits = _num_splits(m, v, hidden.device)
        v_per_split = triton.cdiv(triton.cdiv(v, splits), _BLOCK_V) * _BLOCK_V
        splits = triton.cdiv(v, v_per_split)
        part_max = torch.empty((splits, m), **f32)
        part_sum = torch.empty((splits, m), **f32)
        part_zy = torch.empty((splits, m), **f32)
        part_zsum = torch.empty((splits, m), **f32) if label_smoothing else part_sum
        want_sort = filter_eps is not None and sort_vocab
        colsum = torch.zeros((v,), **f32) if want_sort else part_sum
        grid = (triton.cdiv(m, _BLOCK_M), splits)
        launch(
            _forward_kernel, grid,
            hidden, weight, bias if bias is not None else weight, labels,
            part_max, part_sum, part_zy, part_zsum, colsum,
            m, v, d, hidden.stride(0), weight.stride(0), v_per_split,
            float(softcap or 1.0), 1.0 / temperature,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTH=bool(label_smoothing),
            HAS_COLSUM=want_sort, BLOCK_M=_BLOCK_M, BLOCK_V=_BLOCK_V, BLOCK_D=block_d(hidden.dtype),
            UPCAST=INTERPRET, PRECISION=dot_precision(hidden.dtype), num_warps=_WARPS, num_stages=_STAGES,
        )  # fmt: skip
        gmax = part_max.max(dim=0).values
        safe_max = torch.where(torch.isneginf(gmax), 0.0, gmax)  # a split (or row) whose logits are all −inf
        lse = gmax + torch.log(torch.sum(part_sum * torch.exp(part_max - safe_max), dim=0))
        zy = part_zy.sum(dim=0)
        loss = lse - (1.0 - label_smoothing) * zy
        if label_smoothing:
            loss = loss - (label_smoothing / v) * part_zsum.sum(dim=0)
        if z_loss:
            loss = loss + z_loss * lse.square()
        perm = torch.argsort(colsum, descending=True) if want_sort else None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, perm)
        ctx.options = (softcap, temperature, label_smoothing, z_loss, options)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse, perm = ctx.saved_tensors
        softcap, temperature, eps, z_loss, options = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        m, d = hidden.shape
        v = weight.shape[0]
        g = grad_loss.float().contiguous()
        dz_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
        # float16: dL/du per unit of a power-of-two scale of g, multiplied back in fp32 (see grad_scale)
        scale = grad_scale(g) if dz_dtype == torch.float16 else None
        if scale is not None:
            g = g / scale
        p_scale = (g * (1.0 + 2.0 * z_loss * lse)).contiguous() if z_loss else g
        y_scale = (g * (1.0 - eps)).contiguous()
        smooth = (g * (eps / v)).contiguous() if eps else g
        filter_eps = options["filter_eps"]

        elem = torch.finfo(dz_dtype).bits // 8
        vc = _vocab_chunk(m, v, elem, options["chunk_bytes"], options["vocab_chunk"])
        dz_buf = torch.empty((m, vc), dtype=dz_dtype, device=hidden.device)
        n_mt = triton.cdiv(m, _BLOCK_M)
        flags_buf = torch.ones((n_mt, vc // _BLOCK_V), dtype=torch.int32, device=hidden.device)
        dh = torch.zeros((m, d), dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty((v,), dtype=torch.float32, device=hidden.device) if need_b else None
        density_sum, tiles = 0.0, 0

        for c0 in range(0, v, vc):
            c1 = min(v, c0 + vc)
            width = c1 - c0
            n_vt = triton.cdiv(width, _BLOCK_V)
            dz = dz_buf[:, :width]
            flags = flags_buf[:, :n_vt]
            launch(
                _grad_logits_kernel, (n_mt, n_vt),
                hidden, weight, bias if bias is not None else weight, labels, lse, p_scale, y_scale, smooth,
                perm if perm is not None else labels, dz_buf, flags_buf,
                m, d, c0, c1, hidden.stride(0), weight.stride(0), dz_buf.stride(0), flags_buf.stride(0),
                float(softcap or 1.0), 1.0 / temperature, float(filter_eps or 0.0),
                1.0 - eps, eps / v, 2.0 * z_loss,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTH=bool(eps),
                HAS_PERM=perm is not None, HAS_FILTER=filter_eps is not None,
                BLOCK_M=_BLOCK_M, BLOCK_V=_BLOCK_V, BLOCK_D=block_d(hidden.dtype),
                UPCAST=INTERPRET, PRECISION=dot_precision(hidden.dtype), num_warps=_WARPS, num_stages=_STAGES,
            )  # fmt: skip
            cols = perm[c0:c1] if perm is not None else None
            sparse = False
            if filter_eps is not None:
                density = flags.float().mean().item()
                density_sum, tiles = density_sum + density * flags.numel(), tiles + flags.numel()
                sparse = options["force_sparse"] or density <= _SPARSE_MAX_DENSITY
            if need_b:
                sums = dz.sum(dim=0, dtype=torch.float32)
                if cols is None:
                    db[c0:c1] = sums
                else:
                    db[cols] = sums
            if sparse:
                rows = cols if cols is not None else torch.arange(c0, c1, device=hidden.device)
                if need_h:  # dh (M×H) += dz (M×width) · W[rows]
                    _block_sparse_mm(
                        dz, weight, dh, flags, block_m=_BLOCK_M, block_k=_BLOCK_V, accumulate=True, b_rows=rows
                    )
                if need_w:  # dW[rows] (width×H) = dzᵀ (width×M) · h, flags transposed
                    _block_sparse_mm(
                        dz.T, hidden, dw, flags.T, block_m=_BLOCK_V, block_k=_BLOCK_M, accumulate=False, out_rows=rows,
                        scale=scale,
                    )  # fmt: skip
                continue
            w_c = weight[c0:c1] if cols is None else weight.index_select(0, cols)
            if need_h:
                _mm_into_fp32(dh, dz, w_c.to(dz.dtype))
            if need_w:
                if scale is None:
                    blk = torch.mm(dz.T, hidden)  # dz has hidden's dtype
                else:  # fp32 result, scaled back before the cast (a sum over M tokens of unscaled dz can pass 65504)
                    blk = (_mm_fp32(dz.T, hidden) * scale).to(dw.dtype)
                if cols is None:
                    dw[c0:c1] = blk
                else:
                    dw.index_copy_(0, cols, blk.to(dw.dtype))
        LAST_BACKWARD["filter_density"] = density_sum / tiles if tiles else None
        LAST_BACKWARD["vocab_chunk"] = vc
        del dz_buf, flags_buf, dz, flags  # free the chunk buffer before dh's final cast (peak memory)
        if scale is not None:
            if dh is not None:
                dh.mul_(scale)
            if db is not None:
                db.mul_(scale)
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


def _options(
    filter_eps: float | str | None, sort_vocab: bool, chunk_bytes, vocab_chunk, dtype: torch.dtype, force_sparse
) -> dict[str, Any]:
    filter_eps = reference.check_filter_eps(filter_eps)
    if filter_eps == "auto":
        filter_eps = torch.finfo(dtype).eps / 32  # CCE's threshold: 2^-12 for bf16
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if vocab_chunk is not None and (
        isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, int) or vocab_chunk <= 0
    ):
        raise ValueError(
            f"vocab_chunk must be a positive int (vocabulary columns per backward chunk, rounded to a multiple of "
            f"{_BLOCK_V}) or None to size it from chunk_bytes; got {vocab_chunk!r}"
        )
    return dict(
        filter_eps=filter_eps,
        sort_vocab=bool(sort_vocab),
        chunk_bytes=chunk_bytes,
        vocab_chunk=vocab_chunk,
        force_sparse=bool(force_sparse),
    )


def _per_token(hidden, weight, labels, bias, *, ignore_index, shift, softcap, temperature, label_smoothing, z_loss,
               filter_eps, sort_vocab, chunk_bytes, vocab_chunk, force_sparse):  # fmt: skip
    check_device(hidden, weight, bias, labels)
    if not supports(hidden, weight):
        raise ValueError(
            f"the Triton CCE kernel takes hidden and weight of one dtype, float32/float16/bfloat16, on CUDA; got "
            f"hidden {hidden.dtype} and weight {weight.dtype} on {hidden.device.type}; cast one to the other's dtype, "
            f"or use impl='reference' (float64, mixed dtypes) or impl='auto'"
        )
    h, y, valid, out_shape = reference._check_and_flatten(hidden, weight, labels, bias, ignore_index, shift)
    h_valid = h[valid]
    opts = _options(filter_eps, sort_vocab, chunk_bytes, vocab_chunk, hidden.dtype, force_sparse)
    if h_valid.shape[0] == 0:  # nothing to score: the reference gives the empty result with the right graph
        per_valid = reference._LinearCrossEntropyFunction.apply(
            h_valid, weight, bias, y[valid], softcap, float(temperature), float(label_smoothing), float(z_loss),
            reference.plan_chunks(1, weight.shape[0], weight.shape[1]),
        )  # fmt: skip
        return per_valid, valid, out_shape
    per_valid = _TritonLinearCrossEntropy.apply(
        h_valid, weight, bias, y[valid].contiguous(), None if softcap is None else float(softcap), float(temperature),
        float(label_smoothing), float(z_loss), opts,
    )  # fmt: skip
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
    filter_eps: float | str | None = None,
    sort_vocab: bool = True,
    _force_sparse: bool = False,
) -> torch.Tensor:
    """Triton version of :func:`hfx.kernels.cce.reference.linear_cross_entropy` (same arguments and results).

    Extra: ``filter_eps`` (``None``: exact; ``"auto"``: ``finfo(dtype).eps / 32`` as CCE; or a float) skips the
    gradient tiles whose every entry of ``dL/dz`` per unit of upstream gradient (``|softmax − onehot|`` without
    label smoothing or z-loss) is below it — faster where the softmax is peaked, approximate by design (with label
    smoothing ε, nothing is skipped unless ε/V < filter_eps); ``sort_vocab`` orders the vocabulary by mean logit first so that more tiles are skipped.
    ``chunk_bytes`` / ``vocab_chunk`` size the backward's ``dL/du`` buffer; ``token_chunk`` is accepted for
    compatibility and unused (the kernels tile the tokens themselves).
    """
    del token_chunk
    reference._check_options(reduction, softcap, label_smoothing, z_loss, temperature, num_items_in_batch)
    per_valid, valid, out_shape = _per_token(
        hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, softcap=softcap,
        temperature=temperature, label_smoothing=label_smoothing, z_loss=z_loss, filter_eps=filter_eps,
        sort_vocab=sort_vocab, chunk_bytes=chunk_bytes, vocab_chunk=vocab_chunk, force_sparse=_force_sparse,
    )  # fmt: skip
    return reference._reduce(per_valid, valid, out_shape, reduction, num_items_in_batch)


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
    filter_eps: float | str | None = None,
    sort_vocab: bool = True,
) -> torch.Tensor:
    """Triton version of :func:`hfx.kernels.cce.reference.linear_log_probs` (same arguments and results)."""
    del token_chunk
    reference._check_options("none", softcap, 0.0, 0.0, temperature, None)
    per_valid, valid, out_shape = _per_token(
        hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, softcap=softcap,
        temperature=temperature, label_smoothing=0.0, z_loss=0.0, filter_eps=filter_eps, sort_vocab=sort_vocab,
        chunk_bytes=chunk_bytes, vocab_chunk=vocab_chunk, force_sparse=False,
    )  # fmt: skip
    return reference._reduce(-per_valid, valid, out_shape, "none", None)
