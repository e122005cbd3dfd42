"""Fused kernel for classification-sized heads: every small task, every row, one launch.

The grid runs over row blocks of two row sources: the hidden rows (token rows, whose
every ``seq_stride``-th row is also a sequence row) and, when given, the pooled rows.
For each row block the kernel walks the column groups of the plan (groups of
``BLOCK_C`` slots, each slot a row of the packed weight; a task never straddles a
group, so every task is one segment of one group) and, per group:

1. computes the logits tile ``[BLOCK_M, BLOCK_C]`` on chip, accumulating in fp32;
2. reads each task's targets straight from the caller's label tensors (a table of
   their addresses) and decides which rows count: ``ignore_index`` and out-of-range
   class ids, rows with a NaN target, masked tokens;
3. forward: the per-slot loss terms (segmented softmax cross-entropy with label
   smoothing, a logit softcap and a z-loss, BCE, MSE), reduced over rows into per-task loss
   sums, and the per-task counts of kept rows;
4. backward: ``dlogits`` scaled per task, then ``dH = dlogits @ W``,
   ``dW += dlogits^T @ H`` (fp32, products of fp32 dlogits: in 16-bit computation, whose rows
   TF32 holds exactly, two TF32 products of the dlogits' big and small parts; 3xTF32 in fp32) and
   ``db += sum(dlogits)``.

Logits and dlogits never leave the chip. dH rows belong to one program: with several
groups the partial dH waits in an fp32 scratch (the program's own rows) and is rounded
once, at the last group. With the levels apart and one token group after the sequence
groups, only sequence rows have several groups' dH to sum, and the scratch holds a row per
sequence row and one the other rows share, which only ever holds zeros.

Where the plan keeps the levels apart (``SPLIT_LEVELS``: the sequence tasks' groups first,
the token tasks' after), a hidden row block without a sequence row skips the sequence
groups (pooled blocks, few, walk every group): with a few narrow sequence heads beside a
token head, most blocks walk one narrow group instead of one wide one. In backward the
sequence groups' partial dW rows are then the blocks' that walk them, where there are fewer
such blocks than programs (``SEQ_DW_BY_BLOCK``), not every program's.

Slot table: int32 ``[G, SLOT_FIELDS, BLOCK_C]``, one column per slot (``SLOT_COL`` -1
marks padding; a group's used slots come first, and the used slots of all groups, numbered
``0 .. U - 1`` in order, are the rows of the partial dW buffers);
float table: fp32 ``[G, SLOT_FLT_FIELDS, BLOCK_C]`` (label smoothing, 1 / C, the column's
weight: a cross-entropy class weight or a bce positive weight, 1 for none, the sum of its
task's column weights, the softcap and the z-loss factor, 0 for none).
Target table: int64 ``[T]`` addresses; cross-entropy targets are int64 ``[rows]``,
bce/mse targets fp32 ``[rows, C]``, both contiguous.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..backends import TRITON_VERSION
from .launcher import DirectLauncher, cdiv
from .tiling import KEEP_TUNING, TUNING, logits_tile, rows_bucket, softcapped, tf32_split

SLOT_COL, SLOT_TASK, SLOT_KIND, SLOT_LEVEL, SLOT_CLASS, SLOT_SEGMENT, SLOT_FIRST, SLOT_CLASSES, SLOT_IGNORE = range(9)
SLOT_FIELDS = 9
FLT_SMOOTHING, FLT_INV_CLASSES, FLT_COLUMN_WEIGHT, FLT_WEIGHT_SUM, FLT_SOFTCAP, FLT_Z_LOSS = range(6)
SLOT_FLT_FIELDS = 6
DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _slot_field(slot_int_ptr, group, field: tl.constexpr, slots, BLOCK_C: tl.constexpr, SLOT_FIELDS: tl.constexpr):
    return tl.load(slot_int_ptr + (group * SLOT_FIELDS + field) * BLOCK_C + slots)


@triton.jit
def _add_per_slot(partial_ptrs, atomic_ptrs, value, atomic_mask, revisit, PARTIALS: tl.constexpr):
    """Adds a per-slot ``[BLOCK_C]`` vector: into this program's partial row (stored at its
    first row block, added to after that) with ``PARTIALS``, else by float atomics."""
    if PARTIALS:
        if revisit:
            value += tl.load(partial_ptrs)
        tl.store(partial_ptrs, value)
    else:
        tl.atomic_add(atomic_ptrs, value, mask=atomic_mask, sem="relaxed")


@triton.jit
def _skips_sequence_groups(block, n_blocks_hidden, n_hidden_rows, seq_stride, BLOCK_M: tl.constexpr):
    """Whether row ``block`` skips the sequence groups (with the levels apart): a hidden block
    that holds no sequence row (one every ``seq_stride`` rows, none for 0). A pooled block walks
    every group."""
    first_row = block * BLOCK_M
    next_seq_row = tl.cdiv(first_row, tl.maximum(seq_stride, 1)) * seq_stride
    no_seq_row = (seq_stride == 0) | (next_seq_row >= tl.minimum(first_row + BLOCK_M, n_hidden_rows))
    return (block < n_blocks_hidden) & no_seq_row


@triton.jit
def _sequence_block(block, n_blocks_hidden, seq_stride, BLOCK_M: tl.constexpr):
    """The number of a row block that walks the sequence groups (with the levels apart) among
    those that do, in order (:func:`sequence_blocks` counts them): with sequence rows every
    ``seq_stride`` hidden rows, the sequence rows before the block where no block holds two
    (``seq_stride >= BLOCK_M``), else the block's own (every block before it holds one); a
    pooled block's number among the pooled ones (the hidden rows then hold none)."""
    hidden_number = tl.where(seq_stride >= BLOCK_M, tl.cdiv(block * BLOCK_M, tl.maximum(seq_stride, 1)), block)
    return tl.where(block >= n_blocks_hidden, block - n_blocks_hidden, hidden_number)


