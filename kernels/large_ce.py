"""The element-wise passes of a vocabulary-sized cross-entropy head.

The backend walks the head's columns in chunks (and the rows too when there are many),
computing each chunk of logits ``H[rows] @ W[cols]^T`` in fp32 with a cuBLAS GEMM. These
kernels then read the chunk once:

- forward, :func:`large_ce_lse_merge_kernel` folds the chunk into each row's running max,
  sum of exponentials, target logit and sum of logits (an online log-sum-exp), so no
  buffer wider than one chunk ever exists;
- backward, :func:`large_ce_dlogits_kernel` turns the recomputed chunk into
  ``row_scale * (softmax - (1 - eps) * onehot - eps / C)`` in the computation dtype for the
  two gradient GEMMs, and writes per-column partial sums of the unrounded fp32 values for
  ``db``; with a gradient filter it also marks the tiles the GEMMs cannot skip
  (``filtered_matmul``). No float atomics: the results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import filtered_matmul
from .tiling import softcapped

# Memory-bound streaming passes: one tile shape serves sm_80 and sm_90, small enough to stay
# within 128 registers a thread for occupancy (tests/test_kernels_compile.py checks).
LSE_BLOCK_M, LSE_BLOCK_V = 8, 256
# A dlogits block of columns is one column tile of the gradient filter (one flag each).
DLOGITS_BLOCK_M, DLOGITS_BLOCK_V = 8, filtered_matmul.TILE_V
assert filtered_matmul.TILE_M % DLOGITS_BLOCK_M == 0
NUM_WARPS = 4


@triton.jit
def large_ce_lse_merge_kernel(
    logits_ptr, stride_lm, n_rows, n_cols, bias_ptr, target_ptr, col_offset,
    run_max_ptr, run_sum_ptr, target_logit_ptr, logit_sum_ptr, softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Updates the fp32 ``[n_rows]`` running statistics with one chunk of logits (with
    ``SOFTCAP``, of ``softcap * tanh(logits / softcap)``)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows.to(tl.int64) * stride_lm
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1) - col_offset
    run_max = tl.load(run_max_ptr + rows, mask=row_ok, other=0.0)
    run_sum = tl.load(run_sum_ptr + rows, mask=row_ok, other=0.0)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    logit_sum = tl.load(logit_sum_ptr + rows, mask=row_ok, other=0.0)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:
            x, _ = softcapped(x, softcap)
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        logit_sum += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(run_max_ptr + rows, run_max, mask=row_ok)
    tl.store(run_sum_ptr + rows, run_sum, mask=row_ok)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_ok)
    tl.store(logit_sum_ptr + rows, logit_sum, mask=row_ok)


@triton.jit
def large_ce_dlogits_kernel(
    logits_ptr, stride_lm, n_rows, n_cols, bias_ptr, target_ptr, col_offset, lse_ptr, row_scale_ptr,
    smoothing, inv_classes, dlogits_ptr, stride_dm, col_sums_ptr, filter_eps, tile_flags_ptr, softcap, z_loss,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, FILTER: tl.constexpr, FLAG_M: tl.constexpr,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
):  # fmt: skip
    """Writes ``dlogits`` ``[n_rows, n_cols]`` and ``col_sums[split, n_cols]`` (fp32): the grid is
    (column blocks, row splits), each program walking its split's row blocks. With ``SOFTCAP``
    the loss saw ``softcap * tanh(logits / softcap)``, whose derivative the gradient takes; with
    ``Z_LOSS`` it added ``z_loss * lse^2``, whose gradient is ``2 z_loss lse softmax``. With ``FILTER``,
    sets ``tile_flags[rows // FLAG_M, column block]`` (int32, zeroed) to 1 where an entry of a
    row that counts has ``|softmax - target|`` (times the softcap's derivative) not below
    ``filter_eps`` (NaN included)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    split = tl.program_id(1)
    col_ok = cols < n_cols
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    col_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    row_blocks = tl.cdiv(n_rows, BLOCK_M)
    per_split = tl.cdiv(row_blocks, tl.num_programs(1))
    first = split * per_split
    for block in range(first, tl.minimum(first + per_split, row_blocks)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(logits_ptr + rows64[:, None] * stride_lm + cols[None, :], mask=ok, other=0.0) + bias[None, :]
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        target = tl.load(target_ptr + rows, mask=row_ok, other=-1) - col_offset
        if SOFTCAP:
            x, t = softcapped(x, softcap)
        grad = tl.exp(x - lse[:, None])
        if Z_LOSS:
            grad *= (1.0 + 2.0 * z_loss * lse)[:, None]
        grad -= smoothing * inv_classes
        grad -= tl.where(cols[None, :] == target[:, None], 1.0 - smoothing, 0.0)
        if SOFTCAP:
            grad *= 1.0 - t * t
        counts = ok & (scale != 0.0)[:, None]
        if FILTER:
            # not below: a NaN marks its tile, so that it reaches the gradients as without a filter
            needed = tl.max(tl.max(tl.where(counts, tl.where(tl.abs(grad) < filter_eps, 0, 1), 0), axis=1), axis=0)
            flag_ptr = tile_flags_ptr + (block * BLOCK_M // FLAG_M) * tl.num_programs(0) + tl.program_id(0)
            tl.atomic_max(flag_ptr, needed, sem="relaxed")
        grad = tl.where(counts, grad * scale[:, None], 0.0)
        tl.store(dlogits_ptr + rows64[:, None] * stride_dm + cols[None, :], grad.to(dlogits_ptr.dtype.element_ty),
                 mask=ok)  # fmt: skip
        col_sum += tl.sum(grad, axis=0)
    tl.store(col_sums_ptr + split.to(tl.int64) * n_cols + cols, col_sum, mask=col_ok)


def lse_merge(
    logits: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, col_offset: int, state: torch.Tensor,
    softcap: float = 0.0,
) -> None:
    """Folds ``logits`` [n, v] (fp32, unit column stride) plus ``bias`` [v] into ``state``
    [4, n] fp32 (running max, sum of exp, target logit, sum of logits). ``target`` [n] int32
    holds class ids of the whole head (-1: none); this chunk starts at ``col_offset``. A
    ``softcap`` > 0 folds ``softcap * tanh((logits + bias) / softcap)`` instead."""
    n, v = logits.shape
    run_max, run_sum, target_logit, logit_sum = state.unbind(0)
    large_ce_lse_merge_kernel[(triton.cdiv(n, LSE_BLOCK_M),)](
        logits, logits.stride(0), n, v, bias, target, col_offset, run_max, run_sum, target_logit, logit_sum,
        float(softcap), BLOCK_M=LSE_BLOCK_M, BLOCK_V=LSE_BLOCK_V, SOFTCAP=softcap > 0, num_warps=NUM_WARPS,
    )  # fmt: skip


def dlogits_splits(n_rows: int, n_cols: int, programs_wanted: int) -> int:
    """Row splits of :func:`dlogits` for about ``programs_wanted`` programs in all."""
    col_blocks = triton.cdiv(n_cols, DLOGITS_BLOCK_V)
    return max(1, min(triton.cdiv(n_rows, DLOGITS_BLOCK_M), triton.cdiv(programs_wanted, col_blocks)))


def dlogits(
    logits: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, col_offset: int, lse: torch.Tensor,
    row_scale: torch.Tensor, label_smoothing: float, num_classes: int, out: torch.Tensor, col_sums: torch.Tensor,
    filter_eps: float = 0.0, tile_flags: torch.Tensor | None = None, softcap: float = 0.0, z_loss: float = 0.0,
) -> None:
    """Writes the scaled cross-entropy gradient of ``logits + bias`` ([n, v] fp32) into ``out``
    [n, v] (the computation dtype) and its per-split column sums into ``col_sums``
    [splits, v] fp32. ``lse`` and ``row_scale`` are fp32 [n]; a row scale of 0 skips the row.
    With ``tile_flags`` (``filtered_matmul.tile_flags``), marks the tiles holding an entry
    of the gradient not below ``filter_eps`` in magnitude (NaN included). A ``softcap`` > 0:
    the loss saw ``softcap * tanh((logits + bias) / softcap)``; a ``z_loss`` > 0: it added
    ``z_loss * lse^2`` per row."""
    n, v = logits.shape
    assert out.shape == logits.shape and out.stride(1) == 1 and col_sums.is_contiguous()
    large_ce_dlogits_kernel[(triton.cdiv(v, DLOGITS_BLOCK_V), col_sums.shape[0])](
        logits, logits.stride(0), n, v, bias, target, col_offset, lse, row_scale,
        float(label_smoothing), 1.0 / num_classes, out, out.stride(0), col_sums, float(filter_eps),
        col_sums if tile_flags is None else tile_flags, float(softcap), float(z_loss), BLOCK_M=DLOGITS_BLOCK_M,
        BLOCK_V=DLOGITS_BLOCK_V, FILTER=tile_flags is not None, FLAG_M=filtered_matmul.TILE_M,
        SOFTCAP=softcap > 0, Z_LOSS=z_loss > 0, num_warps=NUM_WARPS,
    )  # fmt: skip
