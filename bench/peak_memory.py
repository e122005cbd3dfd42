"""``python -m mtlfast.bench.peak_memory [--workload memory-32k-cpu]``

The foundation issue's CPU memory check: one training step of the ``torch`` backend
against the ``reference`` backend, each in its own subprocess. Extra peak memory is the
growth of peak RSS (VmHWM) during the step over the RSS just before it; time is the median
step time. Prints both figures and the ratios (goal: memory <= 0.35x, time <= 1.25x).
"""

from __future__ import annotations

import argparse

import torch

from .measure import cpu_subprocess


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mtlfast.bench.peak_memory")
    parser.add_argument("--workload", default="memory-32k-cpu")
    args = parser.parse_args()
    rows = {p: cpu_subprocess(args.workload, p, timed=True) for p in ("mtlfast-reference", "mtlfast-torch")}
    ref, fused = rows["mtlfast-reference"], rows["mtlfast-torch"]
    print(f"workload {args.workload}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, row in rows.items():
        print(f"{name:18s} extra peak RSS {row['peak_mb']:9.1f} MB   step {row['ms']:9.1f} ms")
    print(f"torch / reference: memory {fused['peak_mb'] / ref['peak_mb']:.3f}x, time {fused['ms'] / ref['ms']:.3f}x")


if __name__ == "__main__":
    main()
