"""Eager bf16 baseline errors for the bf16 criterion (eager's own error + 1e-2)."""

import torch
from oracle import Case, make_heads, oracle, rel_error


def eager_errors(case: Case) -> dict[str, float]:
    """Relative errors of per-task ``nn.Linear`` + torch losses under bf16 autocast vs the float64 oracle."""
    import torch.nn.functional as F

    ref_total, _, ref_grads = oracle(case, torch.bfloat16)
    heads = make_heads(case, "reference", "cuda")
    linears = heads.to_linears()
    h = case.hidden.cuda().requires_grad_(True)
    pooled = case.pooled.cuda() if case.pooled is not None else None
    total = 0
    index = {t.name: i for i, t in enumerate(case.tasks)}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for task in case.tasks:
            if task.name not in case.labels:
                continue
            rows = h.reshape(-1, h.shape[-1]) if task.level == "token" else (
                pooled if pooled is not None else (h[:, 0] if h.dim() == 3 else h))  # fmt: skip
            logits = linears[task.name](rows)
            y = case.labels[task.name].cuda()
            n = rows.shape[0]
            keep = torch.ones(n, dtype=torch.bool, device="cuda")
            if task.level == "token" and case.attention_mask is not None:
                keep &= case.attention_mask.cuda().reshape(-1) != 0
            if task.loss == "cross_entropy":
                y = torch.where(keep, y.reshape(n), task.ignore_index)
                loss = F.cross_entropy(logits.float(), y, ignore_index=task.ignore_index,
                                       label_smoothing=task.label_smoothing, reduction="sum")  # fmt: skip
                count = (y != task.ignore_index).sum()
            else:
                y = y.reshape(n, task.num_outputs)
                keep &= ~torch.isnan(y).any(dim=1)
                y = torch.where(keep[:, None], y, 0.0)
                fn = F.binary_cross_entropy_with_logits if task.loss == "bce" else F.mse_loss
                loss = (fn(logits.float(), y, reduction="none") * keep[:, None]).sum()
                count = keep.sum() * task.num_outputs
            if case.num_items and task.name in case.num_items:
                count = torch.as_tensor(case.num_items[task.name], device="cuda")
            loss = torch.where(count > 0, loss / count.clamp_min(1), 0.0)
            if case.weighting == "uncertainty":
                s = heads.log_vars[index[task.name]]
                total = total + 0.5 * torch.exp(-s) * loss + 0.5 * s
            else:
                total = total + task.weight * loss
    total.backward()
    weight = torch.cat([linears[t.name].weight.grad if linears[t.name].weight.grad is not None
                        else torch.zeros_like(linears[t.name].weight) for t in case.tasks])  # fmt: skip
    bias = torch.cat([linears[t.name].bias.grad if linears[t.name].bias.grad is not None
                      else torch.zeros_like(linears[t.name].bias) for t in case.tasks])  # fmt: skip
    hidden_grad = h.grad if h.grad is not None else torch.zeros_like(h)
    return {
        "loss": rel_error(total, ref_total),
        "hidden": rel_error(hidden_grad, ref_grads["hidden"]),
        "weight": rel_error(weight, ref_grads["weight"]),
        "bias": rel_error(bias, ref_grads["bias"]),
    }
