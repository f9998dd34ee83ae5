"""The sandwich layouts (norm_add_norm: Gemma2/3, Peri-LN; norm_add: OLMo2) beyond the
numerical matrix (test_matrix.py has their every flag, shape, layout and dtype on every
backend): what they save for backward, their errors, the module."""

import pytest
import torch
from conftest import DEVICE
from test_ops import SavedBytes

import resfuse

# on a GPU the compiled CUDA backend joins the matrix (tests/test_cuda_sim.py runs its kernels on CPU)
BACKENDS = ["triton", "torch"] + (
    ["cuda"] if DEVICE == "cuda" and resfuse.backends()["cuda"].available else []
)


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
