"""The fused algorithm in plain PyTorch, for any device.

Rows are processed in chunks. Per chunk and per run of adjacent task columns, one GEMM
over the packed weight gives every task's logits in fp32; they are turned in place into
per-task loss sums and ``dlogits`` (already scaled by ``task_weight / divisor``); then
``dH[chunk] += dlogits @ W`` and ``dW += dlogits^T @ H[chunk]`` accumulate in fp32.
Gradients are computed during forward and kept in fp32; backward only multiplies them
by ``grad_output`` and rounds, so nothing is rounded to 16 bits before that scale is
applied. Peak extra memory is one chunk of logits plus the fp32 gradients. Nothing
synchronises with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..task import BCE, CROSS_ENTROPY
from .base import HeadProblem, HeadSpec, addmm_acc_, column_weight_tensor, mm_acc, split_spans, weight_in, weighted_total

name = "torch"

# Spans at least this wide take 16-bit GEMMs (fp32 accumulation) for the gradients on
# CUDA with bf16 compute; narrower spans use exact fp32 GEMMs on fp32 dlogits.
WIDE_SPAN = 1024
# fp32 elements of one chunk of logits (plus its upcast rows): 32 MiB on the CPU; 512 MiB
# on a GPU, where every chunk also re-reads and re-writes the fp32 dW of its columns, so
# a vocabulary head needs chunks of ~1k rows to amortise that pass.
LOGITS_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}


def auto_chunk_rows(widest_span: int, hidden_size: int, device_type: str = "cpu") -> int:
    """Rows per chunk, from the widest run of task columns and the hidden size."""
    budget = LOGITS_CHUNK_ELEMENTS.get(device_type, LOGITS_CHUNK_ELEMENTS["cpu"])
    rows = budget // max(1, widest_span + hidden_size)
    return max(64, min(1 << 15, 1 << max(0, rows.bit_length() - 1)))


def _cross_entropy_(x: Tensor, target: Tensor, valid: Tensor, head: HeadSpec, scale: Tensor | None) -> Tensor:
    """Loss sum of logits ``x`` [n, C]; when ``scale`` is given, ``x`` becomes ``scale * dloss/dx``."""
    eps = head.label_smoothing
    safe = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    x.sub_(x.amax(dim=1, keepdim=True))
    target_logit = x.gather(1, safe).squeeze(1)
    mean_logit = x.mean(dim=1) if eps else None
    x.exp_()
    sumexp = x.sum(dim=1)
    rows = sumexp.log() - (1.0 - eps) * target_logit
    if eps:
        rows = rows - eps * mean_logit
    loss = torch.where(valid, rows, torch.zeros_like(rows)).sum()
    if scale is not None:
        x.div_(sumexp.unsqueeze(1))
        x.scatter_add_(1, safe, torch.full_like(target_logit, eps - 1.0).unsqueeze(1))
        if eps:
            x.sub_(eps / head.num_cols)
        x.mul_(torch.where(valid, scale, torch.zeros_like(scale)).unsqueeze(1))
    return loss


def _weighted_cross_entropy_(x: Tensor, target: Tensor, valid: Tensor, head: HeadSpec, scale: Tensor | None) -> Tensor:
    """:func:`_cross_entropy_` with class weights ``w``: a row's loss is ``(1 - eps) w_y nll_y +
    eps / C sum_c w_c nll_c``, so ``lse`` counts ``coef = (1 - eps) w_y + eps / C sum w`` times."""
    eps, inv_classes = head.label_smoothing, 1.0 / head.num_cols
    weights = column_weight_tensor(head.column_weights, x.dtype, x.device)
    safe = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    w_target = weights[safe.squeeze(1)]
    coef = (1.0 - eps) * w_target + eps * inv_classes * weights.sum()
    x.sub_(x.amax(dim=1, keepdim=True))
    rows = -(1.0 - eps) * w_target * x.gather(1, safe).squeeze(1)
    if eps:
        rows = rows - eps * inv_classes * (x @ weights)
    x.exp_()
    sumexp = x.sum(dim=1)
    rows = rows + coef * sumexp.log()
    loss = torch.where(valid, rows, torch.zeros_like(rows)).sum()
    if scale is not None:
        x.mul_((coef / sumexp).unsqueeze(1))
        x.scatter_add_(1, safe, (-(1.0 - eps) * w_target).unsqueeze(1))
        if eps:
            x.sub_(eps * inv_classes * weights)
        x.mul_(torch.where(valid, scale, torch.zeros_like(scale)).unsqueeze(1))
    return loss


def _dense_(x: Tensor, target: Tensor, valid: Tensor, head: HeadSpec, scale: Tensor | None) -> Tensor:
    """bce/mse loss sum of ``x`` [n, C]; with ``scale``, ``x`` becomes ``scale * dloss/dx``."""
    keep = valid.unsqueeze(1)
    y = torch.where(keep, target.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
    if head.kind == BCE and head.column_weights:
        # -(p y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))) = (1 - y) x + (1 + (p - 1) y) softplus(-x)
        pos_weight = column_weight_tensor(head.column_weights, x.dtype, x.device)
        log_weight = 1.0 + (pos_weight - 1.0) * y
        per_element = (1.0 - y) * x + log_weight * (x.neg().clamp_min(0) + torch.log1p(torch.exp(-x.abs())))
        loss = (per_element * keep).sum()
        if scale is not None:  # its derivative: (1 + (p - 1) y) sigmoid(x) - p y
            x.sigmoid_().mul_(log_weight).sub_(pos_weight * y)
    elif head.kind == BCE:
        per_element = x.clamp_min(0) - x * y + torch.log1p(torch.exp(-x.abs()))
        loss = (per_element * keep).sum()
        if scale is not None:
            x.sigmoid_().sub_(y)
    else:
        x.sub_(y)
        loss = (x.square() * keep).sum()
        if scale is not None:
            x.mul_(2.0)
    if scale is not None:
        x.mul_(torch.where(keep, scale, torch.zeros_like(scale)))
    return loss


def _loss_and_dlogits_(x: Tensor, problem: HeadProblem, index: int, rows: slice, scale: Tensor | None) -> Tensor:
    head = problem.heads[index]
    target = problem.targets[index][rows]
    valid = problem.valid_rows(index, rows)
    if head.kind == CROSS_ENTROPY:
        ce = _weighted_cross_entropy_ if head.column_weights else _cross_entropy_
        return ce(x, target, valid, head, scale)
    return _dense_(x, target, valid, head, scale)


def forward(problem: HeadProblem) -> tuple[Tensor, Tensor, list[Tensor]]:
    acc, cdtype = problem.acc_dtype, problem.compute_dtype
    weight = weight_in(cdtype, problem.weight)
    bias = problem.bias.to(acc)
    divisors = problem.divisors()
    scales = problem.loss_scales(divisors) if problem.compute_grad else None
    sums = [problem.hidden.new_zeros((), dtype=acc) for _ in problem.heads]

    saved: list[Tensor] = []
    if problem.compute_grad:
        hidden_shape, pooled_shape = _grad_rows_shapes(problem)
        grad_hidden = torch.zeros(hidden_shape, dtype=acc, device=problem.hidden.device)
        grad_pooled = torch.zeros(pooled_shape, dtype=acc, device=problem.hidden.device)
        grad_weight = torch.zeros(problem.weight.shape, dtype=acc, device=problem.weight.device)
        grad_bias = torch.zeros(problem.bias.shape, dtype=acc, device=problem.bias.device)
        saved = [grad_hidden, grad_pooled, grad_weight, grad_bias]

    for level in (0, 1):
        spans = split_spans(problem.heads, level)
        if not spans:
            continue
        rows_all = problem.level_rows(level == 1, problem.hidden, problem.pooled)
        if problem.hidden_grad:
            grad_rows_all = problem.level_rows(level == 1, grad_hidden, grad_pooled)
        widest = max(end - start for start, end, _ in spans)
        chunk = problem.chunk_size or auto_chunk_rows(widest, problem.hidden.shape[1], problem.hidden.device.type)
        for start, end, members in spans:
            cols = slice(start, end)
            w_span = weight[cols]
            wide16 = (
                problem.compute_grad and end - start >= WIDE_SPAN and cdtype == torch.bfloat16 and w_span.is_cuda
            )
            w_grad = (w_span if wide16 else w_span.to(acc)) if problem.hidden_grad else None
            for r0 in range(0, rows_all.shape[0], chunk):
                rows = slice(r0, min(r0 + chunk, rows_all.shape[0]))
                h = rows_all[rows].to(cdtype)  # fp32 rows under autocast: rounded chunk by chunk
                logits = mm_acc(h, w_span.t(), acc).add_(bias[cols])
                for i in members:
                    x = logits[:, problem.heads[i].col_start - start : problem.heads[i].col_end - start]
                    sums[i] = sums[i] + _loss_and_dlogits_(x, problem, i, rows, None if scales is None else scales[i])
                if not problem.compute_grad:
                    continue
                dlogits = logits.to(cdtype) if wide16 else logits
                if problem.hidden_grad:
                    addmm_acc_(grad_rows_all[rows], dlogits, w_grad)
                addmm_acc_(grad_weight[cols], dlogits.t(), h if wide16 else h.to(acc))
                grad_bias[cols] += logits.sum(dim=0)

    summed = torch.stack(sums) if sums else divisors
    losses = torch.where(divisors > 0, summed / divisors.clamp_min(1e-30), torch.zeros_like(summed))
    return weighted_total(losses, problem.task_weights), losses, saved


def backward(problem: HeadProblem, saved: list[Tensor], grad_total: Tensor):
    grad_hidden, grad_pooled, grad_weight, grad_bias = saved
    g = grad_total.to(grad_weight.dtype)
    return (
        (grad_hidden * g).to(problem.hidden.dtype) if problem.hidden_grad else None,
        (grad_pooled * g).to(problem.pooled.dtype) if problem.hidden_grad and problem.pooled is not None else None,
        (grad_weight * g).to(problem.weight.dtype),
        (grad_bias * g).to(problem.bias.dtype),
    )


def _grad_rows_shapes(problem: HeadProblem) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the fp32 dH and d pooled kept from forward ([0] when not needed)."""
    if not problem.hidden_grad:
        return (0,), (0,)
    return tuple(problem.hidden.shape), tuple(problem.pooled.shape) if problem.pooled is not None else (0,)


def saved_like(problem: HeadProblem) -> list[Tensor]:
    if not problem.compute_grad:
        return []
    acc = problem.acc_dtype
    hidden_shape, pooled_shape = _grad_rows_shapes(problem)
    return [
        problem.hidden.new_empty(hidden_shape, dtype=acc),
        problem.hidden.new_empty(pooled_shape, dtype=acc),
        problem.weight.new_empty(problem.weight.shape, dtype=acc),
        problem.bias.new_empty(problem.bias.shape, dtype=acc),
    ]
