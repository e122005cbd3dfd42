"""Backends of the fused heads op, all behind the signature of :mod:`.base`."""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch

BACKENDS = ("reference", "torch", "triton")
_MODULES = {"reference": ".reference", "torch": ".torch_chunked", "triton": ".triton_fused"}


@cache
def get_backend(name: str) -> ModuleType:
    """The backend module ``name`` (one of :data:`BACKENDS`)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return importlib.import_module(_MODULES[name], __name__)


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(name: str, device: torch.device) -> str:
    """Maps ``"auto"`` to the best backend for ``device`` and checks an explicit choice."""
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
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
