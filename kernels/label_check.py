"""``validate=True``'s value checks of every task's targets in one launch.

Checked with torch ops, each task costs five or six small kernels (compare, combine, ``any``)
before the one host sync that reads the verdicts: on a GPU host that bound by the host, tens of
microseconds each. This kernel reads every task's targets through the table of their addresses
the small-heads kernel reads them by, and writes one flag per program and task; the host reads
the flags in the same one sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import DirectLauncher, cdiv

# A task's kind in the spec: what its targets must hold (the kernel compares with these numbers).
UNCHECKED, CLASS_IDS, MASKED_CLASS_IDS, UNIT_INTERVAL = 0, 1, 2, 3
BLOCK = 1024
MAX_PROGRAMS = 64  # per task: the strided loop covers the rest


@triton.jit
def label_check_kernel(target_table_ptr, spec_ptr, mask_ptr, flags_ptr, n_programs,
                       BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """Program ``(p, t)`` looks at elements ``p * BLOCK + k * n_programs * BLOCK + [0, BLOCK)`` of
    task ``t``'s targets and stores ``flags[t, p]`` (int32 ``[T, n_programs]``): 1 if one of them
    is out of range, else 0. ``spec`` int64 ``[T, 4]``: the element count, the kind, the class
    count and the ignore index. Kinds: ``CLASS_IDS`` (int64 ``[rows]``: in ``[0, classes)`` or
    the ignore index), ``MASKED_CLASS_IDS`` (the same where ``mask`` [rows] bool holds: a token
    task with an attention mask), ``UNIT_INTERVAL`` (fp32: in ``[0, 1]``; NaN passes, it marks a
    skipped row) and ``UNCHECKED`` (no elements)."""
    p = tl.program_id(0)
    t = tl.program_id(1)
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


_launch = DirectLauncher(label_check_kernel)
_OPTIONS = {has_mask: {"BLOCK": BLOCK, "HAS_MASK": has_mask, "num_warps": 4} for has_mask in (False, True)}


def flag_bad_targets(target_table: torch.Tensor, spec: torch.Tensor, mask: torch.Tensor | None,
                     flags: torch.Tensor) -> None:  # fmt: skip
    """Writes every element of ``flags`` (int32 ``[T, P]``, ``P = flag_programs(largest element
    count)``): 1 where program ``p`` found one of task ``t``'s targets out of range, else 0 (see
    :func:`label_check_kernel`). ``target_table`` int64 ``[T]`` addresses, ``spec`` int64
    ``[T, 4]``, ``mask`` bool ``[rows]`` or None."""
    n_tasks, programs = flags.shape
    has_mask = mask is not None
    # every tensor's dtype is fixed (the mask bool, the rest int): the program count fixes the rest
    _launch((programs, n_tasks), (target_table, spec, mask if has_mask else target_table, flags, programs),
            _OPTIONS[has_mask], (has_mask, programs), fixed=True)  # fmt: skip


def flag_programs(max_elements: int) -> int:
    """Programs per task: one per ``BLOCK`` elements of the largest targets, at most ``MAX_PROGRAMS``."""
    return max(1, min(cdiv(max_elements, BLOCK), MAX_PROGRAMS))
