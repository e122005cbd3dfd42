"""Shared pieces of the kernels: the logits tile, the logit softcap, the TF32 split and when to autotune."""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotuning runs on a GPU unless MTLFAST_AUTOTUNE=0 (tests: no tuning runs for every new
# shape). Otherwise kernels launch with their first config: the interpreter cannot time
# configs, and older triton releases cannot even build an Autotuner without a GPU.
TUNING = os.environ.get("MTLFAST_AUTOTUNE", "1") != "0" and not INTERPRETED
# Tuning picks are kept on disk where triton can, unless MTLFAST_AUTOTUNE_CACHE=0 (a process
# that tunes on a busy GPU, bench/warm.py beside the tests, must not leave its picks to others).
KEEP_TUNING = os.environ.get("MTLFAST_AUTOTUNE_CACHE", "1") != "0"


def rows_bucket(n: int) -> int:
    """Autotuning key for a row count: the next power of two, so that varying batch
    shapes reuse one tuning result."""
    return 1 << max(0, (max(n, 1) - 1).bit_length())


@triton.jit
def logits_tile(
    h_row_ptrs, row_ok, stride_hd, w_ptr, stride_wc, stride_wd, w_rows, col_ok, D,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``H[rows] @ W[w_rows]^T`` as an fp32 ``[BLOCK_M, BLOCK_C]`` tile, both operands rounded to
    ``DOT`` (the computation dtype) on chip: fp32 master weights, and fp32 rows under autocast,
    need no separate cast pass."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    w_col_ptrs = w_ptr + w_rows.to(tl.int64)[None, :] * stride_wc
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        h = tl.load(h_row_ptrs[:, None] + (k0 + ks)[None, :] * stride_hd, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(w_col_ptrs + (k0 + ks)[:, None] * stride_wd, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def softcapped(x, softcap):
    """``softcap * tanh(x / softcap)`` and ``tanh(x / softcap)`` (tanh from a sigmoid, which every
    triton and its interpreter have)."""
    t = 2.0 * tl.sigmoid(x * (2.0 / softcap)) - 1.0
    return softcap * t, t


@triton.jit
def tf32_split(x):
    """fp32 ``x`` as ``(big, small)``, both with their 13 low mantissa bits zero, so exact as
    tf32 operands: ``big`` is ``x`` truncated, ``small`` the rest of it truncated; their sum is off
    ``x`` by less than 2^-20 of ``|x|``, or 2^-136 where the rest is subnormal. An infinite ``x``
    keeps ``small`` at 0 (not inf - inf)."""
    big = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    small = ((x - big).to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return big, tl.where(big == x, 0.0, small)
