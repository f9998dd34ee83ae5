"""Shared test set-up: the Triton interpreter for CPU runs, tolerances, and the comparison
against the float64 reference."""

import os
import shutil
import tempfile
from pathlib import Path

# The interpreter must be chosen before triton is imported (it decides at @triton.jit time).
# On a GPU machine the suite runs the real kernels on CUDA tensors instead.
if os.environ.get("RESFUSE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from resfuse import reference

# torch.compile's and Triton's caches of this run in one temporary folder, removed when the
# run ends (pytest_unconfigure): the inductor's precompiled CPU headers alone take about
# 1 GB, and CI's disk must still hold the CUDA 12 torch that `make wheel-check` installs after
# the suite. A cache folder chosen by the caller is left alone.
_RUN_CACHES = None
if not {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"} & set(os.environ):
    _RUN_CACHES = Path(tempfile.mkdtemp(prefix="resfuse-test-caches-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_RUN_CACHES / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(_RUN_CACHES / "triton")


def pytest_unconfigure(config):
    if _RUN_CACHES is not None:
        shutil.rmtree(_RUN_CACHES, ignore_errors=True)


def _interpreter_index_fix():
    """triton < 3.7's interpreter takes a scalar tensor as an index (the backward's
    ``range(row_start, row_end, BLOCK_M)``) through ``int()`` of its 1-element array, which
    NumPy 2 rejects; later releases read the element. Same fix here, for CPU runs with the
    GPU machines' triton 3.6."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(
            tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
        )

    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()

DEVICE = os.environ.get("RESFUSE_TEST_DEVICE", "cpu")


def cpu_auto() -> str:
    """What "auto" runs CPU tensors with here: the compiled CPU kernels when this install
    has them, else the reference."""
    import resfuse

    return "cpu" if resfuse.backends()["cpu"].available else "torch"


# Tolerances per dtype, written down once, as (atol, rtol) against the float64 oracle:
# - "out": y and h, rounded once at the store (half an ulp: 2^-24 / 2^-11 / 2^-8 relative);
# - "grad": dx and dresidual, which also carry the rounding of the stored h they are
#   computed from (the backward differentiates at the h it reads back);
# - "param": dweight / dbias / dbranch_scale, fp32 sums over rows of such terms.
TOLERANCES = {
    torch.float32: {"out": (1e-5, 1e-5), "grad": (1e-5, 1e-5), "param": (2e-5, 1e-5)},
    torch.float16: {"out": (2e-3, 2e-3), "grad": (4e-3, 4e-3), "param": (5e-3, 2e-3)},
    torch.bfloat16: {"out": (1.6e-2, 1.6e-2), "grad": (3e-2, 3e-2), "param": (5e-2, 1e-2)},
}


def tolerance(dtype: torch.dtype, kind: str = "out"):
    return TOLERANCES[dtype][kind]


def assert_close(actual, expected, dtype, name, kind="out"):
    atol, rtol = tolerance(dtype, kind)
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound)  # NaN compares false: a NaN output must fail, not slip through
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {err.numel()} elements out of tolerance "
            f"(atol={atol}, rtol={rtol}); max abs err {err.max().item():.3e}; first at flat index "
            f"{i}: got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}"
        )


@pytest.fixture
def device():
    return torch.device(DEVICE)


def float64_oracle(
    x,
    residual,
    weight,
    bias,
    eps,
    *,
    norm,
    residual_scale=1.0,
    branch_scale=None,
    rowscale=None,
    zero_centered_weight=False,
    branch_weight=None,
    branch_bias=None,
    branch_norm=False,
):
    """Forward (y, h) of the reference in float64 on leaf copies of every input, returning
    the leaves so gradients can be read after backward."""

    def leaf(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    leaves = {
        "x": leaf(x),
        "residual": leaf(residual),
        "weight": leaf(weight),
        "bias": leaf(bias),
        "branch_scale": leaf(branch_scale)
        if isinstance(branch_scale, torch.Tensor)
        else branch_scale,
        "branch_weight": leaf(branch_weight),
        "branch_bias": leaf(branch_bias),
    }
    if branch_norm:
        y, h = reference.norm_add_norm(
            leaves["x"],
            leaves["residual"],
            leaves["branch_weight"],
            leaves["weight"],
            eps,
            norm=norm,
            branch_bias=leaves["branch_bias"],
            bias=leaves["bias"],
            zero_centered_weight=zero_centered_weight,
            compute_dtype=torch.float64,
        )
        return y, h, leaves
    rs = None
    if rowscale is not None:
        rs = rowscale.double().expand(x.shape[:-1])
    y, h = reference.add_norm(
        leaves["x"],
        leaves["residual"],
        leaves["weight"],
        leaves["bias"],
        eps,
        norm=norm,
        residual_scale=residual_scale,
        branch_scale=leaves["branch_scale"],
        rowscale=rs,
        zero_centered_weight=zero_centered_weight,
        compute_dtype=torch.float64,
    )
    return y, h, leaves


# --------------------------------------------------------------------------- the CUDA kernels on CPU
# The emulator of tests/simt runs csrc/'s kernels on CPU tensors: installed as backend="cuda"
# it joins the numerical matrix on CPU, and the emulator's own tests use it directly.

BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "simt"


def emulator_unavailable() -> str:
    from simt import sim_backend

    return sim_backend.unavailable_reason()


@pytest.fixture(scope="session")
def sim():
    from simt import sim_backend

    reason = sim_backend.unavailable_reason()
    if reason:
        pytest.skip(f"the CUDA emulator cannot be built: {reason}")
    return sim_backend.SimBackend(sim_backend.build(BUILD_DIR))


@pytest.fixture
def use(monkeypatch):
    """use(backend_module): backend="cuda" runs that module, on CPU tensors."""
    from resfuse import backend_registry

    def install(module):
        monkeypatch.setitem(backend_registry._IMPORTED, "resfuse.cuda_ext", (module, ""))
        real = backend_registry.resolve
        monkeypatch.setattr(
            backend_registry,
            "resolve",
            lambda backend, device, key=None: (
                "cuda" if backend == "cuda" else real(backend, device, key)
            ),
        )
        return module

    return install


@pytest.fixture
def cuda_sim(sim, use):
    return use(sim)


_LIMITS: dict = {}


def cuda_launch_limits():
    """The CUDA kernels' launch limits (``resfuse.cuda_ext.launch_limits()``: no GPU needed)
    for the tests' shapes, or the emulator's copy (the same headers), or None."""
    if "limits" not in _LIMITS:
        from resfuse import cuda_ext

        limits = None
        if not cuda_ext._load():
            limits = cuda_ext.launch_limits()
        elif not emulator_unavailable():
            from simt import sim_backend

            limits = sim_backend.SimBackend(sim_backend.build(BUILD_DIR)).limits
        _LIMITS["limits"] = limits
    return _LIMITS["limits"]
