"""Build script: the Python package, the Triton kernels (``kernels/`` -> ``mtlfast.kernels``),
the benchmarks (``bench/`` -> ``mtlfast.bench``) and, where it can be built, the CUDA
extension ``mtlfast._C`` from ``csrc/``.

Environment:
    MTLFAST_BUILD_CUDA=auto|0|1  auto (default): build when a CUDA toolkit and a CUDA build
                                 of torch are both present; 1: fail loudly if it cannot be
                                 built; 0: skip it.
    CUDA_HOME / CUDA_PATH        the toolkit; otherwise it is searched for (a folder whose
                                 lib64 holds libcudart and whose nvcc has torch's major CUDA
                                 version; with none, auto skips the extension).
    TORCH_CUDA_ARCH_LIST         arch list; defaults to 8.0;9.0 when no GPU is visible.
    MAX_JOBS                     parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0"
CSRC = ["csrc/mtlfast_C.cpp", "csrc/accumulate_fp32.cu"]


def _has_cudart(root: str) -> bool:
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")
    return any(glob.glob(os.path.join(root, pattern)) for pattern in patterns)


def toolkit_version(root: str) -> str | None:
    """``major.minor`` of the toolkit's nvcc, or None if it cannot be run."""
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def find_cuda_home(torch_cuda: str) -> tuple[str | None, str]:
    """``(toolkit folder, why not)``: the first folder with ``bin/nvcc``, ``libcudart`` and
    the major CUDA version torch was built with (torch refuses to build with another).

    torch guesses ``/usr/local`` from ``/usr/local/bin/nvcc`` on some hosts, where the
    link then fails (``cannot find -lcudart``); this checks each candidate instead.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    found = []
    for root in dict.fromkeys(c for c in candidates if c):
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            version = toolkit_version(root)
            if version and version.split(".")[0] == torch_cuda.split(".")[0]:
                return root, ""
            found.append(f"{root} (CUDA {version or 'unknown'})")
    if not found:
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    return None, f"torch was built with CUDA {torch_cuda}; toolkits found: {', '.join(found)}"


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
    cuda_home, why_not = find_cuda_home(torch.version.cuda)
    if cuda_home is None:
        return _skip(mode, why_not), {}
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


if __name__ == "__main__":  # as setuptools runs it; tests load the functions above without building
    ext_modules, cmdclass = cuda_extensions()
    setup(
        packages=["mtlfast", "mtlfast.backends", "mtlfast.kernels", "mtlfast.bench"],
        package_dir={"mtlfast.kernels": "kernels", "mtlfast.bench": "bench"},
        package_data={"mtlfast": ["py.typed", "_C.pyi"]},  # PEP 561: the package's type hints are for type checkers too
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
