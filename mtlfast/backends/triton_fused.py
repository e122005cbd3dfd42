"""The fused algorithm in Triton kernels (``mtlfast.kernels``).

Tasks are split in two paths, picked per task:

- small path: every bce/mse task and every cross-entropy task with at most
  ``SMALL_CE_MAX`` classes goes through one launch of ``small_heads_kernel`` in
  forward and one in backward, whatever the number of tasks and both levels together;
- large path: a cross-entropy task with more classes (a vocabulary head) is tiled over
  its columns with an online log-sum-exp (``large_ce_lse_kernel``); the backward
  recomputes tiles (``large_ce_backward_kernel``), as Cut Cross-Entropy does.

Forward keeps only the divisors and, per large task, the row log-sum-exp [rows];
backward recomputes the logits. Nothing synchronises with the host. fp64 inputs, and
``deterministic=True`` together with a large task, run the ``torch`` backend instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from ..task import TOKEN
from . import torch_chunked
from .base import HeadProblem, HeadSpec

name = "triton"

SMALL_CE_MAX = 128
MAX_BLOCK_C = 128
DETERMINISTIC_PARTIAL_BYTES = 256 << 20
FILTER_EPS_16BIT = 2.0**-12


def alloc_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocates a buffer the kernels overwrite entirely (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kernels():
    from ..kernels import large_ce, small_heads

    return small_heads, large_ce


def _delegates(problem: HeadProblem) -> bool:
    if problem.compute_dtype == torch.float64:
        return True
    return problem.deterministic and any(_is_large(h) for h in problem.heads)


def _is_large(head: HeadSpec) -> bool:
    return head.is_ce and head.num_cols > SMALL_CE_MAX


@dataclass(frozen=True)
class _LevelPack:
    """Where the small tasks of one level sit in that level's status and dense packs."""

    ce: tuple[int, ...]
    dense: tuple[int, ...]
    dense_offsets: tuple[int, ...]

    @property
    def dense_width(self) -> int:
        return self.dense_offsets[-1] if self.dense_offsets else 0


@dataclass
class _SmallPlan:
    levels: dict[int, _LevelPack]
    slot_int: Tensor  # int32 [G, SLOT_FIELDS, BLOCK_C]
    slot_flt: Tensor  # fp32 [G, 2, BLOCK_C]
    group_segments: Tensor  # int32 [G]
    slot_rows: Tensor  # int64 [valid slots]: packed weight row of each slot
    slot_index: Tensor  # int64 [valid slots]: position of each slot in G * BLOCK_C
    slot_to_task: Tensor  # fp64 [G * BLOCK_C, T]
    ce_ignore: dict[int, Tensor]
    ce_classes: dict[int, Tensor]
    dense_onehot: dict[int, Tensor]  # fp32 [dense width, dense tasks]

    @property
    def n_groups(self) -> int:
        return self.slot_int.shape[0]


def _level_pack(heads: tuple[HeadSpec, ...], small: list[int], level: int) -> _LevelPack:
    mine = [i for i in small if heads[i].level == level]
    ce = tuple(i for i in mine if heads[i].is_ce)
    dense = tuple(i for i in mine if not heads[i].is_ce)
    offsets, total = [], 0
    for i in dense:
        offsets.append(total)
        total += heads[i].num_cols
    return _LevelPack(ce, dense, tuple(offsets) + ((total,) if dense else ()))


