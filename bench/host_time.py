"""``TRITON_INTERPRET=1 python -m mtlfast.bench.host_time [PROVIDER ...] [--steps N]``: the host
time of a training step on a machine without a GPU, for the providers (default: eager and
mtlfast-triton); with ``--steps``, only the steps, for counting their instructions (see the
host-time section of bench/results/NOTES.md).

mtlfast-triton's small path launches its kernels through direct launchers. Here each
launcher's kernel is a stand-in that hands back a compiled kernel whose launch does
nothing, so the step runs all of mtlfast's Python and aten host work (checks, plans,
allocations, launch keys, autograd) and none of the kernels' device work; its outputs are
meaningless. Eager runs its real ops on the CPU, at sizes where they cost little:
``bert-base-4task``'s tasks at B=2, S=4, D=16. A GPU host adds each kernel launch's driver
call, to both. TRITON_INTERPRET=1 lets triton load without a GPU; no kernel is interpreted.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from types import SimpleNamespace

import torch

from .providers import build_step
from .workloads import WORKLOADS


class _StandInKernel:
    """Hands back, for any launch, a compiled kernel whose launch only counts itself."""

    direct_launches = 0

    def __init__(self, kernel):
        self.arg_names = kernel.arg_names
        self.compiled = SimpleNamespace(run=self._count, function=None, packed_metadata=None)

    @classmethod
    def _count(cls, *args) -> None:
        cls.direct_launches += 1

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiled


def stub_launches() -> None:
    """Turns the direct launchers on, with stand-in kernels, on the CPU. The label check's flags
    (``validate=True``, written by the loss finalize's launch) are then zeroed by a fill op of
    the CPU, as its programs would write them."""
    from mtlfast.kernels import launcher, loss_finalize, small_heads

    launcher.ENABLED = True
    launcher._current_device = lambda: 0
    for direct in (small_heads._launch_small_heads, small_heads._launch_reduce, loss_finalize._launch):
        direct.kernel = _StandInKernel(direct.kernel)
        direct._current_stream = lambda device: 0
    loss_finalize.loss_finalize = zeroing_check_flags(loss_finalize.loss_finalize)


def zeroing_check_flags(finalize):
    """``loss_finalize`` for a stand-in of its kernel: the label check's flags, which the stand-in
    leaves unwritten, are zeroed after it, as the check's programs write them for good labels."""

    def finalize_then_flag_none(*args, check=None):
        finalize(*args, check=check)
        if check is not None:
            check.flags.zero_()

    return finalize_then_flag_none


def warm_step(provider: str):
    """The provider's step at stand-in sizes, run 50 times."""
    workload = dataclasses.replace(WORKLOADS["bert-base-4task-cpu"], batch=2, seq_len=4, hidden=16)
    step, *_ = build_step(provider, workload, "cpu", torch.bfloat16)
    for _ in range(50):
        step()
    return step


def median_step_us(provider: str, steps: int = 400, rounds: int = 5) -> float:
    step = warm_step(provider)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e6)
    return sorted(times)[rounds // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("providers", nargs="*", default=["eager", "mtlfast-triton"])
    parser.add_argument("--steps", type=int, help="run this many steps after the warm-up and print nothing: for an "
                        "instruction count under valgrind, whose difference between two step counts is the host work "
                        "of those steps, free of the timing noise of a shared machine (with OPENBLAS_NUM_THREADS=1: "
                        "valgrind counts the spinning of OpenBLAS's idle worker threads too)")  # fmt: skip
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run with TRITON_INTERPRET=1 (set before triton is imported)")
    torch.set_num_threads(1)
    stub_launches()
    for provider in args.providers:
        if args.steps is not None:
            step = warm_step(provider)
            # A full collection walks every object the imports made (~57M instructions with
            # torch 2.11: 140K a step over 400 steps), and whether one falls inside the counted
            # steps depends on the allocations before them: frozen, those objects are left out.
            gc.collect()
            gc.freeze()
            for _ in range(args.steps):
                step()
        else:
            print(f"{provider}: {median_step_us(provider):.0f} us per step (median of 5 rounds of 400)")


if __name__ == "__main__":
    main()
