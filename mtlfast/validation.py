"""Input checks. Each error names the task (or argument) and the problem.

:func:`check_call` needs no host synchronisation and always runs. :func:`start_value_checks`
and :func:`raise_for_bad_values` look at label values, cost one host sync, and run only with
``validate=True`` outside ``torch.compile`` tracing.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import Tensor

from .backends import get_backend
from .task import FP32_RANGE, HeadSpec, Task, TaskLayout, finite_in_fp32, is_number

if TYPE_CHECKING:
    from .kernels.label_check import LabelCheck

WEIGHTINGS = ("static", "uncertainty")


def grad_filter_threshold(grad_filter_eps: float | str | None, compute_dtype: torch.dtype) -> float:
    """The threshold the backends take for ``grad_filter_eps``: -1 for None (exact gradients),
    the computation dtype's machine epsilon / 32 for ``"auto"`` (2**-12 in bf16), else the
    value itself, which must be a finite float >= 0."""
    if grad_filter_eps is None:
        return -1.0
    if grad_filter_eps == "auto":
        return torch.finfo(compute_dtype).eps / 32
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float)) or not (
        0.0 <= grad_filter_eps < float("inf")
    ):
        raise ValueError(f'grad_filter_eps must be None, "auto" or a finite number >= 0, got {grad_filter_eps!r}')
    return float(grad_filter_eps)


def check_chunk_size(chunk_size: object) -> None:
    """``chunk_size`` is None or a positive int (rows per chunk for chunked backends)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def main_grad_params(weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """For ``fuse_wgrad_accumulation=True``: the weight and the bias (the bias where it has a
    ``main_grad``), whose gradients go into their ``main_grad``; none while no gradient is
    taken (grad mode off, or a frozen weight). The weight must have one: an fp32 (or fp64)
    tensor of its shape on its device, as Megatron-LM and Transformer Engine attach it."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return None, None
    if torch.compiler.is_compiling():
        raise ValueError("fuse_wgrad_accumulation=True is not supported under torch.compile: the gradient is added "
                         "into main_grad outside autograd; compile without it")  # fmt: skip
    if getattr(weight, "main_grad", None) is None:
        raise ValueError("fuse_wgrad_accumulation=True needs weight.main_grad, an fp32 tensor of the weight's shape "
                         "on its device, for the gradient to be added into")  # fmt: skip
    chosen: list[Tensor | None] = []
    for name, param in (("weight", weight), ("bias", bias)):
        main_grad = getattr(param, "main_grad", None)
        if param is None or main_grad is None or not param.requires_grad:  # no bias, a bias without one, or frozen
            chosen.append(None)
            continue
        if not isinstance(main_grad, Tensor) or main_grad.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}.main_grad must be an fp32 tensor, got "
                            f"{getattr(main_grad, 'dtype', type(main_grad).__name__)}")  # fmt: skip
        if main_grad.shape != param.shape or main_grad.device != param.device:
            raise ValueError(f"{name}.main_grad must have the {name}'s shape {tuple(param.shape)} on {param.device}, "
                             f"got {tuple(main_grad.shape)} on {main_grad.device}")  # fmt: skip
        chosen.append(param)
    return chosen[0], chosen[1]


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def expected_label_shape(task: Task, batch: int, seq_len: int | None) -> tuple[int, ...]:
    """The shape of the task's labels for hidden states of ``batch`` sequences (of ``seq_len``
    positions; None for [B, D] hidden states, which a token task cannot take)."""
    if task.level != "token":
        lead: tuple[int, ...] = (batch,)
    elif seq_len is not None:
        lead = (batch, seq_len)
    else:
        raise ValueError(f"task '{task.name}': a token-level task needs hidden_states of shape [B, S, D]")
    return lead if task.loss == "cross_entropy" else (*lead, task.num_outputs)


def check_weighting_name(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _check_weighting(layout: TaskLayout, weighting: str, log_vars: object) -> None:
    """The weighting, and the ``log_vars`` it takes: one fp ``s_t`` per task under uncertainty
    weighting, none under static weighting."""
    check_weighting_name(weighting)
    if log_vars is None:
        if weighting == "uncertainty":
            raise ValueError("weighting='uncertainty' needs log_vars")
        return
    if weighting != "uncertainty":
        raise ValueError(f"log_vars are for weighting='uncertainty'; weighting={weighting!r} weighs the tasks by "
                         "Task.weight or task_weights")  # fmt: skip
    if not isinstance(log_vars, Tensor) or not log_vars.dtype.is_floating_point:
        raise TypeError(f"log_vars must be a floating-point [T] torch.Tensor, got "
                        f"{log_vars.dtype if isinstance(log_vars, Tensor) else type(log_vars).__name__}")  # fmt: skip
    if tuple(log_vars.shape) != (len(layout.tasks),):
        raise ValueError(f"log_vars must be [T] = ({len(layout.tasks)},), one s_t per task in the layout's order, "
                         f"got shape {tuple(log_vars.shape)}")  # fmt: skip


def check_call(
    layout: TaskLayout,
    hidden_states: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Mapping[str, Tensor] | None,
    attention_mask: Tensor | None,
    pooled: Tensor | None,
    num_items_in_batch: Mapping[str, int | Tensor] | None,
    weighting: str,
    log_vars: Tensor | None,
    task_weights: Mapping[str, float | Tensor] | None = None,
) -> None:
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.dtype.is_floating_point:
        raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
    if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] == 0:
        raise ValueError(f"hidden_states must be [B, S, D] or [B, D] with D >= 1, got shape "
                         f"{tuple(hidden_states.shape)}")  # fmt: skip
    if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point:
        raise TypeError("the packed weight must be a floating-point [sum C, D] torch.Tensor")
    if bias is not None and (not isinstance(bias, Tensor) or not bias.dtype.is_floating_point):
        raise TypeError("the packed bias must be a floating-point [sum C] torch.Tensor or None")
    bias_shape = None if bias is None else tuple(bias.shape)
    if weight.dim() != 2 or weight.shape[0] != layout.total_outputs or bias_shape not in (None, (layout.total_outputs,)):
        raise ValueError(
            f"packed weight {tuple(weight.shape)} / bias {bias_shape} do not match the tasks' "
            f"{layout.total_outputs} outputs"
        )
    hidden_size = weight.shape[1]
    if hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states has hidden size {hidden_states.shape[-1]}, the heads expect {hidden_size}")
    _check_weighting(layout, weighting, log_vars)
    device = hidden_states.device
    for name, param in (("weight", weight), ("bias", bias), ("log_vars", log_vars)):
        if param is not None and param.device != device:
            raise ValueError(f"the heads' {name} is on {param.device}, hidden_states on {device}: move the heads "
                             "to the encoder output's device")  # fmt: skip
    if task_weights is not None:
        _check_task_weights(layout, task_weights, weighting, hidden_states.device)
    batch = hidden_states.shape[0]
    seq_len = hidden_states.shape[1] if hidden_states.dim() == 3 else None
    if pooled is not None:
        if not isinstance(pooled, Tensor) or not pooled.dtype.is_floating_point:
            raise TypeError("pooled must be a floating-point torch.Tensor")
        if tuple(pooled.shape) != (batch, hidden_size):
            raise ValueError(f"pooled must be [B, D] = {(batch, hidden_size)}, got {tuple(pooled.shape)}")
        if pooled.device != device:
            raise ValueError(f"pooled is on {pooled.device}, hidden_states on {device}")
    if attention_mask is not None and seq_len is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError("attention_mask must be a torch.Tensor")
        if tuple(attention_mask.shape) != (batch, seq_len):
            raise ValueError(f"attention_mask must be [B, S] = {(batch, seq_len)}, got {tuple(attention_mask.shape)}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, hidden_states on {device}")
    if seq_len == 0 and pooled is None:
        reading = [t.name for t in layout.tasks if t.level == "sequence" and (labels is None or (
            isinstance(labels, Mapping) and t.name in labels))]  # fmt: skip
        if reading:
            raise ValueError(f"task '{reading[0]}': a sequence task reads hidden_states[:, 0], and hidden_states has "
                             "S = 0; pass pooled")  # fmt: skip
    if labels is None:
        if num_items_in_batch:
            raise ValueError("num_items_in_batch was given without labels")
        return
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a dict of task name -> tensor, got {type(labels).__name__}")
    unknown = sorted(set(labels) - set(layout.index))
    if unknown:
        raise ValueError(f"labels name unknown tasks {unknown}; the heads know {list(layout.index)}")
    for name, label in labels.items():
        _check_label(layout.tasks[layout.index[name]], label, batch, seq_len, device)
    if num_items_in_batch is not None:
        _check_num_items(layout, num_items_in_batch)


def _check_label(task: Task, label: Tensor, batch: int, seq_len: int | None, device: torch.device) -> None:
    where = f"task '{task.name}'"
    if not isinstance(label, Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(label).__name__}")
    expected = expected_label_shape(task, batch, seq_len)
    if label.device != device:
        raise ValueError(f"{where}: labels are on {label.device}, hidden_states on {device}")
    if task.loss == "cross_entropy":
        if not _is_int_dtype(label.dtype):
            raise TypeError(f"{where}: cross_entropy takes integer class ids, got {label.dtype}")
    elif not label.dtype.is_floating_point:
        raise TypeError(f"{where}: {task.loss} takes floating-point targets, got {label.dtype}")
    if label.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{where}: the {task.loss} targets require grad, and the fused heads give their targets no "
                         "gradient; detach them (a teacher's soft targets), or compute this loss with torch ops")  # fmt: skip
    shape = tuple(label.shape)
    if shape == expected:
        return
    squeezable = task.loss == "mse" and task.num_outputs == 1  # the trailing C = 1 may be left out
    if squeezable and shape == expected[:-1]:
        return
    shapes = f"{expected} or {expected[:-1]}" if squeezable else f"{expected}"
    raise ValueError(f"{where}: labels must have shape {shapes}, got {shape}")


def _per_task_scalars(layout: TaskLayout, values: Mapping, option: str, kinds: str,
                      one_element: bool = False) -> Iterator[tuple[str, object]]:  # fmt: skip
    """Checks a dict of task name -> ``kinds`` or 0-dim tensor given as ``option``, and yields its
    entries as ``(where, value)``; tensors among them are 0-dim, or of one element of any shape
    where ``one_element``."""
    tensor_kind = "a tensor of one element" if one_element else "a 0-dim tensor"
    if not isinstance(values, Mapping):
        raise TypeError(f"{option} must be a dict of task name -> {kinds} or {tensor_kind}")
    unknown = sorted(set(values) - set(layout.index))
    if unknown:
        raise ValueError(f"{option} names unknown tasks {unknown}; the heads know {list(layout.index)}")
    for name, value in values.items():
        where = f"task '{name}'"
        if isinstance(value, Tensor) and value.dim() != 0 and not (one_element and value.numel() == 1):
            raise ValueError(f"{where}: {option} must be {tensor_kind}, got shape {tuple(value.shape)}")
        yield where, value


def _check_num_items(layout: TaskLayout, num_items: Mapping[str, int | Tensor]) -> None:
    # one element of any shape: under nn.DataParallel Hugging Face's Trainer gives each replica its
    # count as [1, 1] (a [n_gpu, 1] tensor scattered)
    for where, value in _per_task_scalars(layout, num_items, "num_items_in_batch", "int", one_element=True):
        if isinstance(value, Tensor):
            if value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"{where}: num_items_in_batch has dtype {value.dtype}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers too
            raise TypeError(f"{where}: num_items_in_batch must be an int or a tensor of one element, got {type(value).__name__}")
        elif value < 0:
            raise ValueError(f"{where}: num_items_in_batch must be >= 0, got {value}")
        elif not finite_in_fp32(int(value)):  # the divisor is an fp32 number
            raise ValueError(f"{where}: num_items_in_batch must be finite ({FP32_RANGE}), got {value}")


def _check_task_weights(
    layout: TaskLayout, task_weights: Mapping[str, float | Tensor], weighting: str, device: torch.device
) -> None:
    if weighting != "static":
        raise ValueError(f"task_weights are for weighting='static'; weighting='{weighting}' learns its own")
    for where, value in _per_task_scalars(layout, task_weights, "task_weights", "number"):
        if isinstance(value, Tensor):
            if not value.dtype.is_floating_point:
                raise TypeError(f"{where}: task weight must be a floating-point tensor, got {value.dtype}")
            if value.device != device:
                raise ValueError(f"{where}: task weight is on {value.device}, hidden_states on {device}")
        elif not is_number(value):  # numpy floats too
            raise TypeError(f"{where}: task weight must be a number or a 0-dim tensor, got {type(value).__name__}")
        elif not torch.compiler.is_compiling() and not finite_in_fp32(cast(float, value)):  # traced ones are symbolic
            raise ValueError(f"{where}: task weight must be finite ({FP32_RANGE}), got {value}")


class ValueChecks(NamedTuple):
    """Checks of values under way on the device (:func:`start_value_checks`)."""

    flags: Tensor  # [checks, P]: nonzero where a check found a value out of range
    subjects: tuple[Task | str, ...]  # per row of flags, then of count_flags: the task checked, or a count's name
    count_flags: Tensor | None  # int32 [K]: the tensor counts' checks, kept apart from a label check's flags
    label_check: LabelCheck | None  # the backend's check, which its forward runs: flags are written then


def start_value_checks(
    tasks: Sequence[Task],
    heads: Sequence[HeadSpec],
    targets: Sequence[Tensor],
    token_mask: Tensor | None,
    num_items_in_batch: Mapping[str, int | Tensor] | None,
    backend: str,
    compute_dtype: torch.dtype,
) -> ValueChecks | None:
    """Starts the checks of target values: class ids in [0, C) or ignore_index (for token tasks,
    where ``token_mask`` holds), bce targets in [0, 1]; tensors of ``num_items_in_batch`` >= 0.
    Their flags stay on the device for :func:`raise_for_bad_values` to read in one host sync,
    after the op's forward; None when nothing needs checking.

    ``tasks``, their ``heads`` and the op's ``targets`` (cross-entropy int64 [rows], bce/mse
    float [rows, C]) go in the same order; ``token_mask`` [B * S] bool or None. A backend with
    a ``plan_label_check`` of its own (``triton``: programs of its loss finalize launch check
    every task) plans the targets' check, which the op's forward must then be given
    (``ValueChecks.label_check``) to run; otherwise (or where it plans none, as for fp64
    ``compute_dtype``) torch ops check each task's now. Tensors of ``num_items_in_batch`` are
    compared by torch ops. Not for a call under CUDA graph capture, whose sync would fail."""
    counts = [(name, value) for name, value in (num_items_in_batch or {}).items() if isinstance(value, Tensor)]
    checked = [(task, target) for task, target in zip(tasks, targets) if task.loss != "mse"]
    if not checked and not counts:
        return None
    count_flags = [_bad_count_flag(value) for _, value in counts]
    count_names = tuple(name for name, _ in counts)
    plan = getattr(get_backend(backend), "plan_label_check", None)  # a backend's own check, if it has one
    label_check = plan(tuple(heads), targets, token_mask, compute_dtype) if plan and targets else None
    if label_check is None:  # torch ops: a 0-dim flag per checked task
        flags = [_bad_target_flag(task, target, token_mask) for task, target in checked] + count_flags
        stacked = torch.stack([flag.to(flags[0].device) for flag in flags]).unsqueeze(1)
        return ValueChecks(stacked, (*(task for task, _ in checked), *count_names), None, None)
    flags = label_check.flags
    counted = torch.stack([flag.to(flags.device) for flag in count_flags]).to(flags.dtype) if count_flags else None
    return ValueChecks(flags, (*tasks, *count_names), counted, label_check)


def raise_for_bad_values(checks: ValueChecks) -> None:
    """Reads the flags of :func:`start_value_checks` (one host sync) and raises a ``ValueError``
    naming the first task whose values are out of range. A backend's label check has run by
    then (the op's forward has been issued)."""
    flags = checks.flags
    if checks.count_flags is not None:  # the label check's rows, one per task, then the counts'
        flags = torch.cat([flags.amax(dim=1), checks.count_flags]).unsqueeze(1)
    for row, subject in zip(flags.tolist(), checks.subjects):
        if any(row):
            if isinstance(subject, str):
                raise ValueError(f"task '{subject}': num_items_in_batch must be >= 0 and finite ({FP32_RANGE})")
            raise ValueError(f"task '{subject.name}': {_range_problem(subject)}")


def _bad_count_flag(count: Tensor) -> Tensor:
    """0-dim bool: whether a ``num_items_in_batch`` tensor (one element) is negative, NaN, or not
    finite as the fp32 divisor it becomes."""
    divisor = count.reshape(()).float()
    return ~(divisor >= 0) | divisor.isinf()  # ~(x >= 0): NaN too


def _bad_target_flag(task: Task, target: Tensor, token_mask: Tensor | None) -> Tensor:
    """0-dim bool: whether ``target`` holds a value out of range for ``task``, a cross-entropy or
    bce task (see :func:`start_value_checks`)."""
    if task.loss == "cross_entropy":
        bad = (target != task.ignore_index) & ((target < 0) | (target >= task.num_outputs))
        if task.level == "token" and token_mask is not None:
            bad = bad & token_mask
        return bad.any()
    return ((target < 0) | (target > 1)).any()


def _range_problem(task: Task) -> str:
    if task.loss == "cross_entropy":
        return f"class ids must lie in [0, {task.num_outputs}) or equal ignore_index {task.ignore_index}"
    return "bce targets must lie in [0, 1] (NaN marks a skipped row)"
