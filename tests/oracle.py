"""A float64 oracle and a random case generator shared by every backend's tests.

The oracle is written from the loss definitions with plain float64 tensor ops and takes
its gradients from autograd; it shares no code with mtlfast's backends. Inputs are
rounded to the computation dtype first, as the heads see them.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from mtlfast import MultiTaskHeads, Task, multitask_loss

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2}


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


@dataclass
class Case:
    tasks: list[Task]
    hidden: torch.Tensor  # [B, S, D] or [B, D], fp32 master copy
    labels: dict[str, torch.Tensor]
    weight: torch.Tensor  # [sum C, D] fp32
    bias: torch.Tensor  # [sum C] fp32
    attention_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    num_items: dict | None = None
    weighting: str = "static"
    log_vars: torch.Tensor | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        tasks = ", ".join(f"{t.name}:{t.loss}/{t.level}/C={t.num_outputs}" for t in self.tasks)
        return f"seed={self.seed} hidden={tuple(self.hidden.shape)} tasks=[{tasks}] {' '.join(self.notes)}"


def random_labels(task: Task, batch: int, seq_len: int, gen: torch.Generator, ignore_rate: float, nan_rate: float):
    lead = (batch, seq_len) if task.level == "token" else (batch,)
    if task.loss == "cross_entropy":
        y = torch.randint(0, task.num_outputs, lead, generator=gen)
        drop = torch.rand(lead, generator=gen) < ignore_rate
        return y.masked_fill(drop, task.ignore_index)
    shape = (*lead, task.num_outputs)
    y = torch.rand(shape, generator=gen) if task.loss == "bce" else torch.randn(shape, generator=gen)
    if task.loss == "bce" and torch.rand((), generator=gen) < 0.5:
        y = (y > 0.5).float()
    drop = torch.rand(lead, generator=gen) < nan_rate
    y[drop] = float("nan")
    if task.loss == "mse" and task.num_outputs == 1 and torch.rand((), generator=gen) < 0.5:
        y = y.squeeze(-1)
    return y


def case_for(
    tasks: list[Task],
    shape: tuple[int, int, int],
    seed: int | None = None,
    *,
    two_d: bool = False,
    ignore_rate: float = 0.15,
    nan_rate: float = 0.1,
) -> Case:
    """Random hidden states, parameters and labels for the given tasks."""
    seed = fresh_seed() if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    batch, seq_len, hidden_size = shape
    hidden = torch.randn((batch, hidden_size) if two_d else (batch, seq_len, hidden_size), generator=gen)
    total = sum(t.num_outputs for t in tasks)
    weight = torch.randn(total, hidden_size, generator=gen) / hidden_size**0.5
    bias = torch.randn(total, generator=gen) * 0.1
    labels = {t.name: random_labels(t, batch, seq_len, gen, ignore_rate, nan_rate) for t in tasks}
    return Case(list(tasks), hidden, labels, weight, bias, seed=seed)


def random_task(rng: random.Random, name: str, classes: int, loss: str, level: str) -> Task:
    """A task with random options for its loss: label smoothing, ignore_index, class or positive
    weights, a softcap, a z-loss, a task weight."""
    smoothing = rng.choice([0.0, 0.0, 0.1, 0.3]) if loss == "cross_entropy" else 0.0
    ignore = rng.choice([-100, -100, -1, classes + 3, rng.randrange(classes)])  # in range: a class never trained
    pos_weight = class_weights = None
    if loss == "bce" and rng.random() < 0.5:
        pos_weight = rng.choice([rng.uniform(0.1, 8.0), tuple(rng.uniform(0.0, 8.0) for _ in range(classes))])
    if loss == "cross_entropy" and rng.random() < 0.3:
        class_weights = tuple(rng.choice([0.0, rng.uniform(0.05, 6.0)]) for _ in range(classes))
    softcap = rng.choice([0.5, 2.0, 30.0]) if loss == "cross_entropy" and rng.random() < 0.25 else None
    z_loss = rng.choice([1e-4, 0.1]) if loss == "cross_entropy" and not class_weights and rng.random() < 0.25 else 0.0
    return Task(name, classes, loss, level=level, ignore_index=ignore, label_smoothing=smoothing,
                weight=rng.choice([1.0, 0.5, 2.0]), pos_weight=pos_weight, class_weights=class_weights,
                softcap=softcap, z_loss=z_loss)  # fmt: skip


def random_case(
    seed: int | None = None,
    *,
    num_tasks: int | None = None,
    max_classes: int = 20,
    levels: tuple[str, ...] = ("sequence", "token"),
    losses: tuple[str, ...] = ("cross_entropy", "bce", "mse"),
    shape: tuple[int, int, int] | None = None,
    allow_extras: bool = True,
    ce_classes: tuple[int, int] | None = None,
    tasks: list[Task] | None = None,
    all_present: bool = False,
) -> Case:
    """Random tasks (or the ``tasks`` given), sizes and options; odd sizes on purpose. With
    ``all_present`` every task has labels."""
    seed = fresh_seed() if seed is None else seed
    rng = random.Random(seed)
    if tasks is None:
        tasks = []
        for k in range(num_tasks or rng.randint(1, 6)):
            loss, level = rng.choice(losses), rng.choice(levels)
            if loss == "cross_entropy":
                classes = rng.randint(*(ce_classes or (2, max_classes)))
            else:
                classes = rng.randint(1, min(12, max_classes))
            tasks.append(random_task(rng, f"t{k}", classes, loss, level))
    has_token = any(t.level == "token" for t in tasks)
    shape = shape or (rng.randint(1, 5), rng.randint(1, 9), rng.choice([3, 8, 13, 24, 37]))
    two_d = not has_token and rng.random() < 0.3
    case = case_for(tasks, shape, seed, two_d=two_d, ignore_rate=rng.choice([0.0, 0.15, 0.5]),
                    nan_rate=rng.choice([0.0, 0.2]))  # fmt: skip
    batch, seq_len, hidden_size = shape
    gen = torch.Generator().manual_seed(seed + 1)
    if not allow_extras:
        return case
    if rng.random() < 0.25 and len(tasks) > 1 and not all_present:
        absent = rng.choice(tasks).name
        del case.labels[absent]
        case.notes.append(f"absent={absent}")
    if not two_d and rng.random() < 0.4:
        mask = (torch.rand(batch, seq_len, generator=gen) > 0.3).long()
        case.attention_mask = mask
        case.notes.append("mask")
    if rng.random() < 0.3:
        case.pooled = torch.randn(batch, hidden_size, generator=gen)
        case.notes.append("pooled")
    if rng.random() < 0.3 and case.labels:
        name = rng.choice(sorted(case.labels))
        value = rng.choice([0, 1, 7, torch.tensor(5.0), torch.tensor(3), torch.tensor([[2.0]])])  # [1, 1]: a replica's
        case.num_items = {name: value}
        case.notes.append(f"num_items={name}:{value}")
    if rng.random() < 0.3:
        case.weighting = "uncertainty"
        case.log_vars = torch.randn(len(tasks), generator=gen) * 0.5
        case.notes.append("uncertainty")
    return case


def small_tasks_of_width(block_c: int, rng: random.Random, split_levels: bool = False) -> list[Task]:
    """Random small-path tasks (each at most 60 outputs, both levels, every loss) whose outputs
    add up to a total the triton backend packs into groups of ``block_c`` slots: at most 16 for
    16, more than half of ``block_c`` otherwise, and up to 200 for 128 (one or two groups).
    With ``split_levels`` (the groups of each level apart) that total is one level's, and the
    other level's tasks add up to at most ``block_c``."""
    low = 2 if block_c == 16 else block_c // 2 + 1
    tasks: list[Task] = []

    def add(left: int, levels: tuple[str, ...]) -> None:
        while left:
            classes = rng.randint(1, min(left, 60))
            loss = rng.choice(("cross_entropy", "bce", "mse")) if classes > 1 else rng.choice(("bce", "mse"))
            tasks.append(random_task(rng, f"t{len(tasks)}", classes, loss, rng.choice(levels)))
            left -= classes

    levels = ("sequence", "token")
    wide = rng.choice(levels) if split_levels else None
    add(rng.randint(low, 200 if block_c == 128 else block_c), (wide,) if wide else levels)
    if wide:
        add(rng.randint(1, block_c), tuple(level for level in levels if level != wide))
    return tasks


