"""The end of the forward pass in one launch: per-task means, gradient scales, the total, and
``validate=True``'s check of the label values.

The heads kernels leave per-task loss sums and kept-row counts (fp32 ``[T]``); this
turns them into the quantities the op returns and keeps, instead of a dozen small
PyTorch ops on the host. A :class:`~.label_check.LabelCheck` given, the same launch checks
every task's targets in programs of its own (:func:`~.label_check.flag_task_targets`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .label_check import BLOCK as CHECK_BLOCK
from .label_check import LabelCheck, flag_task_targets
from .launcher import DirectLauncher


@triton.jit
def loss_finalize_kernel(
    sums_ptr, counts_ptr, count_scale_ptr, override_ptr, weights_ptr,
    losses_ptr, scales_ptr, total_ptr, target_table_ptr, check_spec_ptr, mask_ptr, flags_ptr,
    n_tasks, check_programs,
    BLOCK_T: tl.constexpr, CHECK: tl.constexpr, HAS_MASK: tl.constexpr, CHECK_BLOCK: tl.constexpr,
):  # fmt: skip
    """Program 0: ``divisor = override if override >= 0 else counts * count_scale``;
    ``losses = sums / divisor`` and ``scales = weights / divisor`` (0 where the divisor is
    not positive); ``total = sum(weights * losses)``. Then zeroes ``sums`` and ``counts`` for the
    next forward (the backend keeps them). fp32 ``[T]`` vectors.

    With ``CHECK``, programs ``1 + t * check_programs + p`` run
    :func:`~.label_check.flag_task_targets` for task ``t`` and its program ``p``, writing
    ``flags`` int32 ``[T, check_programs]``."""
    pid = tl.program_id(0)
    if pid == 0:
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
    if CHECK:
        if pid > 0:
            check = pid - 1
            flag_task_targets(target_table_ptr, check_spec_ptr, mask_ptr, flags_ptr, check // check_programs,
                              check % check_programs, check_programs, CHECK_BLOCK, HAS_MASK)  # fmt: skip


_launch = DirectLauncher(loss_finalize_kernel)
_OPTIONS: dict[tuple[int, int, bool], dict] = {}
_UNREAD_POINTERS: tuple[int | torch.Tensor | None, ...] = (0, 0, 0, 0)


def _options(n_tasks: int, check_programs: int, has_mask: bool) -> dict:
    block_t = max(16, 1 << (n_tasks - 1).bit_length())
    return {"BLOCK_T": block_t, "CHECK": check_programs > 0, "HAS_MASK": has_mask, "CHECK_BLOCK": CHECK_BLOCK,
            "num_warps": 4 if check_programs else 1}  # fmt: skip


def loss_finalize(
    sums: torch.Tensor, counts: torch.Tensor, count_scale: torch.Tensor, divisor_override: torch.Tensor,
    task_weights: torch.Tensor, losses: torch.Tensor, scales: torch.Tensor, total: torch.Tensor, *,
    check: LabelCheck | None = None,
) -> None:
    """Writes ``losses`` and ``scales`` (fp32 ``[T]``) and ``total`` (fp32, 0-dim) from the
    fp32 ``[T]`` inputs (see :func:`loss_finalize_kernel`), and zeroes ``sums`` and ``counts``.
    With ``check`` (its ``flags`` ``[T, P]``) the same launch writes every one of its flags."""
    n_tasks = sums.shape[0]
    if check is None:
        programs, has_mask, checked = 0, False, _UNREAD_POINTERS  # with no check, ints: no address to read
    else:
        programs, has_mask = check.flags.shape[1], check.mask is not None
        if check.flags.shape[0] != n_tasks:
            raise ValueError(f"label check flags {tuple(check.flags.shape)} for {n_tasks} tasks")
        checked = (check.target_table, check.spec, check.mask if has_mask else check.target_table, check.flags)
    variant = (n_tasks, programs, has_mask)
    options = _OPTIONS.get(variant) or _OPTIONS.setdefault(variant, _options(*variant))
    # every tensor's dtype is fixed (fp32 vectors; the check's int64 table and spec, bool mask,
    # int32 flags): the task count and the check's programs (0: ints in the check's place) fix the arguments
    _launch((1 + n_tasks * programs,), (sums, counts, count_scale, divisor_override, task_weights, losses, scales, total,
                                        *checked, n_tasks, programs), options, variant, fixed=True)  # fmt: skip
