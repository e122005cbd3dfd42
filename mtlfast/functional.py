"""The public functional entry point: ``multitask_loss``.

It checks the inputs, lays the labels out as flat tensors, calls the registered op
``mtlfast::fused_heads_loss`` (see :mod:`mtlfast.op`) and packs the results into a
:class:`MultiTaskOutput`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import READS_FP32_ROWS, resolve_backend
from .backends.base import HostValuesCache, device_type, is_fake, keep_bounded, making_kept_tensors
from .op import HeadCall, fused_heads_loss
from .task import Task, TaskLayout
from .validation import (
    check_call,
    check_chunk_size,
    grad_filter_threshold,
    main_grad_params,
    raise_for_bad_values,
    start_value_checks,
)


@dataclass
class MultiTaskOutput:
    """``loss``: the weighted total (scalar), None without labels.
    ``losses``: task name -> detached unweighted mean loss, for the tasks present in labels.
    ``logits``: task name -> logits ([B, C] or [B, S, C], computation dtype) when requested
    or when labels is None, else None."""

    loss: Tensor | None
    losses: dict[str, Tensor]
    logits: dict[str, Tensor] | None


def computation_dtype(hidden_states: Tensor) -> torch.dtype:
    """The autocast dtype inside ``torch.autocast``, else the dtype of ``hidden_states``."""
    kind = device_type(hidden_states)
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden_states.dtype


def head_logits(
    layout: TaskLayout, hidden: Tensor, pooled: Tensor | None, weight: Tensor, bias: Tensor | None
) -> dict[str, Tensor]:
    """Every task's logits in the dtype of ``hidden`` (softcapped for tasks with a softcap): one
    GEMM per level over the packed weight."""
    w, b = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    per_level: dict[str, Tensor] = {}
    if any(t.level == "token" for t in layout.tasks):
        per_level["token"] = F.linear(hidden, w, b)
    if any(t.level == "sequence" for t in layout.tasks):
        seq_rows = pooled if pooled is not None else (hidden[:, 0] if hidden.dim() == 3 else hidden)
        per_level["sequence"] = F.linear(seq_rows, w, b)
    logits = {t.name: per_level[t.level][..., layout.columns(t.name)] for t in layout.tasks}
    for t in layout.tasks:
        if t.softcap:
            logits[t.name] = t.softcap * torch.tanh(logits[t.name] / t.softcap)
    return logits


def _target_shape(task: Task, rows: int) -> tuple[int, ...]:
    return (rows,) if task.loss == "cross_entropy" else (rows, task.num_outputs)


def _flat_target(label: Tensor, shape: tuple[int, ...] | None, dtype: torch.dtype | None) -> Tensor:
    """The label as a contiguous tensor of ``dtype`` and ``shape`` (None: the label's own), which
    are cross-entropy int64 [rows] and bce/mse fp32 (fp64 for fp64 compute) [rows, C]."""
    if dtype is not None:
        label = label.to(dtype)
    if shape is not None:
        label = label.reshape(*shape)
    return label if label.is_contiguous() else label.contiguous()


HALF_DTYPES = (torch.float16, torch.bfloat16)
_CONSTANTS = HostValuesCache(kept=256)


def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device, fake: bool = False) -> Tensor:
    """A small constant tensor, built once per values, dtype and device (no copy per call), and
    without a host sync when built: call-time task weights change every step with DWA. Built
    anew, never kept, while torch.compile traces or for a call on FakeTensors (``fake``)."""
    if fake or torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS.get((values, dtype, device), values, dtype, device)


def _divisor_on(device: torch.device, value: int | float | Tensor | None) -> Tensor:
    """A task's divisor override as a 0-dim fp32 tensor on ``device`` (-1: none), without a
    host sync: numbers become a device fill, CPU tensors a non-blocking copy."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
    return torch.full((), -1.0 if value is None else float(value), dtype=torch.float32, device=device)


def multitask_loss(
    hidden_states: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    tasks: TaskLayout | Sequence[Task],
    labels: Mapping[str, Tensor] | None = None,
    *,
    attention_mask: Tensor | None = None,
    pooled: Tensor | None = None,
    log_vars: Tensor | None = None,
    weighting: str = "static",
    num_items_in_batch: Mapping[str, int | Tensor] | None = None,
    task_weights: Mapping[str, float | Tensor] | None = None,
    return_logits: bool = False,
    backend: str = "auto",
    validate: bool = True,
    chunk_size: int | None = None,
    deterministic: bool = False,
    grad_filter_eps: float | str | None = None,
    fuse_wgrad_accumulation: bool = False,
) -> MultiTaskOutput:
    """Every task head's logits and loss in one fused call.

    Args:
        hidden_states: [B, S, D] encoder output, or [B, D] when every task is sequence-level.
        weight: [sum C, D] packed head weights, tasks in layout order. bias: [sum C], or
            None for heads without one (a language model's ``lm_head``, say).
        tasks: the tasks (or their :class:`TaskLayout`).
        labels: task name -> targets; cross-entropy int [B] / [B, S], bce/mse float
            [B, C] / [B, S, C] (mse with C = 1 may drop the last dim). Tasks absent
            contribute nothing. None runs inference (logits only).
        attention_mask: [B, S]; zero positions are skipped by token tasks.
        pooled: [B, D] rows read by sequence tasks instead of ``hidden_states[:, 0]``.
        log_vars: [T] the ``s_t`` of uncertainty weighting.
        weighting: ``"static"`` (``sum_t weight_t L_t``) or ``"uncertainty"``
            (``sum_t 0.5 exp(-s_t) L_t + 0.5 s_t``).
        num_items_in_batch: task name -> divisor of that task's mean (an int, or a tensor of
            one element: 0-dim, or [1, 1] as the Hugging Face Trainer gives a replica under
            ``nn.DataParallel``).
        task_weights: task name -> its weight for this call under ``weighting="static"`` (a
            number, or a 0-dim tensor that may require grad: its gradient is the task's loss),
            in place of ``Task.weight``; for weights that change during training (DWA, or
            weights learned as GradNorm learns them).
        return_logits: also return logits (one extra GEMM per level).
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``.
        validate: check label values (one host sync; skipped while torch.compile traces).
        chunk_size: rows per chunk for chunked backends; None picks from sum C and D.
        deterministic: bitwise-reproducible gradients (no float atomics); also on while
            ``torch.use_deterministic_algorithms(True)`` is in force.
        grad_filter_eps: gradient filtering for vocabulary-sized heads (cross-entropy with
            more than 128 classes and no class weights) on the ``triton`` backend, as Cut
            Cross-Entropy filters: backward skips the 64 x 256 tiles of their logit gradient
            whose entries of ``softmax - target`` are all below it in magnitude. ``"auto"``
            is the computation dtype's epsilon / 32 (2**-12 in bf16); None (the default)
            computes every tile. The loss and ``db`` stay exact; other heads and backends are
            never filtered.
        fuse_wgrad_accumulation: add the weight's gradient, computed with fp32 accumulation,
            into ``weight.main_grad`` (fp32, the weight's shape) instead of returning it to
            autograd, as Megatron-LM's gradient accumulation fusion and Transformer Engine's
            ``fuse_wgrad_accumulation`` do: with bf16/fp16 parameters nothing is rounded to 16
            bits between micro-batches. The bias likewise when it has a ``main_grad``. Such a
            parameter's ``.grad`` is left alone (a parameter with Megatron's
            ``grad_added_to_main_grad`` attribute gets it set and a stand-in gradient, for its
            hooks). Eager mode only.
    """
    layout = tasks if isinstance(tasks, TaskLayout) else TaskLayout(tuple(tasks))
    options = (weighting, backend, chunk_size, deterministic, grad_filter_eps)
    fake = is_fake(hidden_states)
    # a layout built here from a list of tasks is new every call: no plan kept for it
    key = None if return_logits or labels is None or layout is not tasks or fake else _signature(
        layout, hidden_states, weight, bias, labels, attention_mask, pooled, log_vars, options, num_items_in_batch,
        task_weights,
    )  # fmt: skip
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        check_call(
            layout, hidden_states, weight, bias, labels, attention_mask, pooled, num_items_in_batch, weighting,
            log_vars, task_weights,
        )  # fmt: skip
        check_chunk_size(chunk_size)

    logits = None
    if return_logits or labels is None:
        cdtype = computation_dtype(hidden_states)
        logits = head_logits(layout, hidden_states.to(cdtype), pooled if pooled is None else pooled.to(cdtype),
                             weight, bias)  # fmt: skip
    if labels is None:
        return MultiTaskOutput(loss=None, losses={}, logits=logits)
    if plan is None:
        plan = _plan_call(layout, hidden_states, weight, bias, labels, pooled, num_items_in_batch, task_weights,
                          *options, fake=fake)  # fmt: skip
        if key is not None:
            keep_bounded(_PLANS, key, plan, PLANS_KEPT)
    call = plan.call
    main_grad_targets = main_grad_params(weight, bias) if fuse_wgrad_accumulation else (None, None)
    if bias is None:
        bias = plan.zero_bias
    hidden = hidden_states if hidden_states.dtype == plan.rows_dtype else hidden_states.to(plan.rows_dtype)
    pooled_c = pooled if pooled is None or pooled.dtype == plan.rows_dtype else pooled.to(plan.rows_dtype)
    token_mask = None
    if plan.n_token_rows is not None:
        rows = hidden  # [B, S, D]: the op takes it as [B * S, D] itself, with no view for autograd to walk back
        op_pooled = pooled_c
        if attention_mask is not None:
            token_mask = attention_mask.reshape(plan.n_token_rows) != 0
    else:
        rows = pooled_c if pooled_c is not None else (hidden[:, 0] if hidden.dim() == 3 else hidden)
        op_pooled = None
    targets = [_flat_target(labels[task.name], shape, dtype)
               for task, shape, dtype in zip(plan.present_tasks, plan.target_shapes, plan.target_dtypes)]  # fmt: skip
    # The checks' verdicts are read after the op's forward is issued: the GPU runs it while the
    # host waits for them (the triton backend's check runs in the forward's last launch). A bad
    # class id is skipped there, never read out of bounds.
    value_checks = None
    if validate and not (fake or hidden.is_meta or torch.compiler.is_compiling()):  # values to check
        # a call with a signature is not under CUDA graph capture (_signature gives none there)
        if key is None and hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("validate=True reads the label checks' verdict on the host (one sync), which CUDA graph "
                             "capture does not allow: build the heads with validate=False to capture a step")  # fmt: skip
        value_checks = start_value_checks(plan.present_tasks, call.heads, targets, token_mask, num_items_in_batch,
                                         call.backend, call.compute_dtype)  # fmt: skip
    device = hidden.device
    divisor_override = plan.divisor_override
    if divisor_override is None:
        divisors_given = num_items_in_batch or {}  # a plan without divisor_override: the call gave some
        divisor_override = torch.stack([_divisor_on(device, divisors_given.get(task.name))
                                        for task in plan.present_tasks])  # fmt: skip
    weight_per_task = plan.weight_per_task
    task_log_vars = None
    if weighting == "uncertainty" and log_vars is not None:  # the checks refuse the one without the other
        index = _constant(plan.present, torch.long, log_vars.device, fake)
        task_log_vars = log_vars[index]
        weight_per_task = 0.5 * torch.exp(-task_log_vars.to(plan.weight_dtype))
    elif weight_per_task is None:  # call-time weights, some of them tensors (or traced)
        given = _weights_given(task_weights, plan.present_tasks)
        # numbers multiply a tensor: torch.compile keeps them graph inputs instead of constants
        one = torch.ones((), dtype=plan.weight_dtype, device=device)
        weight_per_task = torch.stack([v.to(one).reshape(()) if isinstance(v, Tensor) else one * v for v in given])

    total, losses = fused_heads_loss(call, rows, op_pooled, token_mask, weight, bias, targets, divisor_override,
                                     weight_per_task, main_grad_targets,
                                     value_checks.label_check if value_checks is not None else None)  # fmt: skip
    if value_checks is not None:
        raise_for_bad_values(value_checks)
    if task_log_vars is not None and plan.present:
        total = total + 0.5 * task_log_vars.to(total.dtype).sum()
    detached = losses.detach() if losses.requires_grad else losses  # the eager op marks them non-differentiable
    return MultiTaskOutput(loss=total, losses=dict(zip(plan.present_names, detached.unbind(0))), logits=logits)


@dataclass(frozen=True, eq=False)
class _CallPlan:
    """What a call's shapes, dtypes, options and modes fix (everything but the tensors' values),
    worked out once per :func:`_signature`."""

    layout: TaskLayout  # kept alive: the signature holds its id
    call: HeadCall
    present: tuple[int, ...]  # the layout indices of the tasks in labels
    present_tasks: tuple[Task, ...]
    present_names: tuple[str, ...]
    rows_dtype: torch.dtype  # the dtype the op takes hidden_states and pooled in
    n_token_rows: int | None  # B * S when a token task is present, else None
    # each present task's flat target shape and dtype, None where its label has it already (:func:`_flat_target`)
    target_shapes: tuple[tuple[int, ...] | None, ...]
    target_dtypes: tuple[torch.dtype | None, ...]
    weight_dtype: torch.dtype  # of the task weights: fp32, fp64 for fp64 compute
    divisor_override: Tensor | None  # the constant [T] of -1 without num_items_in_batch, else None
    weight_per_task: Tensor | None  # the constant [T] of static weights that are numbers, else None
    zero_bias: Tensor | None  # without a bias, the zero one the op takes: [sum C], weight's dtype, never written


# Plans by call signature, the oldest dropped past PLANS_KEPT (a loop over many shapes).
_PLANS: OrderedDict[tuple, _CallPlan] = OrderedDict()
PLANS_KEPT = 256


def _signature(layout: TaskLayout, hidden_states, weight, bias, labels, attention_mask, pooled, log_vars,
               options: tuple, num_items_in_batch, task_weights) -> tuple | None:  # fmt: skip
    """The key of a call's :class:`_CallPlan`: the shapes, dtypes, devices and gradient needs of
    its tensors, its options and the modes in force. None for a call that is not planned once:
    per-call divisors or weights, inputs that are not tensors (left to the checks), torch.compile
    tracing, CUDA graph capture (whose constants are kept apart)."""
    if num_items_in_batch or task_weights or not isinstance(labels, dict) or torch.compiler.is_compiling():
        return None
    try:
        hash(options)
    except TypeError:  # a bad option, which the checks name
        return None
    tensors: list[tuple | None] = []
    for tensor in (hidden_states, weight, bias, attention_mask, pooled, log_vars, *labels.values()):
        if isinstance(tensor, Tensor):
            tensors.append((tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad))
        elif tensor is None:
            tensors.append(None)
        else:
            return None
    kind = device_type(hidden_states)
    if kind == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    autocast = kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind)
    return (id(layout), *tensors, tuple(labels), options, torch.is_grad_enabled(), autocast,
            torch.are_deterministic_algorithms_enabled())  # fmt: skip


