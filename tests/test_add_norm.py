"""The numerical matrix: every flag combination x dtype, odd shapes, layouts and mixed dtypes,
forward and backward, each backend against the float64 reference. On CPU the Triton kernels
themselves run under TRITON_INTERPRET=1."""

import itertools

import pytest
import torch

import resfuse

from conftest import DEVICE
from numerics import DTYPES, Case, run_case

# on a GPU the compiled CUDA backend joins the matrix (tests/test_cuda_sim.py runs its kernels on CPU)
BACKENDS = ["triton", "torch"] + (
    ["cuda"] if DEVICE == "cuda" and resfuse.backends()["cuda"].available else [])


def flag_cases():
    for norm, residual, weight, branch, rowscale, prenorm in itertools.product(
            ("rms", "layer"), ("none", "same", "fp32"), (True, False),
            ("none", "scalar", "tensor"), (False, True), (True, False)):
        for bias in ((False, True) if norm == "layer" else (False,)):
            for zc in ((False, True) if weight else (False,)):
                yield Case(norm=norm, residual=residual, weight=weight, bias=bias, branch=branch,
                           rowscale=rowscale, zero_centered=zc, prenorm=prenorm)


FLAG_CASES = list(flag_cases())


def _id(case):
    return str(case)


# residual="fp32" with fp32 activations is the same case as residual="same"
FLAG_DTYPE_CASES = [c.replace(dtype=d) for d in DTYPES for c in FLAG_CASES
                    if not (c.residual == "fp32" and d == torch.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FLAG_DTYPE_CASES, ids=_id)
def test_every_flag_combination(case, backend):
    # (2, 3, 40): several rows per program; D not a power of two exercises the column mask
    run_case(case, backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [c for c in FLAG_CASES if c.residual != "none"][::5], ids=_id)
def test_flag_combinations_one_row_per_program(case, dtype, backend):
    # D = 300: one row per program, and a third of the flag combinations
    run_case(case.replace(dtype=dtype, shape=(3, 300)), backend, DEVICE)


FULL = dict(residual="same", weight=True, branch="tensor", rowscale=True, zero_centered=True)
SHAPE_CASES = [Case(norm="layer", bias=True, **FULL), Case(norm="rms")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [1, 7, 64, 1000, 4097])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (3, 5), (2, 2, 3)], ids=lambda s: f"lead{s}")
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_shapes(base, lead, D, dtype, backend):
    case = base.replace(dtype=dtype, shape=(*lead, D))
    if not lead and case.rowscale:
        case = case.replace(rowscale=False)
    run_case(case, backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [9000, 20000, 65536 - 7], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_long_rows(base, D, dtype, backend):
    # 9000: backward streams column chunks; 20000 and ~64K: both directions do
    run_case(base.replace(dtype=dtype, shape=(5, D)), backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "transposed", "col_strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_non_contiguous(base, dtype, layout, backend):
    run_case(base.replace(dtype=dtype, shape=(3, 4, 72), layout=layout), backend, DEVICE)


MIXED = [
    dict(dtype=torch.bfloat16, residual="fp32"),                            # fp32 residual stream
    dict(dtype=torch.float16, residual="fp32", out_dtype=torch.float32),
    dict(dtype=torch.bfloat16, residual="same", residual_dtype=torch.float32),
    dict(dtype=torch.float32, residual="same", out_dtype=torch.bfloat16),
    dict(dtype=torch.bfloat16, residual="none", residual_dtype=torch.float32),
    dict(dtype=torch.float16, residual="same", residual_dtype=torch.bfloat16, out_dtype=torch.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mixed", MIXED, ids=lambda m: str(Case(**m)))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_mixed_dtypes(base, mixed, backend):
    run_case(base.replace(shape=(4, 3, 96), **mixed), backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_in_place_through_strides(backend, device):
    """A row-padded input is read in place (no copy), a non-collapsible one is copied."""
    from resfuse.ops import _rows

    base = torch.randn(6, 80, device=device)
    x = base[:, :64]
    assert _rows(x, 64).data_ptr() == x.data_ptr() and _rows(x, 64).stride(0) == 80
    t = torch.randn(4, 6, 64, device=device).transpose(0, 1)
    assert _rows(t, 64).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    case = Case(norm="layer", bias=True, dtype=torch.float32, shape=(64, 130), **FULL)
    first = run_case(case, backend, DEVICE, seed=3)
    second = run_case(case, backend, DEVICE, seed=3)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


def test_backends_agree():
    """Triton and the torch backend agree with each other as closely as with the oracle."""
    case = Case(norm="layer", bias=True, dtype=torch.bfloat16, shape=(4, 5, 200), **FULL)
    a = run_case(case, "triton", DEVICE)
    b = run_case(case, "torch", DEVICE)
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), atol=0.1, rtol=0.02)


def test_plain_norms_match_torch(device):
    import resfuse
    x = torch.randn(3, 7, 96, device=device)
    w, b = torch.randn(96, device=device), torch.randn(96, device=device)
    for backend in BACKENDS:
        torch.testing.assert_close(resfuse.rms_norm(x, w, 1e-6, backend=backend),
                                   torch.nn.functional.rms_norm(x, (96,), w, 1e-6))
        torch.testing.assert_close(resfuse.layer_norm(x, w, b, 1e-5, backend=backend),
                                   torch.nn.functional.layer_norm(x, (96,), w, b, 1e-5))


def test_empty_rows(device):
    import resfuse
    for backend in BACKENDS:
        x = torch.randn(0, 3, 64, device=device, requires_grad=True)
        y, h = resfuse.add_rms_norm(x, torch.randn(0, 3, 64, device=device), torch.ones(64, device=device),
                                    backend=backend)
        assert y.shape == h.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
