"""Thin Python interface to the CUDA extension ``mtlfast._C`` built from ``csrc/``.

The extension is optional: on a CPU-only install it is absent and :func:`available`
is False.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch
from torch import Tensor


@cache
def _extension() -> ModuleType | None:
    try:
        from . import _C
    except ImportError:
        return None
    return _C


def available() -> bool:
    """True when the extension was built and imports."""
    return _extension() is not None


def build_info() -> dict | None:
    """``{"cuda_archs": "sm80_sm90", "cuda_runtime_version": 13000, "torch_version": ...}`` or None."""
    ext = _extension()
    return dict(ext.build_info()) if ext is not None else None


def accumulate_fp32_(main_grad: Tensor, grad: Tensor) -> Tensor:
    """``main_grad += grad`` in fp32 (``main_grad`` fp32, ``grad`` fp32/fp16/bf16, same shape, CUDA)."""
    if not available():
        raise RuntimeError("mtlfast was installed without its CUDA extension (MTLFAST_BUILD_CUDA=0 or no toolkit)")
    torch.ops.mtlfast_C.accumulate_fp32_(main_grad, grad)
    return main_grad
