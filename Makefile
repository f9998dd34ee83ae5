# resfuse: `make test` sets everything up on a fresh machine and runs the CPU test suite.
PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.14.1
# the nvcc on PATH may be a wrapper: point torch's extension builder at the real toolkit
export CUDA_HOME ?= /usr/local/cuda

PY  := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: test test-gpu install clean

$(VENV)/.installed: setup.py pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION) -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# CPU: the Triton kernels themselves run under the interpreter (tests/conftest.py sets it)
test: $(VENV)/.installed
	$(PY) -m pytest tests -q

# on a machine with a CUDA GPU: the same suite on CUDA tensors, plus the GPU-only tests
test-gpu: $(VENV)/.installed
	RESFUSE_TEST_DEVICE=cuda $(PY) -m pytest tests -q

# benchmarks: the full report on a CUDA machine, a short CPU report (a few minutes, labelled
# CPU) otherwise, in benchmarks/results/<device>/; options via BENCH_ARGS, e.g.
# make bench BENCH_ARGS="--preset quick"   (python -m benchmarks --help lists them)
.PHONY: bench
bench: $(VENV)/.installed
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info $(VENV)