@cache
def _small_plan(heads: tuple[HeadSpec, ...], device: torch.device) -> _SmallPlan:
    small_heads, _ = _kernels()
    small = sorted((i for i, h in enumerate(heads) if not _is_large(h)), key=lambda i: heads[i].col_start)
    levels = {level: _level_pack(heads, small, level) for level in (0, TOKEN)}
    total = sum(heads[i].num_cols for i in small)
    block_c = min(MAX_BLOCK_C, max(16, 1 << (total - 1).bit_length()))
    groups: list[list[tuple[int, int]]] = [[]]
    for i in small:
        head = heads[i]
        if head.is_ce and len(groups[-1]) + head.num_cols > block_c:
            groups.append([])
        for c in range(head.num_cols):
            if len(groups[-1]) == block_c:
                groups.append([])
            groups[-1].append((i, c))
    fields = small_heads.SLOT_FIELDS
    slot_int = torch.full((len(groups), fields, block_c), -1, dtype=torch.int32)
    slot_flt = torch.zeros((len(groups), 2, block_c), dtype=torch.float32)
    segments = torch.zeros(len(groups), dtype=torch.int32)
    slot_to_task = torch.zeros(len(groups) * block_c, len(heads), dtype=torch.float64)
    for g, group in enumerate(groups):
        seen_ce: dict[int, int] = {}
        for s, (i, c) in enumerate(group):
            head, pack = heads[i], levels[heads[i].level]
            if head.is_ce:
                status_col, dense_col = pack.ce.index(i), 0
                segment = seen_ce.setdefault(i, len(seen_ce))
            else:
                k = pack.dense.index(i)
                status_col, dense_col, segment = len(pack.ce) + k, pack.dense_offsets[k] + c, -1
            values = {
                small_heads.SLOT_COL: head.col_start + c,
                small_heads.SLOT_TASK: i,
                small_heads.SLOT_KIND: head.kind,
                small_heads.SLOT_LEVEL: head.level,
                small_heads.SLOT_STATUS: status_col,
                small_heads.SLOT_DENSE: dense_col,
                small_heads.SLOT_CLASS: c,
                small_heads.SLOT_SEGMENT: segment,
                small_heads.SLOT_FIRST: int(head.is_ce and c == 0),
            }
            for field, value in values.items():
                slot_int[g, field, s] = value
            slot_flt[g, 0, s] = head.label_smoothing
            slot_flt[g, 1, s] = 1.0 / head.num_cols
            slot_to_task[g * block_c + s, i] = 1.0
        segments[g] = len(seen_ce)
    valid = slot_int[:, small_heads.SLOT_COL, :].reshape(-1) >= 0
    ce_ignore, ce_classes, dense_onehot = {}, {}, {}
    for level, pack in levels.items():
        ce_ignore[level] = torch.tensor([heads[i].ignore_index for i in pack.ce], dtype=torch.long, device=device)
        ce_classes[level] = torch.tensor([heads[i].num_cols for i in pack.ce], dtype=torch.long, device=device)
        onehot = torch.zeros(pack.dense_width, len(pack.dense), dtype=torch.float32)
        for k, i in enumerate(pack.dense):
            onehot[pack.dense_offsets[k] : pack.dense_offsets[k] + heads[i].num_cols, k] = 1.0
        dense_onehot[level] = onehot.to(device)
    return _SmallPlan(
        levels=levels,
        slot_int=slot_int.to(device),
        slot_flt=slot_flt.to(device),
        group_segments=segments.to(device),
        slot_rows=slot_int[:, small_heads.SLOT_COL, :].reshape(-1)[valid].long().to(device),
        slot_index=valid.nonzero().squeeze(1).to(device),
        slot_to_task=slot_to_task.to(device),
        ce_ignore=ce_ignore,
        ce_classes=ce_classes,
        dense_onehot=dense_onehot,
    )


def _pack_level(problem: HeadProblem, plan: _SmallPlan, level: int) -> tuple[Tensor, Tensor, Tensor]:
    """Status pack int32 [rows, tasks], dense targets fp32 [rows, width] and counts [tasks]
    (kept rows, times C for bce/mse) for the small tasks of one level."""
    pack = plan.levels[level]
    rows = problem.hidden.shape[0] if level == TOKEN else problem.seq_rows.shape[0]
    device = problem.hidden.device
    mask = problem.token_mask[:, None] if level == TOKEN and problem.token_mask is not None else None
    statuses, counts = [], []
    dense = torch.zeros((1, 1), dtype=torch.float32, device=device)
    if pack.ce:
        ids = torch.stack([problem.targets[i] for i in pack.ce], dim=1)
        keep = (ids != plan.ce_ignore[level]) & (ids >= 0) & (ids < plan.ce_classes[level])
        if mask is not None:
            keep &= mask
        statuses.append(torch.where(keep, ids, -1).to(torch.int32))
        counts.append(keep.sum(dim=0, dtype=torch.float32))
    if pack.dense:
        values = torch.cat([problem.targets[i].to(torch.float32) for i in pack.dense], dim=1)
        has_nan = torch.isnan(values)
        keep = (has_nan.to(torch.float32) @ plan.dense_onehot[level]) == 0
        if mask is not None:
            keep &= mask
        widths = torch.tensor([problem.heads[i].num_cols for i in pack.dense], dtype=torch.float32, device=device)
        statuses.append(torch.where(keep, 0, -1).to(torch.int32))
        counts.append(keep.sum(dim=0, dtype=torch.float32) * widths)
        dense = torch.where(has_nan, 0.0, values)
    status = torch.cat(statuses, dim=1) if statuses else torch.full((max(rows, 1), 1), -1, dtype=torch.int32,
                                                                    device=device)  # fmt: skip
    count = torch.cat(counts) if counts else torch.zeros(0, device=device)
    return status, dense, count