def small_heads_candidates() -> list[tuple[int, tuple[int, ...]]]:
    """Every autotuning candidate of the small-heads kernel, the forward-only and backward-only
    ones included, as ``(BLOCK_C, (BLOCK_M, BLOCK_K, num_warps, num_stages[, BLOCK_K_LOGITS[,
    1]]))``; none without triton."""
    try:
        from mtlfast.kernels import small_heads
    except ImportError:
        return []
    return [(block_c, shape) for block_c in small_heads.SHAPES_BY_BLOCK_C
            for shape in dict.fromkeys(small_heads.shapes_for(block_c, backward=False)
                                       + small_heads.shapes_for(block_c, backward=True))]  # fmt: skip


def candidate_id(candidate: tuple[int, tuple[int, ...]]) -> str:
    """A test id for a :func:`small_heads_candidates` entry, e.g. ``C64-32x32-w8-s2-kl128``
    (``-prefetch``: a sixth element)."""
    block_c, (block_m, block_k, warps, stages, *extra) = candidate
    return (f"C{block_c}-{block_m}x{block_k}-w{warps}-s{stages}" + "".join(f"-kl{k}" for k in extra[:1])
            + "-prefetch" * (extra[1:] == [1]))  # fmt: skip


def run_small_heads_candidate(monkeypatch, block_c: int, shape: tuple[int, ...], device: str,
                              dtype: torch.dtype, atomics: bool, autocast: bool = False):  # fmt: skip
    """Runs a random case of width ``block_c`` on the triton backend with the small-heads kernel
    in the configuration ``shape`` alone, in both directions (a forward-only or backward-only
    one too, and one that an older triton leaves out of one direction: which direction takes a
    shape is a matter of spills, not of results; untuned, and every kept launch and step
    forgotten), its dW/db through float atomics (``atomics``; never for a PREFETCH_DW shape,
    which changes nothing there) or deterministic partials held by two programs, one of which
    adds a later row block into its own (the rows make at least three blocks of any BLOCK_M),
    and with the levels apart the sequence groups' dW rows by row block (two sequence rows,
    no more than the programs), the groups of each level apart or together (at random; see
    ``triton_fused._splits_levels``); returns the case and :func:`run_heads`' outputs."""
    from mtlfast.kernels import small_heads

    from mtlfast.backends import triton_fused

    monkeypatch.setitem(small_heads.SHAPES_BY_BLOCK_C, block_c, [shape])
    monkeypatch.setitem(small_heads.FORWARD_SHAPES_BY_BLOCK_C, block_c, [])
    monkeypatch.setitem(small_heads.BACKWARD_SHAPES_BY_BLOCK_C, block_c, [])
    monkeypatch.setattr(small_heads, "SPILL_BEFORE_TRITON_3_8", {})
    monkeypatch.setattr(small_heads, "TUNING", False)
    monkeypatch.setattr(small_heads, "_TUNED", {})
    monkeypatch.setattr(small_heads, "_PREPARED", {})
    monkeypatch.setattr(triton_fused, "_STEPS", OrderedDict())
    atomics = atomics and not small_heads._config(shape).kwargs["PREFETCH_DW"]
    if atomics:
        monkeypatch.setattr(triton_fused, "PARTIAL_BYTES", 0)
    else:
        monkeypatch.setattr(triton_fused, "_partial_programs", lambda problem, plan: 2)
    seed = fresh_seed()
    rng = random.Random(seed)
    split_levels = rng.random() < 0.5  # the groups of each level apart, or not, whatever would save work
    monkeypatch.setattr(triton_fused, "_splits_levels", lambda heads, seq_stride: split_levels)
    # rows for at least three blocks of every BLOCK_M with a partial last one; D odd, so a multiple
    # of neither K step, and above the wider one: both K-loops take several steps, the last partial
    widest_k = max(small_heads._config(shape).kwargs[name] for name in ("BLOCK_K", "BLOCK_K_LOGITS"))
    hidden_size = rng.randrange(widest_k + 1, 2 * widest_k, 2)
    case = random_case(seed, tasks=small_tasks_of_width(block_c, rng, split_levels),
                       shape=(2, rng.randint(65, 80), hidden_size), all_present=True)  # fmt: skip
    case.notes.append(f"BLOCK_C={block_c} shape={shape} {'atomics' if atomics else 'deterministic'}"
                      f"{' levels apart' if split_levels else ''}")  # fmt: skip
    out, grads = run_heads(case, "triton", dtype, device=device, autocast=autocast, deterministic=not atomics)
    launched = {(direction, width, config) for direction, width, _, config in small_heads.tuned_shapes()}
    assert launched == {("forward", block_c, shape), ("backward", block_c, shape)}, (launched, case.describe())
    return case, out, grads


