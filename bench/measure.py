"""Timing and memory measurement of one provider on one workload."""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time

import torch

from .providers import build_step
from .workloads import WORKLOADS, Workload


def error_status(exc: Exception) -> str:
    """A provider's failure as a one-line status: its type and the first line of its message."""
    text = str(exc)
    return f"error: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def time_ms(step, device: str, quick: bool) -> float:
    """Median milliseconds of one step, after warm-up."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=100 if quick else 300, rep=300 if quick else 1000,
                                             return_mode="median"))  # fmt: skip
    step()
    times: list[float] = []
    budget = 2.0 if quick else 10.0
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_ms(step) -> float:
    """Median device time of one step replayed from a CUDA graph: its kernels without the host's
    share (launches, Python), which a real training step hides behind the encoder's kernels
    while the host runs ahead. A step that cannot be captured (a host sync) raises."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median"))


def gpu_peak_extra_mb(runner) -> float:
    """Growth of ``torch.cuda.max_memory_allocated`` during one step over the memory held before it."""
    runner.release()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cpu_peak_extra_mb_here(runner) -> float:
    """Peak RSS growth during one step over the RSS before it (this process; Linux)."""
    runner.release()
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak (VmHWM) to the current RSS
    runner.step()
    return (_status_kb("VmHWM") - before) / 1024


def cpu_subprocess(workload: str, provider: str, timed: bool = False) -> dict:
    """Peak RSS growth of one step (and, with ``timed``, the median step time) measured in a
    fresh subprocess, so that providers do not share a heap."""
    code = "from mtlfast.bench.measure import _worker; _worker()"
    result = subprocess.run(
        [sys.executable, "-c", code, workload, provider, "timed" if timed else "peak"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"measurement worker failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_peak_extra_mb(workload: str, provider: str) -> float:
    return cpu_subprocess(workload, provider)["peak_mb"]


def _worker() -> None:
    workload, provider, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    runner = StepRunner(provider, WORKLOADS[workload], "cpu", torch.float32)
    runner.step()
    result = {"peak_mb": cpu_peak_extra_mb_here(runner)}
    if mode == "timed":
        result["ms"] = time_ms(runner.step, "cpu", quick=False)
    print(json.dumps(result))


class StepRunner:
    """One provider's training step on one workload, with its inputs and parameters."""

    def __init__(self, provider: str, workload: Workload, device: str, dtype: torch.dtype, seed: int = 0,
                 hidden_dtype: torch.dtype | None = None):  # fmt: skip
        self.step, self.hidden, self.labels, self.parameters = build_step(provider, workload, device, dtype, seed,
                                                                          hidden_dtype)  # fmt: skip

    def release(self) -> None:
        self.hidden.grad = None
        for p in self.parameters:
            p.grad = None


def _copy_ms(n_bytes: int) -> float:
    import triton.testing

    src = torch.randn(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")


def _matmul_ms(n: int) -> float:
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")


def gpu_ceilings() -> dict[str, float]:
    """Measured device-to-device copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    n_bytes, n = 1 << 28, 8192
    ceilings = {
        "copy_bytes_per_s": 2 * n_bytes / (_copy_ms(n_bytes) * 1e-3),
        "bf16_flops_per_s": 2 * n**3 / (_matmul_ms(n) * 1e-3),
    }
    torch.cuda.empty_cache()
    return ceilings
