"""``python -m mtlfast.bench.filter_tiles [WORKLOAD] [--rows N] [--eps E]``

The share of a vocabulary head's 64 x 256 logit-gradient tiles that the triton backend's
gradient filter keeps (``grad_filter_eps``; default ``"auto"`` in bf16, 2**-12) on a
benchmark workload's inputs (seed 0, ``nn.Linear`` initialisation), over its first ``N``
token rows and with the backend's column chunks. It runs on the CPU, in fp32 products of
bf16-rounded inputs: the backward's ``dH``/``dW`` GEMM work scales with this share. Also what
the filter costs in accuracy there: the norm of the head's ``dH`` that the dropped tiles
carry, over the exact ``dH``'s.
"""

from __future__ import annotations

import argparse

import torch
from mtlfast.kernels import filtered_matmul

from mtlfast.backends import triton_fused

from .providers import make_linears
from .workloads import WORKLOADS

COLUMN_BLOCK = 16384


def kept_share(workload_name: str, rows: int, eps: float) -> dict:
    workload = WORKLOADS[workload_name]
    task = next(t for t in workload.tasks if t.loss == "cross_entropy" and t.num_outputs > triton_fused.MAX_BLOCK_C)
    linear = make_linears(workload, "cpu")[task.name]
    hidden, labels = workload.make_inputs("cpu", torch.bfloat16)
    h = hidden.detach().reshape(-1, workload.hidden)[:rows].float()
    target = labels[task.name].reshape(-1)[:rows]
    weight = linear.weight.detach().to(torch.bfloat16).float()
    bias = linear.bias.detach().float()
    classes = task.num_outputs
    logits = torch.cat([h @ weight[c : c + COLUMN_BLOCK].T + bias[c : c + COLUMN_BLOCK]
                        for c in range(0, classes, COLUMN_BLOCK)], dim=1)  # fmt: skip
    grad = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).exp_()
    counted = target >= 0
    grad[counted, target[counted]] -= 1.0
    grad[~counted] = 0.0
    _, chunk_cols = triton_fused._large_chunk_shape(workload.tokens, classes, 0)
    tile_m, tile_v = filtered_matmul.TILE_M, filtered_matmul.TILE_V
    dropped = torch.empty_like(grad)
    kept = total = 0
    for c0 in range(0, classes, chunk_cols):
        chunk = grad[:, c0 : c0 + chunk_cols]
        # padding, and the rows that do not count, stay below any threshold: they mark no tile
        magnitude = torch.full((-(-rows // tile_m) * tile_m, -(-chunk.shape[1] // tile_v) * tile_v), -1.0)
        magnitude[:rows, : chunk.shape[1]] = torch.where(counted[:, None], chunk.abs(), -1.0)
        maxima = magnitude.reshape(magnitude.shape[0] // tile_m, tile_m, -1, tile_v).amax(dim=(1, 3))
        marked = maxima >= eps
        kept, total = kept + int(marked.sum()), total + marked.numel()
        keep = marked.repeat_interleave(tile_m, 0).repeat_interleave(tile_v, 1)[:rows, : chunk.shape[1]]
        dropped[:, c0 : c0 + chunk_cols] = torch.where(keep, 0.0, chunk)
    dh_dropped_share = (dropped @ weight).norm() / (grad @ weight).norm()
    return {"workload": workload_name, "task": task.name, "rows": rows, "eps": eps, "tiles_kept": kept,
            "tiles": total, "share_kept": kept / total, "dh_dropped_share": float(dh_dropped_share)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("workload", nargs="?", default="big-head-128k",
                        choices=[n for n, w in WORKLOADS.items() if any(t.num_outputs > 128 for t in w.tasks)])
    parser.add_argument("--rows", type=int, default=1024, help="token rows to sample (a multiple of 64)")
    parser.add_argument("--eps", type=float, default=torch.finfo(torch.bfloat16).eps / 32)
    args = parser.parse_args(argv)
    result = kept_share(args.workload, args.rows, args.eps)
    print(result)
    return result


if __name__ == "__main__":
    main()