@triton.jit
def _zero_sequence_partials(loss_ptr, count_ptr, db_ptr, dw_ptr, pid, n_groups, n_seq_groups, n_used_slots, n_seq_slots,
                            D, BACKWARD: tl.constexpr, CLASS_WEIGHTS: tl.constexpr, SEQ_DW_BY_BLOCK: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Zeroes this program's partials of the sequence groups, which its first row block skips:
    their per-slot loss sums and, with ``CLASS_WEIGHTS``, counts (forward) or db, and unless
    ``SEQ_DW_BY_BLOCK`` their used slots' dW rows (the first ``n_seq_slots`` of the program's)."""
    slots = tl.arange(0, BLOCK_C)
    for group in range(0, n_seq_groups):
        part_slots = (pid * n_groups + group) * BLOCK_C + slots
        if BACKWARD:
            tl.store(db_ptr + part_slots, tl.zeros((BLOCK_C,), dtype=tl.float32))
        else:
            tl.store(loss_ptr + part_slots, tl.zeros((BLOCK_C,), dtype=tl.float32))
            if CLASS_WEIGHTS:
                tl.store(count_ptr + part_slots, tl.zeros((BLOCK_C,), dtype=tl.float32))
    if BACKWARD and not SEQ_DW_BY_BLOCK:
        ks = tl.arange(0, BLOCK_K)
        for slot0 in range(0, n_seq_slots, BLOCK_C):
            rows = (pid * n_used_slots + slot0 + slots).to(tl.int64)
            for k0 in range(0, D, BLOCK_K):
                tl.store(dw_ptr + rows[:, None] * D + (k0 + ks)[None, :], tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32),
                         mask=((slot0 + slots) < n_seq_slots)[:, None] & ((k0 + ks) < D)[None, :])  # fmt: skip


@triton.jit
def small_heads_kernel(
    h_ptr, p_ptr, w_ptr, b_ptr, target_table_ptr, mask_ptr,
    task_scale_ptr, grad_out_ptr, loss_ptr, count_ptr,
    dh_ptr, dp_ptr, dh_acc_ptr, dw_ptr, db_ptr,
    slot_int_ptr, slot_flt_ptr, group_segments_ptr,
    stride_hn, stride_hd, n_hidden_rows, stride_pn, stride_pd, n_pooled_rows, seq_stride,
    stride_wc, stride_wd, D, n_groups, n_seq_groups, n_seq_slots, n_used_slots, n_seq_dw_rows, stride_dhn, stride_dpn,
    ROWS_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K_LOGITS: tl.constexpr,
    PREFETCH_DW: tl.constexpr,
    SLOT_FIELDS: tl.constexpr, SLOT_FLT_FIELDS: tl.constexpr, BACKWARD: tl.constexpr, PARTIALS: tl.constexpr,
    HAS_MASK: tl.constexpr, WRITE_DH: tl.constexpr, HAS_DH_INIT: tl.constexpr, USE_DH_ACC: tl.constexpr,
    SPLIT_LEVELS: tl.constexpr, DH_ACC_BY_SEQ_ROW: tl.constexpr, SEQ_DW_BY_BLOCK: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, CLASS_WEIGHTS: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
):  # fmt: skip
    """Forward (``BACKWARD=False``): adds per-task loss sums into ``loss_ptr`` and the divisors
    of their means into ``count_ptr`` ([T] fp32): kept rows, or for a cross-entropy task with
    class weights the summed weights of its kept rows' target classes. Backward: writes dH
    (``dh_ptr``/``dp_ptr``, in the dtype of the rows) and adds dW, db (fp32); the summed loss of
    task ``t`` has the gradient ``task_scale_ptr[t] * grad_out_ptr[0]`` (fp32). The rows (fp32,
    or ``DOT``) and the weight are rounded to ``DOT``, the computation dtype, as they are loaded.
    With ``CLASS_WEIGHTS`` the cross-entropy terms carry their columns' weights, and so do the
    counts. With ``SOFTCAP`` a cross-entropy slot with a softcap ``c`` sees
    ``c * tanh(logit / c)``; with ``Z_LOSS`` its task's rows add ``z * lse^2``. The logits loop
    steps ``BLOCK_K_LOGITS`` columns of D at a time, backward's dH/dW loop ``BLOCK_K``: that
    loop holds the dW and dH tiles, and a wider step there costs registers the logits loop does
    not need. With ``PREFETCH_DW`` (``PARTIALS``) a row block that adds to its program's partial
    dW rows loads their tile one K step ahead, carried in registers, instead of just before the
    add: its latency overlaps a step's products, for an extra layout conversion a step.

    ``PARTIALS``: each program owns partial rows, ``dw_ptr`` ``[programs, U, D]`` with a row per
    used slot (U = ``n_used_slots``: the used slots of all groups, numbered in order), and
    ``loss_ptr``, ``db_ptr`` and with ``CLASS_WEIGHTS`` ``count_ptr`` (a task's count at its first
    slot, 0 at the others) ``[programs, G * BLOCK_C]`` with an entry per slot, padding included
    (stored unmasked: masks there cost registers), stores them at its first row block (or zeroes
    them first, for the groups that block skips) and adds with plain loads and stores after that,
    so they need no zeroing beforehand; otherwise float atomics add into ``[T]``, ``[sum C, D]``
    and ``[sum C]``. With ``SEQ_DW_BY_BLOCK`` (the levels apart) the sequence groups' dW rows
    are the row blocks' instead of the programs': ``dw_ptr`` is ``[n_seq_dw_rows + programs * (U
    - n_seq_slots), D]``, first ``n_seq_slots`` rows for each block that walks the sequence groups
    (numbered by :func:`_sequence_block`; each stores its rows once), then the programs' rows of
    the other slots. Counts of rows are whole numbers, exact in any order: without
    ``CLASS_WEIGHTS`` atomics add them into ``[T]`` in either mode. Either way a slot adds to dW
    only in blocks with a row that counts for it. Without ``WRITE_DH`` backward skips dH (no
    gradient is needed for the rows: a frozen encoder). With ``USE_DH_ACC`` the fp32 scratch
    ``dh_acc_ptr`` has a row per row (hidden rows, then pooled ones), or with
    ``DH_ACC_BY_SEQ_ROW`` one per sequence row and one more.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_blocks_hidden = tl.cdiv(n_hidden_rows, BLOCK_M)
    n_blocks_total = n_blocks_hidden + tl.cdiv(n_pooled_rows, BLOCK_M)
    # At least one (fully masked) block, so that partials are stored even with no rows.
    n_blocks_total += (n_blocks_total == 0).to(tl.int32)
    if SPLIT_LEVELS and PARTIALS:
        if _skips_sequence_groups(pid, n_blocks_hidden, n_hidden_rows, seq_stride, BLOCK_M):
            _zero_sequence_partials(loss_ptr, count_ptr, db_ptr, dw_ptr, pid, n_groups, n_seq_groups, n_used_slots,
                                    n_seq_slots, D, BACKWARD, CLASS_WEIGHTS, SEQ_DW_BY_BLOCK, BLOCK_C,
                                    BLOCK_K)  # fmt: skip
    slots = tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    for block in range(pid, n_blocks_total, programs):
        revisit = block != pid  # the program's first row block stores its partials, later ones add
        from_pooled = block >= n_blocks_hidden
        if from_pooled:
            rows = (block - n_blocks_hidden) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < n_pooled_rows
            seq_row = rows
            is_seq_row = row_ok
            is_tok_row = rows < 0
        else:
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < n_hidden_rows
            safe_stride = tl.maximum(seq_stride, 1)
            seq_row = rows // safe_stride
            is_seq_row = row_ok & (seq_stride > 0) & ((rows % safe_stride) == 0)
            is_tok_row = row_ok
            if HAS_MASK:
                is_tok_row = is_tok_row & (tl.load(mask_ptr + rows.to(tl.int64), mask=row_ok, other=0) != 0)
        rows64 = rows.to(tl.int64)
        # The row pointers come from selects, not from the branch: through a branch the compiler
        # (triton 3.6) loses the rows' alignment and moves H and dH one 16-bit element at a time.
        h_row_ptrs = tl.where(from_pooled, p_ptr, h_ptr) + rows64 * tl.where(from_pooled, stride_pn, stride_hn)
        stride_k = tl.where(from_pooled, stride_pd, stride_hd)
        out_row_ptrs = tl.where(from_pooled, dp_ptr, dh_ptr) + rows64 * tl.where(from_pooled, stride_dpn, stride_dhn)
        seq_row64 = seq_row.to(tl.int64)
        # The fp32 dH scratch's row of each row: its own, or with DH_ACC_BY_SEQ_ROW its sequence
        # row's. There, with sequence groups first and at most one token group after them, only
        # sequence rows have several groups' dH to sum: the other rows share one row past the
        # sequence rows', where only zeros are written (their dH from sequence groups), and read
        # back, with no mask of their own (a mask there made some candidates spill).
        if DH_ACC_BY_SEQ_ROW:
            n_seq_rows = tl.where(seq_stride > 0, tl.cdiv(n_hidden_rows, tl.maximum(seq_stride, 1)), n_pooled_rows)
            acc_row = tl.where(is_seq_row, seq_row64, n_seq_rows)
        else:
            acc_row = rows64 + tl.where(from_pooled, n_hidden_rows, 0)
        # The block walks the groups from g_begin on. With SPLIT_LEVELS the sequence groups come
        # first and the token groups after, and a hidden block without a sequence row walks the
        # token groups alone (the partials of the sequence groups its program's first block skips
        # were zeroed above, and their dW rows unless those are the blocks'). group_first_slot: the
        # number of the group's first slot among the used slots.
        if SPLIT_LEVELS:
            skips = _skips_sequence_groups(block, n_blocks_hidden, n_hidden_rows, seq_stride, BLOCK_M)
            g_begin = tl.where(skips, n_seq_groups, 0)
            group_first_slot = tl.where(skips, n_seq_slots, 0)
        else:
            g_begin = 0
            group_first_slot = pid * 0
        for group in range(g_begin, n_groups):
            w_rows = _slot_field(slot_int_ptr, group, 0, slots, BLOCK_C, SLOT_FIELDS)
            slot_ok = w_rows >= 0
            part_slots = (pid * n_groups + group) * BLOCK_C + slots  # this program's per-slot partials
            task = _slot_field(slot_int_ptr, group, 1, slots, BLOCK_C, SLOT_FIELDS)
            kind = _slot_field(slot_int_ptr, group, 2, slots, BLOCK_C, SLOT_FIELDS)
            level = _slot_field(slot_int_ptr, group, 3, slots, BLOCK_C, SLOT_FIELDS)
            klass = _slot_field(slot_int_ptr, group, 4, slots, BLOCK_C, SLOT_FIELDS)
            segment = _slot_field(slot_int_ptr, group, 5, slots, BLOCK_C, SLOT_FIELDS)
            first = _slot_field(slot_int_ptr, group, 6, slots, BLOCK_C, SLOT_FIELDS)
            classes = _slot_field(slot_int_ptr, group, 7, slots, BLOCK_C, SLOT_FIELDS)
            ignore = _slot_field(slot_int_ptr, group, 8, slots, BLOCK_C, SLOT_FIELDS)
            # The float table's rows: FLT_SMOOTHING, FLT_INV_CLASSES, FLT_COLUMN_WEIGHT, FLT_WEIGHT_SUM,
            # FLT_SOFTCAP, FLT_Z_LOSS.
            flt_row = slot_flt_ptr + group * SLOT_FLT_FIELDS * BLOCK_C + slots
            smoothing = tl.load(flt_row)
            inv_classes = tl.load(flt_row + BLOCK_C)
            col_weight = tl.load(flt_row + 2 * BLOCK_C)
            is_ce = (kind == 0) & slot_ok
            is_dense = (kind != 0) & slot_ok
            is_bce = (kind == 1)[None, :]

            x = logits_tile(h_row_ptrs, row_ok, stride_k, w_ptr, stride_wc, stride_wd, w_rows, slot_ok, D,
                            BLOCK_M, BLOCK_C, BLOCK_K_LOGITS, DOT, PRECISION)  # fmt: skip
            x += tl.load(b_ptr + w_rows, mask=slot_ok, other=0.0).to(tl.float32)[None, :]
            if SOFTCAP:
                cap = tl.load(flt_row + 4 * BLOCK_C)
                capped = (cap > 0)[None, :]
                x_capped, tanh_x = softcapped(x, tl.where(cap > 0, cap, 1.0)[None, :])
                x = tl.where(capped, x_capped, x)

            # Targets, straight from the label tensors. y holds a bce/mse slot's target (0 for NaN)
            # and, in a cross-entropy slot, 1 where the slot is its row's class and 0 elsewhere.
            tok_slot = (level == 1)[None, :]
            row_on = tl.where(tok_slot, is_tok_row[:, None], is_seq_row[:, None]) & slot_ok[None, :]
            target_row = tl.where(tok_slot, rows64[:, None], seq_row64[:, None])
            address = tl.load(target_table_ptr + task, mask=slot_ok, other=0)
            ce_ptrs = address.to(tl.pointer_type(tl.int64))[None, :] + target_row
            target = tl.load(ce_ptrs, mask=row_on & is_ce[None, :], other=-1)
            dense_ptrs = address.to(tl.pointer_type(tl.float32))[None, :] + target_row * classes[None, :] + klass[None, :]
            y = tl.load(dense_ptrs, mask=row_on & is_dense[None, :], other=0.0)
            y_nan = y != y
            # Whether the row counts for the slot: a cross-entropy row whose class id is in range
            # and not ignored; a bce/mse row unless one of its targets is NaN (below).
            counted = tl.where(is_ce[None, :], (target != ignore[None, :]) & (target >= 0) & (target < classes[None, :]),
                               row_on)  # fmt: skip
            y = tl.where(is_ce[None, :], (target == klass[None, :]).to(tl.float32), tl.where(y_nan, 0.0, y))

            # One max per segment: the logit max of a cross-entropy task, +inf for a
            # bce/mse row holding a NaN target.
            probe = tl.where(is_ce[None, :], x, tl.where(y_nan, float("inf"), float("-inf")))
            seg_max = tl.full((BLOCK_M, BLOCK_C), float("-inf"), dtype=tl.float32)
            n_segments = tl.load(group_segments_ptr + group)
            for s in range(0, n_segments):
                in_seg = (segment == s)[None, :]
                top = tl.max(tl.where(in_seg, probe, float("-inf")), axis=1)
                seg_max = tl.where(in_seg, top[:, None], seg_max)
            active = counted & (is_ce[None, :] | (seg_max != float("inf")))

            # Cross-entropy logits from here on are relative to their row's max (the others
            # are left as they are): a row's loss and gradients depend on those alone.
            seg_max = tl.where(is_ce[None, :], seg_max, 0.0)
            x -= seg_max
            exp_x = tl.where(is_ce[None, :], tl.exp(x), 0.0)
            seg_sum = tl.full((BLOCK_M, BLOCK_C), 1.0, dtype=tl.float32)
            for s in range(0, n_segments):
                in_seg = (segment == s)[None, :] & is_ce[None, :]
                total = tl.sum(tl.where(in_seg, exp_x, 0.0), axis=1)
                seg_sum = tl.where(in_seg, total[:, None], seg_sum)
            log_sum = tl.log(seg_sum)  # the log-sum-exp of the relative logits; 0 outside cross-entropy slots
            smooth = smoothing[None, :]
            if CLASS_WEIGHTS:
                # A row's loss (1 - eps) w_y nll_y + eps / C sum_c w_c nll_c counts its lse
                # coef = (1 - eps) w_y + eps / C sum_c w_c times.
                weight_sum = tl.load(flt_row + 3 * BLOCK_C)
                w_target = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
                for s in range(0, n_segments):
                    in_seg = (segment == s)[None, :] & is_ce[None, :]
                    w_row = tl.sum(tl.where(in_seg, y * col_weight[None, :], 0.0), axis=1)
                    w_target = tl.where(in_seg, w_row[:, None], w_target)
                coef = (1.0 - smooth) * w_target + smooth * (inv_classes * weight_sum)[None, :]
            if Z_LOSS:
                z_loss = tl.load(flt_row + 5 * BLOCK_C)[None, :]
                lse = seg_max + log_sum

            if BACKWARD:
                prob = exp_x / seg_sum
                if CLASS_WEIGHTS:
                    ce_grad = coef * prob - ((1.0 - smooth) * y + smooth * inv_classes[None, :]) * col_weight[None, :]
                else:
                    ce_grad = prob - (1.0 - smooth) * y - smooth * inv_classes[None, :]
                if Z_LOSS:
                    ce_grad += 2.0 * z_loss * lse * prob
                # bce: d/dx of (1 - y) x + (1 + (p - 1) y) softplus(-x), with p the column's
                # positive weight; sigmoid(x) - y for p = 1
                log_weight = 1.0 + (col_weight[None, :] - 1.0) * y
                bce_grad = log_weight / (1.0 + tl.exp(-x)) - col_weight[None, :] * y
                mse_grad = 2.0 * (x - y)
                grad = tl.where(is_ce[None, :], ce_grad, tl.where(is_bce, bce_grad, mse_grad))
                if SOFTCAP:
                    grad *= tl.where(capped, 1.0 - tanh_x * tanh_x, 1.0)
                scale = tl.load(task_scale_ptr + task, mask=slot_ok, other=0.0) * tl.load(grad_out_ptr)
                grad = tl.where(active, grad * scale[None, :], 0.0)
                grad_lo = grad.to(DOT)
                if PRECISION != "tf32x3":
                    # dW's fp32 products from tf32 ones: a 16-bit row is exact in tf32, so two
                    # products (grad's big and small parts) do what tf32x3's three do for fp32 rows.
                    grad_t_big, grad_t_small = tf32_split(tl.trans(grad))
                _add_per_slot(db_ptr + part_slots, db_ptr + w_rows, tl.sum(grad, axis=0), slot_ok, revisit, PARTIALS)
                # dW moves only for the slots some row of this block counts for (a sequence
                # task's slots have none in most token blocks), and on a program's first block
                # for every slot, to start its partial rows; padding slots never move.
                slot_live = slot_ok & (tl.max(active.to(tl.int32), axis=0) > 0)
                dw_slots = slot_live
                if PARTIALS:
                    dw_first_row = pid * n_used_slots + group_first_slot
                    dw_revisit = revisit
                    dw_slots = slot_live | (slot_ok & (block == pid))
                    if SEQ_DW_BY_BLOCK:
                        # a sequence group's rows are the block's own, stored once, every used slot
                        by_block = group < n_seq_groups
                        dw_first_row = tl.where(
                            by_block, _sequence_block(block, n_blocks_hidden, seq_stride, BLOCK_M) * n_seq_slots,
                            n_seq_dw_rows + pid * (n_used_slots - n_seq_slots) - n_seq_slots) + group_first_slot
                        dw_revisit = revisit & (group >= n_seq_groups)
                        dw_slots = tl.where(by_block, slot_ok, dw_slots)
                is_last = group == n_groups - 1
                w_col_ptrs = w_ptr + w_rows.to(tl.int64)[:, None] * stride_wc
                if PARTIALS:
                    if PREFETCH_DW:
                        # pointers of its own: the plain path's made here, before the loop, cost
                        # that path registers (a tile of pointers live across the loop)
                        dw_next_ptrs = dw_ptr + (dw_first_row + slots).to(tl.int64)[:, None] * D + ks[None, :]
                        dw_adds = dw_slots[:, None] & dw_revisit
                        dw_next = tl.load(dw_next_ptrs, mask=dw_adds & (ks < D)[None, :], other=0.0)
                for k0 in range(0, D, BLOCK_K):
                    k_ok = (k0 + ks) < D
                    out_mask = row_ok[:, None] & k_ok[None, :]
                    if PARTIALS:
                        if PREFETCH_DW:
                            dw_before = dw_next
                            dw_next_ptrs += BLOCK_K
                            dw_next = tl.load(dw_next_ptrs, mask=dw_adds & ((k0 + BLOCK_K + ks) < D)[None, :],
                                              other=0.0)  # fmt: skip
                    if WRITE_DH:
                        w = tl.load(w_col_ptrs + (k0 + ks)[None, :] * stride_wd,
                                    mask=slot_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                        dh = tl.dot(grad_lo, w.to(DOT), input_precision=PRECISION)
                        acc_ptrs = dh_acc_ptr + acc_row[:, None] * D + (k0 + ks)[None, :]
                        if HAS_DH_INIT:
                            dh += tl.load(acc_ptrs, mask=out_mask, other=0.0)
                        elif USE_DH_ACC:
                            if group > g_begin:
                                dh += tl.load(acc_ptrs, mask=out_mask, other=0.0)
                        if is_last:
                            tl.store(out_row_ptrs[:, None] + (k0 + ks)[None, :], dh.to(dh_ptr.dtype.element_ty),
                                     mask=out_mask)  # fmt: skip
                        else:
                            tl.store(acc_ptrs, dh, mask=out_mask)
                    h = tl.load(h_row_ptrs[:, None] + (k0 + ks)[None, :] * stride_k, mask=out_mask, other=0.0)
                    if PRECISION == "tf32x3":
                        dw = tl.dot(tl.trans(grad), h.to(tl.float32), input_precision="tf32x3")
                    else:
                        h_exact = h.to(DOT).to(tl.float32)
                        dw = tl.dot(grad_t_small, h_exact, input_precision="tf32")
                        dw = tl.dot(grad_t_big, h_exact, dw, input_precision="tf32")
                    dw_mask = dw_slots[:, None] & k_ok[None, :]
                    if PARTIALS:
                        dw_rows = dw_first_row + slots  # padding: masked
                        dw_ptrs = dw_ptr + dw_rows.to(tl.int64)[:, None] * D + (k0 + ks)[None, :]
                        if dw_revisit:
                            if PREFETCH_DW:
                                dw += dw_before
                            else:
                                dw += tl.load(dw_ptrs, mask=dw_mask, other=0.0)
                        tl.store(dw_ptrs, dw, mask=dw_mask)
                    else:
                        dw_ptrs = dw_ptr + w_rows.to(tl.int64)[:, None] * D + (k0 + ks)[None, :]
                        tl.atomic_add(dw_ptrs, dw, mask=dw_mask, sem="relaxed")
                if USE_DH_ACC:
                    # Later groups read the fp32 partial dH this program's own threads wrote.
                    tl.debug_barrier()
            else:
                log_weight = 1.0 + (col_weight[None, :] - 1.0) * y
                softplus = (1.0 - y) * x + log_weight * (tl.maximum(-x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
                # the row's loss over its segment: log-sum-exp minus the (smoothed) target logit, both relative
                weighted_x = ((1.0 - smooth) * y + smooth * inv_classes[None, :]) * x
                if CLASS_WEIGHTS:
                    ce_term = tl.where(first[None, :] == 1, coef * log_sum, 0.0) - weighted_x * col_weight[None, :]
                else:
                    ce_term = tl.where(first[None, :] == 1, log_sum, 0.0) - weighted_x
                if Z_LOSS:
                    ce_term += tl.where(first[None, :] == 1, z_loss * lse * lse, 0.0)
                diff = x - y
                term = tl.where(is_ce[None, :], ce_term, tl.where(is_bce, softplus, diff * diff))
                slot_loss = tl.sum(tl.where(active, term, 0.0), axis=0)
                if CLASS_WEIGHTS:
                    # the divisor of a weighted mean: the class weights of the kept rows' targets, at
                    # the task's first slot (in partials: a sum in any order need not be exact)
                    row_weight = tl.where(active, tl.where(is_ce[None, :], w_target, 1.0), 0.0)
                    kept = tl.where(first == 1, tl.sum(row_weight, axis=0), 0.0)
                    _add_per_slot(count_ptr + part_slots, count_ptr + task, kept, slot_ok & (first == 1), revisit,
                                  PARTIALS)  # fmt: skip
                else:  # whole numbers, exact in fp32 in any order: atomics keep it deterministic
                    kept = tl.sum(active.to(tl.float32), axis=0)
                    tl.atomic_add(count_ptr + task, kept, mask=slot_ok & (first == 1), sem="relaxed")
                _add_per_slot(loss_ptr + part_slots, loss_ptr + task, slot_loss, slot_ok, revisit, PARTIALS)
            group_first_slot += tl.sum(slot_ok.to(tl.int32), axis=0)
        if PARTIALS:
            # The next row block re-reads the partial rows this program's threads wrote.
            tl.debug_barrier()


@triton.jit
def small_heads_reduce_kernel(
    dw_part_ptr, db_part_ptr, slot_row_ptr, slot_index_ptr, dw_ptr, db_ptr, n_programs, n_slots, n_padded_slots, D,
    n_block_slots, n_blocks, n_block_rows,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """Sums the partials over the programs (or row blocks), in a fixed order, and stores each
    used slot's sums in its packed weight row of ``dw_ptr`` [sum C, D] (``ACCUMULATE``: adds
    them to it) and ``db_ptr`` [sum C] (fp32). ``dw_part_ptr`` holds ``[n_blocks,
    n_block_slots, D]`` (the first slots' rows by row block, ``n_block_rows`` rows in all, of
    which the first ``n_blocks * n_block_slots`` were written) then ``[programs, n_slots -
    n_block_slots, D]`` (the other slots'); ``db_part_ptr`` ``[programs, padded slots]``.
    ``slot_row_ptr`` and ``slot_index_ptr`` [slots] int32 hold each used slot's row and its index
    among the padded slots. The grid is (slots, blocks of D)."""
    slot = tl.program_id(0)
    pid_d = tl.program_id(1)
    row = tl.load(slot_row_ptr + slot)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ps = tl.arange(0, BLOCK_P)
    by_block = slot < n_block_slots
    n_parts = tl.where(by_block, n_blocks, n_programs)
    part_step = tl.where(by_block, n_block_slots, n_slots - n_block_slots)
    first_row = tl.where(by_block, slot, n_block_rows + slot - n_block_slots)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p_ok = (p0 + ps) < n_parts
        dw_rows = first_row + (p0 + ps).to(tl.int64) * part_step
        dw += tl.sum(tl.load(dw_part_ptr + dw_rows[:, None] * D + ds[None, :], mask=p_ok[:, None] & d_ok[None, :],
                             other=0.0), axis=0)  # fmt: skip
    dw_ptrs = dw_ptr + row.to(tl.int64) * D + ds
    if ACCUMULATE:
        dw += tl.load(dw_ptrs, mask=d_ok, other=0.0)
    tl.store(dw_ptrs, dw, mask=d_ok)
    if pid_d == 0:
        padded = tl.load(slot_index_ptr + slot)
        db = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for p0 in range(0, n_programs, BLOCK_P):
            program = (p0 + ps).to(tl.int64)
            db += tl.load(db_part_ptr + program * n_padded_slots + padded, mask=(p0 + ps) < n_programs, other=0.0)
        tl.store(db_ptr + row, tl.sum(db, axis=0))


# Autotuning candidates per BLOCK_C as (BLOCK_M, BLOCK_K, num_warps, num_stages[,
# BLOCK_K_LOGITS[, 1]]), the logits loop stepping BLOCK_K unless a fifth is given (a sixth, 1:
# PREFETCH_DW; see BACKWARD_SHAPES_BY_BLOCK_C); the first runs
# untuned (MTLFAST_AUTOTUNE=0, the interpreter). The kernel holds a dozen [BLOCK_M, BLOCK_C]
# tiles at once, so wide heads take short row blocks over more warps: each candidate compiles
# for sm_80 and sm_90 with (almost) no register spills (with triton 3.8; older ones leave out
# SPILL_BEFORE_TRITON_3_8), which tests/test_kernels_compile.py checks. The untuned first
# ones spill nothing and fit sm_80's shared memory. With fp32 rows (under autocast) or class
# weights some candidates spill a little; each width keeps at least one that does not, for
# the autotuner to find (at 128, without pipelining: triton 3.6 on sm_80 spills with class
# weights otherwise). At 64 (the width of bert-base-4task's 33 outputs) the forward took 98
# us on an H200 for ~4 waves of 32-row blocks, ~1 us per step of its 24-step K-loop: a memory
# latency each, at one program per SM (~210 registers a thread). The deeper-pipelined
# candidates keep more loads in flight, or take fewer, wider K steps (added after that run;
# not yet timed). Widths 32 and 128 got a 4-stage candidate each later, also not yet timed.
# What counts is rows in flight per SM: as launched (bf16 rows, D a multiple of 16, sm_90,
# triton 3.8, cuobjdump) the 8-warp firsts of widths 64 and 128 take 154-192 registers a
# thread in both directions, one program per SM (of 65536 registers), so 32 and 16 rows. The
# 4-warp candidates ((32, 32, 4, 2) at 32, (32, 16, 4, 2) at 64, (16, 16, 4, 2) at 128) take
# 168-230, two programs per SM or more: twice the rows in flight in backward, and in forward
# 1.5x at 32 and 2x at 64 and 128. Not yet timed. Or the same rows move more bytes per step:
# the five-element candidates step the logits loop (all of the forward, half of the backward)
# 4 to 8 times wider than their dH/dW loop, whose dW and dH tiles cannot widen without
# spilling; at D = 768 that loop takes 3 to 6 steps instead of 24 (48 at width 128). As
# launched on sm_90, (32, 32, 8, 2, 128) at width 64 takes 171 registers in backward, fewer
# than the width's first. Not yet timed. Width 32 is bert-base-4task's since its sequence
# tasks' group is kept apart from ner's: there the 64-row (64, 16, 8, 2) holds twice the rows
# of the width's first in backward, one program per SM each as triton 3.6 (the GPU hosts')
# launches them on sm_90 (220 registers against 216), while 3.8 gives the first 128 and 32
# bytes of stack, two programs per SM (bench/results/cpu-2core_2026-12-07_small-heads-
# registers-levels-apart-sm90-*). Not yet timed.
SHAPES_BY_BLOCK_C: dict[int, list[tuple[int, ...]]] = {
    16: [(16, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2, 128)],
    32: [(32, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 4), (32, 32, 4, 2), (32, 32, 8, 2, 256),
         (64, 16, 8, 2)],
    64: [(32, 32, 8, 2), (16, 16, 8, 2), (16, 32, 8, 2), (32, 32, 8, 3), (32, 32, 8, 4), (16, 64, 8, 3), (32, 16, 4, 2),
         (32, 32, 8, 2, 128), (16, 32, 8, 2, 256)],
    128: [(16, 16, 8, 2), (16, 32, 8, 2), (16, 16, 8, 1), (16, 32, 8, 4), (16, 16, 4, 2), (16, 16, 8, 2, 64)],
}
# Candidates that triton before 3.8 compiles with spills, left out there, by (BLOCK_C,
# backward). Triton 3.6 (torch 2.11's, the GPU hosts') gives them 40-248 bytes of stack a
# thread on sm_80 or sm_90 in either mode, in the generic compile of the spill checks, where
# 3.8 keeps every candidate within 32 bytes (bench/results/cpu-2core_2026-12-06_small-heads-
# stack-triton3.6-vs-3.8.txt; the backward since dW takes two TF32 products: ..._small-heads-
# stack-triton3.6-c197058.txt). The checks run on the installed triton's list.
SPILL_BEFORE_TRITON_3_8: dict[tuple[int, bool], tuple[tuple[int, ...], ...]] = {
    (64, False): ((32, 16, 4, 2), (16, 32, 8, 2, 256), (64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 4, 2)),
    (64, True): ((32, 16, 4, 2), (32, 32, 8, 2, 128), (16, 32, 8, 2, 256)),
    (128, False): ((32, 32, 8, 2),),
    (128, True): ((16, 32, 8, 4), (16, 16, 8, 2, 64)),
}
# Candidates for the forward alone, which holds no dlogits, dH or dW tiles: twice the rows of
# the width's first candidate in one program, or at width 64 in two 4-warp programs per SM
# ((32, 32, 4, 2): 232 registers as launched), where the backward spills (bf16, generic
# compile: 80-192 bytes of stack a thread on sm_80 and sm_90, where the forward has none; the
# 32-row one at width 128 56 bytes on sm_80 alone). Larger blocks also read the fp32 weight
# from L2 fewer times per row. Not yet timed.
FORWARD_SHAPES_BY_BLOCK_C: dict[int, list[tuple[int, ...]]] = {
    32: [(64, 32, 8, 2)],
    64: [(64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 4, 2)],
    128: [(32, 32, 8, 2)],
}
# Candidates for the backward alone, a sixth element 1: the width's first with PREFETCH_DW, the
# partial dW tile of a program's later row blocks loaded one K step ahead. As compiled on the CPU
# (sm_90, bf16, levels apart, as launched), the plain first candidate's dH/dW loop at width 32
# waits on that load (LDG) right before it adds, every K step of such a block: about half of
# bert-base-4task's 512 token blocks at 264 programs. The variant takes more registers (width
# 32: 234 against 216 with triton 3.6, 166 and no stack against 128 and 32 bytes with 3.8, so
# one program per SM instead of two there; bench/results/cpu-2core_2026-12-07_small-heads-
# prefetch-dw-sass-plain-as-before.txt), so the autotuner decides. Not yet timed.
BACKWARD_SHAPES_BY_BLOCK_C: dict[int, list[tuple[int, ...]]] = {
    16: [(16, 32, 8, 2, 32, 1)],
    32: [(32, 32, 8, 2, 32, 1)],
    64: [(32, 32, 8, 2, 32, 1)],
}


def _config(shape: tuple[int, ...]) -> triton.Config:
    block_m, block_k, warps, stages, *extra = shape
    kwargs = {"BLOCK_M": block_m, "BLOCK_K": block_k, "BLOCK_K_LOGITS": extra[0] if extra else block_k,
              "PREFETCH_DW": extra[1:] == [1]}  # fmt: skip
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def shapes_for(block_c: int, backward: bool, every_triton: bool = False) -> list[tuple[int, ...]]:
    """The candidates of one head-group width and direction, the untuned one first: the
    width's candidates, then its forward-only or backward-only ones; those the installed
    triton spills with left out, unless ``every_triton``."""
    own = BACKWARD_SHAPES_BY_BLOCK_C if backward else FORWARD_SHAPES_BY_BLOCK_C
    shapes = SHAPES_BY_BLOCK_C[block_c] + own.get(block_c, [])
    if every_triton or TRITON_VERSION >= (3, 8):
        return shapes
    return [shape for shape in shapes if shape not in SPILL_BEFORE_TRITON_3_8.get((block_c, backward), ())]


def configs_for(block_c: int, backward: bool, every_triton: bool = False) -> list[triton.Config]:
    """:func:`shapes_for` as autotuning configurations."""
    return [_config(shape) for shape in shapes_for(block_c, backward, every_triton)]


def _shape_of(kwargs: dict, num_warps: int, num_stages: int) -> tuple[int, ...]:
    """The candidate a configuration's keyword arguments and options make, as the tables write it."""
    shape = (kwargs["BLOCK_M"], kwargs["BLOCK_K"], num_warps, num_stages)
    if kwargs["PREFETCH_DW"]:
        return (*shape, kwargs["BLOCK_K_LOGITS"], 1)
    return shape if kwargs["BLOCK_K_LOGITS"] == kwargs["BLOCK_K"] else (*shape, kwargs["BLOCK_K_LOGITS"])


def _shape(config: triton.Config) -> tuple[int, ...]:
    return _shape_of(config.kwargs, config.num_warps, config.num_stages)


def _prune(configs, named_args, **kwargs):
    """Keeps the candidates of the launch's BLOCK_C and direction."""
    block_c = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    shapes = shapes_for(block_c, kwargs.get("BACKWARD", named_args.get("BACKWARD")))
    return [c for c in configs if _shape(c) in shapes]


# BLOCK_C picks the candidate set, so a result tuned at one width must not serve another.
_KEY = ["ROWS_BUCKET", "n_pooled_rows", "D", "n_groups", "n_seq_groups", "BLOCK_C"]
# Where triton can (3.6 and 3.8; not 3.2), tuning results are kept in its cache
# (TRITON_CACHE_DIR) beside the compiled kernels: a later process with the same triton, GPU
# architecture, kernel source and key takes the pick without compiling and timing every
# candidate again (see tiling.KEEP_TUNING).
TUNING_KEPT_ON_DISK = KEEP_TUNING and "cache_results" in inspect.signature(triton.autotune).parameters


@cache
def _tuned_kernel(backward: bool):
    """The autotuned kernel, built on first use (an Autotuner needs a GPU driver)."""
    options: dict[str, object] = (
        {"restore_value": ["dw_ptr", "db_ptr", "dh_acc_ptr"]} if backward else {"reset_to_zero": ["loss_ptr", "count_ptr"]}
    )
    if TUNING_KEPT_ON_DISK:
        options["cache_results"] = True
    every = [_config(shape) for shape in dict.fromkeys(s for width in SHAPES_BY_BLOCK_C for s in shapes_for(width, backward))]
    return triton.autotune(every, key=_KEY, prune_configs_by={"early_config_prune": _prune}, **options)(
        small_heads_kernel
    )


# The autotuner keeps a run's arguments and its pick on itself (Autotuner.nargs, .best_config):
# threads launching at once (nn.DataParallel's replicas on their first step) would read each
# other's, and a launch would take another variant's rows per program. They take turns.
_TUNING_LOCK = threading.Lock()


def tuned_launch(backward: bool, grid, args: tuple, constexprs: dict):
    """Launches :func:`small_heads_kernel` through its autotuner (which tunes a key it has not
    seen) and returns the ``triton.Config`` that the launch ran with."""
    with _TUNING_LOCK:
        kernel = _tuned_kernel(backward)
        kernel[grid](*args, **constexprs)
        return kernel.best_config


# A variant's keyword arguments (constexprs and, once tuned, launch options): later launches
# skip Autotuner.run and, through the direct launchers, JITFunction.run, whose Python per call
# (argument binding, keys) is a large share of a small step's host time.
_TUNED: dict[tuple, dict] = {}


@dataclass(frozen=True, eq=False)
class SmallHeadsLaunch:
    """What fixes a launch of :func:`small_heads_kernel` but the tensors a call passes: the
    plan's slot tables and the flags. Hashed by identity: :func:`launch_small_heads` keys its
    launches on it, so a caller keeps one per shapes, strides and dtypes of those tensors."""

    backward: bool
    slot_int: torch.Tensor  # int32 [G, SLOT_FIELDS, BLOCK_C]
    slot_flt: torch.Tensor  # fp32 [G, SLOT_FLT_FIELDS, BLOCK_C]
    group_segments: torch.Tensor  # int32 [G]: tasks per group
    n_used_slots: int
    n_seq_groups: int  # > 0: the levels apart, these first groups the sequence tasks', token tasks' after
    n_seq_slots: int  # the used slots of those groups
    seq_stride: int
    compute_dtype: torch.dtype  # of the matrix products: hidden's, or 16-bit for fp32 hidden
    class_weights: bool  # some cross-entropy task has class weights (the plan's column weights)
    softcap: bool  # some task has a softcap (the float table holds it)
    z_loss: bool  # some task has a z-loss
    partial_programs: int = 0  # > 0: at most that many persistent programs owning partials; 0: float atomics
    write_dh: bool = False  # backward writes dH
    has_dh_init: bool = False  # backward adds dH to the fp32 dh_acc's contents (other paths' dH)
    # > 0 (backward, partials, the levels apart): the sequence groups' partial dW rows are the row
    # blocks' that walk them, at most this many (sequence_block_bound), not the programs'
    seq_dw_blocks: int = 0

    @property
    def seq_dw_slots(self) -> int:
        """The used slots whose partial dW rows are by row block: the sequence groups' with
        ``seq_dw_blocks``, else none."""
        return self.n_seq_slots if self.seq_dw_blocks else 0

    @property
    def seq_dw_rows(self) -> int:
        """The partial dW rows reserved for the row blocks, ahead of the programs' rows."""
        return self.seq_dw_blocks * self.seq_dw_slots

    @property
    def dw_partial_rows(self) -> int:
        """Rows of the partial dW buffer ``[rows, D]`` (fp32) a backward launch with partials
        takes: the row blocks', then each program's of the other used slots."""
        return self.seq_dw_rows + self.partial_programs * (self.n_used_slots - self.seq_dw_slots)


class Launched(NamedTuple):
    """What :func:`launch_small_heads` launched: its programs, and the row blocks whose
    sequence dW rows it wrote (0 without ``launch.seq_dw_blocks``)."""

    programs: int
    seq_dw_blocks: int


def _launched(launch: SmallHeadsLaunch, n_hidden: int, n_pooled: int, block_m: int) -> Launched:
    seq_blocks = sequence_blocks(n_hidden, n_pooled, launch.seq_stride, block_m) if launch.seq_dw_blocks else 0
    return Launched(_programs(n_hidden, n_pooled, block_m, launch.partial_programs), seq_blocks)


# Options, what a launch launches and the trailing arguments by launch.
_PREPARED: dict[SmallHeadsLaunch, tuple[dict, Launched, tuple]] = {}
PREPARED_KEPT = 1024
_launch_small_heads = DirectLauncher(small_heads_kernel)
_launch_reduce = DirectLauncher(small_heads_reduce_kernel)


def launch_small_heads(
    launch: SmallHeadsLaunch,
    hidden: torch.Tensor,
    pooled: torch.Tensor | None,
    token_mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target_table: torch.Tensor,
    *,
    task_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    grad_hidden: torch.Tensor | None = None,
    grad_pooled: torch.Tensor | None = None,
    dh_acc: torch.Tensor | None = None,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
) -> Launched:
    """One launch of :func:`small_heads_kernel`; returns the programs launched and the row
    blocks whose sequence dW rows were written. With ``launch.partial_programs > 0`` at most that many persistent
    programs run, each owning partial buffers (see :func:`small_heads_kernel`; reproducible bit
    for bit); only the first rows of those, one per program launched, are written (and with
    ``launch.seq_dw_blocks`` the sequence slots' dW rows of the blocks that walk them, ahead of
    the programs': see ``SmallHeadsLaunch.dw_partial_rows``). Forward passes ``loss`` and
    ``count`` (partials then, ``count`` only with class weights); backward the rest (``grad_*``
    and ``dh_acc`` only with ``write_dh``; ``dh_acc`` only with several groups or
    ``has_dh_init``); a buffer a launch does not use is None.

    The launch's first call works out its variant, options and program count and keeps them
    with the ints it passes (strides, sizes): later calls with ``launch`` only gather the
    tensors. A launch of other shapes, strides or dtypes needs a launch of its own; with the
    launcher's ``check_fixed`` every call works them out anew and raises if they differ."""
    dummy = target_table
    pooled_rows = hidden if pooled is None else pooled
    grad_hidden = hidden if grad_hidden is None else grad_hidden
    grad_pooled = grad_hidden if grad_pooled is None else grad_pooled
    tensors = (
        hidden, pooled_rows, weight, bias, target_table,
        dummy if token_mask is None else token_mask.view(torch.uint8),
        dummy if task_scale is None else task_scale, dummy if grad_out is None else grad_out,
        dummy if loss is None else loss, dummy if count is None else count,
        grad_hidden, grad_pooled, dummy if dh_acc is None else dh_acc,
        dummy if grad_weight is None else grad_weight, dummy if grad_bias is None else grad_bias,
    )  # fmt: skip
    prepared = _PREPARED.get(launch)
    if prepared is not None and not _launch_small_heads.check_fixed:
        kept_options, launched, trailing = prepared
        _launch_small_heads((launched.programs,), tensors + trailing, kept_options, launch, fixed=True)
        return launched
    n_groups, _, block_c = launch.slot_int.shape
    n_hidden, hidden_size = hidden.shape
    n_pooled = pooled.shape[0] if pooled is not None else 0
    trailing = (
        launch.slot_int, launch.slot_flt, launch.group_segments,
        hidden.stride(0), hidden.stride(1), n_hidden, pooled_rows.stride(0), pooled_rows.stride(1), n_pooled,
        launch.seq_stride, weight.stride(0), weight.stride(1), hidden_size, n_groups, launch.n_seq_groups,
        launch.n_seq_slots, launch.n_used_slots, launch.seq_dw_rows,
        grad_hidden.stride(0), grad_pooled.stride(0), rows_bucket(n_hidden),
    )  # fmt: skip
    args = tensors + trailing
    backward, partials, write_dh = launch.backward, launch.partial_programs > 0, launch.write_dh
    # The rows bucket, then the rest of the autotuner's key and everything else that selects a
    # compiled variant (the constexprs by what they are made from: torch dtypes hash faster
    # than triton's).
    variant = (trailing[-1], (n_pooled, hidden_size, n_groups, launch.n_seq_groups, hidden.device, hidden.dtype,
                              weight.dtype, bias.dtype, block_c, backward, partials, token_mask is not None, write_dh,
                              launch.has_dh_init, launch.compute_dtype, launch.class_weights, launch.softcap,
                              launch.z_loss, launch.seq_dw_blocks > 0))  # fmt: skip
    options = _TUNED.get(variant)
    if options is None:
        constexprs = dict(
            BLOCK_C=block_c, SLOT_FIELDS=SLOT_FIELDS, SLOT_FLT_FIELDS=SLOT_FLT_FIELDS, BACKWARD=backward,
            PARTIALS=partials, HAS_MASK=token_mask is not None, WRITE_DH=write_dh,
            HAS_DH_INIT=write_dh and launch.has_dh_init, USE_DH_ACC=write_dh and (launch.has_dh_init or n_groups > 1),
            SPLIT_LEVELS=splits_levels(launch), DH_ACC_BY_SEQ_ROW=dh_acc_by_seq_row(launch),
            SEQ_DW_BY_BLOCK=launch.seq_dw_blocks > 0,
            DOT=DOT_DTYPES[launch.compute_dtype], PRECISION="tf32x3" if launch.compute_dtype == torch.float32 else "ieee",
            CLASS_WEIGHTS=launch.class_weights, SOFTCAP=launch.softcap, Z_LOSS=launch.z_loss,
        )  # fmt: skip
        if TUNING:
            grid = lambda meta: (_programs(n_hidden, n_pooled, meta["BLOCK_M"], launch.partial_programs),)
            best = tuned_launch(backward, grid, args, constexprs)
            _TUNED[variant] = {**constexprs, **best.all_kwargs()}
            return _launched(launch, n_hidden, n_pooled, best.kwargs["BLOCK_M"])
        # the first config; only its universal options (older interpreters take no others)
        first = configs_for(block_c, backward)[0]
        options = _TUNED[variant] = {**constexprs, **first.kwargs, "num_warps": first.num_warps,
                                     "num_stages": first.num_stages}  # fmt: skip
    launched = _launched(launch, n_hidden, n_pooled, options["BLOCK_M"])
    if prepared is None:
        if len(_PREPARED) >= PREPARED_KEPT:
            _PREPARED.clear()
        _PREPARED[launch] = (options, launched, trailing)
    elif prepared != (options, launched, trailing):  # checking: what was kept must be what is worked out
        raise AssertionError("a small-heads launch was called with tensors of other shapes, strides or dtypes")
    _launch_small_heads((launched.programs,), args, options, launch, fixed=True)
    return launched


def splits_levels(launch: SmallHeadsLaunch) -> bool:
    """Whether the plan keeps the levels apart: sequence groups first, then token groups."""
    return launch.n_seq_groups > 0


def dh_acc_by_seq_row(launch: SmallHeadsLaunch) -> bool:
    """Whether backward's fp32 dH scratch has a row per sequence row rather than per row: with
    the levels apart, no dH from other paths to start from and one token group, only sequence
    rows have several groups' dH to sum (sequence groups come first)."""
    return (launch.write_dh and not launch.has_dh_init and splits_levels(launch)
            and launch.slot_int.shape[0] - launch.n_seq_groups == 1)  # fmt: skip


def sequence_block_bound(n_hidden: int, n_pooled: int, seq_stride: int) -> int:
    """The most row blocks that walk the sequence groups, whatever their height: one per
    sequence row (every ``seq_stride``-th hidden row, or with 0 the pooled rows)."""
    return cdiv(n_hidden, seq_stride) if seq_stride else n_pooled


def sequence_blocks(n_hidden: int, n_pooled: int, seq_stride: int, block_m: int) -> int:
    """The row blocks of ``block_m`` rows that walk the sequence groups (the levels apart): the
    hidden blocks that hold a sequence row, and every pooled block; the kernel numbers them in
    order (``_sequence_block``)."""
    pooled = cdiv(n_pooled, block_m)
    if not seq_stride or not n_hidden:
        return pooled
    if seq_stride >= block_m:  # no block holds two sequence rows
        return cdiv(n_hidden, seq_stride) + pooled
    # every whole block holds one; the last, shorter one may not
    hidden_blocks = cdiv(n_hidden, block_m)
    last_start = (hidden_blocks - 1) * block_m
    return hidden_blocks - (cdiv(last_start, seq_stride) * seq_stride >= n_hidden) + pooled


def dh_acc_rows(launch: SmallHeadsLaunch, n_hidden: int, n_pooled: int) -> int:
    """Rows of the fp32 dH scratch a backward launch needs (0: none): without dH from other
    paths (``has_dh_init``, which brings its own), a row per row, or per sequence row and one
    more (see :func:`dh_acc_by_seq_row`), when the plan has several groups."""
    if not launch.write_dh or launch.has_dh_init or launch.slot_int.shape[0] == 1:
        return 0
    if not dh_acc_by_seq_row(launch):
        return n_hidden + n_pooled
    return (cdiv(n_hidden, launch.seq_stride) if launch.seq_stride else n_pooled) + 1


def tuned_shapes() -> list[tuple[str, int, int, tuple[int, ...]]]:
    """The configurations launched so far, as ``(direction, BLOCK_C, rows bucket, (BLOCK_M,
    BLOCK_K, num_warps, num_stages[, BLOCK_K_LOGITS[, 1]]))``: the autotuner's picks on a GPU, the
    untuned first candidates otherwise."""
    return [("backward" if options["BACKWARD"] else "forward", options["BLOCK_C"], rows,
             _shape_of(options, options["num_warps"], options["num_stages"]))
            for (rows, _), options in _TUNED.items()]  # fmt: skip


def _programs(n_hidden: int, n_pooled: int, block_m: int, partial_programs: int) -> int:
    """Programs of one launch: a row block each, or at most ``partial_programs`` (> 0)."""
    blocks = cdiv(n_hidden, block_m) + cdiv(n_pooled, block_m)
    return max(1, min(blocks, partial_programs) if partial_programs > 0 else blocks)


# A program of the reduction walks every partial of its slot and block of D in order, one tile
# [BLOCK_P, BLOCK_D] a step; its loads are not pipelined, so each step waits for its tile.
# 128 programs a step (the 264 of an H100 or H200 in 3 steps) over 32 columns (whole 128-byte
# lines) take a third of the steps 32 x 128 took, over four times the programs.
REDUCE_BLOCK_P, REDUCE_BLOCK_D = 128, 32
_REDUCE_OPTIONS = {accumulate: {"BLOCK_P": REDUCE_BLOCK_P, "BLOCK_D": REDUCE_BLOCK_D, "ACCUMULATE": accumulate,
                                "num_warps": 4} for accumulate in (False, True)}  # fmt: skip


def reduce_partials(
    dw_part: torch.Tensor, db_part: torch.Tensor, n_programs: int, slot_row: torch.Tensor, slot_index: torch.Tensor,
    grad_weight: torch.Tensor, grad_bias: torch.Tensor, accumulate: bool = False, block_slots: int = 0,
    n_blocks: int = 0, block_rows: int = 0,
) -> None:
    """``grad_weight[row]`` = the sum of a used slot's partial dW rows (``accumulate``: ``+=``)
    and ``grad_bias[row] = db_part[:n_programs, index].sum(0)`` for every used slot, its packed
    row and its index among the padded slots (see :func:`small_heads_reduce_kernel`); other rows
    are left alone. ``dw_part`` is ``[block_rows + programs * (U - block_slots), D]``: the first
    ``block_slots`` used slots' rows by row block (``n_blocks`` of them written, ``block_rows``
    rows reserved), then the other slots' by program; ``db_part`` ``[programs, padded slots]``.
    Of the programs' rows the first ``n_programs`` were written."""
    hidden_size = dw_part.shape[1]
    slots = slot_row.shape[0]
    grid = (slots, cdiv(hidden_size, REDUCE_BLOCK_D))
    ints = (n_programs, slots, db_part.shape[1], hidden_size, block_slots, n_blocks, block_rows)
    _launch_reduce(grid, (dw_part, db_part, slot_row, slot_index, grad_weight, grad_bias, *ints),
                   _REDUCE_OPTIONS[accumulate], (accumulate, ints, grad_weight.dtype), fixed=True)  # fmt: skip
