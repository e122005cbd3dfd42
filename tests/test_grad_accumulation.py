"""Mixed-precision gradient accumulation: fp32 parameters, bf16/fp16 compute, K=16
micro-batches; the accumulated head gradients stay within 1e-5 of float64."""

import pytest
import torch
import torch.nn.functional as F
from oracle import case_for, rel_error

from mtlfast import MultiTaskHeads, Task

TASKS = [Task("cls", 4, "cross_entropy"), Task("tags", 7, "cross_entropy", level="token"), Task("multi", 5, "bce")]
K = 16


def _oracle_grads(cases, dtype):
    w = cases[0].weight.to(dtype).double().requires_grad_(True)
    b = cases[0].bias.double().requires_grad_(True)
    for case in cases:
        h = case.hidden.to(dtype).double()
        loss = (
            F.cross_entropy(h[:, 0] @ w[:4].T + b[:4], case.labels["cls"])
            + F.cross_entropy((h @ w[4:11].T + b[4:11]).reshape(-1, 7), case.labels["tags"].reshape(-1))
            + F.binary_cross_entropy_with_logits(h[:, 0] @ w[11:].T + b[11:], case.labels["multi"].double())
        )
        (loss / K).backward()
    return w.grad, b.grad


def _eager_grads(cases, dtype):
    heads = MultiTaskHeads(cases[0].hidden.shape[-1], TASKS)
    with torch.no_grad():
        heads.weight.copy_(cases[0].weight)
        heads.bias.copy_(cases[0].bias)
    linears = heads.to_linears()
    for case in cases:
        with torch.autocast("cpu", dtype=dtype):
            h = case.hidden
            loss = (
                F.cross_entropy(linears["cls"](h[:, 0]), case.labels["cls"])
                + F.cross_entropy(linears["tags"](h).reshape(-1, 7), case.labels["tags"].reshape(-1))
                + F.binary_cross_entropy_with_logits(linears["multi"](h[:, 0]), case.labels["multi"])
            )
        (loss / K).backward()
    return (torch.cat([linears[t.name].weight.grad for t in TASKS]), torch.cat([linears[t.name].bias.grad for t in TASKS]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_k16_accumulation_within_1e5_of_float64(backend, dtype, capsys):
    first = case_for(TASKS, (4, 13, 40), ignore_rate=0.0, nan_rate=0.0)
    cases = [first] + [case_for(TASKS, (4, 13, 40), ignore_rate=0.0, nan_rate=0.0) for _ in range(K - 1)]
    for case in cases[1:]:
        case.weight, case.bias = first.weight, first.bias
    heads = MultiTaskHeads(40, TASKS, backend=backend)
    with torch.no_grad():
        heads.weight.copy_(first.weight)
        heads.bias.copy_(first.bias)
    for case in cases:
        with torch.autocast("cpu", dtype=dtype):
            out = heads(case.hidden, case.labels)
        (out.loss / K).backward()
    assert heads.weight.grad.dtype == torch.float32
    ref_w, ref_b = _oracle_grads(cases, dtype)
    err_w, err_b = rel_error(heads.weight.grad, ref_w), rel_error(heads.bias.grad, ref_b)
    eager_w, eager_b = (rel_error(g, r) for g, r in zip(_eager_grads(cases, dtype), (ref_w, ref_b)))
    with capsys.disabled():
        print(f"\n[K=16 {backend} {dtype}] mtlfast dW {err_w:.1e} db {err_b:.1e}; eager autocast dW {eager_w:.1e} "
              f"db {eager_b:.1e}")  # fmt: skip
    assert err_w <= 1e-5 and err_b <= 1e-5


def test_grad_scaler_round_trip():
    """torch.amp.GradScaler: scaled backward, unscale_, then the same fp32 gradients as unscaled."""
    case = case_for(TASKS, (3, 9, 24), ignore_rate=0.0, nan_rate=0.0)
    grads = []
    for use_scaler in (False, True):
        heads = MultiTaskHeads(24, TASKS, backend="torch")
        with torch.no_grad():
            heads.weight.copy_(case.weight)
            heads.bias.copy_(case.bias)
        optimizer = torch.optim.SGD(heads.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = heads(case.hidden, case.labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads.append(heads.weight.grad.clone())
        scaler.step(optimizer)
        scaler.update()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0)
