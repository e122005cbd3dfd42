"""Backends of the fused heads op, all behind the signature of :mod:`.base`."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "torch", "triton")
_MODULES = {"reference": ".reference", "torch": ".torch_chunked", "triton": ".triton_fused"}


def get_backend(name: str) -> ModuleType:
    """The backend module ``name`` (one of :data:`BACKENDS`)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return importlib.import_module(_MODULES[name], __name__)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# With a head this wide, "auto" picks the chunked cuBLAS path: on an H100 the Triton
# large-vocabulary path took 598 ms per step on big-head-128k (eager: 49 ms), bound by its
# float atomics (bench/results/h100_2026-11-23_6ed4158.md).
AUTO_TRITON_MAX_OUTPUTS = 16384


def resolve_backend(name: str, device: torch.device, widest_head: int = 0) -> str:
    """Maps ``"auto"`` to the best backend for ``device`` and the widest task present, and
    checks an explicit choice."""
    if name == "auto":
        use_triton = device.type == "cuda" and triton_available() and widest_head <= AUTO_TRITON_MAX_OUTPUTS
        return "triton" if use_triton else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' needs the triton package")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing triton to run its kernels on the CPU"
            )
    return name
