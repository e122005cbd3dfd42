"""The end of the forward pass in one launch: per-task means, gradient scales, the total.

The heads kernels leave per-task loss sums and kept-row counts (fp32 ``[T]``); this
turns them into the quantities the op returns and keeps, instead of a dozen small
PyTorch ops on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import DirectLauncher


@triton.jit
def loss_finalize_kernel(
    sums_ptr, counts_ptr, count_scale_ptr, override_ptr, weights_ptr,
    losses_ptr, scales_ptr, total_ptr, n_tasks,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """``divisor = override if override >= 0 else counts * count_scale``;
    ``losses = sums / divisor`` and ``scales = weights / divisor`` (0 where the divisor is
    not positive); ``total = sum(weights * losses)``. Then zeroes ``sums`` and ``counts`` for the
    next forward (the backend keeps them). One program, fp32 ``[T]`` vectors."""
    t = tl.arange(0, BLOCK_T)
    ok = t < n_tasks
    counts = tl.load(counts_ptr + t, mask=ok, other=0.0) * tl.load(count_scale_ptr + t, mask=ok, other=0.0)
    override = tl.load(override_ptr + t, mask=ok, other=-1.0)
    divisor = tl.where(override >= 0, override, counts)
    has_rows = divisor > 0
    safe = tl.maximum(divisor, 1e-30)
    weights = tl.load(weights_ptr + t, mask=ok, other=0.0)
    losses = tl.where(has_rows, tl.load(sums_ptr + t, mask=ok, other=0.0) / safe, 0.0)
    tl.store(losses_ptr + t, losses, mask=ok)
    tl.store(scales_ptr + t, tl.where(has_rows, weights / safe, 0.0), mask=ok)
    tl.store(total_ptr, tl.sum(tl.where(ok, weights * losses, 0.0), axis=0))
    tl.debug_barrier()  # every thread has read sums and counts
    tl.store(sums_ptr + t, tl.zeros((BLOCK_T,), dtype=tl.float32), mask=ok)
    tl.store(counts_ptr + t, tl.zeros((BLOCK_T,), dtype=tl.float32), mask=ok)


_launch = DirectLauncher(loss_finalize_kernel)
_OPTIONS: dict[int, dict] = {}


def loss_finalize(
    sums: torch.Tensor, counts: torch.Tensor, count_scale: torch.Tensor, divisor_override: torch.Tensor,
    task_weights: torch.Tensor, losses: torch.Tensor, scales: torch.Tensor, total: torch.Tensor,
) -> None:
    """Writes ``losses`` and ``scales`` (fp32 ``[T]``) and ``total`` (fp32, 0-dim) from the
    fp32 ``[T]`` inputs (see :func:`loss_finalize_kernel`), and zeroes ``sums`` and ``counts``."""
    n_tasks = sums.shape[0]
    block_t = max(16, 1 << (n_tasks - 1).bit_length())
    options = _OPTIONS.get(block_t) or _OPTIONS.setdefault(block_t, {"BLOCK_T": block_t, "num_warps": 1})
    # every tensor is fp32: the task count fixes the arguments
    _launch((1,), (sums, counts, count_scale, divisor_override, task_weights, losses, scales, total, n_tasks), options,
            n_tasks, fixed=True)  # fmt: skip
