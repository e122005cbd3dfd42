"""The fused heads operation: one autograd formula over the backends.

:func:`fused_heads_loss` returns ``(total, losses)`` for a :class:`HeadCall`. In eager
mode it runs :class:`FusedHeadsLoss`, a ``torch.autograd.Function`` (cheap on the
host). While ``torch.compile`` traces it calls the ``torch.library`` custom op
``mtlfast::fused_heads_loss`` instead (flat tensors and lists, fake implementation,
autograd registered to ``mtlfast::fused_heads_loss_backward``), so that
``fullgraph=True`` sees no graph break. Both run the same backend functions.
"""

# The custom ops' annotations use typing's List/Optional: torch.library.infer_schema in
# torch < 2.7 rejects list[...] and X | None.
# ruff: noqa: UP006, UP007, UP035, UP045
from __future__ import annotations

import zlib
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import HeadProblem, HeadSpec, device_type, is_fake, kept_between_calls
from .task import ColumnWeights

if TYPE_CHECKING:
    from .kernels.label_check import LabelCheck

# The last argument of both custom ops. torch.compile's on-disk caches key a compiled graph on
# its code, which names the ops but not what their fake implementations return; a graph
# compiled against other code (the backends' saved tensors, the fakes' shapes and strides
# differ from version to version) must not be taken from the cache, so the source of the
# backends and of this module is part of every call.
SOURCE_DIGEST = zlib.crc32(b"".join(path.read_bytes() for path in (
    Path(__file__), *sorted((Path(__file__).parent / "backends").glob("*.py")))))  # fmt: skip


# Every HeadSpec field but the last (column_weights), each a list of one number per head in the ops' schemas.
HEAD_SCALAR_FIELDS = HeadSpec._fields[:-1]
assert HeadSpec._fields[-1] == "column_weights"


@dataclass(frozen=True)
class HeadCall:
    """The static part of one call: the present tasks and the options."""

    heads: tuple[HeadSpec, ...]
    seq_stride: int
    backend: str
    chunk_size: int
    deterministic: bool
    grad_filter_eps: float  # < 0: exact gradients
    hidden_grad: bool  # hidden or pooled needs its gradient (False: frozen encoder output)
    compute_grad: bool
    compute_dtype: torch.dtype

    def problem(self, hidden, pooled, token_mask, weight, bias, targets, divisor_override, task_weights,
                label_check=None) -> HeadProblem:  # fmt: skip
        """The backends' problem; token rows given as ``[B, S, D]`` become ``[B * S, D]``."""
        # by position: a NamedTuple takes keywords in several times the host time
        return HeadProblem(
            hidden if hidden.dim() == 2 else hidden.flatten(0, 1), pooled, self.seq_stride, token_mask, weight, bias,
            tuple(targets), divisor_override, task_weights, self.heads, self.chunk_size, self.deterministic,
            self.grad_filter_eps, self.hidden_grad, self.compute_grad, self.compute_dtype, label_check,
        )  # fmt: skip

    def flat(self) -> tuple:
        """The call as the custom op's scalar arguments; each head's column weights as the key
        they are registered under (-1 for none; ``ColumnWeights.BY_VALUE`` for weights that
        travel as their values, in ``column_weight_values``)."""
        columns = [[getattr(h, f) for h in self.heads] for f in HEAD_SCALAR_FIELDS]
        weights = [h.column_weights for h in self.heads]
        keys = [-1 if w is None else w.key for w in weights]
        values = [v for w in weights if w is not None and w.key == ColumnWeights.BY_VALUE for v in w.values]
        return (*columns, keys, values, self.compute_dtype, self.backend, self.chunk_size, self.deterministic,
                self.grad_filter_eps, self.hidden_grad)  # fmt: skip

    @classmethod
    def from_flat(cls, seq_stride, col_start, num_cols, kind, level, ignore_index, label_smoothing, softcap, z_loss,
                  column_weights, column_weight_values, compute_dtype, backend, chunk_size, deterministic,
                  grad_filter_eps, hidden_grad, compute_grad) -> HeadCall:  # fmt: skip
        weights: list[ColumnWeights | None] = []
        start = 0
        for key, cols in zip(column_weights, num_cols):
            if key == ColumnWeights.BY_VALUE:
                weights.append(ColumnWeights(column_weight_values[start : start + cols]))
                start += cols
            else:
                weights.append(None if key < 0 else ColumnWeights.registered(key))
        heads = tuple(HeadSpec(*spec) for spec in
                      zip(col_start, num_cols, kind, level, ignore_index, label_smoothing, softcap, z_loss,
                          weights))  # fmt: skip
        return cls(heads, seq_stride, backend, chunk_size, deterministic, grad_filter_eps, hidden_grad, compute_grad,
                   compute_dtype)  # fmt: skip


