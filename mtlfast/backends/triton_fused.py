"""The fused algorithm in Triton kernels (``mtlfast.kernels``).

Tasks are split in three paths, picked per task:

- small path: every task with at most ``MAX_BLOCK_C`` outputs (cross-entropy with or without
  class weights, a softcap, a z-loss; bce, mse) goes through one launch of
  ``small_heads_kernel`` in forward and one in backward, whatever the number of tasks, both
  levels together; the kernel reads the label tensors itself, so the host issues a handful
  of small ops per call;
- large path: a cross-entropy task with more classes and no class weights (a vocabulary
  head, with a softcap or a z-loss or neither) is walked in chunks of columns (and rows,
  when there are many) of at most ``LARGE_CHUNK_ELEMENTS`` logits. Forward computes each
  chunk with a cuBLAS GEMM (fp32 output) and folds it into an online log-sum-exp
  (``large_ce_lse_merge_kernel``); backward recomputes the chunk, turns it into scaled
  ``dlogits`` in one pass (``large_ce_dlogits_kernel``) and adds
  ``dH += dlogits @ W`` and ``dW += dlogits^T @ H`` with GEMMs that accumulate in fp32
  (beta = 1). No N x C buffer, no float atomics. With a gradient filter
  (``grad_filter_eps``) the dlogits pass also marks the tiles holding an entry of
  ``softmax - target`` above the threshold, and Triton GEMMs (``filtered_matmul``) walk
  only those, as Cut Cross-Entropy's backward skips the rest;
- wide path: a task that neither kernel takes (a bce or mse head or a cross-entropy head
  with class weights wider than ``MAX_BLOCK_C``) is walked in chunks of rows: cuBLAS GEMMs,
  and the torch backend's ops for that loss (``torch_chunked.task_span``), in forward for the
  loss and again in backward for ``dlogits``; its dH joins the large path's fp32 dH.

Forward keeps each task's gradient scale (task weight / divisor), the table of label
addresses and, per large task, the row log-sum-exp [rows] and the class ids. Nothing
synchronises with the host. The per-task loss sums and counts go into zeroed buffers kept
between calls, which the loss finalize zeroes again after reading them: no fill kernel per
call. fp32 rows with 16-bit compute (an encoder output under autocast) are read as they are:
the small-heads kernel rounds them on chip, the vocabulary and wide paths cast a copy once
per pass; dH comes back in fp32. fp64 inputs and a V100 with triton before 3.6
(whose compiler fails on the kernels there) run the ``torch`` backend instead.

With ``validate=True`` the label values of every task are checked by programs of the loss
finalize launch (:func:`plan_label_check`), whose flags the caller reads in its one host sync.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..task import BCE
from . import TRITON_VERSION, torch_chunked
from .base import HeadProblem, HeadSpec, HostValuesCache, addmm_acc_, keep_bounded, making_kept_tensors, mm_acc, weight_in

if TYPE_CHECKING:
    from ..kernels.label_check import LabelCheck
    from ..kernels.small_heads import SmallHeadsLaunch

name = "triton"

MAX_BLOCK_C = 128
# dW/db of the small path accumulate in per-program partial buffers (plain stores, then
# one reduction; bitwise reproducible) when these fit in PARTIAL_BYTES with enough
# programs to fill the GPU, else with float atomics. deterministic=True always uses
# partials, with up to DETERMINISTIC_PARTIAL_BYTES.
PARTIAL_BYTES = 64 << 20
DETERMINISTIC_PARTIAL_BYTES = 256 << 20
# Logits per chunk of the large path (fp32 chunk plus its 16-bit dlogits: 384 MiB at most),
# and the narrowest chunk of columns, so that each GEMM stays large.
LARGE_CHUNK_ELEMENTS = 1 << 26
LARGE_MIN_CHUNK_COLS = 1024


def alloc_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocates a buffer the kernels overwrite (tests poison it); only the part a kernel
    reports as written is ever read."""
    # the sizes as separate arguments: torch parses them in two thirds of the host time of a tuple
    return torch.empty(*shape, dtype=dtype, device=device) if shape else torch.empty((), dtype=dtype, device=device)


@cache
def _kernels() -> SimpleNamespace:
    """The kernel modules, imported on first use (this module imports without triton)."""
    from ..kernels import filtered_matmul, label_check, large_ce, loss_finalize, small_heads

    return SimpleNamespace(small_heads=small_heads, large_ce=large_ce, loss_finalize=loss_finalize,
                           filtered_matmul=filtered_matmul, label_check=label_check)  # fmt: skip


def _is_small(head: HeadSpec) -> bool:
    return head.num_cols <= MAX_BLOCK_C


@cache
def _small_tasks(heads: tuple[HeadSpec, ...]) -> tuple[int, ...]:
    """Indices of the tasks that take the small path: at most ``MAX_BLOCK_C`` outputs."""
    return tuple(i for i, h in enumerate(heads) if _is_small(h))


@cache
def _large_tasks(heads: tuple[HeadSpec, ...]) -> tuple[int, ...]:
    """Indices of the tasks that take the large path: wide cross-entropy without class weights."""
    return tuple(i for i, h in enumerate(heads) if not _is_small(h) and h.is_ce and not h.column_weights)


