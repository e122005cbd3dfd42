"""What each benchmark provider runs for one training step of the heads.

Every provider gets the same fp32 parameters (one weight and bias per task, as per-task
``nn.Linear`` modules hold them) and the same inputs, runs forward and backward under the
same autocast dtype, and returns the loss. ``eager`` is what users write today.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlfast import MultiTaskHeads, Task
from mtlfast.backends.triton_fused import MAX_BLOCK_C

from .workloads import Workload

StepFn = Callable[[Tensor, dict[str, Tensor]], Tensor]


def make_linears(workload: Workload, device: str, seed: int = 0) -> dict[str, nn.Linear]:
    """fp32 per-task linears, ``nn.Linear`` initialisation, zero bias (as HF classifiers start)."""
    torch.manual_seed(seed)
    linears = {}
    for task in workload.tasks:
        linear = nn.Linear(workload.hidden, task.num_outputs, device=device)
        nn.init.zeros_(linear.bias)
        linears[task.name] = linear
    return linears


def _rows(task: Task, hidden: Tensor) -> Tensor:
    return hidden.reshape(-1, hidden.shape[-1]) if task.level == "token" else hidden[:, 0]


def _eager_task_loss(task: Task, linear: nn.Linear, hidden: Tensor, target: Tensor) -> Tensor:
    logits = linear(_rows(task, hidden))
    if task.loss == "cross_entropy":
        return F.cross_entropy(logits, target.reshape(-1), ignore_index=task.ignore_index)
    target = target.reshape(logits.shape).to(logits.dtype)
    if task.loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)


def eager_loss_fn(workload: Workload, linears: dict[str, nn.Linear]) -> StepFn:
    def loss(hidden, labels):
        return sum(_eager_task_loss(t, linears[t.name], hidden, labels[t.name]) for t in workload.tasks)

    return loss


def _ce_only_provider(workload: Workload, linears, ce_loss: Callable[[Task, nn.Linear, Tensor, Tensor], Tensor]):
    """A fused CE kernel per cross-entropy head, eager for the others."""

    def loss(hidden, labels):
        total = 0
        for task in workload.tasks:
            linear, target = linears[task.name], labels[task.name]
            if task.loss == "cross_entropy":
                total = total + ce_loss(task, linear, _rows(task, hidden), target.reshape(-1))
            else:
                total = total + _eager_task_loss(task, linear, hidden, target)
        return total

    return loss


def _liger(workload, linears, dtype):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    losses = {t.name: LigerFusedLinearCrossEntropyLoss(ignore_index=t.ignore_index, accum_dtype=torch.float32)
              for t in workload.tasks}  # fmt: skip

    def ce(task, linear, rows, target):
        return losses[task.name](linear.weight.to(rows.dtype), rows, target, linear.bias.to(rows.dtype))

    return _ce_only_provider(workload, linears, ce)


def _cce(exact: bool):
    """cut-cross-entropy as it comes (its default gradient filter skips the backward of
    vocabulary tiles whose softmax values are all below bf16 eps / 32), or with
    ``filter_eps=None``, which computes every tile."""
    options = {"filter_eps": None} if exact else {}

    def build(workload, linears, dtype):
        from cut_cross_entropy import linear_cross_entropy

        def ce(task, linear, rows, target):
            # cut-cross-entropy takes no bias; the benchmark's biases start at zero.
            return linear_cross_entropy(rows, linear.weight.to(rows.dtype), target, ignore_index=task.ignore_index,
                                        **options)  # fmt: skip

        return _ce_only_provider(workload, linears, ce)

    return build


def _torch_linear_ce(workload, linears, dtype):
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    options = LinearCrossEntropyOptions()

    def ce(task, linear, rows, target):
        return F.linear_cross_entropy(rows, linear.weight.to(rows.dtype), target, linear_bias=linear.bias.to(rows.dtype),
                                      ignore_index=task.ignore_index, options=options)  # fmt: skip

    return _ce_only_provider(workload, linears, ce)


def _mtlfast(backend: str, **options):
    """``MultiTaskHeads`` on ``backend``, built with ``validate=False`` unless ``options`` say otherwise."""
    options = {"validate": False, **options}

    def build(workload, linears, dtype):
        heads = MultiTaskHeads.from_linears(workload.tasks, linears, backend=backend, **options)
        if options.get("fuse_wgrad_accumulation"):  # held from the start, as Megatron holds it
            heads.weight.main_grad = torch.zeros_like(heads.weight, dtype=torch.float32)

        def loss(hidden, labels):
            return heads(hidden, labels).loss

        loss.parameters = list(heads.parameters())
        return loss

    return build


def _compiled(workload, linears, dtype):
    return torch.compile(eager_loss_fn(workload, linears))


def _needs_cuda(device: str) -> str | None:
    return None if device == "cuda" else "needs a CUDA device"


def _needs_module(module: str, device: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install mtlfast[bench])"
    return _needs_cuda(device)


def _triton_reason(device: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return _needs_cuda(device)


def _linear_ce_reason(device: str) -> str | None:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (torch >= 2.13)"
    return None


def _cuda_backend_reason(device: str) -> str | None:
    return "mtlfast has no 'cuda' backend yet (csrc/ holds only the extension scaffold)"


# Run in this order: eager first (every other loss is checked against it), then mtlfast and
# the peers the speed goals name, so that a run cut short by its time budget (gpu_check.sh)
# loses the rows that matter least. Each row is saved as soon as it is measured.
PROVIDERS: dict[str, tuple[Callable | None, Callable[[str], str | None]]] = {
    "eager": (lambda w, lin, dt: eager_loss_fn(w, lin), lambda d: None),
    "mtlfast-triton": (_mtlfast("triton"), _triton_reason),
    "torch-compile": (_compiled, lambda d: None),
    "cce": (_cce(exact=False), lambda d: _needs_module("cut_cross_entropy", d)),
    "mtlfast-triton-filter": (_mtlfast("triton", grad_filter_eps="auto"), _triton_reason),
    "cce-exact": (_cce(exact=True), lambda d: _needs_module("cut_cross_entropy", d)),
    "liger": (_liger, lambda d: _needs_module("liger_kernel", d)),
    "mtlfast-triton-main-grad": (_mtlfast("triton", fuse_wgrad_accumulation=True), _triton_reason),
    # the module's defaults: label values checked every step, in one launch and one host sync
    "mtlfast-triton-validate": (_mtlfast("triton", validate=True), _triton_reason),
    "torch-linear-ce": (_torch_linear_ce, _linear_ce_reason),
    "mtlfast-torch": (_mtlfast("torch"), lambda d: None),
    "mtlfast-cuda": (None, _cuda_backend_reason),
    "mtlfast-reference": (_mtlfast("reference"), lambda d: None),
}
# Providers whose step syncs with the host by design, and why: a CUDA graph cannot capture it.
HOST_SYNCING = {"mtlfast-triton-validate": "its step syncs with the host (validate=True reads its label checks' verdicts)"}


# Providers that differ from another only on a vocabulary-sized cross-entropy head (mtlfast's
# gradient filter, as cce's against cce-exact): skipped on workloads without one.
VOCAB_HEAD_ONLY = {"mtlfast-triton-filter": "mtlfast-triton"}


def _has_vocab_head(workload: Workload) -> bool:
    return any(t.loss == "cross_entropy" and t.num_outputs > MAX_BLOCK_C for t in workload.tasks)


def skip_reason(provider: str, device: str, workload: Workload | None = None) -> str | None:
    """Why ``provider`` cannot run on ``device`` (for ``workload``, when given), or None."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {sorted(PROVIDERS)}")
    if workload is not None and provider in VOCAB_HEAD_ONLY and not _has_vocab_head(workload):
        return f"no vocabulary-sized head: the same step as {VOCAB_HEAD_ONLY[provider]}"
    return PROVIDERS[provider][1](device)


