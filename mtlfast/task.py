"""Task descriptions and the packed column layout of the heads."""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch

LOSSES = ("cross_entropy", "bce", "mse")
LEVELS = ("sequence", "token")

# Integer codes carried through the functional op (torch.library schemas take no strings per task).
LOSS_CODE = {name: code for code, name in enumerate(LOSSES)}
CROSS_ENTROPY, BCE, MSE = 0, 1, 2
SEQUENCE, TOKEN = 0, 1

# The losses take a task's numbers in fp32 (or wider): a larger one would be inf there.
FP32_MAX = float(torch.finfo(torch.float32).max)
FP32_RANGE = f"in fp32: at most {FP32_MAX:.6g} in magnitude"


def is_number(value: object) -> bool:
    """A real number (numpy's too) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_in_fp32(value: float) -> bool:
    """Whether the number is finite in fp32. An int of any size compares exactly (``float()``
    of a huge one would raise an OverflowError); NaN is not finite."""
    return bool(abs(value) <= FP32_MAX)


class HeadSpec(NamedTuple):
    """One task as the fused op sees it: its columns ``[col_start, col_start + num_cols)``
    of the packed weight, its loss kind and level codes, its cross-entropy options and its
    ``column_weights``: cross-entropy class weights or bce positive weights, one per column
    (None for none). A tuple, so that the caches keyed by a call's heads hash and compare
    them in C."""

    col_start: int
    num_cols: int
    kind: int
    level: int
    ignore_index: int
    label_smoothing: float
    softcap: float  # cross-entropy logits become softcap * tanh(logits / softcap); 0: as they are
    z_loss: float  # cross-entropy: z_loss * lse^2 added to each row's loss
    column_weights: ColumnWeights | None = None

    @property
    def col_end(self) -> int:
        return self.col_start + self.num_cols

    @property
    def is_ce(self) -> bool:
        return self.kind == CROSS_ENTROPY

    @property
    def is_token(self) -> bool:
        return self.level == TOKEN


class ColumnWeights:
    """A head's per-column loss weights (``values``, C floats), hashed once: a vocabulary
    head's class weights are 100k+ floats, and the backends' caches hash a call's heads on
    every step. Each is registered under ``key``, the hash of its values made non-negative (the
    same in every process: floats and tuples hash without a seed), so that the fused op names it
    with one integer: ``torch.compile`` writes the op's arguments into its graph, and 100k
    floats there cost seconds of compile time and milliseconds a step. Weights built while
    ``torch.compile`` traces (tasks made inside the compiled function) would only be registered
    once the graph has run: they are not, and travel as their values (``key`` is
    :data:`BY_VALUE`); they are hashed when first needed, outside the trace."""

    __slots__ = ("values", "key", "_hash")
    BY_VALUE = -2
    # Strong references: a compiled graph names weights by key alone, after the objects that
    # built it (a task layout made per call, say) are gone.
    _registry: dict[int, ColumnWeights] = {}

    def __init__(self, values) -> None:
        self.values = tuple(float(v) for v in values)
        self._hash: int | None = None
        self.key = ColumnWeights.BY_VALUE
        if not torch.compiler.is_compiling():
            self.key = hash(self) & ((1 << 62) - 1)
            ColumnWeights._registry.setdefault(self.key, self)

    def __reduce__(self):
        # Rebuilt through __init__ when unpickled or copied, so that a model loaded in another
        # process registers its weights again.
        return ColumnWeights, (self.values,)

    @classmethod
    def registered(cls, key: int) -> ColumnWeights:
        """The column weights registered under ``key``."""
        try:
            return cls._registry[key]
        except KeyError:
            raise ValueError(f"no column weights registered under key {key} in this process") from None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self.values)
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ColumnWeights) and hash(self) == hash(other) and self.values == other.values

    def __repr__(self) -> str:
        return f"ColumnWeights({len(self.values)} values)"


@dataclass(frozen=True)
class Task:
    """One prediction head and its loss.

    Args:
        name: unique task name, the key of ``labels`` and of every output dict.
        num_outputs: C, the number of logits of the head (classes for cross-entropy).
        loss: ``"cross_entropy"`` (C >= 2, integer class ids), ``"bce"`` (multi-label,
            float targets in [0, 1]) or ``"mse"`` (float targets).
        level: ``"sequence"`` (one prediction per sequence, read from ``pooled`` or the
            first position) or ``"token"`` (one prediction per position).
        ignore_index: class id skipped by cross-entropy.
        label_smoothing: cross-entropy label smoothing, as ``torch.nn.functional.cross_entropy``.
        weight: the task's weight under ``weighting="static"``.
        pos_weight: bce only: the weight of the positive targets, one per output or one for
            all (a number, a sequence or a 1-d tensor), as
            ``torch.nn.functional.binary_cross_entropy_with_logits(pos_weight=)``; kept as a
            tuple of C floats.
        class_weights: cross-entropy only: a weight per class (a sequence or a 1-d tensor of
            C), as ``torch.nn.functional.cross_entropy(weight=)``: the mean divides by the
            summed weights of the rows' classes; kept as a tuple of C floats.
        softcap: cross-entropy only: the loss (and the logits returned) take
            ``softcap * tanh(logits / softcap)``, as Gemma 2's ``final_logit_softcapping``
            caps its language-model logits; None for plain logits.
        z_loss: cross-entropy only: adds ``z_loss * logsumexp(logits)^2`` to each row's loss
            (PaLM's z-loss, Liger's ``lse_square_scale``), which keeps the log-partition
            near 0; averaged as the loss is. Not with ``class_weights``.
    """

    name: str
    num_outputs: int
    loss: str
    level: str = "sequence"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    weight: float = 1.0
    pos_weight: float | tuple[float, ...] | None = None
    class_weights: tuple[float, ...] | None = None
    softcap: float | None = None
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Task name must be a non-empty string, got {self.name!r}")
        where = f"task '{self.name}'"
        if self.loss not in LOSSES:
            raise ValueError(f"{where}: loss must be one of {LOSSES}, got {self.loss!r}")
        if self.level not in LEVELS:
            raise ValueError(f"{where}: level must be one of {LEVELS}, got {self.level!r}")
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int):
            raise TypeError(f"{where}: num_outputs must be an int, got {type(self.num_outputs).__name__}")
        minimum = 2 if self.loss == "cross_entropy" else 1
        if self.num_outputs < minimum:
            raise ValueError(f"{where}: {self.loss} needs num_outputs >= {minimum}, got {self.num_outputs}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"{where}: ignore_index must be an int")
        if not -(2**63) <= self.ignore_index < 2**63:  # compared with int64 class ids
            raise ValueError(f"{where}: ignore_index must fit in int64, got {self.ignore_index}")
        smoothing = float(self.label_smoothing)
        if smoothing != 0.0 and self.loss != "cross_entropy":
            raise ValueError(f"{where}: label_smoothing is only for cross_entropy, not {self.loss}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"{where}: label_smoothing must lie in [0, 1], got {smoothing}")
        if not is_number(self.weight):
            raise TypeError(f"{where}: weight must be a number, got {type(self.weight).__name__}")
        if not finite_in_fp32(self.weight):
            raise ValueError(f"{where}: weight must be finite ({FP32_RANGE}), got {self.weight}")
        if self.softcap is not None:
            self._check_cross_entropy_scalar("softcap", "> 0")
        if self.z_loss != 0:
            self._check_cross_entropy_scalar("z_loss", ">= 0")
            if self.class_weights is not None:
                raise ValueError(f"{where}: z_loss does not combine with class_weights")
        if self.pos_weight is not None:
            object.__setattr__(self, "pos_weight", self._column_weights("pos_weight", "bce", broadcast=True))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", self._column_weights("class_weights", "cross_entropy"))

    def _check_cross_entropy_scalar(self, field: str, bound: str) -> None:
        """A cross-entropy option given (not its default): a number finite in fp32 and > 0 or
        >= 0, as ``bound`` states (z_loss gets here when it is not 0)."""
        where, value = f"task '{self.name}'", getattr(self, field)
        if not is_number(value):
            raise TypeError(f"{where}: {field} must be a number, got {type(value).__name__}")
        if self.loss != "cross_entropy":
            raise ValueError(f"{where}: {field} is only for cross_entropy, not {self.loss}")
        if not (value > 0 and finite_in_fp32(value)):
            raise ValueError(f"{where}: {field} must be finite and {bound} ({FP32_RANGE}), got {value}")

    def _column_weights(self, field: str, loss: str, broadcast: bool = False) -> tuple[float, ...]:
        """The field's value as C finite floats >= 0 (one number stands for all with ``broadcast``)."""
        where = f"task '{self.name}'"
        if self.loss != loss:
            raise ValueError(f"{where}: {field} is only for {loss}, not {self.loss}")
        value = getattr(self, field)
        if hasattr(value, "tolist"):  # a tensor or an array
            value = value.tolist()
        values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        try:
            weights = tuple(float(v) for v in values)
        except OverflowError:  # an int too large for a float
            raise ValueError(f"{where}: {field} must be finite and >= 0 ({FP32_RANGE}), got {value!r}") from None
        except (TypeError, ValueError):
            raise TypeError(f"{where}: {field} must be numbers, got {value!r}") from None
        if broadcast and len(weights) == 1:
            weights *= self.num_outputs
        if len(weights) != self.num_outputs:
            raise ValueError(f"{where}: {field} has {len(weights)} values for {self.num_outputs} outputs")
        if not all(w >= 0 and finite_in_fp32(w) for w in weights):
            raise ValueError(f"{where}: {field} must be finite and >= 0 ({FP32_RANGE}), got {weights}")
        return weights

    @property
    def column_weights(self) -> tuple[float, ...]:
        """Per-output weights of the loss: ``class_weights`` or ``pos_weight``; empty for none."""
        # __post_init__ has made pos_weight a tuple of C floats; the type is a string because
        # torch 2.6's dynamo cannot build tuple[float, ...] (tasks made inside a compiled function)
        return cast("tuple[float, ...]", self.class_weights or self.pos_weight or ())

    @property
    def loss_code(self) -> int:
        return LOSS_CODE[self.loss]

    @property
    def level_code(self) -> int:
        return TOKEN if self.level == "token" else SEQUENCE


