"""Eager bf16 baseline errors for the bf16 criterion (eager's own error + 1e-2)."""

import torch
from oracle import Case, eager_total, make_heads, oracle, rel_error


def eager_errors(case: Case) -> dict[str, float]:
    """Relative errors of per-task ``nn.Linear`` + torch losses under bf16 autocast vs the float64 oracle."""
    ref_total, _, ref_grads = oracle(case, torch.bfloat16)
    heads = make_heads(case, "reference", "cuda")
    h = case.hidden.cuda().requires_grad_(True)
    pooled = case.pooled.cuda() if case.pooled is not None else None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total = eager_total(case, h, pooled, heads.weight, heads.bias, heads.log_vars)
    total.backward()
    return {
        "loss": rel_error(total, ref_total),
        "hidden": rel_error(h.grad, ref_grads["hidden"]),
        "weight": rel_error(heads.weight.grad, ref_grads["weight"]),
        "bias": rel_error(heads.bias.grad, ref_grads["bias"]),
    }