def _weights_given(task_weights: Mapping[str, float | Tensor] | None, tasks: Sequence[Task]) -> list[float | Tensor]:
    """Each task's static weight for the call: its ``task_weights`` entry, else ``Task.weight``."""
    return [(task_weights or {}).get(task.name, task.weight) for task in tasks]


def _plan_call(layout: TaskLayout, hidden_states, weight, bias, labels, pooled, num_items_in_batch, task_weights,
               weighting, backend, chunk_size, deterministic, grad_filter_eps, *, fake: bool) -> _CallPlan:  # fmt: skip
    """The call's :class:`_CallPlan`; ``fake``: the hidden states are FakeTensors (no constant kept)."""
    cdtype = computation_dtype(hidden_states)
    filter_threshold = grad_filter_threshold(grad_filter_eps, cdtype)
    # The op takes fp32 rows with 16-bit compute as they are (an encoder output under autocast):
    # the backends round them as they read them, instead of a cast pass here and one back in backward.
    backend_name = resolve_backend(backend, hidden_states.device)
    reads_fp32 = hidden_states.dtype == torch.float32 and cdtype in HALF_DTYPES and READS_FP32_ROWS[backend_name]
    rows_dtype = torch.float32 if reads_fp32 else cdtype

    present = tuple(i for i, task in enumerate(layout.tasks) if task.name in labels)
    present_tasks = tuple(layout.tasks[i] for i in present)
    batch = hidden_states.shape[0]
    has_token = any(task.level == "token" for task in present_tasks)
    seq_len = hidden_states.shape[1] if has_token else 1
    seq_stride = 0 if has_token and pooled is not None else seq_len
    target_shapes, target_dtypes = [], []
    for task in present_tasks:
        label = labels[task.name]
        shape = _target_shape(task, batch * seq_len if task.level == "token" else batch)
        dtype = torch.int64 if task.loss == "cross_entropy" else torch.float64 if cdtype == torch.float64 else (
            torch.float32)  # fmt: skip
        target_shapes.append(None if label.shape == shape else shape)
        target_dtypes.append(None if label.dtype == dtype else dtype)
    device = hidden_states.device
    divisor_override = None
    if all((num_items_in_batch or {}).get(task.name) is None for task in present_tasks):
        divisor_override = _constant((-1.0,) * len(present), torch.float32, device, fake)
    weight_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
    weight_per_task = None
    if weighting == "static":
        given = _weights_given(task_weights, present_tasks)
        if not (task_weights and (torch.compiler.is_compiling() or any(isinstance(value, Tensor) for value in given))):
            weight_per_task = _constant(tuple(float(value) for value in given), weight_dtype, device, fake)

    reads_hidden = has_token or pooled is None  # token rows, or the sequence rows hidden[:, 0]
    hidden_grad = torch.is_grad_enabled() and (
        (reads_hidden and hidden_states.requires_grad) or (pooled is not None and pooled.requires_grad))  # fmt: skip
    call = HeadCall(
        heads=tuple(layout.heads[i] for i in present),
        seq_stride=seq_stride,
        backend=backend_name,
        chunk_size=chunk_size or 0,
        deterministic=deterministic or torch.are_deterministic_algorithms_enabled(),
        grad_filter_eps=filter_threshold,
        hidden_grad=hidden_grad,
        compute_grad=hidden_grad or (torch.is_grad_enabled() and (weight.requires_grad or (
            bias is not None and bias.requires_grad))),
        compute_dtype=cdtype,
    )  # fmt: skip
    zero_bias = None
    if bias is None:
        with making_kept_tensors():
            zero_bias = weight.new_zeros(layout.total_outputs)
    return _CallPlan(layout, call, present, present_tasks, tuple(t.name for t in present_tasks), rows_dtype,
                     batch * seq_len if has_token else None, tuple(target_shapes), tuple(target_dtypes), weight_dtype,
                     divisor_override, weight_per_task, zero_bias)  # fmt: skip
