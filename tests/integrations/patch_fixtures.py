"""Fixtures of the integration tests (imported by name: a second conftest.py would shadow
the suite's top-level one): the backend, and a counter of fused calls."""

import pytest

from resfuse.integrations import fused


@pytest.fixture(autouse=True)
def backend(request, monkeypatch):
    """ "torch" (the CPU path of "auto") unless a test is parametrized with "triton" (the
    kernels themselves, under the interpreter on CPU)."""
    name = getattr(request, "param", "torch")
    monkeypatch.setenv("RESFUSE_BACKEND", name)
    return name


@pytest.fixture
def count_fused(monkeypatch):
    """Counts calls of the fused op that carry a residual (i.e. fused adds) vs plain norms."""
    calls = {"add_norm": 0, "norm": 0}

    def counted(original):
        def counting(x, residual, *args, **kwargs):
            calls["add_norm" if residual is not None else "norm"] += 1
            return original(x, residual, *args, **kwargs)

        return counting

    # add_norm, and the branch norm + add (+ norm) of the sandwich layouts
    for name in ("add_norm", "norm_add", "norm_add_norm"):
        monkeypatch.setattr(fused, name, counted(getattr(fused, name)))
    return calls
