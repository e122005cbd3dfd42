"""Triton kernels of the fused heads (installed as ``mtlfast.kernels``)."""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: a checkout's root is on sys.path (``python -m`` or
    # ``-c`` run there, pytest's insertion for bench/), where this folder shadows the Hugging
    # Face ``kernels`` package that transformers imports. Hand over to that package where it is
    # installed: the import returns what sys.modules holds once this module has run.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is not None and _spec.loader is not None:
        _hub = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _hub
        _spec.loader.exec_module(_hub)
