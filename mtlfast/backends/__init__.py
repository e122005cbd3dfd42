"""Backends of the fused heads op, all behind the signature of :mod:`.base`.

A backend may also offer ``plan_label_check(heads, targets, token_mask, compute_dtype)``,
its own check of label values for ``validate=True``, which its forward then runs (``triton``'s: in
programs of the loss finalize launch); the others' are checked by
:func:`mtlfast.validation.start_value_checks` with torch ops."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
from functools import cache
from types import ModuleType

import torch

BACKENDS = ("reference", "torch", "triton")
_MODULES = {"reference": ".reference", "torch": ".torch_chunked", "triton": ".triton_fused"}


def check_backend_name(name: str, *, resolved: bool = False) -> None:
    """``name`` is one of :data:`BACKENDS`, or ``"auto"`` where not ``resolved`` yet."""
    if name not in BACKENDS and (resolved or name != "auto"):
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")


@cache
def get_backend(name: str) -> ModuleType:
    """The backend module ``name`` (one of :data:`BACKENDS`)."""
    check_backend_name(name, resolved=True)
    return importlib.import_module(_MODULES[name], __name__)


# Found, not imported: importing triton here would fix TRITON_INTERPRET before a test sets it,
# and a plain constant is what torch.compile traces best.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_version() -> tuple[int, ...]:
    try:
        release = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)
    return tuple(int(part) for part in re.findall(r"\d+", release)[:2])


TRITON_VERSION = _triton_version() if TRITON_INSTALLED else (0, 0)
# Backends that take fp32 rows with 16-bit compute and round them as they read them; the
# others get a 16-bit copy of the rows. triton 3.2's compiler aborts the process on the
# small-heads backward for fp32 rows; 3.6 and 3.8 compile it (tests/test_kernels_compile.py).
READS_FP32_ROWS = {"reference": True, "torch": True, "triton": TRITON_VERSION >= (3, 6)}
# A ROCm build of torch calls AMD GPUs "cuda" devices too. The triton backend is built and checked
# for NVIDIA's (TF32 products, a launcher of triton's CUDA driver), so "auto" gives ROCm the torch one.
ROCM = torch.version.hip is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(name: str, device: torch.device) -> str:
    """Maps ``"auto"`` to the best backend for ``device`` and checks an explicit choice. On the
    meta device (a dry run: shapes, FLOP counts) the triton backend's kernels, which need data,
    give way to the torch backend's ops."""
    if name == "auto":
        return "triton" if device.type == "cuda" and TRITON_INSTALLED and not ROCM else "torch"
    check_backend_name(name)
    if name == "triton" and device.type == "meta":
        return "torch"
    if name == "triton":
        if not TRITON_INSTALLED:
            raise ValueError("backend 'triton' needs the triton package")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing triton to run its kernels on the CPU"
            )
    return name
