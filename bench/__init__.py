"""Benchmarks of mtlfast against its peers (installed as ``mtlfast.bench``)."""

import importlib
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_hub_kernels_first() -> None:
    """Imports the Hugging Face ``kernels`` package, where it is installed, before this
    checkout's ``kernels/`` can shadow it.

    transformers (which liger-kernel's module imports) imports the Hub's ``kernels`` wherever
    it is installed, and fails on this repository's ``kernels/`` (installed as
    ``mtlfast.kernels``) wherever the checkout's root is on ``sys.path``: under
    ``python -m`` run from the root, and under pytest, which puts the root there for
    ``bench/``. Imported with the root left out of ``sys.path``, the Hub's package is the one
    ``sys.modules`` keeps. Call it before importing transformers.
    """
    if "kernels" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: nothing to shadow
        pass
    finally:
        sys.path[:] = saved
