"""Cross-entropy over a vocabulary-sized head without an N x C buffer.

Forward (:func:`large_ce_lse_kernel`): the grid is (row blocks, column splits); each
program walks its split's column tiles with an online log-sum-exp and writes one
partial (max, sum of exp, target logit, sum of logits) per row and split. The host
combines the few splits per row.

Backward (:func:`large_ce_backward_kernel`): one program per (row block, column tile)
recomputes its logits tile, forms ``dlogits = softmax - (1 - eps) onehot - eps / C``
scaled per row, skips the tile when every entry is below ``filter_eps`` (16-bit
compute only, as Cut Cross-Entropy does), and adds ``dH`` and ``dW`` (fp32, atomics)
and ``db``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import autotune, logits_tile, rows_bucket


@triton.jit
def large_ce_lse_kernel(
    h_ptr, stride_hn, stride_hd, n_rows,
    w_ptr, stride_wc, stride_wd, b_ptr, col_start, n_cols, D,
    target_ptr,
    part_max_ptr, part_sum_ptr, part_target_ptr, part_logit_sum_ptr,
    ROWS_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Partials ``[splits, n_rows]`` (fp32) of the log-sum-exp over this split's columns."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    h_row_ptrs = h_ptr + rows64 * stride_hn
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_tiles = tl.cdiv(n_cols, BLOCK_V)
    tiles_per_split = tl.cdiv(n_tiles, tl.num_programs(1))
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, n_tiles)
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        x = logits_tile(h_row_ptrs, row_ok, stride_hd, w_ptr, stride_wc, stride_wd, col_start + cols, col_ok, D,
                        BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)  # fmt: skip
        x += tl.load(b_ptr + col_start + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        logit_sum += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        run_max = new_max
    out = split.to(tl.int64) * n_rows + rows64
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    tl.store(part_target_ptr + out, target_logit, mask=row_ok)
    tl.store(part_logit_sum_ptr + out, logit_sum, mask=row_ok)


@triton.jit
def large_ce_backward_kernel(
    h_ptr, stride_hn, stride_hd, n_rows,
    w_ptr, stride_wc, stride_wd, b_ptr, col_start, n_cols, D,
    target_ptr, lse_ptr, row_scale_ptr, smoothing, inv_classes, filter_eps,
    dh_ptr, stride_dhn, dw_ptr, db_ptr, ROWS_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FILTER: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Adds this tile's share of dH (fp32 ``[n_rows, D]`` view), dW rows and db (fp32)."""
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    n_tiles = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP_M * n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_row_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < n_cols
    h_row_ptrs = h_ptr + rows64 * stride_hn
    x = logits_tile(h_row_ptrs, row_ok, stride_hd, w_ptr, stride_wc, stride_wd, col_start + cols, col_ok, D,
                    BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)  # fmt: skip
    x += tl.load(b_ptr + col_start + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    grad = tl.exp(x - lse[:, None]) - smoothing * inv_classes
    grad -= tl.where(cols[None, :] == target[:, None], 1.0 - smoothing, 0.0)
    grad = tl.where(col_ok[None, :] & (scale != 0.0)[:, None], grad, 0.0)
    if FILTER:
        if tl.max(tl.max(tl.abs(grad), axis=1), axis=0) < filter_eps:
            return
    grad *= scale[:, None]
    tl.atomic_add(db_ptr + col_start + cols, tl.sum(grad, axis=0), mask=col_ok)
    grad_lo = grad.to(h_ptr.dtype.element_ty)
    ks = tl.arange(0, BLOCK_K)
    w_col_ptrs = w_ptr + (col_start + cols).to(tl.int64)[:, None] * stride_wc
    dw_row_ptrs = dw_ptr + (col_start + cols).to(tl.int64)[:, None] * D
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        w = tl.load(w_col_ptrs + (k0 + ks)[None, :] * stride_wd, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        dh = tl.dot(grad_lo, w.to(grad_lo.dtype), input_precision=PRECISION)
        tl.atomic_add(dh_ptr + rows64[:, None] * stride_dhn + (k0 + ks)[None, :], dh,
                      mask=row_ok[:, None] & k_ok[None, :])  # fmt: skip
        h = tl.load(h_row_ptrs[:, None] + (k0 + ks)[None, :] * stride_hd, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        dw = tl.dot(tl.trans(grad_lo), h, input_precision=PRECISION)
        tl.atomic_add(dw_row_ptrs + (k0 + ks)[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


def _configs(shapes) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, v, k, w, s in shapes
    ]


# (BLOCK_M, BLOCK_V, BLOCK_K, warps, stages): sm_90 likes the 128-wide tiles, sm_80 the 4-warp ones.
_LSE_SHAPES = [(64, 64, 32, 4, 2), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4)]
_BWD_SHAPES = [(64, 64, 32, 4, 2), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3)]
_KEY = ["ROWS_BUCKET", "n_cols", "D"]
_lse_kernel = autotune(_configs(_LSE_SHAPES), _KEY)(large_ce_lse_kernel)
_backward_kernel = autotune(_configs(_BWD_SHAPES), _KEY, restore_value=["dh_ptr", "dw_ptr", "db_ptr"])(
    large_ce_backward_kernel
)


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "ieee"


def large_ce_lse(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, col_start: int, n_cols: int, target: torch.Tensor,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``rows`` [n, D]: log-sum-exp, target logit and sum of logits over the
    columns ``[col_start, col_start + n_cols)`` of the packed head (fp32 ``[n]`` each).
    ``target`` [n] int32 (-1: none)."""
    n = rows.shape[0]
    part = torch.empty((4, splits, n), dtype=torch.float32, device=rows.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), splits)

    _lse_kernel[grid](
        rows, rows.stride(0), rows.stride(1), n,
        weight, weight.stride(0), weight.stride(1), bias, col_start, n_cols, rows.shape[1],
        target,
        part[0], part[1], part[2], part[3],
        rows_bucket(n),
        PRECISION=_precision(rows.dtype),
    )  # fmt: skip
    run_max, run_sum, target_logit, logit_sum = part.unbind(0)
    top = run_max.amax(dim=0)
    lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    return lse, target_logit.sum(dim=0), logit_sum.sum(dim=0)


def large_ce_backward(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, col_start: int, n_cols: int, target: torch.Tensor,
    lse: torch.Tensor, row_scale: torch.Tensor, label_smoothing: float, grad_rows: torch.Tensor,
    grad_weight: torch.Tensor, grad_bias: torch.Tensor, filter_eps: float | None,
) -> None:
    """Adds the gradients of ``sum_rows row_scale * CE(row)`` into ``grad_rows`` (fp32
    ``[n, D]``, may be a strided view), ``grad_weight`` (fp32 ``[sum C, D]``) and
    ``grad_bias`` (fp32 ``[sum C]``). ``filter_eps`` skips tiles whose unscaled dlogits
    all lie below it (None: never)."""
    n = rows.shape[0]
    assert grad_rows.stride(1) == 1 and grad_weight.is_contiguous()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(n_cols, meta["BLOCK_V"]),)

    _backward_kernel[grid](
        rows, rows.stride(0), rows.stride(1), n,
        weight, weight.stride(0), weight.stride(1), bias, col_start, n_cols, rows.shape[1],
        target, lse, row_scale, float(label_smoothing), 1.0 / n_cols, float(filter_eps or 0.0),
        grad_rows, grad_rows.stride(0), grad_weight, grad_bias, rows_bucket(n),
        GROUP_M=8, FILTER=filter_eps is not None, PRECISION=_precision(rows.dtype),
    )  # fmt: skip
