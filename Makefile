# resfuse: `make test` sets everything up on a fresh machine and runs the CPU test suite.
PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.14.1
DEEPSPEED_VERSION ?= 0.19.8
# the nvcc on PATH may be a wrapper: point torch's extension builder at the real toolkit
export CUDA_HOME ?= /usr/local/cuda

PY  := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# CUDA extension (csrc/), built by the install when torch has CUDA and nvcc is found. The
# dev/CI build compiles for sm_80 and sm_90 and keeps ptxas's report (the tests fail on
# register spills); `make wheel` builds the release architecture list.
DEV_CUDA_ARCHS   ?= 8.0;9.0
# the release wheel: Ampere to Blackwell as machine code, the newest also as PTX (later GPUs)
WHEEL_CUDA_ARCHS ?= 8.0;8.6;8.9;9.0;10.0;12.0+PTX
# the CUDA 12 build of torch the wheel check installs the wheel beside (`wheel-check`)
CU12_TORCH ?= 2.10.0
CU12_VENV  := build/venv-torch$(CU12_TORCH)
HAVE_NVCC := $(shell test -x "$(CUDA_HOME)/bin/nvcc" && echo 1 || echo 0)

.PHONY: test test-gpu install clean wheel wheel-check wheel-check-torch

$(VENV)/.installed: setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/* csrc/cpu/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION) -r requirements-dev.txt
	# DeepSpeed (ZeRO-3 on CPU ranks, tests/distributed/test_deepspeed.py) is an sdist whose
	# build imports torch: built against the venv's torch
	$(PIP) install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	TORCH_CUDA_ARCH_LIST="$(DEV_CUDA_ARCHS)" RESFUSE_FORCE_CUDA_BUILD=$(HAVE_NVCC) \
	  RESFUSE_FORCE_CPU_BUILD=1 RESFUSE_PTXAS_LOG=build/ptxas.log \
	  $(PIP) install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# the linters and formatters (configured in pyproject.toml and .clang-format), checked by
# `make test`; `make format` applies them
CXX_SOURCES := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp \
                 tests/simt/*.cpp tests/simt/*.h)
.PHONY: lint format
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)
	$(VENV)/bin/actionlint .github/workflows/*.yml

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# CPU: the Triton kernels themselves run under the interpreter (tests/conftest.py sets it)
test: $(VENV)/.installed lint
	RESFUSE_REQUIRE_CUDA_EXT=$(HAVE_NVCC) RESFUSE_REQUIRE_CPU_EXT=1 $(PY) -m pytest tests -q
	$(MAKE) test-releases
ifeq ($(HAVE_NVCC),1)
	$(MAKE) wheel-check
	$(MAKE) gpu-campaign-rehearsal
endif

# the integration tests on other transformers releases, each in its own environment beside
# the shared torch (build/releases/, about 2 minutes); writes docs/RELEASES.md's table
RELEASES ?= 4.51.3 4.57.6 5.0.0 5.10.4
.PHONY: test-releases
test-releases: $(VENV)/.installed
	$(PY) tools/test_releases.py --releases $(RELEASES) --with-pinned --table docs/RELEASES.md

# on a machine with a CUDA GPU: the same suite on CUDA tensors, plus the GPU-only tests
test-gpu: $(VENV)/.installed
	RESFUSE_TEST_DEVICE=cuda $(PY) -m pytest tests -q

# benchmarks: the full report on a CUDA machine, a short CPU report (a few minutes, labelled
# CPU) otherwise, in benchmarks/results/<device>/; options via BENCH_ARGS, e.g.
# make bench BENCH_ARGS="--preset quick"   (python -m benchmarks --help lists them)
.PHONY: bench
bench: $(VENV)/.installed
	$(PY) -m benchmarks $(BENCH_ARGS)

# the static kernel model (tools/kernel_model.py, README "Reading the static kernel model"):
# a prediction from the compiled kernels, no GPU needed; KERNEL_MODEL_ARGS, e.g.
# make kernel-model KERNEL_MODEL_ARGS="--gpu H100 B200 --markdown --compare benchmarks/results/<gpu>/results.json"
.PHONY: kernel-model
kernel-model: $(VENV)/.installed
	$(PY) -m tools.kernel_model $(KERNEL_MODEL_ARGS)

# after a GPU `make bench`: install the run's measured table for backend="auto" into the
# package, make auto-table RESULTS=benchmarks/results/<gpu>/results.json
.PHONY: auto-table
auto-table: $(VENV)/.installed
	@test -n "$(RESULTS)" || { echo "usage: make auto-table RESULTS=benchmarks/results/<gpu>/results.json"; exit 2; }
	$(PY) -m benchmarks.build_auto_table $(RESULTS)

# The release wheel (cp310-abi3: any CPython >= 3.10; torch >= 2.10, any CUDA 12.x or 13.x
# build) and the sdist, the steps .github/workflows/wheels.yml runs: the release toolkit
# from the package registry (tools/cuda_toolkit.py: CUDA 13's front end, CUDA 12.9's ptxas
# and static runtime), the build, then auditwheel to a manylinux tag, leaving torch's
# libraries and the driver's outside the wheel (they come with the user's torch and driver)
RELEASE_TOOLKIT := $(abspath build/cuda-toolkit)
AUDITWHEEL_EXCLUDES := --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcuda.so.1'
# (setuptools builds in build/temp.*, build/lib.*, which the dev install's build_ext shares:
# cleared before and after, so neither build reuses the other's objects)
SETUPTOOLS_BUILD_DIRS = build/temp.* build/lib.* build/bdist.*
wheel: $(VENV)/.installed
	rm -rf dist build/wheel-raw $(SETUPTOOLS_BUILD_DIRS)
	$(PY) tools/cuda_toolkit.py --packages build/cuda-pkgs --out $(RELEASE_TOOLKIT)
	CUDA_HOME=$(RELEASE_TOOLKIT) TORCH_CUDA_ARCH_LIST="$(WHEEL_CUDA_ARCHS)" \
	  RESFUSE_FORCE_CUDA_BUILD=1 RESFUSE_FORCE_CPU_BUILD=1 RESFUSE_PTXAS_LOG=build/ptxas-wheel.log \
	  $(PY) -m build --no-isolation --sdist --wheel --outdir build/wheel-raw .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair $(AUDITWHEEL_EXCLUDES) --wheel-dir dist build/wheel-raw/*.whl
	cp build/wheel-raw/*.tar.gz dist/
	rm -rf $(SETUPTOOLS_BUILD_DIRS)

# the wheel installed into fresh venvs and imported beside a CUDA 13 build of torch (the dev
# venv's) and a CUDA 12 build (below), what it links and what auditwheel says of it, its
# kernels spill-free for every arch
wheel-check: wheel $(CU12_VENV)/.installed
	$(PY) tools/check_wheel.py dist --archs "$(WHEEL_CUDA_ARCHS)" --ptxas-log build/ptxas-wheel.log \
	  --other-torch $(CU12_VENV)/bin/python

# a CUDA 12 build of torch for the wheel check: torch 2.10.0+cu128 from the registry with the
# CUDA 12 libraries `import torch` loads (5.5 GiB under build/, once; tools/torch_import_venv.py
# leaves out the 1.3 GB torch only loads on first use)
$(CU12_VENV)/.installed:
	$(PYTHON) tools/torch_import_venv.py $(CU12_VENV) --torch $(CU12_TORCH) --cuda 12.
	touch $@

# the same wheel against yet another torch release (e.g. OTHER_TORCH=2.11.0, the GPU
# machines' one): a venv with that torch under build/ (a multi-GB download)
OTHER_TORCH ?= 2.11.0
wheel-check-torch: wheel
	test -x build/venv-torch$(OTHER_TORCH)/bin/python || { $(PYTHON) -m venv build/venv-torch$(OTHER_TORCH) && \
	  build/venv-torch$(OTHER_TORCH)/bin/pip install -q torch==$(OTHER_TORCH); }
	$(PY) tools/check_wheel.py dist --archs "$(WHEEL_CUDA_ARCHS)" --ptxas-log build/ptxas-wheel.log \
	  --other-torch build/venv-torch$(OTHER_TORCH)/bin/python

# The GPU campaign (tools/gpu_campaign.py's header says it all): `make gpu-carry` here fills
# build/carry/ (under 64 MiB with the tree); `make gpu-campaign` on the GPU machine, with
# build/carry/ carried and a 9-minute limit, measures and checks everything in 8 minutes;
# `make gpu-campaign-import FROM=<returned files>` here puts its results under
# benchmarks/results/<gpu>/ and auto's table into resfuse/auto_tables/.
.PHONY: gpu-carry gpu-campaign gpu-campaign-rehearsal gpu-campaign-import
gpu-carry: $(VENV)/.installed
	$(PY) tools/campaign/carry.py

# on the GPU machine: its own python3 (torch, triton, pytest there), no venv, no set-up
gpu-campaign:
	$(PYTHON) tools/gpu_campaign.py

# CPU (part of `make test`): the same script end to end, Triton interpreter, tiny shapes,
# every phase and output file, the fallback source build included; then the checks of what
# it wrote, the deadlines and the carry's size
REHEARSAL_OUT ?= build/campaign-rehearsal/out
gpu-campaign-rehearsal: gpu-carry
	RESFUSE_CAMPAIGN_REHEARSE_BUILD=$(HAVE_NVCC) $(PY) tools/gpu_campaign.py --rehearsal \
	  --out $(REHEARSAL_OUT) --run-dir build/campaign-rehearsal/run
	$(PY) tools/campaign/check.py $(REHEARSAL_OUT)

gpu-campaign-import: $(VENV)/.installed
	@test -n "$(FROM)" || { echo "usage: make gpu-campaign-import FROM=<folder with campaign.tar.gz>"; exit 2; }
	$(PY) tools/campaign/importer.py $(FROM)

clean:
	rm -rf build dist *.egg-info $(VENV) resfuse/_C*.so resfuse/_cuda_build.json
