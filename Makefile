# regfuse: `make bench` (the main job) and `make test`. Both set up what they need:
# a virtual environment that reuses an importable torch (system site packages) or installs
# torch==2.13.0 (CPU build) where there is none, the tools, and the built extension.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)
BENCH_ARGS ?=

.PHONY: all setup build test test-python cuda-check triton-check bench clean

all: test

$(VENV)/.tools: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.tools $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.tools
build: $(VENV)/.built

# The whole suite; Triton kernels run through the interpreter where there is no GPU
# (tests/conftest.py sets TRITON_INTERPRET=1 then).
test: build cuda-check triton-check
	$(PY) -m pytest tests -q

test-python: build
	$(PY) -m pytest tests -q

# CUDA kernels cannot run without a GPU, but they must compile for Ampere and Hopper.
cuda-check:
	@if command -v nvcc >/dev/null 2>&1; then PYTHON=$(PY) bash scripts/check_cuda.sh; \
	else echo "cuda-check: nvcc not found, skipped"; fi

# The Triton kernels too, for sm_80/sm_90 through Triton's compiler (no GPU needed).
triton-check: build
	env -u TRITON_INTERPRET $(PY) scripts/check_triton_aot.py

bench: build
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info regfuse/_C*.so $(VENV)
