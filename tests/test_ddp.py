"""DistributedDataParallel over MultiTaskHeads on the CPU: two gloo processes, each with its
own micro-batches, the first of them under ``no_sync()``. DDP's all-reduce of the fused op's
gradients must give every rank the float64 oracle's average over all ranks' micro-batches."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import TOLERANCE, case_for, make_heads, oracle, rel_error

from mtlfast import Task

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

TASKS = [
    Task("cls", 3, "cross_entropy"),
    Task("ner", 5, "cross_entropy", level="token", label_smoothing=0.1),
    Task("score", 1, "mse"),
    Task("topics", 4, "bce"),
]
WORLD = 2
MICRO_BATCHES = 2


def _rank(rank: int, init_file: str, cases: list, backend: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        heads = make_heads(cases[0], backend)
        model = DistributedDataParallel(heads)
        mine = cases[rank * MICRO_BATCHES : (rank + 1) * MICRO_BATCHES]
        hidden_grads = []
        for k, case in enumerate(mine):
            h = case.hidden.clone().requires_grad_(True)
            if k < len(mine) - 1:
                with model.no_sync():
                    model(h, case.labels).loss.backward()
            else:
                model(h, case.labels).loss.backward()
            hidden_grads.append(h.grad)
        torch.save({"weight": heads.weight.grad, "bias": heads.bias.grad, "log_vars": heads.log_vars.grad,
                    "hidden": hidden_grads}, f"{out_dir}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ddp_all_reduces_the_fused_gradients(tmp_path, backend):
    cases = [case_for(TASKS, (3, 7, 24)) for _ in range(WORLD * MICRO_BATCHES)]
    for case in cases:
        case.weighting, case.log_vars = "uncertainty", torch.zeros(len(TASKS))
        case.weight, case.bias = cases[0].weight, cases[0].bias
    del cases[-1].labels["score"]  # a task absent from one micro-batch of one rank
    mp.spawn(_rank, args=(str(tmp_path / "init"), cases, backend, str(tmp_path)), nprocs=WORLD, join=True)

    references = [oracle(case, torch.float32)[2] for case in cases]
    # d/ds_t sums 0.5 - 0.5 exp(-s_t) L_t over the micro-batches holding task t: the exact
    # 0.5s can cancel the loss terms, so log_vars is compared on the loss terms alone.
    halves = torch.tensor([sum(0.5 for case in cases if t.name in case.labels) for t in TASKS]) / WORLD
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("weight", "bias", "log_vars"):
            expected = sum(ref[name] for ref in references) / WORLD
            shift = halves if name == "log_vars" else 0.0
            err = rel_error(got[name] - shift, expected - shift)
            assert err <= TOLERANCE[torch.float32], f"rank {rank}: {name} rel error {err:.2e}"
        for k, grad in enumerate(got["hidden"]):  # not all-reduced: each micro-batch's own
            err = rel_error(grad, references[rank * MICRO_BATCHES + k]["hidden"])
            assert err <= TOLERANCE[torch.float32], f"rank {rank} micro-batch {k}: hidden rel error {err:.2e}"