@dataclass(frozen=True)
class TaskLayout:
    """Where each task's rows sit in the packed ``weight`` [sum C, D] and ``bias`` [sum C].

    ``index`` maps task names to positions, ``col_start`` holds each task's first packed
    row and ``heads`` each task's :class:`HeadSpec`. They are computed here, not lazily, so
    that ``torch.compile`` finds plain attributes (a ``cached_property`` takes a lock on
    Python 3.11).
    """

    tasks: tuple[Task, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)
    col_start: tuple[int, ...] = field(init=False, repr=False, compare=False)
    heads: tuple[HeadSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("MultiTaskHeads needs at least one Task")
        for task in self.tasks:
            if not isinstance(task, Task):
                raise TypeError(f"tasks must be mtlfast.Task instances, got {type(task).__name__}")
        names = [task.name for task in self.tasks]
        duplicates = sorted({name for k, name in enumerate(names) if name in names[:k]})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {duplicates}")
        starts = tuple(itertools.accumulate((t.num_outputs for t in self.tasks[:-1]), initial=0))
        heads = tuple(
            HeadSpec(start, t.num_outputs, t.loss_code, t.level_code, t.ignore_index, float(t.label_smoothing),
                     float(t.softcap or 0.0), float(t.z_loss),
                     ColumnWeights(t.column_weights) if t.column_weights else None)
            for start, t in zip(starts, self.tasks)
        )
        object.__setattr__(self, "index", {name: i for i, name in enumerate(names)})
        object.__setattr__(self, "col_start", starts)
        object.__setattr__(self, "heads", heads)

    @property
    def total_outputs(self) -> int:
        return self.col_start[-1] + self.tasks[-1].num_outputs

    @property
    def has_token_tasks(self) -> bool:
        return any(task.level == "token" for task in self.tasks)

    def columns(self, name: str) -> slice:
        i = self.index[name]
        start = self.col_start[i]
        return slice(start, start + self.tasks[i].num_outputs)