def check_small_heads_weight_gradient_precision(scale: float, dtype: torch.dtype, device: str = "cpu") -> None:
    """The small-heads kernel's dW and db keep fp32 precision with 16-bit (``dtype``)
    computation under autocast: within 1e-5 of float64 on the same rounded inputs, where
    dlogits rounded to 16 bits would be ~1e-3 off. The loss is scaled by ``scale`` (task
    weights), so that a kernel holding dlogits in any 16-bit form for dW (a split into
    16-bit pieces, say) is caught underflowing at 2^-20 or losing range at 2^10."""
    seed = fresh_seed()
    rng = random.Random(seed)
    tasks = [replace(t, weight=t.weight * scale) for t in small_tasks_of_width(rng.choice([16, 32, 64, 128]), rng)]
    case = random_case(seed, tasks=tasks, shape=(3, rng.randint(5, 30), rng.choice([13, 40])), allow_extras=False)
    _, grads = run_heads(case, "triton", dtype, device=device, autocast=True, deterministic=rng.random() < 0.5)
    reference = oracle(case, dtype)[2]
    for name in ("weight", "bias"):
        error = rel_error(grads[name], reference[name])
        assert error <= 1e-5, (name, error, case.describe())


def bad_class_id_cases(classes: int) -> tuple[Case, Case]:
    """A case whose cross-entropy labels hold class ids outside ``[0, C)`` (for a token head
    of ``classes`` outputs and a 3-class sequence head), and the same case with those ids
    replaced by ``ignore_index``: what a backend computes from the first with
    ``validate=False``, by the README's promise that such ids are skipped."""
    tasks = [Task("tags", classes, "cross_entropy", level="token"), Task("cls", 3, "cross_entropy")]
    case = case_for(tasks, (3, 11, 24), ignore_rate=0.1)
    bad = {name: label.clone() for name, label in case.labels.items()}
    bad["tags"][0, :4] = torch.tensor([classes, classes + 1000, -7, -(2**40)])
    bad["cls"][1] = 3
    ignored = {t.name: torch.where((bad[t.name] >= 0) & (bad[t.name] < t.num_outputs), bad[t.name], t.ignore_index)
               for t in tasks}  # fmt: skip
    return replace(case, labels=bad), replace(case, labels=ignored)


def _present_tasks(case: Case, h, pooled):
    """Per task with labels: ``(task, rows [n, D], its columns, labels, keep [n])``, ``keep``
    holding the attention mask for token tasks."""
    col = 0
    for task in case.tasks:
        cols = slice(col, col + task.num_outputs)
        col += task.num_outputs
        if task.name not in case.labels:
            continue
        if task.level == "token":
            rows = h.reshape(-1, h.shape[-1])
        else:
            rows = pooled if pooled is not None else (h[:, 0] if h.dim() == 3 else h)
        keep = torch.ones(rows.shape[0], dtype=torch.bool, device=h.device)
        if task.level == "token" and case.attention_mask is not None:
            keep &= case.attention_mask.to(h.device).reshape(-1) != 0
        yield task, rows, cols, case.labels[task.name].to(h.device), keep


