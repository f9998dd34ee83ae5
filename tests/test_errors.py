"""Bad input: a ValueError or TypeError naming the argument, raised before any kernel runs,
and no input is ever written (API.md, "Errors")."""

import pytest
import torch
from conftest import cpu_auto

import resfuse
from resfuse import backend_registry

D = 64


def good():
    return dict(
        x=torch.randn(2, 3, D),
        residual=torch.randn(2, 3, D),
        weight=torch.ones(D),
        bias=torch.zeros(D),
    )


# (argument name, override, expected exception); the message must name the argument
BAD_ADD_NORM = [
    ("x", dict(x=[1.0, 2.0]), TypeError),
    ("x", dict(x=torch.ones(2, D, dtype=torch.int32)), TypeError),
    ("x", dict(x=torch.ones(2, 3, D, dtype=torch.float64)), TypeError),
    ("x", dict(x=torch.tensor(1.0)), ValueError),
    ("x", dict(x=torch.ones(2, 0)), ValueError),
    ("residual", dict(residual=torch.randn(D)), ValueError),  # would broadcast
    ("residual", dict(residual=torch.randn(2, 1, D)), ValueError),  # would broadcast
    ("residual", dict(residual=torch.randn(2, 3, D).double()), TypeError),
    ("residual", dict(residual=torch.randn(2, 3, D, device="meta")), ValueError),
    ("weight", dict(weight=torch.ones(D - 1)), ValueError),
    ("weight", dict(weight=torch.ones(1, D)), ValueError),
    ("weight", dict(weight=torch.ones(D, dtype=torch.int64)), TypeError),
    ("weight", dict(weight=[1.0] * D), TypeError),
    ("weight", dict(weight=torch.ones(D, device="meta")), ValueError),
    ("bias", dict(bias=torch.zeros(D + 1)), ValueError),
    ("eps", dict(eps=-1e-5), ValueError),
    ("eps", dict(eps=float("nan")), ValueError),
    ("eps", dict(eps=torch.tensor(1e-5)), TypeError),
    ("eps", dict(eps=True), TypeError),
    ("residual_scale", dict(residual_scale="2"), TypeError),
    ("residual_scale", dict(residual_scale=float("inf")), ValueError),
    ("branch_scale", dict(branch_scale=torch.ones(1)), ValueError),
    ("branch_scale", dict(branch_scale=torch.ones(2, 3, D)), ValueError),
    ("branch_scale", dict(branch_scale="0.5"), TypeError),
    ("rowscale", dict(rowscale=torch.ones(4)), ValueError),
    ("rowscale", dict(rowscale=torch.ones(2, 3, D)), ValueError),
    ("rowscale", dict(rowscale=torch.ones(1, 2, 3)), ValueError),
    ("rowscale", dict(rowscale=torch.ones(2, 1, dtype=torch.int32)), TypeError),
    ("residual_dtype", dict(residual_dtype=torch.float64), TypeError),
    ("out_dtype", dict(out_dtype="bfloat16"), TypeError),
    ("prenorm", dict(prenorm="yes"), TypeError),
    ("zero_centered_weight", dict(zero_centered_weight=1), TypeError),
    ("backend", dict(backend="cudnn"), ValueError),
    ("backend", dict(backend=None), ValueError),
]


@pytest.fixture
def no_kernels(monkeypatch):
    """Any kernel launch fails the test: errors must come first."""

    def forbidden(name):
        raise AssertionError(f"a kernel ({name}) ran before the argument error")

    monkeypatch.setattr(backend_registry, "implementation", forbidden)


BAD_CALLS = [
    (fn, *bad)
    for fn in ("add_rms_norm", "add_layer_norm")
    for bad in BAD_ADD_NORM
    if not (fn == "add_rms_norm" and bad[0] == "bias")
]  # add_rms_norm has no bias