def autocast_for(device: str, dtype: torch.dtype):
    return torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32 else nullcontext()


def build_forward(provider: str, workload: Workload, device: str, dtype: torch.dtype, seed: int = 0,
                  hidden_dtype: torch.dtype | None = None):  # fmt: skip
    """``(forward, hidden, labels, parameters)``: ``forward()`` runs the provider's loss under
    autocast and returns it. The hidden states are in ``hidden_dtype`` (default: ``dtype``)."""
    make_loss = PROVIDERS[provider][0]
    if make_loss is None:
        raise ValueError(f"provider {provider!r} has no step to build: {skip_reason(provider, device)}")
    linears = make_linears(workload, device, seed)
    loss_fn = make_loss(workload, linears, dtype)
    hidden, labels = workload.make_inputs(device, hidden_dtype or dtype, seed)
    params = getattr(loss_fn, "parameters", None) or [p for lin in linears.values() for p in lin.parameters()]

    def forward() -> Tensor:
        with autocast_for(device, dtype):
            return loss_fn(hidden, labels)

    return forward, hidden, labels, params


def build_step(provider: str, workload: Workload, device: str, dtype: torch.dtype, seed: int = 0,
               hidden_dtype: torch.dtype | None = None):  # fmt: skip
    """``(step, hidden, labels, parameters)``: ``step()`` zeroes the grads, runs forward and backward under
    autocast and returns the detached loss (see :func:`build_forward`)."""
    forward, hidden, labels, params = build_forward(provider, workload, device, dtype, seed, hidden_dtype)

    def step() -> Tensor:
        hidden.grad = None
        for p in params:
            p.grad = None
        loss = forward()
        loss.backward()
        return loss.detach()

    return step, hidden, labels, params
