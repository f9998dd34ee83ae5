"""The add + norm entry points beyond the numerical matrix (test_matrix.py has every flag,
shape, layout and dtype on every backend): rows used in place through their strides, the
backends agreeing with each other, the plain norms against torch's, empty inputs."""

import pytest
import torch
from conftest import DEVICE
from numerics import FULL, Case, run_case

import resfuse

# on a GPU the compiled CUDA backend joins the matrix (tests/test_cuda_sim.py runs its kernels on CPU)
BACKENDS = ["triton", "torch"] + (
    ["cuda"] if DEVICE == "cuda" and resfuse.backends()["cuda"].available else []
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_in_place_through_strides(backend, device):
    """A row-padded input is read in place (no copy), a non-collapsible one is copied."""
    from resfuse.ops import rows

    base = torch.randn(6, 80, device=device)
    x = base[:, :64]
    assert rows(x, 64).data_ptr() == x.data_ptr() and rows(x, 64).stride(0) == 80
    t = torch.randn(4, 6, 64, device=device).transpose(0, 1)
    assert rows(t, 64).is_contiguous()


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
        torch.testing.assert_close(
            resfuse.rms_norm(x, w, 1e-6, backend=backend),
            torch.nn.functional.rms_norm(x, (96,), w, 1e-6),
        )
        torch.testing.assert_close(
            resfuse.layer_norm(x, w, b, 1e-5, backend=backend),
            torch.nn.functional.layer_norm(x, (96,), w, b, 1e-5),
        )


def test_emptyrows(device):
    import resfuse

    for backend in BACKENDS:
        x = torch.randn(0, 3, 64, device=device, requires_grad=True)
        y, h = resfuse.add_rms_norm(
            x, torch.randn(0, 3, 64, device=device), torch.ones(64, device=device), backend=backend
        )
        assert y.shape == h.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS + (["cpu"] if DEVICE == "cpu" else []))
def test_emptyrows_2d_parameter_gradients(device, backend):
    """No rows, 2-D: the gradient of y.sum() reaches the ops as an expanded tensor with zero
    strides (contiguous() keeps it so), and the parameter gradients are zeros."""
    import resfuse

    if backend == "cpu" and not resfuse.backends()["cpu"].available:
        pytest.skip(resfuse.backends()["cpu"].reason)
    x = torch.randn(0, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    for _ in range(2):  # a reused allocation would show stale partial sums
        y, h = resfuse.add_layer_norm(x, torch.randn(0, 64, device=device), w, b, backend=backend)
        dx, dw, db = torch.autograd.grad(y.sum() + h.sum(), (x, w, b))
        assert dx.shape == x.shape
        assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))
