"""The pytest-benchmark suite (``pytest benchmarks --benchmark-only``) times GPU kernels:
without a CUDA device every test in this folder is skipped, with the reason."""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="GPU benchmarks: no CUDA device visible to torch "
        "(`python -m benchmarks` writes the CPU report)"
    )
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
