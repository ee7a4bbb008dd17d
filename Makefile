# regfuse: `make bench` (the main job) and `make test`. Both set up what they need in
# $(VENV), created from $(PYTHON) by scripts/setup_venv.py: it imports the torch that
# $(PYTHON) imports (also when $(PYTHON) is a venv's or conda's interpreter), installs
# torch==2.13.0 (CPU build) only where there is none, adds the build and test tools it
# lacks (warning, not failing, when they cannot be installed), and builds the extension.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
BENCH_ARGS ?=

.PHONY: all setup build test test-python cuda-check sanitize-cuda triton-check install-check gpu-check bench clean

all: test

$(VENV)/.tools: requirements-dev.txt scripts/setup_venv.py
	$(PYTHON) scripts/setup_venv.py $(VENV) requirements-dev.txt
	touch $@

# The install the README documents, editable; MAX_JOBS and TORCH_CUDA_ARCH_LIST pass through.
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

# Memory and race checks of the CUDA kernels without a GPU (CI runs it after `make test`):
# kernels.cu compiled for the CPU through csrc/cuda/simt_cpu.h, every launcher on the
# cases of scripts/sanitizer_smoke.py under ASan+UBSan and, one OS thread per CUDA
# thread, under TSan; any report or wrong value fails. Needs g++ (or CXX) only.
sanitize-cuda:
	bash scripts/check_cuda_emulation.sh

# The Triton kernels too, for sm_80/sm_90 through Triton's compiler (no GPU needed).
triton-check: build
	env -u TRITON_INTERPRET $(PY) scripts/check_triton_aot.py

# sdist, regular and editable installs into fresh environments, oldest and newest
# pip/setuptools (CI runs it after `make test`; needs the package index).
install-check: setup
	PYTHON=$(PY) bash scripts/check_install.sh

# One command for a GPU machine: build for sm_90, tests, sanitizer, benchmark.
gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

bench: build
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info regfuse/_C*.so $(VENV)
