"""The two gradient GEMMs of a vocabulary head's chunk, skipping negligible tiles.

With a gradient filter (``grad_filter_eps``), :func:`large_ce.dlogits` also marks each tile of
``TILE_M`` rows by ``TILE_V`` columns of the chunk's ``dlogits`` in which some entry of
``softmax - target`` reaches the threshold; in a large vocabulary most tiles hold none. These
kernels then compute

- ``dH[rows] += dlogits @ W[cols]``: a program per (row tile, block of D), walking only its
  row tile's marked column tiles;
- ``dW[cols] (+)= dlogits^T @ H[rows]``: a program per (block of columns, block of D),
  walking only the marked row tiles of its column tile;

accumulating in fp32, in a fixed order (the marked tiles in ascending order, from a stable
sort on the device: no host sync, no atomics), so the result is bitwise reproducible. Each
program owns its output tile and adds it to what is there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A tile of the filter; large_ce's dlogits blocks of columns are TILE_V wide (one flag each),
# TILE_M is a multiple of their rows.
TILE_M, TILE_V = 64, 256
# Output tiles of TILE_M x BLOCK_D (dH) and DW_BLOCK_V x BLOCK_D (dW), products over
# BLOCK_K, 8 warps: with 4 warps triton 3.6 spills on sm_80; with 8 both 3.6 and 3.8 stay
# under ~180 registers a thread on sm_80 and sm_90 (tests/test_kernels_compile.py checks),
# fp32 with a shallower pipeline (3 stages spill a little on sm_80 where the sizes are not
# multiples of 16).
BLOCK_D = 128
DW_BLOCK_V = 64
# (BLOCK_K, pipeline stages) per computation dtype; triton 3.6 needs BLOCK_K >= 16.
STEPS = {torch.float32: (16, 2), torch.float16: (32, 3), torch.bfloat16: (32, 3)}
NUM_WARPS = 8


@triton.jit
def filtered_dh_kernel(
    dlogits_ptr, stride_gm, w_ptr, stride_wv, dh_ptr, stride_hm, n_rows, n_cols, hidden_size,
    k_blocks_ptr, k_count_ptr, k_stride,
    TILE_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``dh[n_rows, D] += dlogits[n_rows, n_cols] @ w[n_cols, D]`` over the marked tiles:
    ``k_blocks[row_tile, :k_count[row_tile]]`` are the ``BLOCK_K``-column blocks they cover."""
    row_tile = tl.program_id(0)
    rows = row_tile * TILE_M + tl.arange(0, TILE_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    d_ok = (ds < hidden_size)[None, :]
    # Rows past the end are clamped, not masked (their results are not stored). Columns are
    # masked: a clamp would hide their contiguity from the compiler, which then neither
    # vectorizes nor pipelines the loads.
    g_ptrs = dlogits_ptr + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride_gm + ks[None, :]
    w_ptrs = w_ptr + ds[None, :]
    acc = tl.zeros((TILE_M, BLOCK_D), dtype=tl.float32)
    for i in range(0, tl.load(k_count_ptr + row_tile)):
        k0 = tl.load(k_blocks_ptr + row_tile * k_stride + i) * BLOCK_K
        k_ok = k0 + ks < n_cols
        g = tl.load(g_ptrs + k0, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + (k0 + ks).to(tl.int64)[:, None] * stride_wv, mask=k_ok[:, None] & d_ok, other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    ok = (rows < n_rows)[:, None] & d_ok
    out_ptrs = dh_ptr + rows.to(tl.int64)[:, None] * stride_hm + ds[None, :]
    tl.store(out_ptrs, tl.load(out_ptrs, mask=ok, other=0.0) + acc, mask=ok)


@triton.jit
def filtered_dw_kernel(
    dlogits_ptr, stride_gm, h_ptr, stride_hm, dw_ptr, stride_wv, n_rows, n_cols, hidden_size,
    k_blocks_ptr, k_count_ptr, k_stride,
    ACCUMULATE: tl.constexpr, TILE_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``dw[n_cols, D] (+)= dlogits[n_rows, n_cols]^T @ h[n_rows, D]`` over the marked tiles:
    ``k_blocks[col_tile, :k_count[col_tile]]`` are the ``BLOCK_K``-row blocks they cover.
    Without ``ACCUMULATE`` the old contents of ``dw`` are never read."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_tile = tl.program_id(0) * BLOCK_V // TILE_V
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ms = tl.arange(0, BLOCK_K)
    col_ok = (cols < n_cols)[None, :]
    d_ok = (ds < hidden_size)[None, :]
    g_ptrs = dlogits_ptr + ms[:, None] * stride_gm + cols[None, :]
    h_ptrs = h_ptr + ds[None, :]
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for i in range(0, tl.load(k_count_ptr + col_tile)):
        m0 = tl.load(k_blocks_ptr + col_tile * k_stride + i) * BLOCK_K
        m_ok = (m0 + ms < n_rows)[:, None]
        g = tl.load(g_ptrs + m0.to(tl.int64) * stride_gm, mask=m_ok & col_ok, other=0.0)
        h = tl.load(h_ptrs + (m0 + ms).to(tl.int64)[:, None] * stride_hm, mask=m_ok & d_ok, other=0.0)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION)
    ok = (cols < n_cols)[:, None] & d_ok
    out_ptrs = dw_ptr + cols.to(tl.int64)[:, None] * stride_wv + ds[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=ok, other=0.0)
    tl.store(out_ptrs, acc, mask=ok)


def _precision(dtype: torch.dtype) -> str:
    """fp32 products to about fp32 accuracy (three TF32 products), as the small-heads kernel takes them."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def tile_flags(n_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
    """int32 [row tiles, column tiles] of zeros, for :func:`large_ce.dlogits` to mark."""
    return torch.zeros((triton.cdiv(n_rows, TILE_M), triton.cdiv(n_cols, TILE_V)), dtype=torch.int32, device=device)


def _marked_blocks(flags: torch.Tensor, tile: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flags`` (int32 0/1 over tiles of ``tile`` elements), the ``block_k`` blocks
    of its marked tiles in ascending order, then the others' (int32 [rows, tiles * tile / block_k]),
    and the number of marked blocks (int32 [rows])."""
    steps = tile // block_k
    order = torch.sort(flags, dim=1, descending=True, stable=True).indices.to(torch.int32)
    blocks = (order[:, :, None] * steps + torch.arange(steps, dtype=torch.int32, device=flags.device)).flatten(1).contiguous()
    return blocks, flags.sum(dim=1, dtype=torch.int32) * steps


def filtered_grads(dlogits: torch.Tensor, flags: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                   grad_rows: torch.Tensor | None, grad_weight: torch.Tensor, accumulate: bool) -> None:  # fmt: skip
    """Adds ``dlogits @ weight`` into ``grad_rows`` (fp32 [n, D], unit column stride; None: not
    needed) and writes (``accumulate``: adds) ``dlogits^T @ rows`` into ``grad_weight`` (fp32
    [v, D], unit column stride), over the tiles ``flags`` (from :func:`tile_flags`) marks.
    ``dlogits`` [n, v], ``weight`` [v, D] and ``rows`` [n, D] share the computation dtype."""
    n, v = dlogits.shape
    hidden_size = rows.shape[1]
    weight, rows = (t if t.stride(1) == 1 else t.contiguous() for t in (weight, rows))
    assert dlogits.stride(1) == 1 and grad_weight.stride(1) == 1
    precision, (block_k, stages) = _precision(dlogits.dtype), STEPS[dlogits.dtype]
    d_blocks = triton.cdiv(hidden_size, BLOCK_D)
    if grad_rows is not None and n:
        assert grad_rows.stride(1) == 1
        blocks, count = _marked_blocks(flags, TILE_V, block_k)
        filtered_dh_kernel[(flags.shape[0], d_blocks)](
            dlogits, dlogits.stride(0), weight, weight.stride(0), grad_rows, grad_rows.stride(0), n, v, hidden_size,
            blocks, count, blocks.shape[1], TILE_M=TILE_M, BLOCK_D=BLOCK_D, BLOCK_K=block_k, PRECISION=precision,
            num_warps=NUM_WARPS, num_stages=stages,
        )  # fmt: skip
    blocks, count = _marked_blocks(flags.t(), TILE_M, block_k)
    filtered_dw_kernel[(triton.cdiv(v, DW_BLOCK_V), d_blocks)](
        dlogits, dlogits.stride(0), rows, rows.stride(0), grad_weight, grad_weight.stride(0), n, v, hidden_size,
        blocks, count, blocks.shape[1], ACCUMULATE=accumulate, TILE_V=TILE_V, BLOCK_V=DW_BLOCK_V, BLOCK_D=BLOCK_D,
        BLOCK_K=block_k, PRECISION=precision, num_warps=NUM_WARPS, num_stages=stages,
    )  # fmt: skip
