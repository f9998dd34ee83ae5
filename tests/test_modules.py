"""Drop-in modules: the same numbers as torch.nn's norms, state_dict round trips both ways,
the fused residual form, LayerScale and stochastic depth in AddNorm."""

import pytest
import torch
from conftest import DEVICE

import resfuse

# on a GPU the compiled CUDA backend joins the matrix (tests/test_cuda_sim.py runs its kernels on CPU)
BACKENDS = ["triton", "torch"] + (
    ["cuda"] if DEVICE == "cuda" and resfuse.backends()["cuda"].available else []
)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("RESFUSE_BACKEND", request.param)
    return request.param


def _copy_params(src, dst):
    dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_a_drop_in_for_torch(dtype, backend):
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(96, eps=1e-6, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref.weight.normal_()
    ours = resfuse.RMSNorm(96, eps=1e-6, device=DEVICE, dtype=dtype)
    _copy_params(ref, ours)
    x = torch.randn(3, 5, 96, device=DEVICE, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(
        ours.weight.grad.float(),
        ref.weight.grad.float(),
        atol=1e-4 if dtype == torch.float32 else 0.3,
        rtol=2e-2,
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [96, (4, 24)], ids=["1d", "2d"])
def test_layernorm_is_a_drop_in_for_torch(bias, shape, backend):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(shape, bias=bias, device=DEVICE)
    with torch.no_grad():
        ref.weight.normal_()
        if bias:
            ref.bias.normal_()
    ours = resfuse.LayerNorm(shape, bias=bias, device=DEVICE)
    _copy_params(ref, ours)
    tail = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(3, 5, *tail, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(
            p.grad, dict(ref.named_parameters())[name].grad, atol=1e-4, rtol=1e-5
        )


ROUND_TRIPS = {
    "rms": (lambda: torch.nn.RMSNorm(32), lambda: resfuse.RMSNorm(32)),
    "rms-no-affine": (
        lambda: torch.nn.RMSNorm(32, elementwise_affine=False),
        lambda: resfuse.RMSNorm(32, elementwise_affine=False),
    ),
    "layer": (lambda: torch.nn.LayerNorm(32), lambda: resfuse.LayerNorm(32)),
    "layer-no-bias": (
        lambda: torch.nn.LayerNorm(32, bias=False),
        lambda: resfuse.LayerNorm(32, bias=False),
    ),
    "layer-2d": (lambda: torch.nn.LayerNorm((4, 8)), lambda: resfuse.LayerNorm((4, 8))),
}


@pytest.mark.parametrize("kind", ROUND_TRIPS)
def test_state_dict_round_trips(kind):
    make_theirs, make_ours = ROUND_TRIPS[kind]
    theirs, ours, back = make_theirs(), make_ours(), make_theirs()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # torch -> resfuse
    back.load_state_dict(ours.state_dict())  # resfuse -> torch
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v) and torch.equal(back.state_dict()[k], v)
    x = torch.randn(3, *ours.normalized_shape)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_hugging_face_attribute_names():
    norm = resfuse.RMSNorm(16, eps=1e-5)
    assert norm.variance_epsilon == norm.eps == 1e-5
    norm.variance_epsilon = 1e-6
    assert norm.eps == 1e-6


def test_eps_none_follows_torch():
    x = torch.randn(4, 16)
    theirs = torch.nn.RMSNorm(16)  # eps=None: finfo(dtype).eps
    ours = resfuse.RMSNorm(16, eps=None)
    torch.testing.assert_close(ours(x), theirs(x))


def test_fused_residual_form(backend):
    norm = resfuse.RMSNorm(64, device=DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(2, 3, 64, device=DEVICE), torch.randn(2, 3, 64, device=DEVICE)
    y, h = norm(x, r)
    torch.testing.assert_close(h, r + x)
    torch.testing.assert_close(y, norm(r + x), atol=1e-5, rtol=1e-5)
    ln = resfuse.LayerNorm((4, 16), device=DEVICE)
    y2, h2 = ln(x.reshape(2, 3, 4, 16), r.reshape(2, 3, 4, 16))
    assert y2.shape == h2.shape == (2, 3, 4, 16)
    torch.testing.assert_close(y2, ln(h2), atol=1e-5, rtol=1e-5)


def test_zero_centered_weight_starts_as_identity():
    norm = resfuse.RMSNorm(32, zero_centered_weight=True)
    assert torch.equal(norm.weight, torch.zeros(32))
    x = torch.randn(5, 32)
    torch.testing.assert_close(norm(x), resfuse.RMSNorm(32)(x))


def test_addnorm_layer_scale_gets_a_gradient(backend):
    block = resfuse.AddNorm(48, norm="layer", layer_scale_init=0.1, device=DEVICE)
    x = torch.randn(2, 5, 48, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 5, 48, device=DEVICE, requires_grad=True)
    y, h = block(x, r)
    torch.testing.assert_close(h, r + 0.1 * x)
    (y.sum() + h.pow(2).sum()).backward()
    assert block.layer_scale.grad is not None and block.layer_scale.grad.abs().sum() > 0
    expected = ((2 * h + _ln_grad(h, block)) * x).sum((0, 1))
    torch.testing.assert_close(block.layer_scale.grad, expected.detach(), atol=1e-4, rtol=1e-4)


def _ln_grad(h, block):
    hh = h.detach().requires_grad_()
    torch.nn.functional.layer_norm(hh, (48,), block.weight, block.bias, block.eps).sum().backward()
    return hh.grad


def test_addnorm_drop_path_drops_whole_samples(backend):
    torch.manual_seed(0)
    block = resfuse.AddNorm(32, drop_path=0.5, device=DEVICE)
    x = torch.randn(64, 4, 32, device=DEVICE)
    r = torch.randn(64, 4, 32, device=DEVICE)
    block.train()
    _, h = block(x, r)
    dropped = torch.isclose(h, r).all(-1).all(-1)
    kept = torch.isclose(h, r + 2 * x, atol=1e-6).all(-1).all(-1)
    assert (dropped | kept).all(), "each sample is either dropped or kept whole, scaled by 1/keep"
    assert 5 < int(dropped.sum()) < 59
    block.eval()
    _, h_eval = block(x, r)
    torch.testing.assert_close(h_eval, r + x)


def test_addnorm_post_norm_and_residual_scale(backend):
    block = resfuse.AddNorm(32, norm="layer", residual_scale=2.0, prenorm=False, device=DEVICE)
    x, r = torch.randn(3, 32, device=DEVICE), torch.randn(3, 32, device=DEVICE)
    y = block(x, r)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(
        y, torch.nn.functional.layer_norm(2 * r + x, (32,), eps=1e-5), atol=1e-5, rtol=1e-5
    )