@cache
def _wide_tasks(heads: tuple[HeadSpec, ...]) -> tuple[int, ...]:
    """Indices of the tasks that take the wide path: the others (bce, mse or class-weighted
    cross-entropy wider than ``MAX_BLOCK_C``)."""
    large = _large_tasks(heads)
    return tuple(i for i, h in enumerate(heads) if not _is_small(h) and i not in large)


def kernels_compile_for(capability: tuple[int, int]) -> bool:
    """Whether this triton compiles the kernels for a GPU of compute ``capability``: before 3.6
    (seen with 3.2) the small-heads kernel aborts the process in LLVM for sm_70 (V100), and its
    backward's TF32 products fail in LLVM (``IndexError: map::at``) for sm_75 (T4); 3.6 and 3.8
    compile both."""
    return TRITON_VERSION >= (3, 6) or capability >= (8, 0)


@cache
def _kernels_compile_on(device: torch.device) -> bool:
    return device.type != "cuda" or kernels_compile_for(torch.cuda.get_device_capability(device))


def _runs_torch_backend(compute_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a problem computed in ``compute_dtype`` on ``device`` runs the torch backend instead."""
    return compute_dtype == torch.float64 or not _kernels_compile_on(device)


def _delegates(problem: HeadProblem) -> bool:
    return _runs_torch_backend(problem.compute_dtype, problem.hidden.device)


@dataclass(frozen=True)
class _SmallPlan:
    slot_int: Tensor  # int32 [G, SLOT_FIELDS, BLOCK_C]
    slot_flt: Tensor  # fp32 [G, SLOT_FLT_FIELDS, BLOCK_C]
    group_segments: Tensor  # int32 [G]: tasks per group
    slot_row: Tensor  # int32 [U]: the packed weight row of each used slot, groups in order
    slot_index: Tensor  # int32 [U]: the index of each used slot among all G * BLOCK_C
    slot_to_task: Tensor  # fp64 [G * BLOCK_C, T]: 1 where a slot belongs to a task
    n_seq_groups: int  # with the levels apart, the first groups (sequence tasks'); 0 otherwise
    n_seq_slots: int  # the used slots of those groups
    class_weights: bool  # some cross-entropy task has class weights
    softcap: bool  # some task has a softcap
    z_loss: bool  # some task has a z-loss

    @property
    def n_groups(self) -> int:
        return self.slot_int.shape[0]

    @property
    def block_c(self) -> int:
        return self.slot_int.shape[2]

    @property
    def n_used_slots(self) -> int:
        """U: the slots that hold a weight row (the partial buffers' rows)."""
        return self.slot_row.shape[0]

    @property
    def launch_fields(self) -> dict:
        """What the plan fixes of a ``small_heads.SmallHeadsLaunch``."""
        return dict(slot_int=self.slot_int, slot_flt=self.slot_flt, group_segments=self.group_segments,
                    n_used_slots=self.n_used_slots, n_seq_groups=self.n_seq_groups, n_seq_slots=self.n_seq_slots,
                    class_weights=self.class_weights, softcap=self.softcap, z_loss=self.z_loss)  # fmt: skip


def _group_width(columns: int) -> int:
    return min(MAX_BLOCK_C, max(16, 1 << (max(columns, 1) - 1).bit_length()))


def _packed(tasks: list[int], heads: tuple[HeadSpec, ...], block_c: int) -> list[list[int]]:
    """The tasks in groups of at most ``block_c`` columns, in order."""
    groups: list[list[int]] = []
    used = block_c
    for i in tasks:
        if used + heads[i].num_cols > block_c:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += heads[i].num_cols
    return groups


def _small_levels(heads: tuple[HeadSpec, ...]) -> tuple[list[int], list[int]]:
    """The small tasks of sequence level and of token level, each in packed weight order."""
    small = sorted(_small_tasks(heads), key=lambda i: heads[i].col_start)
    return [i for i in small if not heads[i].is_token], [i for i in small if heads[i].is_token]


def _columns(tasks: list[int], heads: tuple[HeadSpec, ...]) -> int:
    return sum(heads[i].num_cols for i in tasks)


def _grouping(heads: tuple[HeadSpec, ...], split_levels: bool) -> tuple[int, list[list[int]], int]:
    """``(BLOCK_C, groups, sequence groups)``: the small tasks packed into groups of at most
    BLOCK_C columns, in packed weight order, or with ``split_levels`` the sequence tasks' groups
    first, then the token tasks'."""
    sequence, token = _small_levels(heads)
    if split_levels:
        # a hidden row block without a sequence row walks the token groups alone: there must be one
        assert sequence and token, "the levels are kept apart only with small tasks of both"
        block_c = _group_width(max(_columns(sequence, heads), _columns(token, heads)))
        seq_groups = _packed(sequence, heads, block_c)
        return block_c, seq_groups + _packed(token, heads, block_c), len(seq_groups)
    small = sorted(sequence + token, key=lambda i: heads[i].col_start)
    block_c = _group_width(_columns(small, heads))
    return block_c, _packed(small, heads, block_c), 0


def _splits_levels(heads: tuple[HeadSpec, ...], seq_stride: int) -> bool:
    """Whether the small tasks' groups keep the two levels apart (see :func:`_grouping`). A token
    row block then walks the token groups alone, unless it holds a sequence row (every
    ``seq_stride``-th row; 0: the sequence rows are pooled rows, in blocks of their own). Kept
    apart when that saves work, counted as groups times width, for blocks of up to 64 rows."""
    if not all(_small_levels(heads)):
        return False
    together_c, together, _ = _grouping(heads, False)
    split_c, groups, n_seq_groups = _grouping(heads, True)
    blocks_with_sequence_rows = min(1.0, 64 / seq_stride) if seq_stride else 0.0
    walked = len(groups) - n_seq_groups + blocks_with_sequence_rows * n_seq_groups
    return walked * split_c < len(together) * together_c


@cache
def _small_plan(heads: tuple[HeadSpec, ...], device: torch.device, split_levels: bool) -> _SmallPlan:
    """Packs the small tasks into groups of slots (:func:`_grouping`), one slot per row of the
    packed weight."""
    small_heads = _kernels().small_heads
    small = _small_tasks(heads)
    block_c, groups, n_seq_groups = _grouping(heads, split_levels)
    slot_int = torch.full((len(groups), small_heads.SLOT_FIELDS, block_c), -1, dtype=torch.int32)
    slot_flt = torch.zeros((len(groups), small_heads.SLOT_FLT_FIELDS, block_c), dtype=torch.float32)
    slot_to_task = torch.zeros(len(groups) * block_c, len(heads), dtype=torch.float64)
    for g, members in enumerate(groups):
        s = 0
        for segment, i in enumerate(members):
            head = heads[i]
            weights = head.column_weights.values if head.column_weights else (1.0,) * head.num_cols
            for c in range(head.num_cols):
                fields = {
                    small_heads.SLOT_COL: head.col_start + c,
                    small_heads.SLOT_TASK: i,
                    small_heads.SLOT_KIND: head.kind,
                    small_heads.SLOT_LEVEL: head.level,
                    small_heads.SLOT_CLASS: c,
                    small_heads.SLOT_SEGMENT: segment,
                    small_heads.SLOT_FIRST: int(c == 0),
                    small_heads.SLOT_CLASSES: head.num_cols,
                    small_heads.SLOT_IGNORE: head.ignore_index,
                }
                for field, value in fields.items():
                    slot_int[g, field, s] = value
                slot_flt[g, small_heads.FLT_SMOOTHING, s] = head.label_smoothing
                slot_flt[g, small_heads.FLT_INV_CLASSES, s] = 1.0 / head.num_cols
                slot_flt[g, small_heads.FLT_COLUMN_WEIGHT, s] = weights[c]
                slot_flt[g, small_heads.FLT_WEIGHT_SUM, s] = sum(weights)
                slot_flt[g, small_heads.FLT_SOFTCAP, s] = head.softcap
                slot_flt[g, small_heads.FLT_Z_LOSS, s] = head.z_loss
                slot_to_task[g * block_c + s, i] = 1.0
                s += 1
    slot_cols = slot_int[:, small_heads.SLOT_COL, :].reshape(-1)
    used = (slot_cols >= 0).nonzero().flatten()
    return _SmallPlan(
        slot_int=slot_int.to(device),
        slot_flt=slot_flt.to(device),
        group_segments=torch.tensor([len(m) for m in groups], dtype=torch.int32, device=device),
        slot_row=slot_cols[used].to(device),
        slot_index=used.to(device, torch.int32),
        slot_to_task=slot_to_task.to(device),
        n_seq_groups=n_seq_groups,
        n_seq_slots=sum(heads[i].num_cols for members in groups[:n_seq_groups] for i in members),
        class_weights=any(heads[i].is_ce and heads[i].column_weights for i in small),
        softcap=any(heads[i].softcap for i in small),
        z_loss=any(heads[i].z_loss for i in small),
    )


def _unwritten_rows(heads: tuple[HeadSpec, ...], packed_rows: int, small_written: bool) -> tuple[tuple[int, int], ...]:
    """``[start, end)`` runs of packed weight rows that backward's kernels do not write: rows of
    absent tasks, and of the small tasks unless their partials are reduced (``small_written``)."""
    written = sorted((h.col_start, h.col_end) for h in heads if small_written or not _is_small(h))
    gaps, start = [], 0
    for begin, end in written:
        if begin > start:
            gaps.append((start, begin))
        start = max(start, end)
    if start < packed_rows:
        gaps.append((start, packed_rows))
    return tuple(gaps)


@cache
def _count_scale(heads: tuple[HeadSpec, ...], device: torch.device) -> Tensor:
    """fp32 [T]: C for small bce/mse tasks (their divisor is kept rows * C, the kernel counts
    rows), 1 for cross-entropy and for the wide path (whose counts include C)."""
    wide = _wide_tasks(heads)
    scale = [1.0 if h.is_ce or i in wide else float(h.num_cols) for i, h in enumerate(heads)]
    return torch.tensor(scale, dtype=torch.float32, device=device)


# Device tables of label addresses by (device, addresses): a training loop that reallocates
# its label tensors each step mostly gets the same addresses back from the caching allocator.
_TABLES = HostValuesCache(kept=64)


@cache
def _target_dtypes(heads: tuple[HeadSpec, ...]) -> tuple[torch.dtype, ...]:
    return tuple(torch.int64 if head.is_ce else torch.float32 for head in heads)


def _target_table(heads: tuple[HeadSpec, ...], targets: Sequence[Tensor], device: torch.device,
                  capturing: bool) -> Tensor:  # fmt: skip
    """int64 [T]: the address of each task's targets (int64 [rows] or fp32 [rows, C], contiguous)."""
    for target, expected in zip(targets, _target_dtypes(heads)):
        if target.dtype != expected or not target.is_contiguous():
            raise ValueError(f"triton backend: targets must be contiguous {expected}, got {target.dtype}")
    addresses = tuple(t.data_ptr() for t in targets)
    return _TABLES.get((device, *addresses), addresses, torch.int64, device, capturing)


# The label check's spec tensors by (device, values): a loop's tasks and shapes recur.
_CHECK_SPECS = HostValuesCache(kept=64)


def plan_label_check(heads: tuple[HeadSpec, ...], targets: Sequence[Tensor], token_mask: Tensor | None,
                     compute_dtype: torch.dtype) -> LabelCheck | None:  # fmt: skip
    """``validate=True``'s check of every task's target values (``validation.start_value_checks``),
    for the forward of a problem with these heads, targets, token mask and computation dtype to
    run: its loss finalize launch writes the check's int32 ``[T, P]`` flags, nonzero where a task's
    targets hold a value out of range. None where this backend's kernels do not take the problem
    (fp64, a GPU they do not compile for: the forward runs the torch backend's). The targets are
    the forward's (contiguous int64 class ids, fp32 bce/mse targets; anything else is a ValueError
    of the table, as in the forward). Never under CUDA graph capture: ``validate=True`` raises
    there before any check is planned."""
    device = targets[0].device
    if _runs_torch_backend(compute_dtype, device):
        return None
    table = _target_table(heads, targets, device, False)
    values, programs = _label_check_spec(heads, tuple([t.numel() for t in targets]), token_mask is not None)
    spec = _CHECK_SPECS.get((device, values), values, torch.int64, device, False)
    flags = alloc_output((len(heads), programs), torch.int32, device)
    return _kernels().label_check.LabelCheck(table, spec, token_mask, flags)


@lru_cache(maxsize=256)
def _label_check_spec(heads: tuple[HeadSpec, ...], elements: tuple[int, ...], masked: bool) -> tuple[tuple[int, ...], int]:
    """The label check's spec (``[T, 4]`` flattened: elements, kind, classes, ignore index) and its
    programs per task, for targets of ``elements`` each (``masked``: with a token mask)."""
    label_check = _kernels().label_check
    spec = []
    for head, count in zip(heads, elements):
        if head.is_ce:
            kind = label_check.MASKED_CLASS_IDS if head.is_token and masked else label_check.CLASS_IDS
        else:
            kind = label_check.UNIT_INTERVAL if head.kind == BCE else label_check.UNCHECKED
        spec.append((count if kind != label_check.UNCHECKED else 0, kind, head.num_cols, head.ignore_index))
    programs = label_check.flag_programs(max(row[0] for row in spec))
    return tuple(v for row in spec for v in row), programs


def _large_target(problem: HeadProblem, index: int) -> Tensor:
    """int32 class ids of a large task, -1 for skipped rows."""
    return torch.where(problem.valid_rows(index), problem.targets[index], -1).to(torch.int32)


@cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 stand in for the interpreter on the CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _large_chunk_shape(n_rows: int, n_cols: int, chunk_rows: int) -> tuple[int, int]:
    """``(rows, columns)`` of one chunk of a large head's logits: columns split evenly into
    pieces of at least ``LARGE_MIN_CHUNK_COLS`` (a multiple of 64), rows filling the rest of
    ``LARGE_CHUNK_ELEMENTS`` unless ``chunk_rows`` is given."""
    widest = max(LARGE_MIN_CHUNK_COLS, LARGE_CHUNK_ELEMENTS // max(n_rows, 1))
    pieces = -(-n_cols // widest)
    cols = min(n_cols, -(-n_cols // (64 * pieces)) * 64)
    rows = chunk_rows or max(1, LARGE_CHUNK_ELEMENTS // cols)
    return min(rows, max(n_rows, 1)), cols


def _large_rows(problem: HeadProblem, head: HeadSpec) -> Tensor:
    """A large head's rows in the computation dtype (cuBLAS takes no fp32 rows with 16-bit weights)."""
    return problem.rows_for(head).to(problem.compute_dtype)


def _large_chunks(problem: HeadProblem, head: HeadSpec, rows_all: Tensor) -> Iterator[tuple[int, slice, Tensor, slice, Tensor]]:
    """Walks a large head chunk by chunk, yielding ``(c0, cols, weight, rows, logits)``: the
    chunk's first class, its packed weight rows (``cols``) and their weight in the computation
    dtype, its rows of ``rows_all`` (the head's rows in the computation dtype), and its fp32
    logits ``[rows, cols]`` (cuBLAS, without the bias)."""
    n = rows_all.shape[0]
    chunk_rows, chunk_cols = _large_chunk_shape(n, head.num_cols, problem.chunk_size)
    for c0, c1 in _spans(head.num_cols, chunk_cols):
        cols = slice(head.col_start + c0, head.col_start + c1)
        weight = weight_in(problem.compute_dtype, problem.weight[cols])
        for r0, r1 in _spans(n, chunk_rows):
            yield c0, cols, weight, slice(r0, r1), mm_acc(rows_all[r0:r1], weight.t(), torch.float32)


def _large_lse(problem: HeadProblem, head: HeadSpec, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row log-sum-exp, target logit and sum of logits of a large head (fp32 [rows] each)."""
    large_ce = _kernels().large_ce
    state = torch.zeros((4, target.shape[0]), dtype=torch.float32, device=target.device)
    state[0].fill_(float("-inf"))
    for c0, cols, _, rows, logits in _large_chunks(problem, head, _large_rows(problem, head)):
        large_ce.lse_merge(logits, problem.bias[cols], target[rows], c0, state[:, rows], head.softcap)
    run_max, run_sum, target_logit, logit_sum = state.unbind(0)
    return run_max + run_sum.log(), target_logit, logit_sum


def _large_backward(
    problem: HeadProblem, head: HeadSpec, target: Tensor, lse: Tensor, row_scale: Tensor, grad_rows: Tensor | None,
    grad_weight: Tensor, grad_bias: Tensor, accumulate: bool,
) -> None:
    """Adds a large head's gradients into ``grad_rows`` (fp32 [rows, D]; None: not needed) and
    writes its rows of ``grad_weight`` (``accumulate``: adds to them) and ``grad_bias`` (fp32,
    old contents never read otherwise): per chunk, logits recomputed, scaled dlogits in the
    computation dtype, then GEMMs accumulating in fp32: cuBLAS's, or with a gradient filter
    ``filtered_matmul``'s over the marked tiles."""
    large_ce, filtered_matmul = _kernels().large_ce, _kernels().filtered_matmul
    filtering = problem.grad_filter_eps >= 0
    rows_all = _large_rows(problem, head)
    device = rows_all.device
    if rows_all.shape[0] == 0:  # no chunks to walk
        if not accumulate:
            grad_weight[head.col_start : head.col_end].zero_()
        grad_bias[head.col_start : head.col_end].zero_()
        return
    for c0, cols, weight, rows, logits in _large_chunks(problem, head, rows_all):
        dlogits = alloc_output(logits.shape, problem.compute_dtype, device)
        splits = large_ce.dlogits_splits(*logits.shape, 2 * _multiprocessors(device))
        col_sums = alloc_output((splits, logits.shape[1]), torch.float32, device)
        flags = filtered_matmul.tile_flags(*logits.shape, device) if filtering else None
        large_ce.dlogits(logits, problem.bias[cols], target[rows], c0, lse[rows], row_scale[rows],
                         head.label_smoothing, head.num_cols, dlogits, col_sums, problem.grad_filter_eps,
                         flags, head.softcap, head.z_loss)  # fmt: skip
        del logits
        first = rows.start == 0
        if first:
            torch.sum(col_sums, dim=0, out=grad_bias[cols])
        else:
            grad_bias[cols] += col_sums.sum(dim=0)
        add_dw = accumulate or not first
        if filtering:
            filtered_matmul.filtered_grads(dlogits, flags, weight, rows_all[rows],
                                           None if grad_rows is None else grad_rows[rows], grad_weight[cols],
                                           accumulate=add_dw)  # fmt: skip
            continue
        if grad_rows is not None:
            addmm_acc_(grad_rows[rows], dlogits, weight)
        addmm_acc_(grad_weight[cols], dlogits.t(), rows_all[rows], beta=1.0 if add_dw else 0.0)


def _wide_chunks(problem: HeadProblem, head: HeadSpec, rows_all: Tensor, weight: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """Walks a wide-path head by chunks of rows of at most ``LARGE_CHUNK_ELEMENTS`` logits,
    yielding ``(rows, logits)``: the chunk's rows of ``rows_all`` (the head's rows in the
    computation dtype) and its fp32 logits [rows, C] with the bias (``weight``: the head's
    weight rows in the computation dtype)."""
    bias = problem.bias[head.col_start : head.col_end].to(torch.float32)
    chunk_rows = problem.chunk_size or max(1, LARGE_CHUNK_ELEMENTS // head.num_cols)
    for r0, r1 in _spans(rows_all.shape[0], chunk_rows):
        yield slice(r0, r1), mm_acc(rows_all[r0:r1], weight.t(), torch.float32).add_(bias)


def _wide_weight(problem: HeadProblem, head: HeadSpec) -> Tensor:
    return weight_in(problem.compute_dtype, problem.weight[head.col_start : head.col_end])


def _wide_forward(problem: HeadProblem, index: int, sums: Tensor, counts: Tensor) -> None:
    """Adds a wide-path task's loss sum to ``sums`` [T] and its divisor's count to ``counts``."""
    head = problem.heads[index]
    (group,) = torch_chunked.task_span(problem.heads, index, problem.hidden.device).groups
    state = group.prepare(problem, counts)
    for rows, logits in _wide_chunks(problem, head, _large_rows(problem, head), _wide_weight(problem, head)):
        group.apply_(logits, rows, state, None, sums)


def _wide_backward(problem: HeadProblem, index: int, scales: Tensor, grad_rows: Tensor | None, grad_weight: Tensor,
                   grad_bias: Tensor, accumulate: bool) -> None:  # fmt: skip
    """Adds a wide-path task's gradients into ``grad_rows`` (fp32 [rows, D]; None: not needed)
    and writes its rows of ``grad_weight`` (``accumulate``: adds to them) and ``grad_bias``
    (fp32): per chunk, logits recomputed and turned into fp32 ``dlogits`` scaled by ``scales``
    [T], then GEMMs."""
    head = problem.heads[index]
    cols = slice(head.col_start, head.col_end)
    (group,) = torch_chunked.task_span(problem.heads, index, problem.hidden.device).groups
    state = group.prepare(problem, torch.zeros_like(scales))
    if not accumulate:
        grad_weight[cols].zero_()
    grad_bias[cols].zero_()
    rows_all, weight = _large_rows(problem, head), _wide_weight(problem, head)
    weight_fp32, unused_sums = weight.to(torch.float32), torch.zeros_like(scales)
    for rows, dlogits in _wide_chunks(problem, head, rows_all, weight):
        group.apply_(dlogits, rows, state, scales, unused_sums)
        if grad_rows is not None:
            grad_rows[rows].addmm_(dlogits, weight_fp32)
        grad_weight[cols].addmm_(dlogits.t(), rows_all[rows].to(torch.float32))
        grad_bias[cols] += dlogits.sum(dim=0)


def _partial_programs(problem: HeadProblem, plan: _SmallPlan) -> int:
    """Programs owning partial dW/db buffers, or 0 for float atomics."""
    per_program = (plan.n_used_slots * problem.hidden.shape[1] + plan.n_groups * plan.block_c) * 4
    sms = _multiprocessors(problem.hidden.device)
    rows = problem.hidden.shape[0] + (problem.pooled.shape[0] if problem.pooled is not None else 0)
    wanted = max(1, min(2 * sms, -(-rows // 32)))
    if wanted * per_program <= PARTIAL_BYTES:
        return wanted
    if not problem.deterministic:
        return 0
    return max(1, min(wanted, DETERMINISTIC_PARTIAL_BYTES // per_program))


@dataclass(frozen=True, eq=False)
class _Step:
    """What a problem's signature (:func:`_step`) fixes for its launches, worked out once."""

    small: _SmallPlan | None  # the small path's slots, None without small tasks
    large: tuple[int, ...]  # the large path's tasks
    wide: tuple[int, ...]  # the wide path's tasks
    count_scale: Tensor  # see _count_scale
    unwritten_rows: tuple[tuple[int, int], ...]  # see _unwritten_rows
    # The small-heads kernel's launches in forward and backward (None without small tasks): the
    # step fixes the tensors each passes but for their addresses (fp32 dense buffers chosen by
    # the step's paths, dH in the rows' dtype). Their partial_programs: the programs owning
    # partial loss sums in forward (deterministic) and partial dW/db in backward, 0 for atomics.
    forward_launch: SmallHeadsLaunch | None
    backward_launch: SmallHeadsLaunch | None
    dh_acc_rows: int = 0  # rows of the backward launch's own fp32 dH scratch (small_heads.dh_acc_rows)


# Steps by signature, the oldest dropped past STEPS_KEPT (a loop over many shapes).
_STEPS: OrderedDict[tuple, _Step] = OrderedDict()
STEPS_KEPT = 256


def _step(problem: HeadProblem) -> _Step:
    """The problem's :class:`_Step`, keyed on its heads and its tensors' shapes, strides and
    dtypes: the small-heads kernel's launches are fixed by them but for the tensors' addresses."""
    hidden, pooled, weight = problem.hidden, problem.pooled, problem.weight
    key = (
        problem.heads, hidden.shape, hidden.stride(), hidden.dtype, hidden.device,
        None if pooled is None else (pooled.shape, pooled.stride(), pooled.dtype), problem.seq_stride,
        problem.token_mask is None, weight.shape, weight.stride(), weight.dtype, problem.bias.dtype,
        problem.compute_dtype, problem.deterministic, problem.hidden_grad,
    )  # fmt: skip
    step = _STEPS.get(key)
    if step is None:
        step = _new_step(problem)
        keep_bounded(_STEPS, key, step, STEPS_KEPT)
    return step


def _new_step(problem: HeadProblem) -> _Step:
    """Works a problem's :class:`_Step` out: its paths, its small plan and launches, its rows to zero."""
    heads, device = problem.heads, problem.hidden.device
    large, wide = _large_tasks(heads), _wide_tasks(heads)
    plan = _small_plan(heads, device, _splits_levels(heads, problem.seq_stride)) if _small_tasks(heads) else None
    programs = _partial_programs(problem, plan) if plan is not None else 0
    forward_launch = backward_launch = None
    dh_acc_rows = 0
    if plan is not None:
        small_heads = _kernels().small_heads
        fixed = dict(plan.launch_fields, seq_stride=problem.seq_stride, compute_dtype=problem.compute_dtype)
        n_pooled = problem.pooled.shape[0] if problem.pooled is not None else 0
        # With the levels apart and fewer blocks that walk the sequence groups than programs, those
        # groups' partial dW rows are the blocks' own: fewer rows to write and reduce.
        seq_dw_blocks = small_heads.sequence_block_bound(problem.hidden.shape[0], n_pooled, problem.seq_stride)
        if not (plan.n_seq_groups and 0 < seq_dw_blocks <= programs):
            seq_dw_blocks = 0
        forward_launch = small_heads.SmallHeadsLaunch(
            backward=False, partial_programs=programs if problem.deterministic else 0, **fixed)
        backward_launch = small_heads.SmallHeadsLaunch(
            backward=True, partial_programs=programs, write_dh=problem.hidden_grad,
            has_dh_init=problem.hidden_grad and bool(large or wide), seq_dw_blocks=seq_dw_blocks, **fixed)
        dh_acc_rows = small_heads.dh_acc_rows(backward_launch, problem.hidden.shape[0], n_pooled)
    return _Step(plan, large, wide, _count_scale(heads, device), _unwritten_rows(heads, problem.weight.shape[0], programs > 0),
                 forward_launch, backward_launch, dh_acc_rows)  # fmt: skip


# Zeroed fp32 [2, T] buffers for the forward's per-task loss sums and kept-row counts, with
# their rows, per (device, T, stream, thread): loss_finalize reads them and zeroes them again,
# so a call pays neither an allocation nor a fill kernel (on the H200 host one torch.zeros
# took tens of microseconds). Per stream and thread, so that no two forwards in flight share one.
_LOSS_SUMS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _loss_sums(n_tasks: int, rows: Tensor, capturing: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(buffer [2, T], sums [T], counts [T])``, all zero, on the device of ``rows``. Under CUDA
    graph capture a fresh buffer (a captured fill runs only at replay, so a kept buffer would not
    be zero before it)."""
    device = rows.device
    if capturing:
        buffer = torch.zeros((2, n_tasks), dtype=torch.float32, device=device)
        sums, counts = buffer.unbind(0)
        return buffer, sums, counts
    stream = torch._C._cuda_getCurrentRawStream(device.index) if rows.is_cuda else 0
    key = (device, n_tasks, stream, threading.get_ident())
    kept = _LOSS_SUMS.get(key)
    if kept is None:
        with making_kept_tensors():
            buffer = torch.zeros((2, n_tasks), dtype=torch.float32, device=device)
            sums, counts = buffer.unbind(0)
        kept = _LOSS_SUMS[key] = (buffer, sums, counts)
    return kept


def _with_dense_bias(problem: HeadProblem) -> HeadProblem:
    """The problem with a contiguous bias: the kernels index the bias by packed row alone (a
    strided view, ``bias[::2]`` say, is copied; its gradient is the same)."""
    return problem if problem.bias.is_contiguous() else problem._replace(bias=problem.bias.contiguous())


def forward(problem: HeadProblem) -> tuple[Tensor, Tensor, list[Tensor]]:
    if _delegates(problem):
        return torch_chunked.forward(problem)
    problem = _with_dense_bias(problem)
    capturing = problem.hidden.is_cuda and torch.cuda.is_current_stream_capturing()
    buffer, sums, counts = _loss_sums(len(problem.heads), problem.hidden, capturing)
    try:
        return _forward_into(problem, sums, counts, capturing)
    except BaseException:
        buffer.zero_()  # the finalize that zeroes it did not run
        raise


def _forward_into(problem: HeadProblem, sums: Tensor, counts: Tensor, capturing: bool,
                  ) -> tuple[Tensor, Tensor, list[Tensor]]:  # fmt: skip
    """The forward into the zeroed ``sums`` and ``counts`` [T], which the finalize zeroes again
    (``capturing``: whether a CUDA graph is being captured)."""
    device = problem.hidden.device
    heads = problem.heads
    n_tasks = len(heads)
    check = problem.label_check  # planned for these targets: its table is theirs
    table = check.target_table if check is not None else _target_table(problem.heads, problem.targets,
                                                                        problem.hidden.device, capturing)  # fmt: skip
    step = _step(problem)
    large = step.large
    plan, launch = step.small, step.forward_launch
    if plan is not None and launch is not None:  # both or neither
        programs = launch.partial_programs
        loss, count = sums, counts
        if programs:  # per-slot partial loss sums and class-weighted counts, summed here in a fixed order
            rows = 2 if plan.class_weights else 1
            partials = alloc_output((rows, programs, plan.n_groups * plan.block_c), torch.float32, device)
            loss = partials[0]
            if plan.class_weights:
                count = partials[1]
        launched = _kernels().small_heads.launch_small_heads(
            launch, problem.hidden, problem.pooled, problem.token_mask, problem.weight, problem.bias,
            table, loss=loss, count=count,
        ).programs  # fmt: skip
        if programs:  # the kept sums (and with class weights counts) stay zero
            totals = (partials[:, :launched].sum(dim=1, dtype=torch.float64) @ plan.slot_to_task).to(torch.float32)
            sums = totals[0]
            if plan.class_weights:
                counts = totals[1]
    saved_large = []
    for i in large:
        head = heads[i]
        target = _large_target(problem, i)
        lse, target_logit, logit_sum = _large_lse(problem, head, target)
        eps = head.label_smoothing
        row_loss = lse - (1.0 - eps) * target_logit - (eps / head.num_cols) * logit_sum
        if head.z_loss:
            row_loss = row_loss + head.z_loss * lse.square()
        kept = target >= 0
        sums[i] = torch.where(kept, row_loss, 0.0).sum()
        counts[i] = kept.sum(dtype=torch.float32)
        saved_large += [lse, target]
    for i in step.wide:
        _wide_forward(problem, i, sums, counts)
    losses = alloc_output((n_tasks,), torch.float32, device)
    loss_scale = alloc_output((n_tasks,), torch.float32, device)
    total = alloc_output((), torch.float32, device)
    _kernels().loss_finalize.loss_finalize(sums, counts, step.count_scale, problem.divisor_override,
                                           problem.task_weights, losses, loss_scale, total, check=check)  # fmt: skip
    return total, losses, [loss_scale, table, *saved_large]


def backward(problem: HeadProblem, saved: list[Tensor], grad_total: Tensor, main_grad: Tensor | None = None):
    """With ``main_grad`` (fp32, contiguous) the kernels and GEMMs add dW straight into it, with
    no dW buffer of their own, and None is returned for the weight."""
    if _delegates(problem):
        return torch_chunked.backward(problem, saved, grad_total, main_grad)
    problem = _with_dense_bias(problem)
    small_heads = _kernels().small_heads
    loss_scale, table, *saved_large = saved
    device = problem.hidden.device
    rows_dtype = problem.hidden.dtype  # of dH too: fp32 rows under autocast get an fp32 dH
    heads = problem.heads
    n_hidden, hidden_size = problem.hidden.shape
    n_pooled = problem.pooled.shape[0] if problem.pooled is not None else 0
    grad_out = grad_total if grad_total.dtype == torch.float32 else grad_total.to(torch.float32)  # 0-dim
    step = _step(problem)
    large, wide, plan = step.large, step.wide, step.small
    # Large tasks' GEMMs write their rows and the reduction of the partials the small tasks'
    # rows; the rest (absent tasks, small tasks' rows for the atomics) is zeroed here. Into
    # main_grad every kernel adds instead, and nothing is zeroed there.
    if main_grad is not None and main_grad.dtype == torch.float32 and main_grad.is_contiguous():
        accumulate, grad_weight = True, main_grad
    else:
        accumulate, grad_weight = False, alloc_output(problem.weight.shape, torch.float32, device)
    grad_bias = alloc_output(problem.bias.shape, torch.float32, device)
    for start, end in step.unwritten_rows:
        if not accumulate:
            grad_weight[start:end].zero_()
        grad_bias[start:end].zero_()

    # Without hidden_grad (a frozen encoder output) no dH is computed: the small-heads kernel
    # skips its dH half and the vocabulary path its dH GEMM.
    hidden_grad = problem.hidden_grad
    dh_large = None
    if large or wide:
        scale = loss_scale * grad_out
        if hidden_grad:
            dh_large = torch.zeros((n_hidden + n_pooled, hidden_size), dtype=torch.float32, device=device)

        def grad_rows_of(head: HeadSpec) -> Tensor | None:
            if dh_large is None:
                return None
            return problem.level_rows(head.is_token, dh_large[:n_hidden], dh_large[n_hidden:])

        for i, lse, target in zip(large, saved_large[::2], saved_large[1::2]):
            row_scale = torch.where(target >= 0, scale[i], 0.0)
            _large_backward(problem, heads[i], target, lse, row_scale, grad_rows_of(heads[i]), grad_weight, grad_bias,
                            accumulate)  # fmt: skip
        for i in wide:
            _wide_backward(problem, i, scale, grad_rows_of(heads[i]), grad_weight, grad_bias, accumulate)

    grad_hidden = grad_pooled = dh_acc = None
    launch = step.backward_launch
    if plan is not None and launch is not None:  # both or neither
        if hidden_grad:
            grad_hidden = alloc_output((n_hidden, hidden_size), rows_dtype, device)
            grad_pooled = alloc_output((n_pooled, hidden_size), rows_dtype, device) if n_pooled else None
            if dh_large is not None:
                dh_acc = dh_large
            elif step.dh_acc_rows:
                dh_acc = torch.empty((step.dh_acc_rows, hidden_size), dtype=torch.float32, device=device)
        programs = launch.partial_programs
        if programs:
            dw_target = alloc_output((launch.dw_partial_rows, hidden_size), torch.float32, device)
            db_target = alloc_output((programs, plan.n_groups * plan.block_c), torch.float32, device)
        else:
            dw_target, db_target = grad_weight, grad_bias
        launched = small_heads.launch_small_heads(
            launch, problem.hidden, problem.pooled, problem.token_mask, problem.weight, problem.bias,
            table, task_scale=loss_scale, grad_out=grad_out, grad_hidden=grad_hidden, grad_pooled=grad_pooled,
            dh_acc=dh_acc, grad_weight=dw_target, grad_bias=db_target,
        )  # fmt: skip
        if programs:
            small_heads.reduce_partials(dw_target, db_target, launched.programs, plan.slot_row, plan.slot_index,
                                        grad_weight, grad_bias, accumulate, launch.seq_dw_slots, launched.seq_dw_blocks,
                                        launch.seq_dw_rows)  # fmt: skip
    elif dh_large is not None:
        grad_hidden = dh_large[:n_hidden].to(rows_dtype)
        # a copy: the op's outputs must not alias each other
        grad_pooled = dh_large[n_hidden:].to(rows_dtype, copy=True) if n_pooled else None
    elif hidden_grad:
        grad_hidden = torch.zeros((n_hidden, hidden_size), dtype=rows_dtype, device=device)
        grad_pooled = torch.zeros((n_pooled, hidden_size), dtype=rows_dtype, device=device) if n_pooled else None
    return grad_hidden, grad_pooled, None if accumulate else grad_weight, grad_bias


def saved_like(problem: HeadProblem) -> list[Tensor]:
    if _delegates(problem):
        return torch_chunked.saved_like(problem)
    count = len(problem.heads)
    saved = [problem.hidden.new_empty((count,), dtype=torch.float32), problem.hidden.new_empty((count,), dtype=torch.int64)]
    for i in _large_tasks(problem.heads):
        rows = (problem.rows_for(problem.heads[i]).shape[0],)
        saved += [problem.hidden.new_empty(rows, dtype=torch.float32), problem.hidden.new_empty(rows, dtype=torch.int32)]
    return saved