_NO_CONTEXT = nullcontext()  # reusable: it does nothing


def _autocast_off(kind: str):
    """Turns autocast off around a backend, whose matrix products pick their own dtypes; a
    no-op when autocast is already off. Through the C++ guard: entering ``torch.autocast``
    costs ~9 us of host time, a few percent of a small step's."""
    if kind in ("cpu", "cuda") and not torch.is_autocast_enabled(kind):
        return _NO_CONTEXT
    return torch._C._DisableAutocast()


_current_cuda_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def _on_device(tensor: Tensor):
    """Makes the tensor's CUDA device the current one around a backend: Triton launches on the
    current device, which is not the tensors' when a model is spread over GPUs
    (``device_map``) without ``torch.cuda.set_device``. A no-op when it already is."""
    if tensor.is_cuda and tensor.get_device() != _current_cuda_device():
        return torch.cuda.device(tensor.device)
    return _NO_CONTEXT


def _forward(problem: HeadProblem, backend: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    hidden = problem.hidden
    with _autocast_off(device_type(hidden)), _on_device(hidden):
        return get_backend(backend).forward(problem)


def _backward(problem: HeadProblem, backend: str, saved: list[Tensor], grad_total: Tensor,
              main_grads: Sequence[Tensor | None] = (None, None)):  # fmt: skip
    """The gradients for hidden, pooled, weight and bias, each in its input's dtype. A
    parameter with a ``main_grads`` entry has its gradient added there at the backend's
    accumulation precision (fp32) instead (by the backend itself where it can), and gets None."""
    hidden = problem.hidden
    with _autocast_off(device_type(hidden)), _on_device(hidden):
        grad_hidden, grad_pooled, *grad_params = get_backend(backend).backward(problem, saved, grad_total,
                                                                               main_grads[0])  # fmt: skip
        for i, (param, main_grad) in enumerate(zip((problem.weight, problem.bias), main_grads)):
            if main_grad is not None:
                if grad_params[i] is not None:
                    main_grad.add_(grad_params[i])
                grad_params[i] = None
            elif grad_params[i].dtype != param.dtype:
                grad_params[i] = grad_params[i].to(param.dtype)
    if not problem.hidden_grad:  # fast backends skip them then; the reference computes them regardless
        grad_hidden = grad_pooled = None
    return grad_hidden, grad_pooled, *grad_params


_NO_TRANSFORMS = (
    "mtlfast's fused heads loss does not run under torch.func transforms (grad, vjp, jacrev, vmap): its autograd "
    "Function computes gradients with kernels of its own, which those transforms cannot see through. Differentiate "
    "with torch.autograd instead (loss.backward() or torch.autograd.grad), which works with "
    "torch.func.functional_call; logits alone (labels=None) do run under the transforms"
)
_TWICE = "mtlfast's fused heads are differentiable once: a derivative of their gradients (create_graph=True) is not supported"


def _differentiable_once(grads: list) -> tuple:
    """For a backward that records a graph (``create_graph=True``): the gradients behind a
    node that raises if anything differentiates them. The kernels' backward has no
    derivative of its own, and gradients treated as constants would silently drop the
    heads' part of a second derivative."""
    present = [i for i, g in enumerate(grads) if g is not None]
    marked = torch._C._functions.DelayedError(_TWICE, len(present))(
        *[grads[i].detach().requires_grad_(True) for i in present]
    )
    marked = marked if isinstance(marked, tuple) else (marked,)
    for i, g in zip(present, marked):
        grads[i] = g
    return tuple(grads)


# The positions of FusedHeadsLoss.forward's inputs (after ctx) that take a gradient, and of its first target.
_HIDDEN, _POOLED, _WEIGHT, _BIAS, _TASK_WEIGHTS, _TARGETS = 3, 4, 6, 7, 9, 10


class FusedHeadsLoss(torch.autograd.Function):
    """``(total, losses)`` of all heads; gradients for hidden, pooled, weight, bias and the
    task weights. ``losses`` is not differentiable, and the gradients are not either: a second
    derivative (``create_graph=True``, then a backward through a gradient, as an input-gradient
    penalty takes) raises instead of silently missing the heads' part."""

    @staticmethod
    def forward(ctx, call: HeadCall, main_grad_params: tuple[Tensor | None, Tensor | None], label_check, hidden, pooled,
                token_mask, weight, bias, divisor_override, task_weights, *targets):  # fmt: skip
        problem = call.problem(hidden, pooled, token_mask, weight, bias, targets, divisor_override, task_weights,
                               label_check)  # fmt: skip
        total, losses, saved = _forward(problem, call.backend)
        ctx.call = call
        ctx.main_grad_params = main_grad_params
        ctx.num_targets = len(targets)
        ctx.hidden_shape = hidden.shape  # the rows are kept as the problem's [N, D] view
        ctx.save_for_backward(problem.hidden, pooled, token_mask, weight, bias, divisor_override, task_weights, losses,
                              *targets, *saved)  # fmt: skip
        ctx.mark_non_differentiable(losses)
        ctx.set_materialize_grads(False)  # no zeros for the gradient of losses, which is never read
        return total, losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        if grad_total is None:  # only losses reached backward: nothing flows back
            return (None,) * (_TARGETS + ctx.num_targets)
        if not torch.is_grad_enabled():  # the usual backward, which records no graph
            return tuple(FusedHeadsLoss._backward(ctx, grad_total))
        with torch.no_grad():
            grads = FusedHeadsLoss._backward(ctx, grad_total)
        return _differentiable_once(grads)

    @staticmethod
    def _backward(ctx, grad_total) -> list:
        hidden, pooled, token_mask, weight, bias, divisor_override, task_weights, losses, *rest = ctx.saved_tensors
        targets, saved = rest[: ctx.num_targets], rest[ctx.num_targets :]
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * (_TARGETS + ctx.num_targets)
        if needs[_HIDDEN] or needs[_POOLED] or needs[_WEIGHT] or needs[_BIAS]:
            problem = ctx.call.problem(hidden, pooled, token_mask, weight, bias, targets, divisor_override, task_weights)
            main_grads = tuple(None if param is None else param.main_grad for param in ctx.main_grad_params)
            grad_hidden, grads[_POOLED], grads[_WEIGHT], grads[_BIAS] = _backward(
                problem, ctx.call.backend, list(saved), grad_total, main_grads)  # fmt: skip
            if grad_hidden is not None and grad_hidden.shape != ctx.hidden_shape:
                grad_hidden = grad_hidden.reshape(*ctx.hidden_shape)  # sizes apart: parsed faster than a tuple
            grads[_HIDDEN] = grad_hidden
            for index, param in zip((_WEIGHT, _BIAS), ctx.main_grad_params):
                if param is not None and hasattr(param, "grad_added_to_main_grad"):
                    # Megatron's convention: its gradient hooks fire on a stand-in they then discard.
                    param.grad_added_to_main_grad = True
                    grads[index] = torch.zeros_like(param) if getattr(param, "zero_out_wgrad", False) else (
                        torch.empty_like(param))  # fmt: skip
        if needs[_TASK_WEIGHTS]:
            grads[_TASK_WEIGHTS] = (grad_total * losses).to(task_weights.dtype)
        return grads


# Before torch 2.14 (2.6, 2.11: the GPU hosts') Function.apply is Python: for a Function without
# setup_context and with no functorch transform active it unwraps dead functorch wrappers from
# every tensor argument and calls the C++ apply. The op does those steps itself, the unwrapping
# over its tensors alone: 22K fewer host instructions a bert-base-4task step with torch 2.11.
_PYTHON_APPLY = isinstance(torch.autograd.Function.__dict__.get("apply"), classmethod)
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_C_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, FusedHeadsLoss)


