import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


# The Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported;
# tests/test_triton_interpreter.py runs them in a process of their own.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreter"]
