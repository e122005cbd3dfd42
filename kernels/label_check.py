"""``validate=True``'s value checks of every task's targets, as programs of the loss finalize launch.

Checked with torch ops, each task costs five or six small kernels (compare, combine, ``any``)
before the one host sync that reads the verdicts: on a GPU host that is bound by the host, tens
of microseconds each. :func:`flag_task_targets` reads a task's targets through the table of
their addresses the small-heads kernel reads them by, and stores one flag per program and task;
``loss_finalize_kernel`` runs it in programs of its own beside the finalize, so the check costs
no launch of its own, and the host reads the flags in the same one sync, after the forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launcher import cdiv

# A task's kind in the spec: what its targets must hold (the kernel compares with these numbers).
UNCHECKED, CLASS_IDS, MASKED_CLASS_IDS, UNIT_INTERVAL = 0, 1, 2, 3
BLOCK = 1024
MAX_PROGRAMS = 64  # per task: the strided loop covers the rest


class LabelCheck(NamedTuple):
    """A check of every task's target values, for the loss finalize launch to run.

    - ``target_table`` int64 [T]: the address of each task's targets (as the small-heads kernel
      reads them: int64 [rows] class ids, fp32 [rows, C] bce/mse targets, contiguous).
    - ``spec`` int64 [T, 4]: per task the element count, the kind, the class count and the
      ignore index (see :func:`flag_task_targets`).
    - ``mask`` bool [rows] or None: the token rows that count, for ``MASKED_CLASS_IDS`` tasks.
    - ``flags`` int32 [T, P] with ``P = flag_programs(largest element count)``: written by the
      launch, every element (1 where program ``p`` found one of task ``t``'s targets out of range).
    """

    target_table: torch.Tensor
    spec: torch.Tensor
    mask: torch.Tensor | None
    flags: torch.Tensor


@triton.jit
def flag_task_targets(target_table_ptr, spec_ptr, mask_ptr, flags_ptr, t, p, n_programs,
                      BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """Looks at elements ``p * BLOCK + k * n_programs * BLOCK + [0, BLOCK)`` of task ``t``'s
    targets and stores ``flags[t, p]`` (int32 ``[T, n_programs]``): 1 if one of them is out of
    range, else 0. ``spec`` int64 ``[T, 4]``: the element count, the kind, the class count and
    the ignore index. Kinds: ``CLASS_IDS`` (int64 ``[rows]``: in ``[0, classes)`` or the ignore
    index), ``MASKED_CLASS_IDS`` (the same where ``mask`` [rows] bool holds: a token task with an
    attention mask), ``UNIT_INTERVAL`` (fp32: in ``[0, 1]``; NaN passes, it marks a skipped row)
    and ``UNCHECKED`` (no elements)."""
    numel = tl.load(spec_ptr + t * 4)
    kind = tl.load(spec_ptr + t * 4 + 1)
    classes = tl.load(spec_ptr + t * 4 + 2)
    ignore_index = tl.load(spec_ptr + t * 4 + 3)
    address = tl.load(target_table_ptr + t)
    class_ptr = address.to(tl.pointer_type(tl.int64))
    unit_ptr = address.to(tl.pointer_type(tl.float32))
    is_unit = kind == 3  # UNIT_INTERVAL
    is_class = kind != 3  # not ~is_unit: triton 3.2's interpreter cannot invert a scalar bool
    offsets = tl.arange(0, BLOCK)
    found = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(p * BLOCK, numel, n_programs * BLOCK):
        index = start + offsets
        ok = index < numel
        ids = tl.load(class_ptr + index, mask=ok & is_class, other=0)
        bad_id = (ids != ignore_index) & ((ids < 0) | (ids >= classes))
        if HAS_MASK:
            kept = tl.load(mask_ptr + index, mask=ok & (kind == 2), other=1) != 0  # MASKED_CLASS_IDS
            bad_id = bad_id & kept
        values = tl.load(unit_ptr + index, mask=ok & is_unit, other=0.0)
        bad = tl.where(is_unit, (values < 0.0) | (values > 1.0), bad_id) & ok
        found = found | bad.to(tl.int32)
    tl.store(flags_ptr + t * n_programs + p, tl.max(found, axis=0))


def flag_programs(max_elements: int) -> int:
    """Programs per task: one per ``BLOCK`` elements of the largest targets, at most ``MAX_PROGRAMS``."""
    return max(1, min(cdiv(max_elements, BLOCK), MAX_PROGRAMS))