def _large_target(problem: HeadProblem, index: int) -> tuple[Tensor, Tensor]:
    """int32 class ids of a large task (-1 for skipped rows) and its kept-row count."""
    keep = problem.valid_rows(index)
    return torch.where(keep, problem.targets[index], -1).to(torch.int32), keep.sum(dtype=torch.float32)


def _divisors(problem: HeadProblem, plan: _SmallPlan | None, packs) -> Tensor:
    device = problem.hidden.device
    default = torch.zeros(len(problem.heads), dtype=torch.float32, device=device)
    if plan is not None:
        for level, pack in plan.levels.items():
            order = list(pack.ce) + list(pack.dense)
            if order:
                default[torch.tensor(order, device=device)] = packs[level][2]
    for i, head in enumerate(problem.heads):
        if _is_large(head):
            default[i] = _large_target(problem, i)[1]
    override = problem.divisor_override.to(torch.float32)
    return torch.where(override >= 0, override, default)


def _splits(rows: int, n_cols: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    row_blocks = max(1, -(-rows // 128))
    return max(1, min(-(-2 * sms // row_blocks), -(-n_cols // 128)))


def forward(problem: HeadProblem) -> tuple[Tensor, list[Tensor]]:
    if _delegates(problem):
        return torch_chunked.forward(problem)
    small_heads, large_ce = _kernels()
    device = problem.hidden.device
    heads = problem.heads
    sums = torch.zeros(len(heads), dtype=torch.float32, device=device)
    plan = _small_plan(heads, device) if any(not _is_large(h) for h in heads) else None
    packs = {}
    if plan is not None:
        packs = {level: _pack_level(problem, plan, level) for level in plan.levels}
        programs = _deterministic_programs(problem, plan)
        loss = (
            torch.zeros((programs, plan.n_groups * plan.slot_int.shape[2]), dtype=torch.float32, device=device)
            if programs
            else sums
        )
        _launch_small(problem, plan, packs, backward=False, loss=loss, programs=programs)
        if programs:
            sums = sums + (loss.sum(dim=0, dtype=torch.float64) @ plan.slot_to_task).to(torch.float32)
    saved_lse = []
    for i, head in enumerate(heads):
        if not _is_large(head):
            continue
        rows = problem.rows_for(head)
        target, _ = _large_target(problem, i)
        lse, target_logit, logit_sum = large_ce.large_ce_lse(
            rows, problem.weight, problem.bias, head.col_start, head.num_cols, target,
            _splits(rows.shape[0], head.num_cols, device),
        )  # fmt: skip
        eps = head.label_smoothing
        row_loss = lse - (1.0 - eps) * target_logit - (eps / head.num_cols) * logit_sum
        sums[i] = torch.where(target >= 0, row_loss, 0.0).sum()
        saved_lse.append(lse)
    divisors = _divisors(problem, plan, packs)
    losses = torch.where(divisors > 0, sums / divisors.clamp_min(1e-30), torch.zeros_like(sums))
    return losses, [divisors, *saved_lse]


def _deterministic_programs(problem: HeadProblem, plan: _SmallPlan) -> int:
    if not problem.deterministic:
        return 0
    per_program = plan.n_groups * plan.slot_int.shape[2] * problem.hidden.shape[1] * 4
    return max(1, min(256, DETERMINISTIC_PARTIAL_BYTES // max(per_program, 1)))


def _launch_small(problem, plan, packs, *, backward, loss, programs, task_scale=None, grads=None) -> None:
    small_heads, _ = _kernels()
    tok_status, tok_dense, _ = packs[TOKEN]
    seq_status, seq_dense, _ = packs[0]
    dummy = problem.hidden
    grad_hidden, grad_pooled, dh_acc, grad_weight, grad_bias, has_init = grads or (dummy, dummy, dummy, dummy,
                                                                                  dummy, False)  # fmt: skip
    small_heads.launch_small_heads(
        backward=backward,
        hidden=problem.hidden,
        pooled=problem.pooled,
        seq_stride=problem.seq_stride,
        weight=problem.weight,
        bias=problem.bias,
        slot_int=plan.slot_int,
        slot_flt=plan.slot_flt,
        group_segments=plan.group_segments,
        tok_status=tok_status,
        tok_dense=tok_dense,
        seq_status=seq_status,
        seq_dense=seq_dense,
        task_scale=task_scale if task_scale is not None else loss,
        loss=loss,
        grad_hidden=grad_hidden,
        grad_pooled=grad_pooled,
        dh_acc=dh_acc,
        grad_weight=grad_weight,
        grad_bias=grad_bias,
        has_dh_init=has_init,
        deterministic_programs=programs,
    )


def backward(problem: HeadProblem, saved: list[Tensor], grad_total: Tensor):
    if _delegates(problem):
        return torch_chunked.backward(problem, saved, grad_total)
    _, large_ce = _kernels()
    divisors, *saved_lse = saved
    device = problem.hidden.device
    cdtype = problem.compute_dtype
    heads = problem.heads
    n_hidden, hidden_size = problem.hidden.shape
    n_pooled = problem.pooled.shape[0] if problem.pooled is not None else 0
    scale = problem.loss_scales(divisors) * grad_total.to(torch.float32)
    grad_weight = torch.zeros(problem.weight.shape, dtype=torch.float32, device=device)
    grad_bias = torch.zeros(problem.bias.shape, dtype=torch.float32, device=device)

    dh_large = None
    large = [i for i, h in enumerate(heads) if _is_large(h)]
    if large:
        dh_large = torch.zeros((n_hidden + n_pooled, hidden_size), dtype=torch.float32, device=device)
        filter_eps = FILTER_EPS_16BIT if cdtype in (torch.float16, torch.bfloat16) else None
        for i, lse in zip(large, saved_lse):
            head = heads[i]
            target, _ = _large_target(problem, i)
            if head.is_token:
                grad_rows = dh_large[:n_hidden]
            elif problem.pooled is not None:
                grad_rows = dh_large[n_hidden:]
            else:
                grad_rows = dh_large[:n_hidden][:: problem.seq_stride]
            large_ce.large_ce_backward(
                problem.rows_for(head), problem.weight, problem.bias, head.col_start, head.num_cols, target, lse,
                torch.where(target >= 0, scale[i], 0.0), head.label_smoothing, grad_rows, grad_weight, grad_bias,
                filter_eps,
            )  # fmt: skip

    if len(large) < len(heads):
        plan = _small_plan(heads, device)
        packs = {level: _pack_level(problem, plan, level) for level in plan.levels}
        grad_hidden = alloc_output((n_hidden, hidden_size), cdtype, device)
        grad_pooled = alloc_output((n_pooled, hidden_size), cdtype, device) if n_pooled else grad_hidden
        if dh_large is not None:
            dh_acc = dh_large
        elif plan.n_groups > 1:
            dh_acc = torch.empty((n_hidden + n_pooled, hidden_size), dtype=torch.float32, device=device)
        else:
            dh_acc = grad_weight
        programs = _deterministic_programs(problem, plan)
        if programs:
            slots = plan.n_groups * plan.slot_int.shape[2]
            dw_target = torch.zeros((programs, slots, hidden_size), dtype=torch.float32, device=device)
            db_target = torch.zeros((programs, slots), dtype=torch.float32, device=device)
        else:
            dw_target, db_target = grad_weight, grad_bias
        _launch_small(
            problem, plan, packs, backward=True, loss=scale, programs=programs, task_scale=scale,
            grads=(grad_hidden, grad_pooled, dh_acc, dw_target, db_target, dh_large is not None),
        )  # fmt: skip
        if programs:
            grad_weight.index_copy_(0, plan.slot_rows, dw_target.sum(dim=0)[plan.slot_index])
            grad_bias.index_copy_(0, plan.slot_rows, db_target.sum(dim=0)[plan.slot_index])
        grad_pooled = grad_pooled if n_pooled else None
    elif dh_large is not None:
        grad_hidden = dh_large[:n_hidden].to(cdtype)
        # a copy: the op's outputs must not alias each other
        grad_pooled = dh_large[n_hidden:].to(cdtype, copy=True) if n_pooled else None
    else:
        grad_hidden = torch.zeros((n_hidden, hidden_size), dtype=cdtype, device=device)
        grad_pooled = torch.zeros((n_pooled, hidden_size), dtype=cdtype, device=device) if n_pooled else None
    return (
        grad_hidden,
        grad_pooled,
        grad_weight if problem.weight.dtype == torch.float32 else grad_weight.to(problem.weight.dtype),
        grad_bias if problem.bias.dtype == torch.float32 else grad_bias.to(problem.bias.dtype),
    )


def saved_like(problem: HeadProblem) -> list[Tensor]:
    if _delegates(problem):
        return torch_chunked.saved_like(problem)
    saved = [problem.hidden.new_empty((len(problem.heads),), dtype=torch.float32)]
    for head in problem.heads:
        if _is_large(head):
            saved.append(problem.hidden.new_empty((problem.rows_for(head).shape[0],), dtype=torch.float32))
    return saved
