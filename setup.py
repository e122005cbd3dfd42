"""Build script: the Python package, the Triton kernels (``kernels/`` -> ``mtlfast.kernels``),
the benchmarks (``bench/`` -> ``mtlfast.bench``) and, where it can be built, the CUDA
extension ``mtlfast._C`` from ``csrc/``.

Environment:
    MTLFAST_BUILD_CUDA=auto|0|1  auto (default): build when a CUDA toolkit and a CUDA build
                                 of torch are both present; 1: fail loudly if it cannot be
                                 built; 0: skip it.
    CUDA_HOME / CUDA_PATH        the toolkit; otherwise it is searched for (the folder whose
                                 lib64 holds libcudart).
    TORCH_CUDA_ARCH_LIST         arch list; defaults to 8.0;9.0 when no GPU is visible.
    MAX_JOBS                     parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0"
CSRC = ["csrc/mtlfast_C.cpp", "csrc/accumulate_fp32.cu"]


def _has_cudart(root: str) -> bool:
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")
    return any(glob.glob(os.path.join(root, pattern)) for pattern in patterns)


def find_cuda_home() -> str | None:
    """The toolkit folder: one with ``bin/nvcc`` whose libraries hold ``libcudart``.

    torch guesses ``/usr/local`` from ``/usr/local/bin/nvcc`` on some hosts, where the
    link then fails (``cannot find -lcudart``); this checks each candidate instead.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return root
    return None


def _skip(mode: str, reason: str) -> list:
    if mode == "1":
        sys.exit(f"MTLFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"mtlfast: skipping the CUDA extension ({reason})", file=sys.stderr)
    return []


def cuda_extensions() -> tuple[list, dict]:
    mode = os.environ.get("MTLFAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MTLFAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return _skip(mode, "MTLFAST_BUILD_CUDA=0"), {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip(mode, "torch is not importable; install with --no-build-isolation"), {}
    if torch.version.cuda is None:
        return _skip(mode, f"torch {torch.__version__} is not a CUDA build"), {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return _skip(mode, "no CUDA toolkit found (set CUDA_HOME)"), {}
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    arch_tag = "_".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in arch_list.replace(",", ";").split(";") if a)
    print(f"mtlfast: building the CUDA extension with CUDA_HOME={cuda_home}, archs {arch_list}", file=sys.stderr)
    define = [f"-DMTLFAST_CUDA_ARCHS={arch_tag or 'native'}"]
    extension = cpp_extension.CUDAExtension(
        name="mtlfast._C",
        sources=CSRC,
        extra_compile_args={"cxx": ["-O3", *define], "nvcc": ["-O3", "--expt-relaxed-constexpr", *define]},
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=["mtlfast", "mtlfast.backends", "mtlfast.kernels", "mtlfast.bench"],
    package_dir={"mtlfast.kernels": "kernels", "mtlfast.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
