"""``python -m mtlfast.bench.profile_step WORKLOAD PROVIDER [ROWS]``: the device kernels of one
training step (torch.profiler), with their total time, and the step's wall time: to
complete, and to issue on the host."""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .measure import StepRunner
from .workloads import WORKLOADS


def main() -> None:
    workload, provider = WORKLOADS[sys.argv[1]], sys.argv[2]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    runner = StepRunner(provider, workload, device, dtype)
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
    print(f"{workload.name} / {provider}: {(done - start) * 100:.3f} ms per step to complete, "
          f"{(issued - start) * 100:.3f} ms to issue (host clock, 10 steps)")  # fmt: skip
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=int(sys.argv[3]) if len(sys.argv) > 3 else 15))


if __name__ == "__main__":
    main()