@pytest.mark.parametrize(
    "fn,arg,override,exc",
    BAD_CALLS,
    ids=[f"{fn}-{a}-{i}" for i, (fn, a, _, _) in enumerate(BAD_CALLS)],
)
def test_bad_argument_is_named(fn, arg, override, exc, no_kernels):
    kw = {**good(), **override}
    snapshot = {
        k: v.clone()
        for k, v in kw.items()
        if isinstance(v, torch.Tensor) and v.device.type == "cpu"
    }
    extra = {k: kw.pop(k) for k in list(kw) if k not in ("x", "residual", "weight", "bias")}
    args = [kw["x"], kw["residual"], kw["weight"]] + (
        [kw["bias"]] if fn == "add_layer_norm" else []
    )
    with pytest.raises(exc) as info:
        getattr(resfuse, fn)(*args, **extra)
    assert arg in str(info.value), f"message does not name {arg!r}: {info.value}"
    for k, v in snapshot.items():
        assert torch.equal(kw.get(k, extra.get(k)), v), f"{k} was modified"


@pytest.mark.parametrize(
    "call",
    [
        lambda: resfuse.rms_norm(torch.randn(3, D), torch.ones(D + 1)),
        lambda: resfuse.layer_norm(torch.randn(3, D), torch.ones(D), torch.zeros(3)),
        lambda: resfuse.rms_norm(torch.randn(3, D), torch.ones(D), out_dtype=torch.int8),
    ],
)
def test_plain_norm_errors(call, no_kernels):
    with pytest.raises((ValueError, TypeError)):
        call()


def test_environment_backend_is_validated(monkeypatch):
    monkeypatch.setenv("RESFUSE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="RESFUSE_BACKEND"):
        resfuse.rms_norm(torch.randn(2, D), torch.ones(D))


def test_environment_backend_is_used(monkeypatch):
    monkeypatch.setenv("RESFUSE_BACKEND", "torch")
    assert backend_registry.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("RESFUSE_BACKEND", "auto")
    assert backend_registry.resolve("auto", torch.device("cpu")) == cpu_auto()
    monkeypatch.setenv("RESFUSE_BACKEND", "triton")
    assert backend_registry.resolve("auto", torch.device("cpu")) == "triton"  # interpreter on


def test_unavailable_backends_say_why(monkeypatch):
    x, w = torch.randn(2, D), torch.ones(D)
    if not backend_registry.backends()["cuda"].available:
        with pytest.raises(resfuse.BackendUnavailableError, match="cuda"):
            resfuse.rms_norm(x, w, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(resfuse.BackendUnavailableError, match="TRITON_INTERPRET"):
        resfuse.rms_norm(x, w, backend="triton")
    assert "TRITON_INTERPRET" in backend_registry.backends()["triton"].reason


def test_backends_report():
    report = resfuse.backends()
    assert set(report) == {"auto", "cuda", "triton", "cpu", "torch"}
    assert report["torch"].available
    text = str(report)
    for name in report:
        assert name in text
    for status in report.values():
        assert status.reason, f"{status.name} gives no reason"


def test_auto_on_cpu_is_the_cpu_backend_when_built():
    assert backend_registry.resolve("auto", torch.device("cpu")) == cpu_auto()
    assert f"CPU tensors: {cpu_auto()}" in resfuse.backends()["auto"].reason


@pytest.mark.parametrize(
    "make",
    [
        lambda: resfuse.RMSNorm(0),
        lambda: resfuse.RMSNorm((4, -1)),
        lambda: resfuse.LayerNorm(()),
        lambda: resfuse.AddNorm(D, norm="batch"),
        lambda: resfuse.AddNorm(D, drop_path=1.0),
    ],
)
def test_module_construction_errors(make):
    with pytest.raises(ValueError):
        make()


def test_module_input_shape_error():
    with pytest.raises(ValueError, match="normalized_shape"):
        resfuse.RMSNorm(D)(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="residual"):
        resfuse.LayerNorm((4, 16))(torch.randn(2, 4, 16), torch.randn(4, 16))
