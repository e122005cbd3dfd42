"""The fused heads operation, registered with ``torch.library``.

``mtlfast::fused_heads_loss`` takes flat tensors and lists (schemas take no dicts),
dispatches to a backend and returns ``[total, losses, *saved]``. Its autograd formula
calls ``mtlfast::fused_heads_loss_backward``, which dispatches to the same backend's
backward. Both ops have fake implementations, so ``torch.compile(fullgraph=True)``
traces through them without graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import HeadProblem, HeadSpec


def _problem(
    hidden: Tensor,
    pooled: Tensor | None,
    seq_stride: int,
    token_mask: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    targets: list[Tensor],
    divisor_override: Tensor,
    task_weights: Tensor,
    col_start: list[int],
    num_cols: list[int],
    kind: list[int],
    level: list[int],
    ignore_index: list[int],
    label_smoothing: list[float],
    chunk_size: int,
    deterministic: bool,
    compute_grad: bool,
) -> HeadProblem:
    heads = tuple(
        HeadSpec(*spec) for spec in zip(col_start, num_cols, kind, level, ignore_index, label_smoothing)
    )
    return HeadProblem(
        hidden=hidden,
        pooled=pooled,
        seq_stride=seq_stride,
        token_mask=token_mask,
        weight=weight,
        bias=bias,
        targets=tuple(targets),
        divisor_override=divisor_override,
        task_weights=task_weights,
        heads=heads,
        chunk_size=chunk_size,
        deterministic=deterministic,
        compute_grad=compute_grad,
    )


@torch.library.custom_op("mtlfast::fused_heads_loss", mutates_args=())
def fused_heads_loss(
    hidden: Tensor,
    pooled: Tensor | None,
    seq_stride: int,
    token_mask: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    targets: list[Tensor],
    divisor_override: Tensor,
    task_weights: Tensor,
    col_start: list[int],
    num_cols: list[int],
    kind: list[int],
    level: list[int],
    ignore_index: list[int],
    label_smoothing: list[float],
    backend: str,
    chunk_size: int,
    deterministic: bool,
    compute_grad: bool,
) -> list[Tensor]:
    """All heads' losses in one call. Returns ``[total, losses [T], *saved]``:
    ``total = sum_t task_weights[t] * losses[t]`` (fp32, fp64 for fp64 inputs)."""
    problem = _problem(
        hidden, pooled, seq_stride, token_mask, weight, bias, targets, divisor_override, task_weights,
        col_start, num_cols, kind, level, ignore_index, label_smoothing, chunk_size, deterministic, compute_grad,
    )  # fmt: skip
    with torch.autocast(hidden.device.type, enabled=False):
        losses, saved = get_backend(backend).forward(problem)
    total = (losses * task_weights.to(losses.dtype)).sum()
    return [total, losses, *saved]


@fused_heads_loss.register_fake
def _fused_heads_loss_fake(
    hidden, pooled, seq_stride, token_mask, weight, bias, targets, divisor_override, task_weights,
    col_start, num_cols, kind, level, ignore_index, label_smoothing, backend, chunk_size, deterministic, compute_grad,
):  # fmt: skip
    problem = _problem(
        hidden, pooled, seq_stride, token_mask, weight, bias, targets, divisor_override, task_weights,
        col_start, num_cols, kind, level, ignore_index, label_smoothing, chunk_size, deterministic, compute_grad,
    )  # fmt: skip
    acc = problem.acc_dtype
    saved = get_backend(backend).saved_like(problem)
    return [hidden.new_empty((), dtype=acc), hidden.new_empty((len(col_start),), dtype=acc), *saved]


@torch.library.custom_op("mtlfast::fused_heads_loss_backward", mutates_args=())
def fused_heads_loss_backward(
    grad_total: Tensor,
    saved: list[Tensor],
    hidden: Tensor,
    pooled: Tensor | None,
    seq_stride: int,
    token_mask: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    targets: list[Tensor],
    divisor_override: Tensor,
    task_weights: Tensor,
    col_start: list[int],
    num_cols: list[int],
    kind: list[int],
    level: list[int],
    ignore_index: list[int],
    label_smoothing: list[float],
    backend: str,
    chunk_size: int,
    deterministic: bool,
) -> list[Tensor]:
    """Gradients of ``grad_total * total``: ``[d hidden, d pooled (empty without pooled), d weight, d bias]``."""
    problem = _problem(
        hidden, pooled, seq_stride, token_mask, weight, bias, targets, divisor_override, task_weights,
        col_start, num_cols, kind, level, ignore_index, label_smoothing, chunk_size, deterministic, True,
    )  # fmt: skip
    with torch.autocast(hidden.device.type, enabled=False):
        grad_hidden, grad_pooled, grad_weight, grad_bias = get_backend(backend).backward(problem, saved, grad_total)
    if grad_pooled is None:
        grad_pooled = hidden.new_empty(0)
    return [grad_hidden, grad_pooled, grad_weight, grad_bias]


@fused_heads_loss_backward.register_fake
def _fused_heads_loss_backward_fake(grad_total, saved, hidden, pooled, *args):
    weight, bias = args[2], args[3]
    grad_pooled = torch.empty_like(pooled) if pooled is not None else hidden.new_empty(0)
    return [torch.empty_like(hidden), grad_pooled, torch.empty_like(weight), torch.empty_like(bias)]


_SAVED_INPUTS = 7  # hidden, pooled, token_mask, weight, bias, divisor_override, task_weights


def _setup_context(ctx, inputs, output) -> None:
    (hidden, pooled, seq_stride, token_mask, weight, bias, targets, divisor_override, task_weights, *options) = inputs
    ctx.seq_stride = seq_stride
    ctx.num_inputs = len(inputs)
    ctx.options = options
    ctx.num_targets = len(targets)
    ctx.save_for_backward(
        hidden, pooled, token_mask, weight, bias, divisor_override, task_weights, *targets, *output[1:]
    )


def _backward(ctx, grads):
    grad_total = grads[0]
    no_grads = [None] * ctx.num_inputs
    no_grads[6] = [None] * ctx.num_targets
    if grad_total is None:
        return tuple(no_grads)
    saved_tensors = ctx.saved_tensors
    hidden, pooled, token_mask, weight, bias, divisor_override, task_weights = saved_tensors[:_SAVED_INPUTS]
    targets = list(saved_tensors[_SAVED_INPUTS : _SAVED_INPUTS + ctx.num_targets])
    losses, *saved = saved_tensors[_SAVED_INPUTS + ctx.num_targets :]
    col_start, num_cols, kind, level, ignore_index, label_smoothing, backend, chunk_size, deterministic, _ = ctx.options
    needs = ctx.needs_input_grad
    grad_hidden = grad_pooled = grad_weight = grad_bias = None
    if needs[0] or needs[1] or needs[4] or needs[5]:
        grad_hidden, grad_pooled, grad_weight, grad_bias = torch.ops.mtlfast.fused_heads_loss_backward(
            grad_total, saved, hidden, pooled, ctx.seq_stride, token_mask, weight, bias, targets, divisor_override,
            task_weights, col_start, num_cols, kind, level, ignore_index, label_smoothing, backend, chunk_size,
            deterministic,
        )  # fmt: skip
        if pooled is None:
            grad_pooled = None
    grad_task_weights = (grad_total * losses).to(task_weights.dtype) if needs[8] else None
    grads_in = no_grads
    grads_in[0], grads_in[1], grads_in[4], grads_in[5] = grad_hidden, grad_pooled, grad_weight, grad_bias
    grads_in[8] = grad_task_weights
    return tuple(grads_in)


fused_heads_loss.register_autograd(_backward, setup_context=_setup_context)
