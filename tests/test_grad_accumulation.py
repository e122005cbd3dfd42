"""Mixed-precision gradient accumulation: fp32 parameters, bf16/fp16 compute, K=16
micro-batches; the accumulated head gradients stay within 1e-5 of float64. With 16-bit
parameters, the same through fp32 ``main_grad`` buffers (``fuse_wgrad_accumulation``)."""

import pytest
import torch
import torch.nn.functional as F
from oracle import case_for, check_main_grad_accumulation, rel_error

from mtlfast import MultiTaskHeads, Task, multitask_loss

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


def check_k16_accumulation(backend: str, dtype: torch.dtype, device: str = "cpu", shape: tuple[int, int, int] = (4, 13, 40),
                           ) -> tuple[list, float, float]:  # fmt: skip
    """K fresh micro-batches through fp32 heads under autocast to ``dtype``, each loss divided by
    K, gradients accumulated by autograd: the head gradients within 1e-5 of float64. Returns the
    cases and the errors of dW and db."""
    cases = [case_for(TASKS, shape, ignore_rate=0.0, nan_rate=0.0) for _ in range(K)]
    for case in cases[1:]:
        case.weight, case.bias = cases[0].weight, cases[0].bias
    heads = MultiTaskHeads(shape[-1], TASKS, backend=backend).to(device)
    with torch.no_grad():
        heads.weight.copy_(cases[0].weight)
        heads.bias.copy_(cases[0].bias)
    for case in cases:
        with torch.autocast(torch.device(device).type, dtype=dtype):
            out = heads(case.hidden.to(device), {k: v.to(device) for k, v in case.labels.items()})
        (out.loss / K).backward()
    assert heads.weight.grad.dtype == torch.float32
    ref_w, ref_b = _oracle_grads(cases, dtype)
    err_w, err_b = rel_error(heads.weight.grad, ref_w), rel_error(heads.bias.grad, ref_b)
    assert err_w <= 1e-5 and err_b <= 1e-5, f"{backend}/{dtype}: dW {err_w:.1e}, db {err_b:.1e}"
    return cases, err_w, err_b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_k16_accumulation_within_1e5_of_float64(backend, dtype, capsys):
    cases, err_w, err_b = check_k16_accumulation(backend, dtype)
    ref_w, ref_b = _oracle_grads(cases, dtype)
    eager_w, eager_b = (rel_error(g, r) for g, r in zip(_eager_grads(cases, dtype), (ref_w, ref_b)))
    with capsys.disabled():
        print(f"\n[K=16 {backend} {dtype}] mtlfast dW {err_w:.1e} db {err_b:.1e}; eager autocast dW {eager_w:.1e} "
              f"db {eager_b:.1e}")  # fmt: skip


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_16bit_parameters_accumulate_into_fp32_main_grad(backend, dtype, capsys):
    fused, plain = check_main_grad_accumulation(TASKS, (4, 13, 40), backend, dtype, K)
    with capsys.disabled():
        print(f"\n[K=16 {backend} {dtype} parameters] main_grad dW {fused:.1e}; .grad in {dtype} {plain:.1e}")


def _heads_with_main_grad(**kwargs):
    heads = MultiTaskHeads(24, TASKS, backend="torch", fuse_wgrad_accumulation=True, **kwargs).bfloat16()
    heads.weight.main_grad = torch.zeros_like(heads.weight, dtype=torch.float32)
    case = case_for(TASKS, (3, 9, 24))
    return heads, case.hidden.bfloat16(), case.labels


def test_main_grad_leaves_a_bias_without_one_to_autograd():
    heads, hidden, labels = _heads_with_main_grad()
    heads(hidden, labels).loss.backward()
    assert heads.weight.grad is None and heads.weight.main_grad.abs().sum() > 0
    assert heads.bias.grad is not None and heads.bias.grad.dtype == torch.bfloat16 and heads.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("zero_out_wgrad", [False, True])
def test_main_grad_megatron_stand_in_gradient(zero_out_wgrad):
    """A weight carrying Megatron's ``grad_added_to_main_grad`` flag gets it set and a
    stand-in gradient, so that hooks on its gradient accumulator fire (zeros with
    ``zero_out_wgrad``, which Megatron then adds to main_grad)."""
    heads, hidden, labels = _heads_with_main_grad()
    heads.weight.grad_added_to_main_grad = False
    heads.weight.zero_out_wgrad = zero_out_wgrad
    fired = []
    heads.weight.register_post_accumulate_grad_hook(lambda param: fired.append(param.grad.shape))
    heads(hidden, labels).loss.backward()
    assert heads.weight.grad_added_to_main_grad and fired == [heads.weight.shape]
    assert heads.weight.main_grad.abs().sum() > 0
    if zero_out_wgrad:
        assert not heads.weight.grad.any()


def test_main_grad_untouched_for_a_frozen_weight():
    heads, hidden, labels = _heads_with_main_grad()
    heads.weight.requires_grad_(False)
    hidden.requires_grad_(True)
    heads(hidden, labels).loss.backward()
    assert hidden.grad is not None and not heads.weight.main_grad.any() and heads.weight.grad is None


def test_main_grad_not_needed_without_gradients():
    """Evaluation under no_grad needs no main_grad buffer."""
    heads, hidden, labels = _heads_with_main_grad()
    del heads.weight.main_grad
    with torch.no_grad():
        assert torch.isfinite(heads(hidden, labels).loss)


def test_main_grad_through_the_functional_call_without_bias():
    heads, hidden, labels = _heads_with_main_grad()
    weight = heads.weight
    out = multitask_loss(hidden, weight, None, TASKS, labels, fuse_wgrad_accumulation=True)
    out.loss.backward()
    assert weight.grad is None and weight.main_grad.abs().sum() > 0


@pytest.mark.parametrize("main_grad, error, match", [
    (None, ValueError, "needs weight.main_grad"),
    (lambda w: torch.zeros_like(w, dtype=torch.bfloat16), TypeError, "weight.main_grad must be an fp32 tensor"),
    (lambda w: torch.zeros(w.shape[0], w.shape[1] + 1), ValueError, "weight.main_grad must have the weight's shape"),
], ids=["missing", "bf16", "shape"])  # fmt: skip
def test_main_grad_bad_buffer(main_grad, error, match):
    heads, hidden, labels = _heads_with_main_grad()
    if main_grad is None:
        del heads.weight.main_grad
    else:
        heads.weight.main_grad = main_grad(heads.weight)
    with pytest.raises(error, match=match):
        heads(hidden, labels)


def test_main_grad_refused_under_compile():
    """Refused while tracing. torch 2.6's dynamo reports a raise in traced code as an "Observed
    exception", without its message; 2.11 and 2.14 pass the message on (versions between are
    not checked)."""
    heads, hidden, labels = _heads_with_main_grad()
    compiled = torch.compile(lambda h: heads(h, labels).loss, backend="eager", fullgraph=True)
    refused = "fuse_wgrad_accumulation=True is not supported under torch.compile"
    torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    with pytest.raises(Exception, match=refused if torch_version >= (2, 11) else f"{refused}|Observed exception"):
        compiled(hidden)
