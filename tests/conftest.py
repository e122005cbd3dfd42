import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# The Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported;
# tests/test_triton_interpreter.py runs them in a process of their own.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreter"]