def _oracle_losses(case: Case, h, pooled, w, b) -> dict[str, torch.Tensor]:
    losses = {}
    for task, rows, cols, y, keep in _present_tasks(case, h, pooled):
        logits = rows @ w[cols].T + b[cols]
        if task.softcap:
            logits = task.softcap * torch.tanh(logits / task.softcap)
        n = rows.shape[0]
        if task.loss == "cross_entropy":
            y = y.reshape(n)
            keep &= y != task.ignore_index
            safe = torch.where(keep, y, torch.zeros_like(y))
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            logp = logits - lse
            eps, classes = task.label_smoothing, task.num_outputs
            cw = torch.tensor(task.class_weights or (1.0,) * classes, dtype=torch.float64, device=h.device)
            row_loss = -(1 - eps) * cw[safe] * logp.gather(1, safe[:, None]).squeeze(1) - eps / classes * (logp * cw).sum(1)
            row_loss = row_loss + task.z_loss * lse.squeeze(1) ** 2
            total = (row_loss * keep).sum()
            default = (cw[safe] * keep).sum()
        else:
            y = y.reshape(n, task.num_outputs).double()
            keep &= ~torch.isnan(y).any(dim=1)
            y = torch.where(keep[:, None], y, torch.zeros_like(y))
            if task.loss == "bce":
                p = torch.tensor(task.pos_weight or (1.0,) * task.num_outputs, dtype=torch.float64, device=h.device)
                log_sigmoid = -(torch.clamp(-logits, min=0) + torch.log1p(torch.exp(-logits.abs())))
                element = -(p * y * log_sigmoid + (1 - y) * (log_sigmoid - logits))
            else:
                element = (logits - y) ** 2
            total = (element * keep[:, None]).sum()
            default = keep.sum().double() * task.num_outputs
        divisor = default
        if case.num_items and task.name in case.num_items:
            divisor = torch.as_tensor(case.num_items[task.name], dtype=torch.float64).reshape(())
        losses[task.name] = total / divisor if divisor > 0 else total * 0.0
    return losses


def eager_total(case: Case, h, pooled, w, b, log_vars=None) -> torch.Tensor:
    """What users write today: per-task ``F.linear`` + PyTorch's losses on the given tensors
    (bf16 ones, or fp32 ones under autocast), summed with the case's weighting."""
    import torch.nn.functional as F

    index = {t.name: i for i, t in enumerate(case.tasks)}
    terms = []
    for task, rows, cols, y, keep in _present_tasks(case, h, pooled):
        logits = F.linear(rows, w[cols], b[cols])
        if task.softcap:
            logits = task.softcap * torch.tanh(logits / task.softcap)
        n = rows.shape[0]
        if task.loss == "cross_entropy":
            y = torch.where(keep, y.reshape(n), task.ignore_index)
            weight = torch.tensor(task.class_weights, dtype=logits.dtype, device=h.device) if task.class_weights else None
            summed = F.cross_entropy(logits, y, weight=weight, ignore_index=task.ignore_index,
                                     label_smoothing=task.label_smoothing, reduction="sum")  # fmt: skip
            if task.z_loss:
                kept_rows = y != task.ignore_index
                summed = summed + task.z_loss * (torch.logsumexp(logits.float(), dim=1) ** 2 * kept_rows).sum()
            kept = y != task.ignore_index
            count = kept.sum() if weight is None else torch.where(kept, weight[torch.where(kept, y, 0)], 0).sum()
        else:
            y = y.reshape(n, task.num_outputs)
            keep &= ~torch.isnan(y).any(dim=1)
            y = torch.where(keep[:, None], y, 0.0).to(logits.dtype)
            if task.loss == "bce":
                pos_weight = torch.tensor(task.pos_weight, device=h.device) if task.pos_weight else None
                element = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)
            else:
                element = F.mse_loss(logits, y, reduction="none")
            summed = (element * keep[:, None]).sum()
            count = keep.sum() * task.num_outputs
        if case.num_items and task.name in case.num_items:
            count = torch.as_tensor(case.num_items[task.name], device=h.device).reshape(())
        loss = torch.where(count > 0, summed / count.clamp_min(1), 0.0)
        if case.weighting == "uncertainty":
            s = (log_vars if log_vars is not None else case.log_vars.to(h.device))[index[task.name]]
            terms.append(0.5 * torch.exp(-s) * loss + 0.5 * s)
        else:
            terms.append(task.weight * loss)
    return torch.stack([t.float() for t in terms]).sum() if terms else h.sum() * 0


def oracle(case: Case, compute_dtype: torch.dtype):
    """float64 loss, per-task losses and gradients of the case, inputs rounded to ``compute_dtype``."""
    h = case.hidden.to(compute_dtype).double().requires_grad_(True)
    pooled = case.pooled.to(compute_dtype).double().requires_grad_(True) if case.pooled is not None else None
    w = case.weight.to(compute_dtype).double().requires_grad_(True)
    b = case.bias.double().requires_grad_(True)
    log_vars = case.log_vars.double().requires_grad_(True) if case.log_vars is not None else None
    losses = _oracle_losses(case, h, pooled, w, b)
    index = {t.name: i for i, t in enumerate(case.tasks)}
    if case.weighting == "uncertainty":
        terms = [0.5 * torch.exp(-log_vars[index[n]]) * v + 0.5 * log_vars[index[n]] for n, v in losses.items()]
    else:
        terms = [case.tasks[index[n]].weight * v for n, v in losses.items()]
    total = torch.stack(terms).sum() if terms else h.sum() * 0.0
    leaves = {"hidden": h, "weight": w, "bias": b}
    if pooled is not None:
        leaves["pooled"] = pooled
    if log_vars is not None:
        leaves["log_vars"] = log_vars
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    grads = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), grads)}
    return total.detach(), {k: v.detach() for k, v in losses.items()}, grads


