"""``python -m mtlfast.bench.warm [--device cuda] [--workloads ...] [--providers ...]``: one
training step of each provider on each workload, untimed, so that their kernels are compiled
into the on-disk caches (Triton's, inductor's) before a benchmark times them. gpu_check.sh
runs it beside the tests with ``MTLFAST_AUTOTUNE_CACHE=0``: its autotuning picks are not
kept, so the benchmark still tunes on an idle GPU, but its candidates compile from the cache."""

from __future__ import annotations

import argparse
import gc
import time

import torch

from .measure import StepRunner, error_status
from .providers import PROVIDERS, skip_reason
from .workloads import GPU_WORKLOADS, WORKLOADS

# the providers whose first step compiles for long
COMPILING = ["mtlfast-triton", "torch-compile", "cce", "mtlfast-triton-filter", "cce-exact", "liger"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtlfast.bench.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", default=list(GPU_WORKLOADS), choices=sorted(WORKLOADS))
    parser.add_argument("--providers", nargs="+", default=COMPILING, choices=list(PROVIDERS))
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    runner: StepRunner | None = None
    for name in args.workloads:
        for provider in args.providers:
            reason = skip_reason(provider, args.device, WORKLOADS[name])
            if reason:
                print(f"[warm {name}] {provider}: skipped: {reason}", flush=True)
                continue
            start = time.perf_counter()
            try:
                runner = StepRunner(provider, WORKLOADS[name], args.device, dtype)
                runner.step()
                outcome = "ok"
            except Exception as exc:  # the benchmark reports failures; warming only tries
                outcome = error_status(exc)
            finally:
                runner = None
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            print(f"[warm {name}] {provider}: {time.perf_counter() - start:.1f} s {outcome}", flush=True)


if __name__ == "__main__":
    main()
