"""The reference itself: it agrees with torch's own norms, and its closed-form backward
agrees with autograd through it (float64)."""

import pytest
import torch

from resfuse import reference


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_normalize_matches_torch(norm):
    h = torch.randn(4, 7, 96, dtype=torch.float64)
    w, b = torch.randn(96, dtype=torch.float64), torch.randn(96, dtype=torch.float64)
    if norm == "rms":
        expected = torch.nn.functional.rms_norm(h, (96,), w, 1e-6)
        got = reference.normalize(h, w, None, 1e-6, norm="rms")
    else:
        expected = torch.nn.functional.layer_norm(h, (96,), w, b, 1e-5)
        got = reference.normalize(h, w, b, 1e-5, norm="layer")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("D", [1, 5, 300])
def test_normalize_backward_matches_autograd(norm, weight, zero_centered, D):
    h = torch.randn(6, 3, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True) if weight else None
    b = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 3, D, dtype=torch.float64)
    y = reference.normalize(h, w, b, 1e-5, norm=norm, zero_centered_weight=zero_centered)
    y.backward(dy)
    dh, dw, db = reference.normalize_backward(
        h.detach(), dy, w, 1e-5, norm=norm, zero_centered_weight=zero_centered
    )
    torch.testing.assert_close(dh, h.grad)
    torch.testing.assert_close(db, b.grad)
    if weight:
        torch.testing.assert_close(dw, w.grad)
    else:
        assert dw is None


def test_residual_sum_layouts():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    r = torch.randn(2, 3, 8, dtype=torch.float64)
    gamma = torch.randn(8, dtype=torch.float64)
    keep = torch.tensor([[0.0], [2.0]], dtype=torch.float64).expand(2, 3)
    h = reference.residual_sum(
        x, r, residual_scale=0.5, branch_scale=gamma, rowscale=keep, compute_dtype=torch.float64
    )
    torch.testing.assert_close(h, 0.5 * r + gamma * keep.unsqueeze(-1) * x)
    torch.testing.assert_close(h[0], 0.5 * r[0])  # a dropped sample keeps only its residual
