"""``python -m mtlfast.bench.profile_step WORKLOAD PROVIDER [ROWS] [--host]``: the device kernels
of one training step (torch.profiler), with their total time, and the step's wall time: to
complete, and to issue on the host. With ``--host``, where the host's time goes instead: the
Python functions of 50 steps by their own time (cProfile)."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .measure import StepRunner
from .workloads import WORKLOADS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mtlfast.bench.profile_step")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("provider")
    parser.add_argument("rows", nargs="?", type=int, default=15, help="rows of the table")
    parser.add_argument("--host", action="store_true", help="profile the host's Python (cProfile) instead")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
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


if __name__ == "__main__":
    main()
