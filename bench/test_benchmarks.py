"""pytest-benchmark comparisons: every provider on every workload, grouped by workload.

    pytest bench/test_benchmarks.py --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

CPU hosts get the ``-cpu`` workloads, CUDA hosts the full ones (bf16 autocast).
"""

import pytest
import torch
from mtlfast.bench.measure import StepRunner
from mtlfast.bench.providers import PROVIDERS, skip_reason
from mtlfast.bench.workloads import CPU_WORKLOADS, GPU_WORKLOADS, WORKLOADS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
NAMES = GPU_WORKLOADS if DEVICE == "cuda" else CPU_WORKLOADS


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "mtlfast-reference"])
@pytest.mark.parametrize("workload", NAMES)
def test_training_step(benchmark, workload, provider):
    reason = skip_reason(provider, DEVICE, WORKLOADS[workload])
    if reason:
        pytest.skip(reason)
    runner = StepRunner(provider, WORKLOADS[workload], DEVICE, DTYPE)
    benchmark.group = workload
    benchmark.extra_info.update(provider=provider, device=DEVICE, tokens=WORKLOADS[workload].tokens)

    def step():
        runner.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
