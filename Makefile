# Two commands on a fresh machine: `make train` and `make test`. Both create .venv, install torch and
# torchvision from the package registry, build edropout's kernels against them, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edropout-installed

# Compile the CUDA kernels whenever a CUDA toolkit is here, even without a GPU, so that a CUDA compile
# error fails the build everywhere. Override CUDA_HOME for a toolkit elsewhere.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
ifneq ($(CUDA_HOME),)
export CUDA_HOME
export FORCE_CUDA ?= 1
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
endif
export MAX_JOBS ?= 2

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cuh csrc/cuda/*.cu)

.PHONY: setup train test test-all bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch torchvision numpy tqdm scikit-learn matplotlib pytest hypothesis
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

# `make train` runs EDropout on the bundled digits data with a short schedule and prints the report.
train: setup
	$(PY) -m edropout train

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/kernels.py

clean:
	rm -rf build $(VENV) edropout/*.so *.egg-info
