import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _import_hub_kernels_first() -> None:
    """transformers imports the Hugging Face ``kernels`` package where it is installed, and
    this repository's own ``kernels/`` (installed as ``mtlfast.kernels``) shadows it wherever
    the repository root is on ``sys.path``, as ``python -m pytest`` run from the root puts it.
    Imported here first, without the root, the Hub's package is the one ``sys.modules`` keeps."""
    root = os.path.dirname(HERE)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: nothing to shadow
        pass
    finally:
        sys.path[:] = saved


_import_hub_kernels_first()

# The Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported;
# tests/test_triton_interpreter.py runs them in a process of their own.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreter"]
