"""``python -m mtlfast.bench.profile_step WORKLOAD PROVIDER [ROWS] [--host | --phases]``: the device
kernels of one training step (torch.profiler), with their total time, and the step's wall
time: to complete, and to issue on the host. With ``--host``, where the host's time goes
instead: the Python functions of 50 steps by their own time (cProfile). With ``--phases``,
the host's time to issue the step's forward and its backward, beside what a few building
blocks cost on this host: an allocation, an autograd round trip, a small Triton launch."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .measure import StepRunner
from .providers import build_forward
from .workloads import WORKLOADS, Workload


def _medians_us(parts: dict, calls: int, sync: bool) -> dict[str, float]:
    """Median host time of each of ``parts`` (name -> function, called in order, ``calls``
    times) in microseconds, the device drained every 16 rounds (outside the timings) so that
    the launch queue never fills."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    for i in range(calls):
        for name, part in parts.items():
            start = time.perf_counter()
            part()
            times[name].append(time.perf_counter() - start)
        if sync and i % 16 == 15:
            torch.cuda.synchronize()
    return {f"{name}_us": sorted(t)[len(t) // 2] * 1e6 for name, t in times.items()}


class _PassThrough(torch.autograd.Function):
    """An autograd node that does no work: the engine's own round trip."""

    @staticmethod
    def forward(ctx, x, out, grad_in):
        ctx.grad_in = grad_in
        return out

    @staticmethod
    def backward(ctx, grad):
        return ctx.grad_in, None, None


def host_phases(provider: str, workload: Workload, device: str, dtype: torch.dtype, steps: int = 200) -> dict:
    """Median host microseconds to issue one step's forward (under autocast) and its backward,
    and reference costs on this host (see the module's docstring)."""
    cuda = device == "cuda"
    run_forward, hidden, _, params = build_forward(provider, workload, device, dtype)
    losses: list[torch.Tensor] = []

    def backward():
        losses.pop().backward()
        hidden.grad = None
        for p in params:
            p.grad = None

    phases = {"forward": lambda: losses.append(run_forward()), "backward": backward}
    _medians_us(phases, 3, False)  # warm-up
    result = _medians_us(phases, steps, cuda)

    x = torch.zeros(1, device=device, requires_grad=True)
    out, grad_in, seed = torch.zeros((), device=device), torch.zeros(1, device=device), torch.ones((), device=device)

    def round_trip():
        _PassThrough.apply(x, out, grad_in).backward(seed)
        x.grad = None

    result |= _medians_us({"empty": lambda: torch.empty((4096, 768), device=device, dtype=dtype)}, 1000, cuda)
    result |= _medians_us({"autograd_round_trip": round_trip}, 1000, cuda)
    if cuda:
        result.update(_launch_costs(device))
    return result


def _launch_costs(device: str) -> dict:
    """Host time of one loss-finalize launch, direct and through triton's ``JITFunction.run``."""
    from mtlfast.kernels import launcher, loss_finalize

    buffers = [torch.zeros(4, device=device) for _ in range(7)]
    total = torch.zeros((), device=device)

    def launch():
        loss_finalize.loss_finalize(*buffers, total)

    costs = {}
    enabled = launcher.ENABLED
    try:
        for name, on in (("launch_direct_us", True), ("launch_triton_us", False)):
            launcher.ENABLED = on and enabled
            launch()
            costs[name] = _medians_us({"launch": launch}, 1000, True)["launch_us"]
    finally:
        launcher.ENABLED = enabled
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mtlfast.bench.profile_step")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("provider")
    parser.add_argument("rows", nargs="?", type=int, default=15, help="rows of the table")
    parser.add_argument("--host", action="store_true", help="profile the host's Python (cProfile) instead")
    parser.add_argument("--phases", action="store_true", help="the host's time by phase and reference costs instead")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.phases:
        costs = host_phases(args.provider, workload, device, dtype)
        print(f"{workload.name} / {args.provider} host us (medians): " +
              ", ".join(f"{name.removesuffix('_us')} {value:.1f}" for name, value in costs.items()))  # fmt: skip
        return
    runner = StepRunner(args.provider, workload, device, dtype)
    for _ in range(3):
        runner.step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        runner.step()
    issued = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    # Issue time near the completion time means the host is the bottleneck; far below it, the GPU.
    print(f"{workload.name} / {args.provider}: {(done - start) * 100:.3f} ms per step to complete, "
          f"{(issued - start) * 100:.3f} ms to issue (host clock, 10 steps)")  # fmt: skip
    if args.host:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            runner.step()
        profiler.disable()
        if device == "cuda":
            torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    if args.provider.startswith("mtlfast-triton"):
        from mtlfast.kernels import small_heads

        for direction, block_c, rows, shape in small_heads.tuned_shapes():
            print(f"small_heads_kernel {direction}, BLOCK_C {block_c}, rows up to {rows}: "
                  f"(BLOCK_M, BLOCK_K, num_warps, num_stages[, BLOCK_K_LOGITS[, 1: PREFETCH_DW]]) = {shape}")  # fmt: skip


if __name__ == "__main__":
    main()
