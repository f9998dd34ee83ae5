"""The sandwich layouts (issue 7): norm_add_norm (Gemma2/3, Peri-LN) and norm_add (OLMo2),
forward and backward against the float64 reference, every flag x dtype, odd shapes, long
rows, layouts and mixed dtypes; saved tensors; the module."""

import itertools

import pytest
import torch

import resfuse
from conftest import DEVICE
from numerics import DTYPES, Case, run_case
from test_ops import SavedBytes

# on a GPU the compiled CUDA backend joins the matrix (tests/test_cuda_sim.py runs its kernels on CPU)
BACKENDS = ["triton", "torch"] + (
    ["cuda"] if DEVICE == "cuda" and resfuse.backends()["cuda"].available else [])


def flag_cases():
    for norm, residual, bw, weight, zc, prenorm in itertools.product(
            ("rms", "layer"), ("none", "same", "fp32"), (True, False), (True, False),
            (False, True), (True, False)):
        for bb, bias in (itertools.product((False, True), repeat=2) if norm == "layer" else [(False, False)]):
            yield Case(norm=norm, residual=residual, branch_norm=True, branch_weight=bw,
                       branch_bias=bb, weight=weight, bias=bias, zero_centered=zc, prenorm=prenorm)
    for norm, residual, bw, zc in itertools.product(("rms", "layer"), ("none", "same", "fp32"),
                                                    (True, False), (False, True)):
        for bb in ((False, True) if norm == "layer" else (False,)):
            yield Case(norm=norm, residual=residual, branch_norm=True, branch_weight=bw,
                       branch_bias=bb, weight=False, output_norm=False, zero_centered=zc)


CASES = [c.replace(dtype=d) for d in DTYPES for c in flag_cases()
         if not (c.residual == "fp32" and d == torch.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_flag_combination(case, backend):
    run_case(case, backend, DEVICE)


GEMMA = Case(norm="rms", branch_norm=True, zero_centered=True)
PERI_LN = Case(norm="layer", branch_norm=True, branch_bias=True, bias=True)
OLMO2 = Case(norm="rms", branch_norm=True, weight=False, output_norm=False)
LAYOUTS = [GEMMA, PERI_LN, OLMO2]
LAYOUT_IDS = ["gemma", "peri_ln", "olmo2"]
SHAPES = [(7,), (1, 1), (5, 7), (3, 5, 64), (2, 2, 3, 1000), (3, 4097)]
MIXED = [
    dict(dtype=torch.bfloat16, residual="fp32"),
    dict(dtype=torch.bfloat16, residual="same", residual_dtype=torch.float32),
    dict(dtype=torch.float16, residual="same", out_dtype=torch.float32),
]


def mixed_case(base, mixed):
    if not base.output_norm and "out_dtype" in mixed:
        mixed = {k: v for k, v in mixed.items() if k != "out_dtype"}
    return base.replace(shape=(4, 3, 96), **mixed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_shapes(base, shape, dtype, backend):
    run_case(base.replace(dtype=dtype, shape=shape), backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,dtype", [(6000, torch.float32), (6000, torch.bfloat16),
                                     (65536 - 7, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_long_rows(base, D, dtype, backend):
    # 6000: the backward streams chunks (three passes); ~64K: the forward too
    run_case(base.replace(dtype=dtype, shape=(3, D)), backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "transposed", "col_strided"])
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_non_contiguous(base, layout, backend):
    run_case(base.replace(dtype=torch.bfloat16, shape=(3, 4, 72), layout=layout), backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mixed", MIXED, ids=lambda m: str(Case(**m)))
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_mixed_dtypes(base, mixed, backend):
    run_case(mixed_case(base, mixed), backend, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    case = PERI_LN.replace(shape=(64, 130))
    first = run_case(case, backend, DEVICE, seed=3)
    second = run_case(case, backend, DEVICE, seed=3)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_saved_tensors(norm, backend):
    """Saved: h (the output norm is differentiated at it), x (the branch norm's), and for
    LayerNorm the two row means (shifts); norm_add needs no h."""
    N, D = 16, 128
    x = torch.randn(N, D, device=DEVICE, requires_grad=True)
    r = torch.randn(N, D, device=DEVICE, requires_grad=True)
    wb = torch.nn.Parameter(torch.ones(D, device=DEVICE))
    w = torch.nn.Parameter(torch.ones(D, device=DEVICE))
    stats = 0 if norm == "rms" else 4 * N
    with SavedBytes(exclude=[wb, w]) as saved:
        resfuse.norm_add_norm(x, r, wb, w, norm=norm, backend=backend)
    assert saved.total == 2 * 4 * N * D + 2 * stats
    with SavedBytes(exclude=[wb]) as saved:
        resfuse.norm_add(x, r, wb, norm=norm, backend=backend)
    assert saved.total == 4 * N * D + stats and saved.tensors[0].data_ptr() == x.data_ptr()


def test_errors_name_the_argument():
    x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="norm"):
        resfuse.norm_add_norm(x, r, w, w, norm="batch")
    with pytest.raises(ValueError, match="branch_weight"):
        resfuse.norm_add_norm(x, r, torch.ones(7), w)
    with pytest.raises(ValueError, match="branch_bias"):
        resfuse.norm_add(x, r, w, branch_bias=torch.ones(9))
    with pytest.raises(ValueError, match="residual"):
        resfuse.norm_add(x, torch.randn(8), w)
    with pytest.raises(TypeError, match="prenorm"):
        resfuse.norm_add_norm(x, r, w, w, prenorm=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_two_norms_and_an_add(backend, monkeypatch):
    monkeypatch.setenv("RESFUSE_BACKEND", backend)
    torch.manual_seed(0)
    m = resfuse.NormAddNorm(64, norm="rms", zero_centered_weight=True, device=DEVICE)
    with torch.no_grad():
        m.branch_norm.weight.normal_()
        m.norm.weight.normal_()
    x, r = torch.randn(2, 5, 64, device=DEVICE), torch.randn(2, 5, 64, device=DEVICE)
    y, h = m(x, r)
    h_ref = r + m.branch_norm(x)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, m.norm(h_ref), atol=1e-5, rtol=1e-5)
    assert set(m.state_dict()) == {"branch_norm.weight", "norm.weight"}
    olmo = resfuse.NormAddNorm.from_norms(m.branch_norm)
    torch.testing.assert_close(olmo(x, r), h_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="agree"):
        resfuse.NormAddNorm.from_norms(resfuse.RMSNorm(64), resfuse.RMSNorm(64, eps=1e-3))
