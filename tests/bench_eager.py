"""Eager bf16 baseline errors for the bf16 criterion (eager's own error + 1e-2)."""

import torch
from oracle import TOLERANCE, Case, assert_matches_oracle, eager_total, grad_error, make_heads, oracle, rel_error

BF16_MARGIN = 1e-2


def eager_errors(case: Case, device: str = "cuda") -> dict[str, float]:
    """Relative errors of per-task ``nn.Linear`` + torch losses under bf16 autocast vs the float64
    oracle: of the loss and of the gradients of hidden, weight, bias (and of pooled and log_vars,
    where the case has them)."""
    ref_total, _, ref_grads = oracle(case, torch.bfloat16)
    heads = make_heads(case, "reference", device)
    h = case.hidden.to(device, copy=True).requires_grad_(True)
    pooled = case.pooled.to(device, copy=True).requires_grad_(True) if case.pooled is not None else None
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        total = eager_total(case, h, pooled, heads.weight, heads.bias, heads.log_vars)
    total.backward()
    errors = {
        "loss": rel_error(total, ref_total),
        "hidden": rel_error(h.grad, ref_grads["hidden"]),
        "weight": rel_error(heads.weight.grad, ref_grads["weight"]),
        "bias": rel_error(heads.bias.grad, ref_grads["bias"]),
    }
    if pooled is not None:
        errors["pooled"] = rel_error(pooled.grad, ref_grads["pooled"])
    if case.log_vars is not None:
        errors["log_vars"] = grad_error("log_vars", heads.log_vars.grad, ref_grads["log_vars"])
    return errors


def assert_within_eager_bf16_error(case: Case, out, grads: dict, device: str = "cuda", what: str = "",
                                   skip: tuple[str, ...] = ()) -> None:  # fmt: skip
    """The bf16 criterion: mtlfast's loss and gradients (``run_heads``' outputs, bf16 computation;
    but those named in ``skip``) no further from the float64 oracle than eager bf16's own plus
    ``BF16_MARGIN``; each task's loss held to the bound of the total."""
    ref_total, ref_losses, ref_grads = oracle(case, torch.bfloat16)
    eager = eager_errors(case, device)
    context = f"{what} {case.describe()}"
    assert set(out.losses) == set(ref_losses), f"{context}: tasks in losses {set(out.losses)} != {set(ref_losses)}"
    bound = eager["loss"] + BF16_MARGIN
    for name, got, ref in [("the total", out.loss, ref_total)] + [(k, out.losses[k], v) for k, v in ref_losses.items()]:
        error = rel_error(got, ref)
        assert error <= bound, f"{context}: loss of {name} rel error {error:.3e}, eager's total {eager['loss']:.3e}"
    for name, eager_error in eager.items():
        if name != "loss" and name not in skip:
            error = grad_error(name, grads.get(name), ref_grads[name])
            assert error <= eager_error + BF16_MARGIN, (
                f"{context}: grad of {name} rel error {error:.3e}, eager's {eager_error:.3e}"
            )


def assert_matches(case: Case, out, grads: dict, dtype: torch.dtype, what: str, device: str = "cpu",
                   skip: tuple[str, ...] = ()) -> None:  # fmt: skip
    """fp32 and fp16 against the oracle within ``TOLERANCE``; bf16 within eager bf16's error plus
    ``BF16_MARGIN`` (eager run on ``device``)."""
    if dtype == torch.bfloat16:
        assert_within_eager_bf16_error(case, out, grads, device, what, skip)
    else:
        assert_matches_oracle(case, out, grads, dtype, TOLERANCE[dtype], what, skip=skip)
