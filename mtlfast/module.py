"""``MultiTaskHeads``: the drop-in ``nn.Module`` over :func:`mtlfast.multitask_loss`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import check_backend_name
from .functional import MultiTaskOutput, multitask_loss
from .task import Task, TaskLayout
from .validation import check_chunk_size, check_weighting_name, grad_filter_threshold


class MultiTaskHeads(nn.Module):
    """Every task head on one shared encoder output, computed in one fused pass.

    Parameters are packed: ``weight`` [sum C, D] and ``bias`` [sum C] (None with
    ``bias=False``), each task's rows in the order the tasks were given (each initialised
    as ``nn.Linear`` initialises itself), and with ``weighting="uncertainty"`` ``log_vars``
    [T] (the ``s_t``, from 0).

    Args:
        hidden_size: D.
        tasks: the :class:`Task` list.
        weighting: ``"static"`` or ``"uncertainty"``.
        dropout: dropout applied to the head inputs in training, as HF classifiers do.
        backend: ``"auto"`` | ``"reference"`` | ``"torch"`` | ``"triton"``.
        validate: run the label-value checks that need a host sync.
        chunk_size: rows per chunk for chunked backends (None: from sum C and D).
        deterministic: bitwise-reproducible gradients (no float atomics); also on while
            ``torch.use_deterministic_algorithms(True)`` is in force.
        grad_filter_eps: None (exact), ``"auto"`` or a threshold: gradient filtering for
            vocabulary-sized heads on the triton backend (see :func:`mtlfast.multitask_loss`).
        bias: False for heads without a bias, as ``nn.Linear(bias=False)`` (the score head of
            a decoder's ``*ForSequenceClassification``, say).
        fuse_wgrad_accumulation: add the head gradients into ``weight.main_grad`` (and
            ``bias.main_grad`` where set), fp32 tensors attached by the caller or by
            Megatron-style DDP, instead of ``.grad`` (see :func:`mtlfast.multitask_loss`).
    """

    def __init__(
        self,
        hidden_size: int,
        tasks: Sequence[Task],
        *,
        weighting: str = "static",
        dropout: float = 0.0,
        backend: str = "auto",
        validate: bool = True,
        chunk_size: int | None = None,
        deterministic: bool = False,
        grad_filter_eps: float | str | None = None,
        bias: bool = True,
        fuse_wgrad_accumulation: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        check_weighting_name(weighting)
        check_backend_name(backend)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        grad_filter_threshold(grad_filter_eps, torch.bfloat16)
        check_chunk_size(chunk_size)
        self.layout = TaskLayout(tuple(tasks))
        self.hidden_size = hidden_size
        self.weighting = weighting
        self.dropout = float(dropout)
        self.backend = backend
        self.validate = validate
        self.chunk_size = chunk_size
        self.deterministic = deterministic
        self.grad_filter_eps = grad_filter_eps
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.layout.total_outputs, hidden_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.layout.total_outputs, **factory))
        else:
            self.register_parameter("bias", None)
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(self.layout.tasks), **factory))
        else:
            self.register_parameter("log_vars", None)
        self.reset_parameters()

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.layout.tasks

    def reset_parameters(self) -> None:
        """Each task's rows as ``nn.Linear(D, C)`` initialises them; ``log_vars`` to 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for task in self.tasks:
                cols = self.layout.columns(task.name)
                nn.init.kaiming_uniform_(self.weight[cols], a=math.sqrt(5))
                if self.bias is not None:
                    nn.init.uniform_(self.bias[cols], -bound, bound)
            if self.log_vars is not None:
                self.log_vars.zero_()

    def forward(
        self,
        hidden_states: Tensor,
        labels: Mapping[str, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        return_logits: bool = False,
        num_items_in_batch: Mapping[str, int | Tensor] | None = None,
        task_weights: Mapping[str, float | Tensor] | None = None,
    ) -> MultiTaskOutput:
        """See :func:`mtlfast.multitask_loss` for shapes and semantics."""
        if self.training and self.dropout > 0.0:
            hidden_states = F.dropout(hidden_states, self.dropout, training=True)
            if pooled is not None:
                pooled = F.dropout(pooled, self.dropout, training=True)
        return multitask_loss(
            hidden_states,
            cast(Tensor, self._parameter("weight")),
            self._parameter("bias"),
            self.layout,
            labels,
            attention_mask=attention_mask,
            pooled=pooled,
            log_vars=self._parameter("log_vars") if self.weighting == "uncertainty" else None,
            weighting=self.weighting,
            num_items_in_batch=num_items_in_batch,
            task_weights=task_weights,
            return_logits=return_logits,
            backend=self.backend,
            validate=self.validate,
            chunk_size=self.chunk_size,
            deterministic=self.deterministic,
            grad_filter_eps=self.grad_filter_eps,
            fuse_wgrad_accumulation=self.fuse_wgrad_accumulation,
        )

    if TYPE_CHECKING:  # nn.Module types its __call__ as returning Any: type checkers see forward's signature
        __call__ = forward

    def _parameter(self, name: str) -> Tensor | None:
        """``getattr(self, name)`` for a parameter: through ``nn.Module.__getattr__`` (after a
        failed attribute lookup) each costs about a microsecond of a step's host time. A name
        that is no longer among the parameters (a parametrization's) takes that way."""
        parameters = self._parameters
        return parameters[name] if name in parameters else getattr(self, name)

    @classmethod
    def from_linears(
        cls, tasks: Sequence[Task], linears: Mapping[str, nn.Linear], **kwargs
    ) -> MultiTaskHeads:
        """Heads holding copies of existing per-task linears (a HF ``classifier``, say).

        A linear without bias gets a zero bias, unless ``bias=False`` is passed (heads without
        one; then no linear may have a bias). dtype and device follow the linears, which must
        then share them; ``dtype=`` or ``device=`` given here takes the linears' weights to it
        instead (bf16 classifiers into fp32 heads, say).
        """
        layout = TaskLayout(tuple(tasks))
        missing = [t.name for t in layout.tasks if t.name not in linears]
        if missing:
            raise ValueError(f"from_linears: no linear given for tasks {missing}")
        extra = sorted(set(linears) - set(layout.index))
        if extra:
            raise ValueError(f"from_linears: linears given for unknown tasks {extra}")
        for task in layout.tasks:
            if not isinstance(linears[task.name], nn.Linear):
                raise TypeError(
                    f"task '{task.name}': from_linears needs nn.Linear, got {type(linears[task.name]).__name__}"
                )
        first = linears[layout.tasks[0].name]
        hidden_size = first.in_features
        shared = [name for name in ("dtype", "device") if name not in kwargs]  # taken from the linears
        for task in layout.tasks:
            linear = linears[task.name]
            if linear.out_features != task.num_outputs:
                raise ValueError(
                    f"task '{task.name}': linear has out_features={linear.out_features}, "
                    f"the task has num_outputs={task.num_outputs}"
                )
            if linear.in_features != hidden_size:
                raise ValueError(
                    f"task '{task.name}': linear has in_features={linear.in_features}, expected {hidden_size}"
                )
            if linear.bias is not None and not kwargs.get("bias", True):
                raise ValueError(f"task '{task.name}': linear has a bias, and the heads are built with bias=False")
            for name in shared:
                if getattr(linear.weight, name) != getattr(first.weight, name):
                    raise ValueError(
                        f"task '{task.name}': linear's weight has {name} {getattr(linear.weight, name)}, the first "
                        f"linear's (task '{layout.tasks[0].name}') {getattr(first.weight, name)}; pass {name}= to "
                        f"choose the heads' {name}"
                    )
        heads = cls(hidden_size, layout.tasks, **{"dtype": first.weight.dtype, "device": first.weight.device, **kwargs})
        with torch.no_grad():
            for task in layout.tasks:
                linear, cols = linears[task.name], layout.columns(task.name)
                heads.weight[cols].copy_(linear.weight)
                if heads.bias is None:
                    continue
                if linear.bias is not None:
                    heads.bias[cols].copy_(linear.bias)
                else:
                    heads.bias[cols].zero_()
        return heads

    def to_linears(self) -> dict[str, nn.Linear]:
        """New ``nn.Linear`` per task holding copies of its rows."""
        linears = {}
        for task in self.tasks:
            cols = self.layout.columns(task.name)
            linear = nn.Linear(self.hidden_size, task.num_outputs, bias=self.bias is not None,
                               device=self.weight.device, dtype=self.weight.dtype)  # fmt: skip
            with torch.no_grad():
                linear.weight.copy_(self.weight[cols])
                if self.bias is not None:
                    linear.bias.copy_(self.bias[cols])
            linears[task.name] = linear
        return linears

    def extra_repr(self) -> str:
        tasks = ", ".join(f"{t.name}:{t.loss}/{t.level}[{t.num_outputs}]" for t in self.tasks)
        bias = "" if self.bias is not None else ", bias=False"
        bias += ", fuse_wgrad_accumulation=True" if self.fuse_wgrad_accumulation else ""
        return (f"hidden_size={self.hidden_size}, weighting={self.weighting}, backend={self.backend}{bias}, "
                f"tasks=({tasks})")  # fmt: skip