def _apply_unwrapped(call: HeadCall, main_grad_params, label_check, hidden, pooled, token_mask, weight, bias,
                     divisor_override, task_weights, targets) -> tuple[Tensor, Tensor]:  # fmt: skip
    """What a Python ``FusedHeadsLoss.apply`` with these arguments does with no functorch
    transform active."""
    return _C_APPLY(call, main_grad_params, label_check, _unwrap_if_dead(hidden),
                    None if pooled is None else _unwrap_if_dead(pooled),
                    None if token_mask is None else _unwrap_if_dead(token_mask),
                    *map(_unwrap_if_dead, (weight, bias, divisor_override, task_weights, *targets)))  # fmt: skip


def fused_heads_loss(call: HeadCall, hidden, pooled, token_mask, weight, bias, targets, divisor_override,
                     task_weights, main_grad_params: tuple[Tensor | None, Tensor | None] = (None, None),
                     label_check: LabelCheck | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(total, losses [T])`` for the call (fp32; fp64 for fp64 inputs). ``hidden``: the rows
    ``[N, D]``, or the token rows as ``[B, S, D]`` (taken as ``[B * S, D]``; their gradient
    comes back in that shape). ``main_grad_params``:
    the weight and the bias where their gradient is to be added into their ``main_grad``
    (eager only), else None. ``label_check``: the backend's planned check of the target values
    (``validate=True``, eager only), which its forward runs."""
    if torch.compiler.is_compiling() or is_fake(hidden):
        outputs = torch.ops.mtlfast.fused_heads_loss(
            hidden, pooled, call.seq_stride, token_mask, weight, bias, list(targets), divisor_override, task_weights,
            *call.flat(), call.compute_grad, SOURCE_DIGEST,
        )  # fmt: skip
        return outputs[0], outputs[1]
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(_NO_TRANSFORMS)
    if _PYTHON_APPLY:
        return _apply_unwrapped(call, main_grad_params, label_check, hidden, pooled, token_mask, weight, bias,
                                divisor_override, task_weights, targets)  # fmt: skip
    return FusedHeadsLoss.apply(call, main_grad_params, label_check, hidden, pooled, token_mask, weight, bias,
                                divisor_override, task_weights, *targets)  # fmt: skip


# ---- torch.library registration (used while torch.compile traces) -------------------


@torch.library.custom_op("mtlfast::fused_heads_loss", mutates_args=())
def _custom_forward(
    hidden: Tensor,
    pooled: Optional[Tensor],
    seq_stride: int,
    token_mask: Optional[Tensor],
    weight: Tensor,
    bias: Tensor,
    targets: List[Tensor],
    divisor_override: Tensor,
    task_weights: Tensor,
    col_start: List[int],
    num_cols: List[int],
    kind: List[int],
    level: List[int],
    ignore_index: List[int],
    label_smoothing: List[float],
    softcap: List[float],
    z_loss: List[float],
    column_weights: List[int],
    column_weight_values: List[float],
    compute_dtype: torch.dtype,
    backend: str,
    chunk_size: int,
    deterministic: bool,
    grad_filter_eps: float,
    hidden_grad: bool,
    compute_grad: bool,
    backends_digest: int,
) -> List[Tensor]:
    """``[total, losses, *saved]``; ``saved`` is the backend's state for its backward."""
    call = HeadCall.from_flat(seq_stride, col_start, num_cols, kind, level, ignore_index, label_smoothing, softcap,
                              z_loss, column_weights, column_weight_values, compute_dtype, backend, chunk_size,
                              deterministic, grad_filter_eps, hidden_grad, compute_grad)  # fmt: skip
    problem = call.problem(hidden, pooled, token_mask, weight, bias, targets, divisor_override, task_weights)
    total, losses, saved = _forward(problem, backend)
    # The compiler owns an op's outputs and may reuse their memory once they are dead: a tensor a
    # backend keeps between calls (the triton backend's table of label addresses) leaves as a copy.
    return [total, losses, *(t.clone() if kept_between_calls(t) else t for t in saved)]


@_custom_forward.register_fake
def _custom_forward_fake(hidden, pooled, seq_stride, token_mask, weight, bias, targets, divisor_override, task_weights,
                         *flat):  # fmt: skip
    call = HeadCall.from_flat(seq_stride, *flat[:-1])
    problem = call.problem(hidden, pooled, token_mask, weight, bias, targets, divisor_override, task_weights)
    acc = problem.acc_dtype
    saved = get_backend(call.backend).saved_like(problem)
    return [hidden.new_empty((), dtype=acc), hidden.new_empty((len(call.heads),), dtype=acc), *saved]


@torch.library.custom_op("mtlfast::fused_heads_loss_backward", mutates_args=())
def _custom_backward(
    grad_total: Tensor,
    saved: List[Tensor],
    hidden: Tensor,
    pooled: Optional[Tensor],
    seq_stride: int,
    token_mask: Optional[Tensor],
    weight: Tensor,
    bias: Tensor,
    targets: List[Tensor],
    divisor_override: Tensor,
    task_weights: Tensor,
    col_start: List[int],
    num_cols: List[int],
    kind: List[int],
    level: List[int],
    ignore_index: List[int],
    label_smoothing: List[float],
    softcap: List[float],
    z_loss: List[float],
    column_weights: List[int],
    column_weight_values: List[float],
    compute_dtype: torch.dtype,
    backend: str,
    chunk_size: int,
    deterministic: bool,
    grad_filter_eps: float,
    hidden_grad: bool,
    backends_digest: int,
) -> List[Tensor]:
    """``[d hidden, d pooled, d weight, d bias]`` of ``grad_total * total``; the first two empty
    without ``hidden_grad`` (and d pooled without pooled)."""
    call = HeadCall.from_flat(seq_stride, col_start, num_cols, kind, level, ignore_index, label_smoothing, softcap,
                              z_loss, column_weights, column_weight_values, compute_dtype, backend, chunk_size,
                              deterministic, grad_filter_eps, hidden_grad, True)  # fmt: skip
    problem = call.problem(hidden, pooled, token_mask, weight, bias, targets, divisor_override, task_weights)
    grad_hidden, grad_pooled, grad_weight, grad_bias = _backward(problem, backend, saved, grad_total)
    if grad_hidden is not None and hidden.dim() == 3:
        grad_hidden = grad_hidden.reshape(hidden.shape)
    # Outputs must not alias each other: an empty tensor of their own stands for a missing one.
    # Each is contiguous, as the fake implementation says, whatever the inputs' strides (a
    # transposed weight or an [S, B, D] encoder output seen as [B, S, D]).
    return [grad_hidden.contiguous() if grad_hidden is not None else hidden.new_empty(0),
            grad_pooled.contiguous() if grad_pooled is not None else hidden.new_empty(0), grad_weight.contiguous(),
            grad_bias.contiguous()]  # fmt: skip


@_custom_backward.register_fake
def _custom_backward_fake(grad_total, saved, hidden, pooled, seq_stride, token_mask, weight, bias, *rest):
    hidden_grad = rest[-2]
    grad_hidden = hidden.new_empty(hidden.shape) if hidden_grad else hidden.new_empty(0)
    grad_pooled = pooled.new_empty(pooled.shape) if pooled is not None and hidden_grad else hidden.new_empty(0)
    return [grad_hidden, grad_pooled, weight.new_empty(weight.shape), bias.new_empty(bias.shape)]


def _setup_context(ctx, inputs, output) -> None:
    hidden, pooled, seq_stride, token_mask, weight, bias, targets, divisor_override, task_weights, *flat = inputs
    # flat ends with compute_grad and the digest; the backward op takes the digest, not compute_grad
    ctx.seq_stride, ctx.flat, ctx.num_inputs, ctx.num_targets = seq_stride, flat[:-2], len(inputs), len(targets)
    # The gradients must mirror the inputs' structure, in which an empty list is a list, not a leaf.
    ctx.empty_lists = [i for i, value in enumerate(inputs) if isinstance(value, list) and not value]
    ctx.save_for_backward(hidden, pooled, token_mask, weight, bias, divisor_override, task_weights, *targets,
                          *output[1:])  # fmt: skip


def _custom_autograd(ctx, grads):
    grad_total = grads[0]
    grads_in = [None] * ctx.num_inputs
    grads_in[6] = [None] * ctx.num_targets
    for i in ctx.empty_lists:
        grads_in[i] = []
    if grad_total is None:
        return tuple(grads_in)
    hidden, pooled, token_mask, weight, bias, divisor_override, task_weights, *rest = ctx.saved_tensors
    targets, (losses, *saved) = rest[: ctx.num_targets], rest[ctx.num_targets :]
    needs = ctx.needs_input_grad
    if needs[0] or needs[1] or needs[4] or needs[5]:
        grad_hidden, grad_pooled, grad_weight, grad_bias = torch.ops.mtlfast.fused_heads_loss_backward(
            grad_total, saved, hidden, pooled, ctx.seq_stride, token_mask, weight, bias, list(targets),
            divisor_override, task_weights, *ctx.flat, SOURCE_DIGEST,
        )  # fmt: skip
        grads_in[4], grads_in[5] = grad_weight, grad_bias
        if ctx.flat[-1]:  # hidden_grad
            grads_in[0] = grad_hidden
            grads_in[1] = grad_pooled if pooled is not None else None
    if needs[8]:
        grads_in[8] = (grad_total * losses).to(task_weights.dtype)
    return tuple(grads_in)


_custom_forward.register_autograd(_custom_autograd, setup_context=_setup_context)