def filter_tiles(logit_grad: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient filter's view of one chunk of a vocabulary head's logit gradient
    (``softmax - target``, [rows, C]): the largest magnitude in each ``TILE_M x TILE_V`` tile
    ([row tiles, column tiles]) and the [rows, C] mask of the entries in tiles kept at ``eps``
    (those whose largest magnitude is not below it)."""
    from mtlfast.kernels.filtered_matmul import TILE_M, TILE_V

    n, c = logit_grad.shape
    padded = torch.zeros(-(-n // TILE_M) * TILE_M, -(-c // TILE_V) * TILE_V, dtype=torch.float64)
    padded[:n, :c] = logit_grad.abs()
    maxima = padded.reshape(padded.shape[0] // TILE_M, TILE_M, padded.shape[1] // TILE_V, TILE_V).amax(dim=(1, 3))
    keep = (maxima >= eps).repeat_interleave(TILE_M, 0).repeat_interleave(TILE_V, 1)[:n, :c]
    return maxima, keep


def filtered_oracle(case: Case, task_name: str, eps: float, compute_dtype: torch.dtype, chunk_shape: tuple[int, int]):
    """``oracle`` with the gradient filter on one token-level cross-entropy head (static
    weighting, no label smoothing): its logit gradient, cut into chunks of ``chunk_shape``
    (rows, columns) as the backend walks it, loses the tiles ``filter_tiles`` drops at ``eps``;
    the losses and the bias gradient stay exact."""
    total, losses, grads = oracle(case, compute_dtype)
    index = [t.name for t in case.tasks].index(task_name)
    task = case.tasks[index]
    assert task.level == "token" and task.loss == "cross_entropy" and not task.label_smoothing
    assert case.weighting == "static" and case.attention_mask is None
    start = sum(t.num_outputs for t in case.tasks[:index])
    cols = slice(start, start + task.num_outputs)
    h = case.hidden.reshape(-1, case.hidden.shape[-1]).to(compute_dtype).double()
    w = case.weight[cols].to(compute_dtype).double()
    labels = case.labels[task_name].reshape(-1)
    valid = labels >= 0
    dropped = torch.softmax(h @ w.T + case.bias[cols].double(), dim=1)
    dropped[valid, labels[valid]] -= 1.0
    dropped[~valid] = 0.0
    chunk_rows, chunk_cols = chunk_shape
    for r0 in range(0, dropped.shape[0], chunk_rows):
        for c0 in range(0, dropped.shape[1], chunk_cols):
            chunk = dropped[r0 : r0 + chunk_rows, c0 : c0 + chunk_cols]
            chunk[filter_tiles(chunk, eps)[1]] = 0.0
    dropped *= task.weight / valid.sum()
    grads = dict(grads, hidden=grads["hidden"] - (dropped @ w).reshape(grads["hidden"].shape),
                 weight=grads["weight"].clone())  # fmt: skip
    grads["weight"][cols] -= dropped.T @ h
    return total, losses, grads


def make_heads(case: Case, backend: str, device="cpu", **kwargs) -> MultiTaskHeads:
    heads = MultiTaskHeads(case.hidden.shape[-1], case.tasks, weighting=case.weighting, backend=backend, **kwargs)
    heads = heads.to(device)
    with torch.no_grad():
        heads.weight.copy_(case.weight)
        if heads.bias is not None:
            heads.bias.copy_(case.bias)
        else:
            assert not case.bias.any(), "heads built with bias=False need a case whose bias is zero"
        if case.log_vars is not None:
            heads.log_vars.copy_(case.log_vars)
    return heads


def run_heads(case: Case, backend: str, dtype: torch.dtype, device="cpu", autocast: bool = False,
              frozen_hidden: bool = False, task_weights: dict | None = None, evaluated_first: bool = False,
              **kwargs):  # fmt: skip
    """Loss, per-task losses and gradients from mtlfast for the case (``kwargs`` build the heads,
    ``task_weights`` goes to the call). With ``evaluated_first`` the same heads first take the
    same call under ``torch.inference_mode``, as a validation pass in a training loop does.

    With ``autocast`` the parameters and hidden states stay fp32 and ``torch.autocast``
    sets the computation dtype; otherwise hidden states are given in ``dtype``. With
    ``frozen_hidden`` the hidden (and pooled) states need no gradient, as from a frozen encoder.
    With ``fuse_wgrad_accumulation=True`` among ``kwargs`` the weight's ``main_grad`` starts
    as noise of the gradient's size (1 where the gradient is 0: rows no kernel may touch), and
    the weight gradient returned is what was added to it.
    """
    heads = make_heads(case, backend, device, **kwargs)
    if kwargs.get("fuse_wgrad_accumulation"):
        expected = oracle(case, dtype)[2]["weight"]
        noise = expected * torch.empty_like(expected).uniform_(-1.0, 1.0) + (expected == 0)
        noise = noise.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
        heads.weight.main_grad = noise.clone()
    in_dtype = torch.float32 if autocast else dtype
    if not autocast and dtype == torch.float64:
        heads = heads.double()
    # Fresh leaves: .to() can return case.hidden itself, whose .grad would add up across runs.
    h = case.hidden.to(device=device, dtype=in_dtype).detach().clone().requires_grad_(not frozen_hidden)
    pooled = None
    if case.pooled is not None:
        pooled = case.pooled.to(device=device, dtype=in_dtype).detach().clone().requires_grad_(not frozen_hidden)
    labels = {k: v.to(device) for k, v in case.labels.items()}
    mask = case.attention_mask.to(device) if case.attention_mask is not None else None
    num_items = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in (case.num_items or {}).items()}
    ctx = torch.autocast(device_type=torch.device(device).type, dtype=dtype) if autocast else _null()
    if evaluated_first:
        with torch.inference_mode(), ctx:
            heads(h, labels, attention_mask=mask, pooled=pooled, num_items_in_batch=num_items or None,
                  task_weights=task_weights)  # fmt: skip
    with ctx:
        out = heads(h, labels, attention_mask=mask, pooled=pooled, num_items_in_batch=num_items or None,
                    task_weights=task_weights)  # fmt: skip
    out.loss.backward()
    grads = {"hidden": h.grad, "weight": heads.weight.grad}
    if kwargs.get("fuse_wgrad_accumulation"):
        assert heads.weight.grad is None, "fused accumulation wrote .grad"
        grads["weight"] = heads.weight.main_grad - noise
    if heads.bias is not None:
        grads["bias"] = heads.bias.grad
    if pooled is not None:
        grads["pooled"] = pooled.grad
    if case.log_vars is not None:
        grads["log_vars"] = heads.log_vars.grad
    return out, grads


def check_calls_from_threads(backend: str, device: str = "cpu", threads: int = 4,
                             shapes: Sequence[tuple[int, int, int]] = ((3, 5, 13),)) -> None:  # fmt: skip
    """One module called at once from ``threads`` threads, as ``nn.DataParallel`` calls its
    replicas (which share the module's task layout): the calls share the kept plans and
    constants, and each matches the oracle for its own inputs. The calls' ``[B, S, D]`` go round
    ``shapes``."""
    tasks = random_case(all_present=True).tasks
    first = case_for(tasks, shapes[0])
    heads = make_heads(first, backend, device)
    cases = [replace(case_for(tasks, shapes[k % len(shapes)]), weight=first.weight, bias=first.bias)
             for k in range(2 * threads)]  # fmt: skip
    errors: list[BaseException] = []

    def steps(thread: int) -> None:
        try:
            for case in cases[thread::2] * 3:
                hidden = case.hidden.to(device, copy=True).requires_grad_(True)
                out = heads(hidden, {name: label.to(device) for name, label in case.labels.items()})
                grads = dict(zip(("hidden", "weight", "bias"),
                                 torch.autograd.grad(out.loss, [hidden, heads.weight, heads.bias])))  # fmt: skip
                assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32],
                                      f"{backend} thread {thread}")  # fmt: skip
        except BaseException as error:  # raised again in the caller's thread
            errors.append(error)

    workers = [threading.Thread(target=steps, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def check_frozen_hidden(case: Case, backend: str, dtype: torch.dtype, device="cpu", **kwargs) -> None:
    """Hidden (and pooled) states that need no gradient, as from a frozen encoder: no gradient
    reaches them, and the losses and parameter gradients still match the oracle."""
    out, grads = run_heads(case, backend, dtype, device, frozen_hidden=True, **kwargs)
    assert grads.pop("hidden") is None and grads.pop("pooled", None) is None
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], f"{backend} frozen hidden",
                          skip=("hidden", "pooled"))  # fmt: skip


def _transposed_storage(tensor: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, view)``: a leaf that holds ``tensor`` with its first two dims swapped, and the
    view of it that equals ``tensor`` (strided, not contiguous, for a dim of size > 1)."""
    leaf = tensor.transpose(0, 1).to(device=device, dtype=dtype).contiguous().requires_grad_(True)
    return leaf, leaf.transpose(0, 1)


def check_strided_inputs(case: Case, backend: str, dtype: torch.dtype, device="cpu", compiled: bool = False) -> None:
    """Every input of ``multitask_loss`` given as a strided view, as a head sliced out of a
    wider parameter or a sequence-first encoder gives them: the hidden states (and ``pooled``)
    transposed out of ``[S, B, D]`` (``[D, B]``) tensors, the weight a transposed column slice
    of a ``[D, sum C + 3]`` tensor (strides ``(1, sum C + 3)``), the bias every other element
    of a ``[2 sum C]`` one. Loss and gradients match the oracle, and every element of the
    parameters outside the views gets a zero gradient. Hidden states in ``dtype``, parameters
    in fp32; ``compiled``: through ``torch.compile(fullgraph=True)``."""
    heads = make_heads(case, backend, device)
    if dtype == torch.float64:
        heads = heads.double()
    total, hidden_size = case.weight.shape
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight_base = torch.randn(hidden_size, total + 3, dtype=param_dtype, device=device)
    weight_base[:, 1 : total + 1] = case.weight.t()
    bias_base = torch.randn(2 * total, dtype=param_dtype, device=device)
    bias_base[::2] = case.bias
    weight_base.requires_grad_(True)
    bias_base.requires_grad_(True)
    hidden_base, hidden = _transposed_storage(case.hidden, device, dtype)
    pooled_base, pooled = (None, None) if case.pooled is None else _transposed_storage(case.pooled, device, dtype)
    labels = {k: v.to(device) for k, v in case.labels.items()}
    mask = None if case.attention_mask is None else case.attention_mask.to(device)
    num_items = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in (case.num_items or {}).items()}

    def loss(hidden, pooled, weight_base, bias_base):
        weight, bias = weight_base[:, 1 : total + 1].t(), bias_base[::2]
        return multitask_loss(hidden, weight, bias, heads.layout, labels, attention_mask=mask, pooled=pooled,
                              log_vars=heads.log_vars, weighting=case.weighting, num_items_in_batch=num_items or None,
                              backend=backend, validate=not compiled)  # fmt: skip

    if compiled:
        torch._dynamo.reset()
    out = (torch.compile(loss, fullgraph=True) if compiled else loss)(hidden, pooled, weight_base, bias_base)
    out.loss.backward()

    def unswapped(leaf: torch.Tensor) -> torch.Tensor | None:
        return None if leaf.grad is None else leaf.grad.transpose(0, 1)  # None: no present task reads it

    grads = {"hidden": unswapped(hidden_base), "weight": weight_base.grad[:, 1 : total + 1].t(),
             "bias": bias_base.grad[::2]}  # fmt: skip
    if pooled is not None:
        grads["pooled"] = unswapped(pooled_base)
    if heads.log_vars is not None:
        grads["log_vars"] = heads.log_vars.grad
    what = f"{backend}/{dtype} strided inputs{' compiled' if compiled else ''}"
    assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], what)
    outside_weight = torch.cat([weight_base.grad[:, :1], weight_base.grad[:, total + 1 :]], dim=1)
    assert not outside_weight.any() and not bias_base.grad[1::2].any(), f"{what}: a gradient outside the views"


