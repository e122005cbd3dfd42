"""The fused algorithm in Triton kernels (``mtlfast.kernels``).

Tasks are split in two paths, picked per task:

- small path: every bce/mse task and every cross-entropy task with at most
  ``MAX_BLOCK_C`` outputs goes through one launch of ``small_heads_kernel`` in forward
  and one in backward, whatever the number of tasks, both levels together; the kernel
  reads the label tensors itself, so the host issues a handful of small ops per call;
- large path: a cross-entropy task with more classes (a vocabulary head) is tiled over
  its columns with an online log-sum-exp (``large_ce_lse_kernel``); the backward
  recomputes tiles (``large_ce_backward_kernel``), as Cut Cross-Entropy does.

Forward keeps each task's gradient scale (task weight / divisor), the table of label
addresses and, per large task, the row log-sum-exp [rows];
backward recomputes the logits. Nothing synchronises with the host. fp64 inputs, a
bce/mse task wider than ``MAX_BLOCK_C``, and ``deterministic=True`` together with a
large task run the ``torch`` backend instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from . import torch_chunked
from .base import HeadProblem, HeadSpec

name = "triton"

MAX_BLOCK_C = 128
# dW/db of the small path accumulate in per-program partial buffers (plain stores, then
# one reduction; bitwise reproducible) when these fit in PARTIAL_BYTES with enough
# programs to fill the GPU, else with float atomics. deterministic=True always uses
# partials, with up to DETERMINISTIC_PARTIAL_BYTES.
PARTIAL_BYTES = 64 << 20
DETERMINISTIC_PARTIAL_BYTES = 256 << 20
# Cut Cross-Entropy skips vocabulary tiles whose dlogits all lie below ~2**-12. That drops
# the whole softmax mass of a near-uniform row, beyond the numerics rules, so the large
# path keeps every tile (None); a float here would turn the skipping on for 16-bit compute.
LARGE_FILTER_EPS: float | None = None


def alloc_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocates a buffer the kernels overwrite entirely (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kernels():
    from ..kernels import large_ce, small_heads

    return small_heads, large_ce


def _is_large(head: HeadSpec) -> bool:
    return head.num_cols > MAX_BLOCK_C


def _delegates(problem: HeadProblem) -> bool:
    if problem.compute_dtype == torch.float64:
        return True
    if any(_is_large(h) and not h.is_ce for h in problem.heads):
        return True
    return problem.deterministic and any(_is_large(h) for h in problem.heads)


@dataclass(frozen=True)
class _SmallPlan:
    slot_int: Tensor  # int32 [G, SLOT_FIELDS, BLOCK_C]
    slot_flt: Tensor  # fp32 [G, 2, BLOCK_C]
    group_segments: Tensor  # int32 [G]: tasks per group
    slot_rows: Tensor  # int64 [valid slots]: packed weight row of each slot
    slot_index: Tensor  # int64 [valid slots]: position of each slot in G * BLOCK_C
    slot_to_task: Tensor  # fp64 [G * BLOCK_C, T]
    count_scale: Tensor  # fp32 [T]: C for bce/mse (divisor = kept rows * C), 1 for cross-entropy

    @property
    def n_groups(self) -> int:
        return self.slot_int.shape[0]

    @property
    def block_c(self) -> int:
        return self.slot_int.shape[2]


@cache
def _small_plan(heads: tuple[HeadSpec, ...], device: torch.device) -> _SmallPlan:
    """Packs the small tasks into groups of slots (one slot per packed weight row)."""
    small_heads, _ = _kernels()
    small = sorted((i for i, h in enumerate(heads) if not _is_large(h)), key=lambda i: heads[i].col_start)
    total = sum(heads[i].num_cols for i in small)
    block_c = min(MAX_BLOCK_C, max(16, 1 << (max(total, 1) - 1).bit_length()))
    groups: list[list[int]] = [[]]
    used = 0
    for i in small:
        if used + heads[i].num_cols > block_c:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += heads[i].num_cols
    slot_int = torch.full((len(groups), small_heads.SLOT_FIELDS, block_c), -1, dtype=torch.int32)
    slot_flt = torch.zeros((len(groups), 2, block_c), dtype=torch.float32)
    slot_to_task = torch.zeros(len(groups) * block_c, len(heads), dtype=torch.float64)
    for g, members in enumerate(groups):
        s = 0
        for segment, i in enumerate(members):
            head = heads[i]
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
                slot_flt[g, 0, s] = head.label_smoothing
                slot_flt[g, 1, s] = 1.0 / head.num_cols
                slot_to_task[g * block_c + s, i] = 1.0
                s += 1
    cols = slot_int[:, small_heads.SLOT_COL, :].reshape(-1)
    valid = cols >= 0
    count_scale = torch.tensor([1.0 if h.is_ce else float(h.num_cols) for h in heads], dtype=torch.float32)
    return _SmallPlan(
        slot_int=slot_int.to(device),
        slot_flt=slot_flt.to(device),
        group_segments=torch.tensor([len(m) for m in groups], dtype=torch.int32, device=device),
        slot_rows=cols[valid].long().to(device),
        slot_index=valid.nonzero().squeeze(1).to(device),
        slot_to_task=slot_to_task.to(device),
        count_scale=count_scale.to(device),
    )


def _target_table(problem: HeadProblem) -> Tensor:
    """int64 [T]: the address of each task's targets (int64 [rows] or fp32 [rows, C], contiguous)."""
    for target, head in zip(problem.targets, problem.heads):
        expected = torch.int64 if head.is_ce else torch.float32
        if target.dtype != expected or not target.is_contiguous():
            raise ValueError(f"triton backend: targets must be contiguous {expected}, got {target.dtype}")
    return torch.tensor([t.data_ptr() for t in problem.targets], dtype=torch.int64, device=problem.hidden.device)


