"""The single signature every backend implements.

The functional op hands a backend one :class:`HeadProblem`: flat tensors plus the
layout of the tasks present in ``labels``. A backend returns the per-task mean
losses and whatever it wants to keep for its own backward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ..task import ColumnWeights, HeadSpec

if TYPE_CHECKING:
    from ..kernels.label_check import LabelCheck

# Host tensors (and their device copies) a captured CUDA graph reads: every replay reads them, so
# they are never freed.
CAPTURED: list[Tensor] = []


def device_type(tensor: Tensor) -> str:
    """``tensor.device.type`` in a tenth of its host time for CUDA and CPU tensors (a device's
    ``type`` builds its string anew on every read)."""
    return "cuda" if tensor.is_cuda else "cpu" if tensor.is_cpu else tensor.device.type


def is_fake(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a FakeTensor (a shape without data, as a memory or FLOP estimator
    under ``FakeTensorMode`` passes): a call on one is traced as torch.compile traces, through
    the custom op's fake implementation, and keeps nothing for later calls."""
    return type(tensor) is not Tensor and isinstance(tensor, FakeTensor)


def making_kept_tensors() -> AbstractContextManager:
    """The context to make a tensor kept between calls in: outside ``torch.inference_mode``
    when a call runs under it. An inference tensor kept would break a later training call,
    which saves it for backward or writes it in place. (torch.compile keeps none.)"""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return nullcontext()
    return torch.inference_mode(False)


