"""tools/torch_import_venv.py's choice of torch requirements to leave out (`make wheel-check`
builds the environment itself and imports torch in it)."""

import pytest

from tools import torch_import_venv


@pytest.mark.parametrize(
    "requirement",
    [
        "triton==3.6.0",
        "cuda-bindings==12.9.4",
        "nvidia-cusolver-cu12==11.7.3.90",
        "nvidia-cuda-nvrtc-cu12==12.8.93",
        "nvidia-cusolver-cu13>=12",
    ],
)
def test_left_out(requirement):
    assert torch_import_venv.skipped(requirement)


@pytest.mark.parametrize(
    "requirement",
    [
        # what libtorch_cuda.so and libtorch_cpu.so link (import fails without them)
        "nvidia-cuda-runtime-cu12==12.8.90",
        "nvidia-cusparse-cu12==12.5.8.93",
        "nvidia-nvjitlink-cu12==12.8.93",
        "nvidia-cuda-cupti-cu12==12.8.90",
        "nvidia-cudnn-cu12==9.10.2.21",
        "sympy>=1.13.3",
        # names that merely start like a left-out one
        "tritonclient",
        "cuda-bindings-extra",
    ],
)
def test_kept(requirement):
    assert not torch_import_venv.skipped(requirement)
