"""``python -m mtlfast.bench [--device cpu|cuda] [--quick] [--workloads ...] [--providers ...] [--fp32-hidden] --out DIR``

Times forward+backward of every provider on every workload, checks each provider's loss
against eager first, and writes ``DIR/results.json``, ``DIR/results.md`` and
``DIR/results.png``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch

from . import measure, report
from .measure import StepRunner, cpu_peak_extra_mb, error_status, gpu_ceilings, gpu_peak_extra_mb, time_ms
from .providers import HOST_SYNCING, PROVIDERS, skip_reason
from .workloads import CPU_WORKLOADS, GPU_WORKLOADS, WORKLOADS

LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# the reference backend is the tests' oracle, not a contender; ask for it by name
DEFAULT_PROVIDERS = [p for p in PROVIDERS if p != "mtlfast-reference"]


def _commit() -> str:
    """``MTLFAST_COMMIT`` if set (a copy of the tree without .git), else git's HEAD."""
    if os.environ.get("MTLFAST_COMMIT"):
        return os.environ["MTLFAST_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


PEERS = ("liger-kernel", "cut-cross-entropy", "transformers")


def peer_versions() -> dict[str, str | None]:
    """The installed version of each peer distribution the providers compare with (None: absent)."""
    versions: dict[str, str | None] = {}
    for name in PEERS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_one(workload, provider: str, device: str, dtype: torch.dtype, quick: bool, eager_loss, ceilings,
            hidden_dtype: torch.dtype | None = None) -> dict:  # fmt: skip
    suffix = "" if hidden_dtype in (None, dtype) else f" ({str(hidden_dtype).replace('torch.', '')} hidden)"
    row = {"workload": workload.name + suffix, "provider": provider}
    reason = skip_reason(provider, device, workload)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    try:
        runner = StepRunner(provider, workload, device, dtype, hidden_dtype=hidden_dtype)
        loss = runner.step().float().item()
        row["loss"] = loss
        if eager_loss is not None:
            rel = abs(loss - eager_loss) / max(abs(eager_loss), 1e-12)
            row["loss_rel_diff_vs_eager"] = rel
            if not rel <= LOSS_TOLERANCE[dtype]:
                return {**row, "status": f"error: loss {loss:.6g} differs from eager {eager_loss:.6g}"}
        ms = time_ms(runner.step, device, quick)
        peak = gpu_peak_extra_mb(runner) if device == "cuda" else None
        del runner
        if device == "cpu":
            peak = cpu_peak_extra_mb(workload.name, provider)
        row.update(ms=ms, peak_mb=peak, tokens_per_s=workload.tokens / (ms * 1e-3), status="ok")
        if ceilings:
            floor = max(workload.min_bytes() / ceilings["copy_bytes_per_s"], workload.flops() / ceilings["bf16_flops_per_s"])
            row.update(floor_ms=floor * 1e3, floor_ratio=ms / (floor * 1e3))
        return row
    except Exception as exc:  # a provider failing is a result, not the end of the run
        return {**row, "status": error_status(exc)}
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def add_device_time(row: dict, workload, device: str, dtype: torch.dtype, hidden_dtype: torch.dtype | None = None) -> None:
    """Adds ``device_ms`` (the step's kernels alone, replayed from a CUDA graph) to a measured
    row, or ``device_status`` saying why there is none. Run after every provider's wall-clock
    measurement of the workload: a failed capture cannot disturb those."""
    try:
        runner = StepRunner(row["provider"], workload, device, dtype, hidden_dtype=hidden_dtype)
        row["device_ms"] = measure.device_ms(runner.step)
    except Exception as exc:
        row["device_status"] = error_status(exc)
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


# The kernels-alone comparison the goals need first (eager, mtlfast-triton, torch.compile), then
# mtlfast's other steps, then the peers': a failed capture leaves the rows after it unmeasured.
_CAPTURED_FIRST = ("eager", "mtlfast-triton", "torch-compile")


def _capture_order(row: dict) -> int:
    provider = row["provider"]
    if provider in _CAPTURED_FIRST:
        return _CAPTURED_FIRST.index(provider)
    return len(_CAPTURED_FIRST) + (0 if provider.startswith("mtlfast-") else 1)


def device_time_pass(rows: list[dict], workload, device: str, dtype: torch.dtype,
                     hidden_dtype: torch.dtype | None = None) -> Iterator[dict]:  # fmt: skip
    """Runs :func:`add_device_time` on the measured rows, yielding each: eager, mtlfast-triton and
    torch.compile, then mtlfast's other steps and the peers'; a step that syncs with the host is
    not captured. A capture that fails can leave CUDA graph capture unusable for the rest of the
    process (the RNG's graph state stays behind), so the rows after a failure get a status naming
    it instead of errors of their own."""
    failed = None
    for row in sorted((r for r in rows if r["status"] == "ok"), key=_capture_order):
        if row["provider"] in HOST_SYNCING:  # a capture would fail, and leave capture broken for the rows after it
            row["device_status"] = f"not measured: {HOST_SYNCING[row['provider']]}, which a CUDA graph cannot capture"
        elif failed is None:
            add_device_time(row, workload, device, dtype, hidden_dtype)
            if "device_status" in row:
                failed = row["provider"]
        else:
            row["device_status"] = f"not measured: {failed}'s capture failed before it in this process"
        yield row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mtlfast.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU variants of the workloads and shorter timing")
    parser.add_argument("--workloads", nargs="+", help=f"default: all for the device; known: {sorted(WORKLOADS)}")
    parser.add_argument("--providers", nargs="+", default=DEFAULT_PROVIDERS, help=f"known: {list(PROVIDERS)}")
    parser.add_argument("--fp32-hidden", action="store_true",
                        help="hidden states in fp32 under the autocast dtype, as a BERT's final LayerNorm gives them "
                             "(default: in the autocast dtype); the workloads get a suffix")  # fmt: skip
    parser.add_argument("--no-device-time", action="store_true",
                        help="on a GPU, skip the second pass that times each step's kernels alone (CUDA graph replay)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    names = args.workloads or list(CPU_WORKLOADS if args.device == "cpu" or args.quick and args.device == "cpu"
                                   else GPU_WORKLOADS)  # fmt: skip
    unknown = [n for n in names if n not in WORKLOADS] + [p for p in args.providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown workloads/providers: {unknown}")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hidden_dtype = torch.float32 if args.fp32_hidden else None
    providers = ["eager"] + [p for p in args.providers if p != "eager"]
    ceilings = gpu_ceilings() if args.device == "cuda" else None
    doc: dict[str, Any] = {
        "device": _device_name(args.device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peers": peer_versions(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m mtlfast.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "dtype": str(dtype).replace("torch.", ""),
        "hidden_dtype": "float32" if args.fp32_hidden else str(dtype).replace("torch.", ""),
        "ceilings": ceilings,
        "results": [],
    }
    for name in names:
        workload = WORKLOADS[name]
        eager_loss = None
        rows = []
        for provider in providers:
            row = run_one(workload, provider, args.device, dtype, args.quick, eager_loss, ceilings, hidden_dtype)
            if provider == "eager" and row["status"] == "ok":
                eager_loss = row["loss"]
            doc["results"].append(row)
            rows.append(row)
            ms = f"{row['ms']:.3f} ms" if row.get("ms") else ""
            peak = f"{row['peak_mb']:.1f} MB" if row.get("peak_mb") is not None else ""
            print(f"[{name}] {provider:16s} {ms:>12s} {peak:>12s}  {row['status']}", flush=True)
            report.write(doc, args.out)
        if args.device != "cuda" or args.no_device_time:
            continue
        for row in device_time_pass(rows, workload, args.device, dtype, hidden_dtype):
            device = f"{row['device_ms']:.3f} ms" if "device_ms" in row else row["device_status"]
            print(f"[{name}] {row['provider']:16s} kernels alone (CUDA graph): {device}", flush=True)
            report.write(doc, args.out)
    print(report.markdown(doc))
    return doc


if __name__ == "__main__":
    main()
