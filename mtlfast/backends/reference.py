"""Plain PyTorch oracle: ``F.linear`` and PyTorch's losses, upcast to fp32.

Never optimise this file; tests compare the fast backends against it. Everything is
materialised: full logits per task, then the textbook gradient of each loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..task import BCE, CROSS_ENTROPY, HeadSpec
from .base import HeadProblem, column_weight_tensor, empty_saved, weight_in, weighted_total

name = "reference"
saved_like = empty_saved


def _task_logits(problem: HeadProblem, index: int) -> tuple[Tensor, Tensor, slice]:
    head = problem.heads[index]
    acc = problem.acc_dtype
    cols = slice(head.col_start, head.col_end)
    rows = problem.rows_for(head).to(problem.compute_dtype).to(acc)
    weight = weight_in(problem.compute_dtype, problem.weight)[cols].to(acc)
    return F.linear(rows, weight, problem.bias[cols].to(acc)), rows, cols


def _softcapped(head: HeadSpec, logits: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(softcap * tanh(logits / softcap), its derivative)``, or ``(logits, None)`` without a softcap."""
    if not head.softcap:
        return logits, None
    t = torch.tanh(logits / head.softcap)
    return head.softcap * t, 1.0 - t * t


def _dense_target(problem: HeadProblem, index: int, valid: Tensor) -> Tensor:
    target = problem.targets[index].to(problem.acc_dtype)
    return torch.where(valid[:, None], target, torch.zeros_like(target))


def _column_weights(head: HeadSpec, logits: Tensor) -> Tensor | None:
    """Class weights (cross-entropy) or positive weights (bce) [C], or None."""
    return column_weight_tensor(head.column_weights, logits.dtype, logits.device) if head.column_weights else None


def _summed_loss(problem: HeadProblem, index: int, logits: Tensor) -> Tensor:
    head, valid = problem.heads[index], problem.valid_rows(index)
    if head.kind == CROSS_ENTROPY:
        target = torch.where(valid, problem.targets[index], torch.full_like(problem.targets[index], head.ignore_index))
        summed = F.cross_entropy(logits, target, weight=_column_weights(head, logits), ignore_index=head.ignore_index,
                                 label_smoothing=head.label_smoothing, reduction="sum")  # fmt: skip
        if head.z_loss:
            summed = summed + head.z_loss * (torch.logsumexp(logits, dim=1).square() * valid).sum()
        return summed
    target = _dense_target(problem, index, valid)
    if head.kind == BCE:
        per_element = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                                         pos_weight=_column_weights(head, logits))  # fmt: skip
    else:
        per_element = F.mse_loss(logits, target, reduction="none")
    return (per_element * valid[:, None]).sum()


def _dlogits(problem: HeadProblem, index: int, logits: Tensor) -> Tensor:
    """d(summed loss)/d logits."""
    head, valid = problem.heads[index], problem.valid_rows(index)
    if head.kind == CROSS_ENTROPY:
        eps = head.label_smoothing
        safe = torch.where(valid, problem.targets[index], torch.zeros_like(problem.targets[index]))
        one_hot = F.one_hot(safe, head.num_cols).to(logits.dtype)
        weights = _column_weights(head, logits)
        if weights is None:
            grad = torch.softmax(logits, dim=1) - eps / head.num_cols - (1.0 - eps) * one_hot
        else:  # d/dx of (1 - eps) w_y nll_y + eps / C sum_c w_c nll_c
            w_target = weights[safe].unsqueeze(1)
            coef = (1.0 - eps) * w_target + eps / head.num_cols * weights.sum()
            grad = coef * torch.softmax(logits, dim=1) - (1.0 - eps) * w_target * one_hot - eps / head.num_cols * weights
        if head.z_loss:  # d/dx of z lse^2
            grad = grad + 2.0 * head.z_loss * torch.logsumexp(logits, dim=1, keepdim=True) * torch.softmax(logits, dim=1)
    elif head.kind == BCE:
        target = _dense_target(problem, index, valid)
        pos_weight = _column_weights(head, logits)
        if pos_weight is None:
            grad = torch.sigmoid(logits) - target
        else:  # d/dx of -(p y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))
            grad = (1 + (pos_weight - 1) * target) * torch.sigmoid(logits) - pos_weight * target
    else:
        grad = 2.0 * (logits - _dense_target(problem, index, valid))
    return grad * valid[:, None]


def forward(problem: HeadProblem) -> tuple[Tensor, Tensor, list[Tensor]]:
    divisors = problem.divisors()
    if problem.heads:
        sums = torch.stack([_summed_loss(problem, i, _softcapped(head, _task_logits(problem, i)[0])[0])
                            for i, head in enumerate(problem.heads)])  # fmt: skip
        losses = torch.where(divisors > 0, sums / divisors.clamp_min(1e-30), torch.zeros_like(sums))
    else:
        losses = divisors
    return weighted_total(losses, problem.task_weights), losses, []


def backward(problem: HeadProblem, saved: list[Tensor], grad_total: Tensor, main_grad: Tensor | None = None):
    acc = problem.acc_dtype
    scales = problem.loss_scales(problem.divisors()) * grad_total.to(acc)
    pooled = problem.pooled
    grad_hidden = torch.zeros(problem.hidden.shape, dtype=acc, device=problem.hidden.device)
    grad_pooled = torch.zeros(pooled.shape, dtype=acc, device=pooled.device) if pooled is not None else None
    grad_weight = torch.zeros(problem.weight.shape, dtype=acc, device=problem.weight.device)
    grad_bias = torch.zeros(problem.bias.shape, dtype=acc, device=problem.bias.device)
    weight = weight_in(problem.compute_dtype, problem.weight).to(acc)
    for i, head in enumerate(problem.heads):
        logits, rows, cols = _task_logits(problem, i)
        logits, softcap_derivative = _softcapped(head, logits)
        dlogits = _dlogits(problem, i, logits) * scales[i]
        if softcap_derivative is not None:
            dlogits = dlogits * softcap_derivative
        problem.level_rows(head.is_token, grad_hidden, grad_pooled).add_(dlogits @ weight[cols])
        grad_weight[cols] += dlogits.t() @ rows
        grad_bias[cols] += dlogits.sum(dim=0)
    return (
        grad_hidden.to(problem.hidden.dtype),
        grad_pooled.to(pooled.dtype) if grad_pooled is not None and pooled is not None else None,
        grad_weight,
        grad_bias,
    )