def _large_target(problem: HeadProblem, index: int) -> Tensor:
    """int32 class ids of a large task, -1 for skipped rows."""
    return torch.where(problem.valid_rows(index), problem.targets[index], -1).to(torch.int32)


@cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 stand in for the interpreter on the CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _splits(rows: int, n_cols: int, device: torch.device) -> int:
    sms = _multiprocessors(device)
    row_blocks = max(1, -(-rows // 128))
    return max(1, min(-(-2 * sms // row_blocks), -(-n_cols // 128)))


def _partial_programs(problem: HeadProblem, plan: _SmallPlan) -> int:
    """Programs owning partial dW/db buffers, or 0 for float atomics."""
    per_program = plan.n_groups * plan.block_c * (problem.hidden.shape[1] + 1) * 4
    sms = _multiprocessors(problem.hidden.device)
    rows = problem.hidden.shape[0] + (problem.pooled.shape[0] if problem.pooled is not None else 0)
    wanted = max(1, min(2 * sms, -(-rows // 32)))
    if wanted * per_program <= PARTIAL_BYTES:
        return wanted
    if not problem.deterministic:
        return 0
    return max(1, min(wanted, DETERMINISTIC_PARTIAL_BYTES // per_program))


def _launch_small(problem: HeadProblem, plan: _SmallPlan, table: Tensor, *, backward: bool, **buffers) -> None:
    small_heads, _ = _kernels()
    dummy = buffers.get("loss", table)
    args = {
        "task_scale": dummy, "loss": dummy, "count": dummy, "grad_hidden": problem.hidden,
        "grad_pooled": problem.hidden, "dh_acc": dummy, "grad_weight": dummy, "grad_bias": dummy,
        "has_dh_init": False, "partial_programs": 0,
    }  # fmt: skip
    args.update(buffers)
    small_heads.launch_small_heads(
        backward=backward,
        hidden=problem.hidden,
        pooled=problem.pooled,
        seq_stride=problem.seq_stride,
        token_mask=problem.token_mask,
        weight=problem.weight,
        bias=problem.bias,
        slot_int=plan.slot_int,
        slot_flt=plan.slot_flt,
        group_segments=plan.group_segments,
        target_table=table,
        **args,
    )


def forward(problem: HeadProblem) -> tuple[Tensor, list[Tensor]]:
    if _delegates(problem):
        return torch_chunked.forward(problem)
    _, large_ce = _kernels()
    device = problem.hidden.device
    heads = problem.heads
    sums_counts = torch.zeros((2, len(heads)), dtype=torch.float32, device=device)
    sums, counts = sums_counts[0], sums_counts[1]
    table = _target_table(problem)
    if any(not _is_large(h) for h in heads):
        plan = _small_plan(heads, device)
        programs = _partial_programs(problem, plan) if problem.deterministic else 0
        loss = torch.zeros((programs, plan.n_groups * plan.block_c), dtype=torch.float32, device=device) if (
            programs) else sums  # fmt: skip
        _launch_small(problem, plan, table, backward=False, loss=loss, count=counts,
                      partial_programs=programs)  # fmt: skip
        if programs:
            sums = sums + (loss.sum(dim=0, dtype=torch.float64) @ plan.slot_to_task).to(torch.float32)
        counts = counts * plan.count_scale
    saved_lse = []
    for i, head in enumerate(heads):
        if not _is_large(head):
            continue
        rows = problem.rows_for(head)
        target = _large_target(problem, i)
        lse, target_logit, logit_sum = large_ce.large_ce_lse(
            rows, problem.weight, problem.bias, head.col_start, head.num_cols, target,
            _splits(rows.shape[0], head.num_cols, device),
        )  # fmt: skip
        eps = head.label_smoothing
        row_loss = lse - (1.0 - eps) * target_logit - (eps / head.num_cols) * logit_sum
        kept = target >= 0
        sums[i] = torch.where(kept, row_loss, 0.0).sum()
        counts[i] = kept.sum(dtype=torch.float32)
        saved_lse.append(lse)
    override = problem.divisor_override.to(torch.float32)
    divisors = torch.where(override >= 0, override, counts)
    losses = torch.where(divisors > 0, sums / divisors.clamp_min(1e-30), 0.0)
    return losses, [problem.loss_scales(divisors), table, *saved_lse]


def backward(problem: HeadProblem, saved: list[Tensor], grad_total: Tensor):
    if _delegates(problem):
        return torch_chunked.backward(problem, saved, grad_total)
    _, large_ce = _kernels()
    loss_scale, table, *saved_lse = saved
    device = problem.hidden.device
    cdtype = problem.compute_dtype
    heads = problem.heads
    n_hidden, hidden_size = problem.hidden.shape
    n_pooled = problem.pooled.shape[0] if problem.pooled is not None else 0
    scale = loss_scale * grad_total.to(torch.float32)
    grad_weight = torch.zeros(problem.weight.shape, dtype=torch.float32, device=device)
    grad_bias = torch.zeros(problem.bias.shape, dtype=torch.float32, device=device)

    dh_large = None
    large = [i for i, h in enumerate(heads) if _is_large(h)]
    if large:
        dh_large = torch.zeros((n_hidden + n_pooled, hidden_size), dtype=torch.float32, device=device)
        filter_eps = LARGE_FILTER_EPS if cdtype in (torch.float16, torch.bfloat16) else None
        for i, lse in zip(large, saved_lse):
            head = heads[i]
            target = _large_target(problem, i)
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
        grad_hidden = alloc_output((n_hidden, hidden_size), cdtype, device)
        grad_pooled = alloc_output((n_pooled, hidden_size), cdtype, device) if n_pooled else grad_hidden
        if dh_large is not None:
            dh_acc = dh_large
        elif plan.n_groups > 1:
            dh_acc = torch.empty((n_hidden + n_pooled, hidden_size), dtype=torch.float32, device=device)
        else:
            dh_acc = grad_bias
        programs = _partial_programs(problem, plan)
        if programs:
            slots = plan.n_groups * plan.block_c
            dw_target = torch.zeros((programs, slots, hidden_size), dtype=torch.float32, device=device)
            db_target = torch.zeros((programs, slots), dtype=torch.float32, device=device)
        else:
            dw_target, db_target = grad_weight, grad_bias
        _launch_small(
            problem, plan, table, backward=True, task_scale=scale, grad_hidden=grad_hidden,
            grad_pooled=grad_pooled, dh_acc=dh_acc, grad_weight=dw_target, grad_bias=db_target,
            has_dh_init=dh_large is not None, partial_programs=programs,
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
    count = len(problem.heads)
    saved = [problem.hidden.new_empty((count,), dtype=torch.float32), problem.hidden.new_empty((count,), dtype=torch.int64)]
    for head in problem.heads:
        if _is_large(head):
            saved.append(problem.hidden.new_empty((problem.rows_for(head).shape[0],), dtype=torch.float32))
    return saved
