"""Runs tests/interpreter/ in its own process with TRITON_INTERPRET=1 (the variable must
be set before triton is imported, and this process may already have imported it)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(__file__)


def test_triton_backend_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "interpreter")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