def check_autocast_reads_fp32_rows(case: Case, backend: str, dtype: torch.dtype, device="cpu", param_tol: float = 0.0,
                                   **kwargs) -> None:  # fmt: skip
    """fp32 hidden states under autocast to ``dtype`` (an encoder's output, as BERT's final
    LayerNorm gives it) are rounded as the backend reads them: the losses and parameter
    gradients equal, bit for bit, those of the same states cast to ``dtype`` by hand, and the
    hidden gradient comes back in fp32, rounding to the cast states' gradient. With
    ``param_tol`` the parameter gradients may differ by that relative error instead (fp32 sums
    in another order: a kernel compiled for fp32 rows need not add up its products as the
    one for 16-bit rows does; rows used unrounded would differ by ~``dtype``'s eps)."""
    read, read_grads = run_heads(case, backend, dtype, device, autocast=True, **kwargs)
    cast, cast_grads = run_heads(case, backend, dtype, device, **kwargs)
    what = f"{backend}/{dtype} {case.describe()}"
    assert torch.equal(read.loss, cast.loss), f"{what}: loss {read.loss.item()} != {cast.loss.item()}"
    for name in cast.losses:
        assert torch.equal(read.losses[name], cast.losses[name]), f"{what}: loss of {name}"
    for name, grad in cast_grads.items():
        got = read_grads[name]
        if grad is None:  # pooled rows that no present task reads
            assert got is None, f"{what}: grad of {name}"
            continue
        if name in ("hidden", "pooled"):
            assert got.dtype == torch.float32, f"{what}: grad of {name} in {got.dtype}"
            got = got.to(dtype)
        elif param_tol:
            err = rel_error(got, grad)
            assert err <= param_tol, f"{what}: grad of {name} rel error {err:.3e} > {param_tol}"
            continue
        assert torch.equal(got, grad), f"{what}: grad of {name} differs by {(got.double() - grad.double()).abs().max()}"


