"""The CUDA extension built from csrc/: build facts and op registration (CPU-only host)."""

import glob
import os
import runpy

import pytest
import torch

from mtlfast import cuda_ext


def test_extension_state_is_reported():
    info = cuda_ext.build_info()
    if torch.version.cuda is None:
        assert info is None  # a CPU build of torch cannot have built it
        return
    if info is None:
        pytest.skip("built without the CUDA extension (MTLFAST_BUILD_CUDA=0 or no toolkit)")
    assert info["cuda_archs"].startswith("sm") and info["cuda_runtime_version"] >= 11000


@pytest.mark.skipif(not cuda_ext.available(), reason="no CUDA extension")
def test_op_is_registered_and_refuses_cpu_tensors():
    assert hasattr(torch.ops.mtlfast_C, "accumulate_fp32_")
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError):
            cuda_ext.accumulate_fp32_(torch.zeros(3), torch.ones(3))


def _setup_functions() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return runpy.run_path(os.path.join(root, "setup.py"), run_name="setup_functions")


def test_toolkit_must_match_torchs_cuda_major():
    """auto skips the extension, naming what it found, when no toolkit has torch's major CUDA
    version (torch's build refuses one, e.g. torch 2.6 cu124 beside a CUDA 13 toolkit)."""
    setup_py = _setup_functions()
    for root in ["/usr/local/cuda", *glob.glob("/usr/local/cuda-*")]:
        version = setup_py["toolkit_version"](root)
        if version:
            break
    else:
        pytest.skip("no CUDA toolkit on this host")
    home, why_not = setup_py["find_cuda_home"]("1.0")  # no toolkit has major version 1
    assert home is None and "CUDA 1.0" in why_not and version in why_not
    home, why_not = setup_py["find_cuda_home"](version)
    assert home is not None and why_not == ""