def host_values_to(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without a host sync: on a GPU the
    values go through pinned memory with a non-blocking copy (a copy from pageable memory
    synchronises the stream). Under CUDA graph capture both ends are kept for the replays."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    source = torch.tensor(values, dtype=dtype, pin_memory=True)
    tensor = source.to(device, non_blocking=True)
    if torch.cuda.is_current_stream_capturing():
        CAPTURED.extend((source, tensor))
    return tensor


# The attribute that marks a tensor a HostValuesCache holds.
_KEPT = "_mtlfast_kept"


def kept_between_calls(tensor: Tensor) -> bool:
    """Whether ``tensor`` is held by a :class:`HostValuesCache`, so that later calls get it again."""
    return getattr(tensor, _KEPT, False)


def keep_bounded(cache: OrderedDict, key: Hashable, value: object, kept: int) -> None:
    """Puts ``value`` into ``cache`` under ``key``, then drops the oldest entry if more than
    ``kept`` are held. Threads keeping entries at once (``nn.DataParallel``'s replicas) may each
    find the cache over the bound and drop: ``popitem`` drops in one step, and a drop that finds
    the cache emptied meanwhile (``clear``) has nothing left to do."""
    cache[key] = value
    if len(cache) > kept:
        try:
            cache.popitem(last=False)
        except KeyError:
            pass


class HostValuesCache:
    """Device tensors of small tuples of host values (:func:`host_values_to`), one per key, the
    least recently used dropped past ``kept``: no copy per call for values that recur. Each is
    marked as such (:func:`kept_between_calls`).

    Under CUDA graph capture a hit is kept in ``CAPTURED`` (every replay reads it; a later
    eviction must not free it), and a miss is not cached: a copy captured is only made when the
    graph replays, so an eager call before that must not find it."""

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()

    def get(self, key: tuple, values: tuple, dtype: torch.dtype, device: torch.device,
            capturing: bool | None = None) -> Tensor:  # fmt: skip
        """The tensor of ``values``; ``capturing``: whether a CUDA graph is being captured, when the
        caller knows (else asked here)."""
        if capturing is None:
            capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        tensor = self._entries.pop(key, None)  # and put back last: no KeyError if another thread evicts it meanwhile
        if tensor is not None:
            self._entries[key] = tensor
            if capturing:
                CAPTURED.append(tensor)
            return tensor
        with making_kept_tensors():
            tensor = host_values_to(values, dtype, device)
        if not capturing:
            setattr(tensor, _KEPT, True)
            keep_bounded(self._entries, key, tensor, self._kept)
        return tensor

    def clear(self) -> None:
        self._entries.clear()


class HeadProblem(NamedTuple):
    """Everything one call of the fused heads computes on. A tuple: it is built twice per
    training step, in half the host time of a frozen dataclass.

    Shapes: N token rows, B sequence rows, D hidden size, T tasks present.

    - ``hidden`` [N, D], in ``compute_dtype`` or fp32: the token rows (``[B*S, D]``), or the
      sequence rows when no token task is present (then ``seq_stride == 1``). fp32 rows with a
      16-bit ``compute_dtype`` (an encoder output under autocast) are rounded to it as they are
      read, with no cast pass; their gradient comes back in fp32.
    - ``pooled`` [B, D] or None, in the dtype of ``hidden``: the sequence rows when given
      separately (``seq_stride == 0``).
    - ``seq_stride``: sequence row ``b`` is ``hidden[b * seq_stride]``; 0 means ``pooled``.
    - ``token_mask`` [N] bool or None: token rows that count; sequence rows ignore it.
    - ``weight`` [sum C, D] and ``bias`` [sum C], the packed parameters in their own dtype.
    - ``targets``: T tensors. Cross-entropy: int64 [rows]; bce/mse: float [rows, C].
    - ``divisor_override`` [T] fp32: a task's mean divisor, or < 0 for PyTorch's default.
    - ``task_weights`` [T] fp32: ``total = sum_t task_weights[t] * loss[t]``.
    - ``grad_filter_eps``: the triton backend's vocabulary path skips the tiles of its gradient
      GEMMs whose entries of ``softmax - target`` are all below it in magnitude; < 0: none.
    - ``hidden_grad``: whether ``hidden``/``pooled`` need their gradient; a backend may skip
      ``dH`` without it (a frozen encoder) and return None for both.
    - ``compute_grad``: whether any gradient is needed (the torch backend's forward computes them).
    - ``compute_dtype``: the dtype of the matrix products' inputs (the autocast dtype, else that
      of ``hidden``).
    - ``label_check``: ``validate=True``'s check of the values of ``targets`` (planned for these
      very tensors) for the forward to run and write the flags of, or None. Only a backend that
      plans one (``plan_label_check``, the triton backend's) is given one.
    """

    hidden: Tensor
    pooled: Tensor | None
    seq_stride: int
    token_mask: Tensor | None
    weight: Tensor
    bias: Tensor
    targets: tuple[Tensor, ...]
    divisor_override: Tensor
    task_weights: Tensor
    heads: tuple[HeadSpec, ...]
    chunk_size: int
    deterministic: bool
    grad_filter_eps: float
    hidden_grad: bool
    compute_grad: bool
    compute_dtype: torch.dtype
    label_check: LabelCheck | None = None

    @property
    def acc_dtype(self) -> torch.dtype:
        """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
        return torch.float64 if self.hidden.dtype == torch.float64 else torch.float32

    @property
    def seq_rows(self) -> Tensor:
        """The sequence-level rows, [B, D] (a strided view of ``hidden`` unless ``pooled``)."""
        return self.level_rows(False, self.hidden, self.pooled)

    def rows_for(self, head: HeadSpec) -> Tensor:
        return self.level_rows(head.is_token, self.hidden, self.pooled)

    def level_rows(self, token: bool, hidden_like: Tensor, pooled_like: Tensor | None) -> Tensor:
        """One level's rows of a tensor laid out like ``hidden`` ([N, ...]) or ``pooled``
        ([B, ...]), a gradient buffer for instance: all of ``hidden_like`` for token tasks;
        ``pooled_like``, or every ``seq_stride``-th row of ``hidden_like``, for sequence tasks."""
        if token:
            return hidden_like
        if self.pooled is None:
            return hidden_like[:: self.seq_stride]
        assert pooled_like is not None, "a problem with pooled rows takes pooled_like"
        return pooled_like

    def valid_rows(self, index: int, rows: slice | None = None) -> Tensor:
        """[rows] bool: the rows of task ``index`` that are not skipped."""
        head, target = self.heads[index], self.targets[index]
        if rows is not None:
            target = target[rows]
        if head.is_ce:
            valid = (target != head.ignore_index) & (target >= 0) & (target < head.num_cols)
        else:
            valid = ~torch.isnan(target).any(dim=-1)
        if head.is_token and self.token_mask is not None:
            mask = self.token_mask if rows is None else self.token_mask[rows]
            valid = valid & mask
        return valid

    def class_weight_count(self, index: int) -> Tensor:
        """0-dim acc dtype: the summed class weights of the kept rows of cross-entropy task
        ``index`` (PyTorch's divisor of a weighted mean)."""
        valid = self.valid_rows(index)
        weights = column_weight_tensor(self.heads[index].column_weights, self.acc_dtype, valid.device)
        return torch.where(valid, weights[torch.where(valid, self.targets[index], 0)], 0).sum()

    def divisors(self, default: Tensor | None = None) -> Tensor:
        """[T] acc dtype: the divisor of each task's mean (rows kept, times C for bce/mse; for
        cross-entropy with class weights, the summed weights of the kept rows' classes), or
        ``num_items_in_batch`` where given. ``default`` [T] holds those counts when the caller
        has them already."""
        if default is None:
            counts = []
            for i, head in enumerate(self.heads):
                if head.is_ce and head.column_weights:
                    counts.append(self.class_weight_count(i))
                    continue
                count = self.valid_rows(i).sum(dtype=self.acc_dtype)
                counts.append(count if head.is_ce else count * head.num_cols)
            if not counts:
                return self.task_weights.new_zeros(0, dtype=self.acc_dtype)
            default = torch.stack(counts)
        override = self.divisor_override.to(self.acc_dtype)
        return torch.where(override >= 0, override, default)

    def loss_scales(self, divisors: Tensor) -> Tensor:
        """[T]: d total / d (summed loss of task t) = task_weight / divisor, 0 for an empty divisor."""
        weights = self.task_weights.to(divisors.dtype)
        return torch.where(divisors > 0, weights / divisors.clamp_min(1e-30), torch.zeros_like(weights))


class Backend(Protocol):
    """What a backend provides. ``saved`` is the backend's own list of tensors kept
    between forward and backward; ``saved_like`` builds empty tensors of the same
    shapes and dtypes (for fake tensors under ``torch.compile``)."""

    name: str

    def forward(self, problem: HeadProblem) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Returns the weighted total (0-dim), the per-task mean losses [T] (both in the acc
        dtype) and ``saved``."""

    def backward(
        self, problem: HeadProblem, saved: list[Tensor], grad_total: Tensor, main_grad: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """Returns gradients of ``grad_total * total`` for hidden, pooled (in their dtypes),
        weight and bias (in the acc dtype: the op rounds them to the parameters' dtype, or adds
        them into their ``main_grad``). Given the weight's ``main_grad`` (fp32 [sum C, D]), a
        backend may add the weight's gradient into it itself and return None for it."""

    def saved_like(self, problem: HeadProblem) -> list[Tensor]: ...


@cache
def column_weight_tensor(weights: ColumnWeights, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A head's column weights [C] as a tensor, built once per dtype and device (no copy to
    the device per step)."""
    return torch.tensor(weights.values, dtype=dtype, device=device)


def weighted_total(losses: Tensor, task_weights: Tensor) -> Tensor:
    """``sum_t task_weights[t] * losses[t]``, 0-dim in the dtype of ``losses``."""
    return (losses * task_weights.to(losses.dtype)).sum()


def empty_saved(problem: HeadProblem) -> list[Tensor]:
    return []


def weight_in(dtype: torch.dtype, weight: Tensor) -> Tensor:
    """The weight as the matrix products see it: rounded to the computation dtype."""
    return weight if weight.dtype == dtype else weight.to(dtype)


def _has_out_dtype_mm() -> bool:
    try:
        return "out_dtype" in str(torch.ops.aten.mm.dtype._schema)
    except (AttributeError, RuntimeError):
        return False


_MM_OUT_DTYPE = _has_out_dtype_mm()


def products_take_16_bit(a: Tensor) -> bool:
    """Whether :func:`mm_acc` and :func:`addmm_acc_` multiply 16-bit ``a`` as it is (a CUDA
    GEMM with an fp32 output); elsewhere they multiply an fp32 copy of it, so a caller whose
    16-bit rows enter two products casts them once and passes the copy to both."""
    return a.is_cuda and _MM_OUT_DTYPE


def mm_acc(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` with the result in ``acc`` and products accumulated in ``acc`` (``b`` is cast
    to ``acc`` where ``a`` is in it and ``b`` is not)."""
    if a.dtype == acc:
        return a @ (b if b.dtype == acc else b.to(acc))
    if products_take_16_bit(a):
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


@cache
def _addmm_adds_to_fp32(device: torch.device) -> bool:
    """Whether this torch adds 16-bit products into an fp32 ``self`` with ``addmm(out_dtype=)``
    (older releases require ``self`` in the input dtype)."""
    out = torch.zeros((1, 1), dtype=torch.float32, device=device)
    a = torch.zeros((1, 1), dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except RuntimeError:
        return False
    return True


def addmm_acc_(out: Tensor, a: Tensor, b: Tensor, *, beta: float = 1.0) -> None:
    """``out = beta * out + a @ b`` (beta 0 or 1) accumulated in ``out.dtype``, with no fp32 copy of
    16-bit ``a``, ``b`` on CUDA. With ``beta = 0`` the old contents of ``out`` are never read, NaN included."""
    if a.dtype == out.dtype:
        out.addmm_(a, b if b.dtype == out.dtype else b.to(out.dtype), beta=beta)
    elif products_take_16_bit(a) and out.is_contiguous():
        if beta == 0:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        elif _addmm_adds_to_fp32(out.device):
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            out += torch.mm(a, b, out_dtype=out.dtype)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype), beta=beta)