def check_main_grad_accumulation(tasks: list[Task], shape: tuple[int, int, int], backend: str, dtype: torch.dtype,
                                 micro_batches: int, device="cpu", tol: float = 1e-5) -> tuple[float, float]:  # fmt: skip
    """16-bit parameters with fp32 ``main_grad`` buffers and ``fuse_wgrad_accumulation=True``
    over fresh random micro-batches (the loss divided by their number): the buffers hold the
    float64 sum of the gradients within ``tol``, ``.grad`` stays None, the hidden states'
    gradients match the oracle. The first task is absent from every other micro-batch (its
    rows of ``main_grad`` must keep what they hold). Returns the relative errors of
    ``main_grad`` and of the same accumulation in the parameters' dtype through ``.grad`` (the
    unfused path)."""
    first = case_for(tasks, shape)
    cases = [first] + [case_for(tasks, shape) for _ in range(micro_batches - 1)]
    for case in cases[1::2]:
        del case.labels[tasks[0].name]
    rounded_bias = first.bias.to(dtype).float()  # the oracle rounds the weight to dtype, not the bias
    for case in cases:
        case.weight, case.bias = first.weight, rounded_bias
    fused = make_heads(first, backend, device, fuse_wgrad_accumulation=True).to(dtype)
    plain = make_heads(first, backend, device).to(dtype)
    for heads in (fused, plain):  # the plain heads' main_grad must stay untouched
        heads.weight.main_grad = torch.zeros_like(heads.weight, dtype=torch.float32)
    fused.bias.main_grad = torch.zeros_like(fused.bias, dtype=torch.float32)
    ref = {"weight": torch.zeros_like(first.weight, dtype=torch.float64),
           "bias": torch.zeros_like(first.bias, dtype=torch.float64)}  # fmt: skip
    for case in cases:
        _, _, grads = oracle(case, dtype)
        for name in ref:
            ref[name] += grads[name] / micro_batches
        labels = {k: v.to(device) for k, v in case.labels.items()}
        for heads in (fused, plain):
            h = case.hidden.to(device=device, dtype=dtype).requires_grad_(True)
            (heads(h, labels).loss / micro_batches).backward()
            assert rel_error(h.grad, grads["hidden"] / micro_batches) <= 2e-2, f"{backend}/{dtype}: hidden grad"
    what = f"{backend}/{dtype} fused accumulation"
    assert fused.weight.grad is None and fused.bias.grad is None, f"{what}: .grad was written"
    assert fused.weight.main_grad.dtype == torch.float32
    err_bias = rel_error(fused.bias.main_grad, ref["bias"])
    err_fused = rel_error(fused.weight.main_grad, ref["weight"])
    assert err_fused <= tol and err_bias <= tol, f"{what}: main_grad {err_fused:.1e}, bias {err_bias:.1e}"
    assert plain.weight.grad is not None and not plain.weight.main_grad.any(), "the unfused heads used main_grad"
    return err_fused, rel_error(plain.weight.grad, ref["weight"])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def rel_error(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf for any non-finite value; the absolute
    error when ``ref`` is all zeros. A missing gradient (None) counts as zeros."""
    ref = ref.detach().double().cpu()
    out = torch.zeros_like(ref) if out is None else out.detach().double().cpu()
    if out.shape != ref.shape:
        out = out.reshape(ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    ref_norm = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / ref_norm if ref_norm > 0 else diff


def assert_matches_oracle(case: Case, out, grads, compute_dtype: torch.dtype, tol: float, what: str = "",
                          skip: tuple[str, ...] = (), reference=None) -> None:  # fmt: skip
    """Loss, per-task losses and every gradient of the oracle (or of ``reference``, an
    oracle-like ``(total, losses, grads)``) but those named in ``skip``."""
    ref_total, ref_losses, ref_grads = reference or oracle(case, compute_dtype)
    context = f"{what} {case.describe()}"
    assert set(out.losses) == set(ref_losses), f"{context}: tasks in losses {set(out.losses)} != {set(ref_losses)}"
    err = rel_error(out.loss, ref_total)
    assert err <= tol, f"{context}: loss rel error {err:.3e} > {tol}"
    for name, ref in ref_losses.items():
        err = rel_error(out.losses[name], ref)
        assert err <= tol, f"{context}: loss of {name} rel error {err:.3e} > {tol}"
    for name, ref in ref_grads.items():
        if name in skip:
            continue
        err = grad_error(name, grads.get(name), ref)
        assert err <= tol, f"{context}: grad of {name} rel error {err:.3e} > {tol}"


def grad_error(name: str, got: torch.Tensor | None, ref: torch.Tensor) -> float:
    """:func:`rel_error` of the gradient of ``name``. For ``log_vars`` (d/ds_t = 0.5 - 0.5
    exp(-s_t) L_t, where the exact 0.5 can cancel the loss term to near zero) it is measured on
    the loss term: both sides shifted by 0.5."""
    if name == "log_vars" and got is not None:
        got, ref = got - 0.5, ref - 0.5
    return rel_error(got, ref)


def check_op_outputs_are_its_own(backend: str, device: str = "cpu") -> None:
    """The custom op that ``torch.compile`` traces returns tensors of its own on every call,
    none that mtlfast keeps between calls (the compiler owns an op's outputs and may reuse their
    memory once they are dead): two calls on the same inputs share no memory. Small heads, a
    vocabulary head, token and sequence levels."""
    from mtlfast.op import SOURCE_DIGEST, HeadCall
    from mtlfast.task import TaskLayout

    tasks = (Task("tok", 5, "cross_entropy", level="token"), Task("cls", 3, "cross_entropy"),
             Task("tags", 4, "bce", level="token"), Task("vocab", 300, "cross_entropy", level="token"))  # fmt: skip
    case = case_for(list(tasks), (2, 5, 16))
    batch, seq_len, hidden_size = case.hidden.shape
    hidden, weight, bias = case.hidden.to(device), case.weight.to(device), case.bias.to(device)
    targets = [case.labels[t.name].reshape(batch * seq_len if t.level == "token" else batch, *(
        (t.num_outputs,) if t.loss == "bce" else ())).to(device) for t in tasks]  # fmt: skip
    call = HeadCall(TaskLayout(tasks).heads, seq_len, backend, 0, False, -1.0, True, True, torch.float32)
    ones = torch.ones(len(tasks), device=device)

    def outputs() -> list[torch.Tensor]:
        return torch.ops.mtlfast.fused_heads_loss(hidden, None, seq_len, None, weight, bias, targets, -ones, ones,
                                                  *call.flat(), True, SOURCE_DIGEST)  # fmt: skip

    first, second = outputs(), outputs()
    assert len(first) > 2, "no saved tensors: nothing checked"
    held = {t.untyped_storage().data_ptr() for t in first if t.numel()}
    shared = [i for i, t in enumerate(second) if t.numel() and t.untyped_storage().data_ptr() in held]
    assert not shared, f"{backend}: outputs {shared} of a second call share memory with the first call's"


def check_compiled_over_shapes(backend: str, device: str) -> None:
    """Dynamic padding under ``torch.compile(fullgraph=True)``: every batch has its own B and S.
    After the first shape, one recompile with dynamic sizes serves every later shape, and each
    step matches the float64 oracle (a vocabulary-sized head included, which takes the Triton
    backend's chunked path)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    hidden_size = 24
    tasks = [Task("cls", 3, "cross_entropy"), Task("tok", 6, "cross_entropy", level="token"),
             Task("lm", 301, "cross_entropy", level="token", label_smoothing=0.05), Task("reg", 2, "mse"),
             Task("tags", 5, "bce", level="token", pos_weight=(0.5, 1.0, 2.0, 3.0, 0.0)),
             Task("weighted", 150, "cross_entropy", level="token", class_weights=[0.5 + k % 4 for k in range(150)])]  # fmt: skip
    heads = MultiTaskHeads(hidden_size, tasks, backend=backend).to(device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda h, y, m: heads(h, y, attention_mask=m), fullgraph=True, backend=counter)
    for batch, seq_len in [(3, 9), (4, 13), (5, 21), (7, 6)]:
        case = case_for(tasks, (batch, seq_len, hidden_size))
        case.attention_mask = (torch.rand(batch, seq_len) > 0.2).long()
        with torch.no_grad():
            heads.weight.copy_(case.weight)
            heads.bias.copy_(case.bias)
        heads.zero_grad()
        hidden = case.hidden.to(device).requires_grad_(True)
        labels = {name: label.to(device) for name, label in case.labels.items()}
        out = compiled(hidden, labels, case.attention_mask.to(device))
        out.loss.backward()
        grads = {"hidden": hidden.grad, "weight": heads.weight.grad, "bias": heads.bias.grad}
        assert_matches_oracle(case, out, grads, torch.float32, TOLERANCE[torch.float32], f"B={batch} S={seq_len}")
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 4 shapes"
