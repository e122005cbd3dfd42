# The whole set-up on a fresh machine: `make test` and `make bench` create .venv, install
# torch if it is missing, install mtlfast in editable mode (building csrc/ where a CUDA
# toolkit is present) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtlfast-installed
BENCH_OUT ?= bench/out

ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: install test bench lint compat gpu-wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch>=2.6"
	$(PY) -m pip install setuptools wheel pybind11 ninja numpy
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests bench/test_smoke.py

bench: install
	$(PY) -m pip install --no-build-isolation -e ".[test,bench]"
	$(PY) -m mtlfast.bench --device cpu --quick --out $(BENCH_OUT)

# ruff, then mypy on the package laid out as installed (kernels/ and bench/ as mtlfast.kernels and
# mtlfast.bench, which an editable install hides from type checkers) and on tests/typed_usage.py
# against it. Triton ships no type hints: its imports are left unchecked.
TYPECHECK := build/typecheck
lint: install
	$(PY) -m pip install ruff mypy
	$(PY) -m ruff check mtlfast kernels bench tests setup.py
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK) && cp -r mtlfast $(TYPECHECK)/
	cp -r kernels $(TYPECHECK)/mtlfast/kernels && cp -r bench $(TYPECHECK)/mtlfast/bench
	cd $(TYPECHECK) && $(abspath $(PY)) -m mypy --ignore-missing-imports mtlfast
	MYPYPATH=$(TYPECHECK) $(PY) -m mypy --follow-imports=silent --ignore-missing-imports tests/typed_usage.py

# The suite on the CPU against another torch and triton, by default the GPU hosts' (torch
# 2.11, triton 3.6; triton 3.6's interpreter needs numpy < 2.3), in a venv per version pair.
# mtlfast is installed there as a copy, not editable, so the in-tree build stays .venv's,
# and pytest runs from that venv's bin so that the copy is the one imported.
COMPAT_TORCH ?= 2.11.0
COMPAT_TRITON ?= 3.6.0
COMPAT_VENV := .venv-compat-torch$(COMPAT_TORCH)-triton$(COMPAT_TRITON)
compat:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install "torch==$(COMPAT_TORCH)" "triton==$(COMPAT_TRITON)" "numpy<2.3" setuptools wheel pybind11 ninja
	$(COMPAT_VENV)/bin/pip install --no-build-isolation ".[test]"
	cd tests && ../$(COMPAT_VENV)/bin/pytest -q -p no:cacheprovider --rootdir . .

# The pure-Python peers the GPU benchmark compares with, as wheels for the GPU hosts (no
# network there): bench/gpu_check.sh installs .whl/*.whl when the device call carries .whl.
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel cut-cross-entropy

clean:
	rm -rf build *.egg-info mtlfast/_C*.so $(BENCH_OUT) .venv-compat-*
