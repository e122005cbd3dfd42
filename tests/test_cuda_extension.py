"""The CUDA extension built from csrc/: build facts and op registration (CPU-only host)."""

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
