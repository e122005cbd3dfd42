"""The fused algorithm in plain PyTorch, for any device.

Rows are processed in chunks. Per chunk, one GEMM over the packed weight gives the fp32
logits of all of a level's tasks of up to ``NARROW_MAX_COLS`` outputs (a span: their weight
rows gathered once per call into the order below), and one GEMM per wider task its own.
A span's tasks are not walked one by one: its cross-entropy tasks form a few blocks [rows,
tasks, C_max] (one per power-of-two bracket of C, with class weights or without), its bce
tasks and its mse tasks each one run of columns, so the ops per chunk do not grow with the
number of tasks. The logits
are turned in place into per-task loss sums and ``dlogits`` (already scaled by
``task_weight / divisor``); then ``dH[chunk] += dlogits @ W`` and ``dW += dlogits^T @ H[chunk]``
accumulate in fp32.
Gradients are computed during forward and kept in fp32, except the dH of a span no wider than
D: that span keeps its fp32 ``dlogits`` (fewer bytes than dH) and backward computes
``dH = (grad_output * dlogits) @ W``. Otherwise backward only multiplies by ``grad_output`` and
rounds, so nothing is rounded to 16 bits before that scale is applied. Peak extra memory is one
chunk of logits plus the fp32 gradients. Nothing synchronises with the host.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple, cast

import torch
from torch import Tensor

from ..task import BCE, CROSS_ENTROPY, MSE, SEQUENCE, TOKEN, ColumnWeights
from .base import HeadProblem, HeadSpec, addmm_acc_, mm_acc, products_take_16_bit, weight_in, weighted_total

name = "torch"

# Spans at least this wide take 16-bit GEMMs (fp32 accumulation) for the gradients computed
# in forward on CUDA with bf16 compute; narrower spans, and every dH computed in backward,
# use exact fp32 GEMMs on fp32 dlogits.
WIDE_SPAN = 1024
# fp32 elements of one chunk of logits (plus its upcast rows): 32 MiB on the CPU; 512 MiB
# on a GPU, where every chunk also re-reads and re-writes the fp32 dW of its columns, so
# a vocabulary head needs chunks of ~1k rows to amortise that pass.
LOGITS_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}
# Tasks of up to this many outputs share one GEMM per level; a wider task has a GEMM of its own.
NARROW_MAX_COLS = 128


def auto_chunk_rows(widest_span: int, hidden_size: int, device_type: str = "cpu") -> int:
    """Rows per chunk, from the widest span of task columns and the hidden size."""
    budget = LOGITS_CHUNK_ELEMENTS.get(device_type, LOGITS_CHUNK_ELEMENTS["cpu"])
    rows = budget // max(1, widest_span + hidden_size)
    return max(64, min(1 << 15, 1 << max(0, rows.bit_length() - 1)))


# A group's rows for a call, from its prepare: targets, kept rows, and (cross-entropy with class
# weights) each row's target class weight, else None.
GroupState = tuple[Tensor, Tensor, Tensor | None]


class _CrossEntropyGroup(NamedTuple):
    """Cross-entropy tasks of one span with C in one power-of-two bracket, all with class
    weights or all without, computed together as one block of logits [rows, G, C_max], a view
    of the span's columns (a narrower task's last columns are padding: less than half of the
    block). With class weights ``w`` a row's loss is ``(1 - eps) w_y nll_y + eps / C sum_c w_c
    nll_c``, so its log-sum-exp counts ``coef = (1 - eps) w_y + eps / C sum_c w_c`` times (1
    without weights)."""

    tasks: tuple[int, ...]
    is_token: bool
    task_index: Tensor  # int64 [G]
    num_classes: Tensor  # int64 [G]
    ignore_index: Tensor | None  # int64 [G]; None when each lies outside [0, C): the range check skips it then
    neg_target_coef: Tensor  # acc [G]: label smoothing - 1
    smoothing_per_class: Tensor | None  # acc [G]: label smoothing / C; None when no task smooths
    class_weights: Tensor | None  # acc [G, C_max], 0 on padding; None for none
    smoothed_weight_sums: Tensor | None  # acc [G]: label smoothing / C times the summed class weights; None without both
    first_col: int  # the span column where the block starts
    width: int  # C_max
    pad: Tensor | None  # bool [G, C_max]: padding columns; None for none
    softcap: Tensor | None  # acc [G]: the tasks' softcaps; None for a block without
    z_loss: Tensor | None  # acc [G]: the tasks' z-loss factors; None for a block without (never with class weights)

    def prepare(self, problem: HeadProblem, counts: Tensor) -> GroupState:
        """``(class ids [R, G] with skipped rows set to 0, kept rows [R, G] bool, the class weight
        of each row's target [R, G] or None)``; adds the tasks' divisors to ``counts`` [T]: kept
        rows, or their targets' summed class weights."""
        target = torch.stack([problem.targets[i] for i in self.tasks], dim=1)
        valid = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        if self.is_token and problem.token_mask is not None:
            valid &= problem.token_mask.unsqueeze(1)
        target = torch.where(valid, target, 0)
        if self.class_weights is None:
            counts.index_add_(0, self.task_index, valid.sum(dim=0, dtype=counts.dtype))
            return target, valid, None
        target_weight = self.class_weights.expand(target.shape[0], -1, -1).gather(2, target.unsqueeze(2)).squeeze(2)
        counts.index_add_(0, self.task_index, torch.where(valid, target_weight, 0.0).sum(dim=0))
        return target, valid, target_weight

    def apply_(self, logits: Tensor, rows: slice, state: GroupState, scales: Tensor | None, sums: Tensor) -> None:
        """Adds the tasks' loss sums over ``rows`` to ``sums`` [T]; with ``scales`` [T], turns their
        columns of ``logits`` [rows, span width] into ``scale * dloss/dlogits``."""
        all_targets, all_valid, target_weight = state
        target, valid = all_targets[rows].unsqueeze(2), all_valid[rows]
        n, tasks = logits.shape[0], len(self.tasks)
        x = logits[:, self.first_col : self.first_col + tasks * self.width].view(n, tasks, self.width)
        softcap_derivative = None
        if self.softcap is not None:  # x = cap tanh(x / cap), whose derivative 1 - tanh^2 dlogits take
            cap = self.softcap.unsqueeze(1)
            x.div_(cap).tanh_()
            if scales is not None:
                softcap_derivative = 1.0 - x * x
            x.mul_(cap)
        if self.pad is not None:  # their weight rows are 0, and so is their gradient's effect on dH
            x.masked_fill_(self.pad, float("-inf"))
        row_max = x.amax(dim=2, keepdim=True)
        x.sub_(row_max)
        # -(1 - eps) w_y x_y - eps / C sum_c w_c x_c + coef * lse, on logits shifted by their row max
        neg_coef = self.neg_target_coef if target_weight is None else self.neg_target_coef * target_weight[rows]
        row_loss = neg_coef * x.gather(2, target).squeeze(2)
        if self.smoothing_per_class is not None:
            finite = x if self.pad is None else x.masked_fill(self.pad, 0.0)
            summed = finite.sum(dim=2) if self.class_weights is None else (finite * self.class_weights).sum(dim=2)
            row_loss -= self.smoothing_per_class * summed
        x.exp_()
        sumexp = x.sum(dim=2)
        log_sumexp = sumexp.log()
        if self.class_weights is None:
            row_loss += log_sumexp
            if self.z_loss is not None:
                lse = row_max.squeeze(2) + log_sumexp
                row_loss += self.z_loss * lse.square()
        else:
            coef = -neg_coef if self.smoothed_weight_sums is None else self.smoothed_weight_sums - neg_coef
            row_loss += coef * log_sumexp
        sums.index_add_(0, self.task_index, torch.where(valid, row_loss, 0.0).sum(dim=0))
        if scales is None:
            return
        x.div_(sumexp.unsqueeze(2) if self.class_weights is None else (sumexp / coef).unsqueeze(2))
        if self.z_loss is not None:  # d/dx of z lse^2 = 2 z lse softmax
            x.mul_((1.0 + 2.0 * self.z_loss * lse).unsqueeze(2))
        x.scatter_add_(2, target, neg_coef.expand(n, tasks).unsqueeze(2))
        if self.smoothing_per_class is not None:
            smoothing = self.smoothing_per_class.unsqueeze(1)
            x.sub_(smoothing if self.class_weights is None else smoothing * self.class_weights)
        x.mul_(torch.where(valid, scales[self.task_index], 0.0).unsqueeze(2))
        if softcap_derivative is not None:
            x.mul_(softcap_derivative)


class _DenseGroup(NamedTuple):
    """The bce or the mse tasks of one span, computed together on their adjacent columns [rows, C_d]."""

    kind: int
    tasks: tuple[int, ...]
    is_token: bool
    task_index: Tensor  # int64 [G]
    cols: slice  # their span columns
    col_task: Tensor  # int64 [C_d]: the group's task (0 .. G - 1) of each column
    col_global: Tensor  # int64 [C_d]: the task (0 .. T - 1) of each column
    task_cols: Tensor | None  # int64 [G, W_max]: each task's columns, padded with C_d (a zero appended); None for one task
    widths: Tensor  # acc [G]: C of each task
    pos_weight: Tensor | None  # acc [C_d]: bce positive weights (1 where a task has none); None for none

    def prepare(self, problem: HeadProblem, counts: Tensor) -> GroupState:
        """``(targets [R, C_d], kept rows [R, G] bool, None)``: a row of a task holding a NaN is
        skipped. Adds each task's kept rows times C to ``counts`` [T]."""
        targets = [problem.targets[i] for i in self.tasks]
        if len(targets) == 1:
            target = targets[0]
            valid = ~torch.isnan(target).any(dim=1, keepdim=True)
        else:
            target = torch.cat(targets, dim=1)
            nan = torch.isnan(target).to(counts.dtype)
            valid = nan.new_zeros(target.shape[0], len(targets)).index_add_(1, self.col_task, nan) == 0
        if self.is_token and problem.token_mask is not None:
            valid &= problem.token_mask.unsqueeze(1)
        counts.index_add_(0, self.task_index, valid.sum(dim=0, dtype=counts.dtype) * self.widths)
        return target, valid, None

    def apply_(self, logits: Tensor, rows: slice, state: GroupState, scales: Tensor | None, sums: Tensor) -> None:
        """As :meth:`_CrossEntropyGroup.apply_`."""
        target, valid, _ = state
        keep = valid[rows]
        if len(self.tasks) > 1:
            keep = keep.gather(1, self.col_task.expand(keep.shape[0], -1))
        x = logits[:, self.cols]
        y = torch.where(keep, target[rows].to(x.dtype), 0.0)
        if self.kind == MSE:
            x.sub_(y)
            per_element = x.square()
        elif self.pos_weight is None:
            per_element = x.clamp_min(0) - x * y + torch.log1p(torch.exp(-x.abs()))
        else:
            # -(p y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))) = (1 - y) x + (1 + (p - 1) y) softplus(-x)
            log_weight = 1.0 + (self.pos_weight - 1.0) * y
            per_element = (1.0 - y) * x + log_weight * (x.neg().clamp_min(0) + torch.log1p(torch.exp(-x.abs())))
        col_sums = torch.where(keep, per_element, 0.0).sum(dim=0)
        # Per task in a fixed order: index_add_ over columns would add with atomics on a GPU.
        task_sums = col_sums.sum().reshape(1) if self.task_cols is None else (
            torch.cat([col_sums, col_sums.new_zeros(1)])[self.task_cols].sum(dim=1))  # fmt: skip
        sums.index_add_(0, self.task_index, task_sums)
        if scales is None:
            return
        scale = torch.where(keep, scales[self.col_global], 0.0)
        if self.kind == MSE:
            x.mul_(scale.mul_(2.0))
        elif self.pos_weight is None:
            x.sigmoid_().sub_(y).mul_(scale)
        else:  # the derivative: (1 + (p - 1) y) sigmoid(x) - p y
            x.sigmoid_().mul_(log_weight).sub_(self.pos_weight * y).mul_(scale)


_Group = _CrossEntropyGroup | _DenseGroup


class _Span(NamedTuple):
    """Tasks of one level whose logits one GEMM computes, and their groups. The span's columns
    are the packed weight rows ``rows`` when these are adjacent and in the groups' order; else
    ``span_cols`` [R] holds the span column of each of the packed rows ``rows`` [R] and the other
    span columns are padding (zero weight and bias)."""

    rows: slice | Tensor  # a slice, or int64 [R]
    span_cols: Tensor | None  # int64 [R]; None when ``rows`` is a slice
    width: int
    groups: tuple[_Group, ...]

    def gather(self, packed: Tensor) -> Tensor:
        """The span's rows [width, ...] of a tensor laid out like the packed weight rows."""
        rows, span_cols = self.rows, self.span_cols
        if isinstance(rows, slice) or span_cols is None:
            return packed[rows]
        return packed.new_zeros(self.width, *packed.shape[1:]).index_copy_(0, span_cols, packed.index_select(0, rows))

    def scatter_(self, packed: Tensor, span_rows: Tensor) -> None:
        """Writes the span's rows ``span_rows`` [width, ...] into ``packed`` (padding left out): a
        span with ``span_cols`` only; the others' rows are views of ``packed``."""
        rows, span_cols = self.rows, self.span_cols
        assert isinstance(rows, Tensor) and span_cols is not None, "a span of adjacent rows has nothing to scatter"
        packed.index_copy_(0, rows, span_rows.index_select(0, span_cols))


def _long(values: list[int] | list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _cross_entropy_blocks(heads: tuple[HeadSpec, ...], tasks: list[int]) -> list[tuple[list[int], int]]:
    """``(tasks, C_max)`` of each block of cross-entropy tasks: one per power-of-two bracket of C
    and combination of options (class weights, softcap, z-loss: each present or not), so that
    padding stays under half of a block (one wide task among binary ones does not pad them all)
    and the number of blocks does not grow with the number of tasks."""
    ce = [i for i in tasks if heads[i].is_ce]

    def kind(head: HeadSpec) -> tuple[bool, bool, bool, int]:
        return bool(head.column_weights), bool(head.softcap), bool(head.z_loss), (head.num_cols - 1).bit_length()

    kinds = sorted({kind(heads[i]) for i in ce})
    blocks = [[i for i in ce if kind(heads[i]) == k] for k in kinds]
    return [(block, max(heads[i].num_cols for i in block)) for block in blocks]


def _cross_entropy_group(heads: tuple[HeadSpec, ...], tasks: list[int], first_col: int, width: int,
                         device: torch.device, acc: torch.dtype) -> _CrossEntropyGroup:  # fmt: skip
    specs = [heads[i] for i in tasks]
    smoothing = [h.label_smoothing for h in specs]
    padded = any(h.num_cols < width for h in specs)
    smoothing_per_class = torch.tensor([e / h.num_cols for e, h in zip(smoothing, specs)], dtype=acc,
                                       device=device) if any(smoothing) else None  # fmt: skip
    weights = smoothed_weight_sums = None
    if specs[0].column_weights:  # then every task of the group has them
        weights = torch.tensor([[*cast(ColumnWeights, h.column_weights).values, *[0.0] * (width - h.num_cols)]
                                for h in specs], dtype=acc, device=device)  # fmt: skip
        if smoothing_per_class is not None:
            smoothed_weight_sums = smoothing_per_class * weights.sum(dim=1)
    return _CrossEntropyGroup(
        tasks=tuple(tasks),
        is_token=specs[0].is_token,
        task_index=_long(tasks, device),
        num_classes=_long([h.num_cols for h in specs], device),
        ignore_index=_long([h.ignore_index for h in specs], device) if any(
            0 <= h.ignore_index < h.num_cols for h in specs) else None,  # fmt: skip
        neg_target_coef=torch.tensor([e - 1.0 for e in smoothing], dtype=acc, device=device),
        smoothing_per_class=smoothing_per_class,
        class_weights=weights,
        smoothed_weight_sums=smoothed_weight_sums,
        first_col=first_col,
        width=width,
        pad=torch.tensor([[c >= h.num_cols for c in range(width)] for h in specs], device=device) if padded else None,
        softcap=torch.tensor([h.softcap for h in specs], dtype=acc, device=device) if specs[0].softcap else None,
        z_loss=torch.tensor([h.z_loss for h in specs], dtype=acc, device=device) if specs[0].z_loss else None,
    )


def _dense_group(heads: tuple[HeadSpec, ...], kind: int, tasks: list[int], first_col: int, device: torch.device,
                 acc: torch.dtype) -> _DenseGroup:  # fmt: skip
    specs = [heads[i] for i in tasks]
    weighted = any(h.column_weights for h in specs)
    widest, total = max(h.num_cols for h in specs), sum(h.num_cols for h in specs)
    starts = [sum(h.num_cols for h in specs[:k]) for k in range(len(specs))]
    pos_weight = [w for h in specs for w in (h.column_weights.values if h.column_weights else (1.0,) * h.num_cols)]
    return _DenseGroup(
        kind=kind,
        tasks=tuple(tasks),
        is_token=specs[0].is_token,
        task_index=_long(tasks, device),
        cols=slice(first_col, first_col + total),
        col_task=_long([k for k, h in enumerate(specs) for _ in range(h.num_cols)], device),
        col_global=_long([i for i, h in zip(tasks, specs) for _ in range(h.num_cols)], device),
        task_cols=_long([[s + c if c < h.num_cols else total for c in range(widest)] for s, h in zip(starts, specs)],
                        device) if len(specs) > 1 else None,  # fmt: skip
        widths=torch.tensor([float(h.num_cols) for h in specs], dtype=acc, device=device),
        pos_weight=torch.tensor(pos_weight, dtype=acc, device=device) if weighted else None,
    )


def _span_layout(heads: tuple[HeadSpec, ...], members: list[int]) -> tuple[list[int], list[tuple[int, list[int], int]]]:
    """How one GEMM's tasks lie on its columns: the packed row of each span column (-1 for
    padding) and each group's ``(kind, tasks, first column)``, each group on adjacent columns:
    the blocks of cross-entropy tasks (:func:`_cross_entropy_blocks`), then the bce tasks and the
    mse tasks. No tensors: fake-tensor code calls it too."""
    layout: list[int] = []
    groups: list[tuple[int, list[int], int]] = []
    for block, width in _cross_entropy_blocks(heads, members):
        groups.append((CROSS_ENTROPY, block, len(layout)))
        for i in block:
            layout += [*range(heads[i].col_start, heads[i].col_end), *[-1] * (width - heads[i].num_cols)]
    for kind in (BCE, MSE):
        tasks = [i for i in members if heads[i].kind == kind]
        if tasks:
            groups.append((kind, tasks, len(layout)))
            layout += [c for i in tasks for c in range(heads[i].col_start, heads[i].col_end)]
    return layout, groups


def _span(heads: tuple[HeadSpec, ...], members: list[int], device: torch.device, acc: torch.dtype) -> _Span:
    """One GEMM's worth of tasks and their groups (:func:`_span_layout`)."""
    layout, placed = _span_layout(heads, members)
    groups = tuple(
        _cross_entropy_group(heads, tasks, first, max(heads[i].num_cols for i in tasks), device, acc)
        if kind == CROSS_ENTROPY else _dense_group(heads, kind, tasks, first, device, acc)
        for kind, tasks, first in placed
    )  # fmt: skip
    if layout == list(range(layout[0], layout[0] + len(layout))):
        return _Span(slice(layout[0], layout[0] + len(layout)), None, len(layout), groups)
    rows = [(row, col) for col, row in enumerate(layout) if row >= 0]
    return _Span(_long([r for r, _ in rows], device), _long([c for _, c in rows], device), len(layout), groups)


@cache
def _level_spans(heads: tuple[HeadSpec, ...], level: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """``(tasks, width)`` of each GEMM of one level: one over all tasks of up to ``NARROW_MAX_COLS``
    outputs, one per wider task (a vocabulary head, say: no gathered copy of its weight). Width
    counts the cross-entropy blocks' padding."""
    members = sorted((i for i, h in enumerate(heads) if h.level == level), key=lambda i: heads[i].col_start)
    narrow = [i for i in members if heads[i].num_cols <= NARROW_MAX_COLS]
    spans = ([narrow] if narrow else []) + [[i] for i in members if heads[i].num_cols > NARROW_MAX_COLS]
    return tuple((tuple(tasks), len(_span_layout(heads, tasks)[0])) for tasks in spans)


@cache
def _level_plan(heads: tuple[HeadSpec, ...], level: int, device: torch.device, acc: torch.dtype) -> tuple[_Span, ...]:
    """The spans of one level (:func:`_level_spans`), their weight rows gathered into the groups'
    order unless they already lie so in the packed weight."""
    return tuple(_span(heads, list(tasks), device, acc) for tasks, _ in _level_spans(heads, level))


@cache
def task_span(heads: tuple[HeadSpec, ...], index: int, device: torch.device) -> _Span:
    """One task on its own (fp32): its packed weight rows and its one group, whose ``prepare``
    and ``apply_`` other backends can borrow for a task their kernels do not take."""
    return _span(heads, [index], device, torch.float32)


def _dh_in_backward(problem: HeadProblem, width: int) -> bool:
    """Whether a span's dH is computed in backward from its scaled ``dlogits`` [R, width], kept
    from forward, rather than in forward into an fp32 dH [R, D]: when the span is no wider than
    D, it keeps fewer bytes and spares dH a zero fill and a scaling pass."""
    return problem.compute_grad and problem.hidden_grad and width <= problem.hidden.shape[1]


def _levels(problem: HeadProblem, acc: torch.dtype) -> list[tuple[int, tuple[_Span, ...]]]:
    """Each level's spans, the token level first (its dH product covers every row of ``hidden``)."""
    return [(level, _level_plan(problem.heads, level, problem.hidden.device, acc)) for level in (TOKEN, SEQUENCE)]


def _forward_dh_shapes(problem: HeadProblem) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the fp32 dH and d pooled that forward accumulates, ``(0,)`` when no span's dH is
    computed there."""
    widths = [width for level in (TOKEN, SEQUENCE) for _, width in _level_spans(problem.heads, level)]
    if not problem.hidden_grad or all(_dh_in_backward(problem, width) for width in widths):
        return (0,), (0,)
    return tuple(problem.hidden.shape), tuple(problem.pooled.shape) if problem.pooled is not None else (0,)


def forward(problem: HeadProblem) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``saved`` holds the fp32 dH and d pooled computed in forward (shape ``(0,)`` when none),
    the fp32 dW and db, and the scaled ``dlogits`` of each span whose dH waits for backward."""
    acc, cdtype, device = problem.acc_dtype, problem.compute_dtype, problem.hidden.device
    weight = weight_in(cdtype, problem.weight)
    bias = problem.bias.to(acc)
    levels = _levels(problem, acc)
    counts = torch.zeros(len(problem.heads), dtype=acc, device=device)
    states = [[[group.prepare(problem, counts) for group in span.groups] for span in spans] for _, spans in levels]
    divisors = problem.divisors(counts)
    scales = problem.loss_scales(divisors) if problem.compute_grad else None
    sums = torch.zeros_like(counts)

    saved: list[Tensor] = []
    if problem.compute_grad:
        hidden_shape, pooled_shape = _forward_dh_shapes(problem)
        grad_hidden = torch.zeros(hidden_shape, dtype=acc, device=device)
        grad_pooled = torch.zeros(pooled_shape, dtype=acc, device=device)
        grad_weight = torch.zeros(problem.weight.shape, dtype=acc, device=problem.weight.device)
        grad_bias = torch.zeros(problem.bias.shape, dtype=acc, device=problem.bias.device)
        saved = [grad_hidden, grad_pooled, grad_weight, grad_bias]

    for (level, spans), level_states in zip(levels, states):
        if not spans:
            continue
        rows_all = problem.level_rows(level == TOKEN, problem.hidden, problem.pooled)
        widest = max(span.width for span in spans)
        chunk = problem.chunk_size or auto_chunk_rows(widest, problem.hidden.shape[1], device.type)
        for span, span_states in zip(spans, level_states):
            w_span, b_span = span.gather(weight), span.gather(bias)
            wide16 = problem.compute_grad and span.width >= WIDE_SPAN and cdtype == torch.bfloat16 and w_span.is_cuda
            deferred = _dh_in_backward(problem, span.width)
            dh_now = problem.hidden_grad and not deferred
            if dh_now:
                grad_rows_all = problem.level_rows(level == TOKEN, grad_hidden, grad_pooled)
                w_grad = w_span if wide16 else w_span.to(acc)
            gathered = span.span_cols is not None
            if problem.compute_grad:
                gw_span = grad_weight.new_zeros(span.width, grad_weight.shape[1]) if gathered else grad_weight[span.rows]
                gb_span = grad_bias.new_zeros(span.width) if gathered else grad_bias[span.rows]
            kept = None
            if deferred:
                kept = torch.empty(rows_all.shape[0], span.width, dtype=acc, device=device)
                saved.append(kept)
            for r0 in range(0, rows_all.shape[0], chunk):
                rows = slice(r0, min(r0 + chunk, rows_all.shape[0]))
                h = rows_all[rows].to(cdtype)  # fp32 rows under autocast: rounded chunk by chunk
                if problem.compute_grad and not wide16 and not products_take_16_bit(h):
                    h = h.to(acc)  # the logits and dW products both take the rows in acc here: cast once
                if kept is None:
                    logits = mm_acc(h, w_span.t(), acc)
                else:
                    logits = kept[rows]
                    addmm_acc_(logits, h, w_span.t(), beta=0.0)
                logits.add_(b_span)
                for group, state in zip(span.groups, span_states):
                    group.apply_(logits, rows, state, scales, sums)
                if not problem.compute_grad:
                    continue
                dlogits = logits.to(cdtype) if wide16 else logits
                if dh_now:
                    addmm_acc_(grad_rows_all[rows], dlogits, w_grad)
                addmm_acc_(gw_span, dlogits.t(), h if wide16 else h.to(acc))
                gb_span += logits.sum(dim=0)
            if problem.compute_grad and gathered:
                span.scatter_(grad_weight, gw_span)
                span.scatter_(grad_bias, gb_span)

    losses = torch.where(divisors > 0, sums / divisors.clamp_min(1e-30), torch.zeros_like(sums))
    return weighted_total(losses, problem.task_weights), losses, saved


def _add_rows(problem: HeadProblem, token: bool, grads: list[Tensor | None], dlogits: Tensor, weight: Tensor) -> None:
    """Adds ``dlogits @ weight`` to one level's rows of ``grads = [dH, d pooled]`` (fp32),
    creating a missing one: from the product itself when it covers every row."""
    index = 1 if not token and problem.pooled is not None else 0
    whole = token or index == 1 or problem.seq_stride == 1
    grad = grads[index]
    if grad is None and whole:
        grads[index] = dlogits @ weight
        return
    if grad is None:
        grad = grads[index] = dlogits.new_zeros(problem.hidden.shape)
    rows = grad if whole else grad[:: problem.seq_stride]
    rows.addmm_(dlogits, weight)


def backward(problem: HeadProblem, saved: list[Tensor], grad_total: Tensor, main_grad: Tensor | None = None):
    grad_hidden, grad_pooled, grad_weight, grad_bias, *kept = saved
    acc = grad_weight.dtype
    g = grad_total.to(acc)
    grad_rows: tuple[Tensor | None, Tensor | None] = (None, None)
    if problem.hidden_grad:
        grads = [grad_hidden * g if grad_hidden.dim() == 2 else None, grad_pooled * g if grad_pooled.dim() == 2 else None]
        weight = weight_in(problem.compute_dtype, problem.weight)
        dlogits = iter(kept)
        for level, spans in _levels(problem, acc):
            for span in spans:
                if _dh_in_backward(problem, span.width):
                    _add_rows(problem, level == TOKEN, grads, next(dlogits) * g, span.gather(weight).to(acc))
        grad_rows = (
            torch.zeros_like(problem.hidden) if grads[0] is None else grads[0].to(problem.hidden.dtype),
            None if problem.pooled is None else
            torch.zeros_like(problem.pooled) if grads[1] is None else grads[1].to(problem.pooled.dtype),
        )  # fmt: skip
    if main_grad is None:
        return (*grad_rows, grad_weight * g, grad_bias * g)
    main_grad.addcmul_(grad_weight, g)  # no scaled copy of dW
    return (*grad_rows, None, grad_bias * g)


def saved_like(problem: HeadProblem) -> list[Tensor]:
    if not problem.compute_grad:
        return []
    acc = problem.acc_dtype
    hidden_shape, pooled_shape = _forward_dh_shapes(problem)
    kept = [problem.hidden.new_empty((problem.level_rows(level == TOKEN, problem.hidden, problem.pooled).shape[0],
                                      width), dtype=acc)
            for level in (TOKEN, SEQUENCE) for _, width in _level_spans(problem.heads, level)
            if _dh_in_backward(problem, width)]  # fmt: skip
    return [
        problem.hidden.new_empty(hidden_shape, dtype=acc),
        problem.hidden.new_empty(pooled_shape, dtype=acc),
        problem.weight.new_empty(problem.weight.shape, dtype=acc),
        problem.bias.new_empty(problem.bias.shape, dtype=acc),
        *kept,
    ]
