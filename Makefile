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

.PHONY: install test bench lint clean

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

lint: install
	$(PY) -m pip install ruff
	$(PY) -m ruff check mtlfast kernels bench tests setup.py

clean:
	rm -rf build *.egg-info mtlfast/_C*.so $(BENCH_OUT)
