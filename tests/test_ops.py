"""The autograd layer and the torch.library ops: what is saved for backward (activation
memory), gradients reaching one output only, torch.compile without graph breaks, opcheck."""

import pytest
import torch
from conftest import DEVICE

import resfuse
from resfuse import ops
from resfuse.spec import AddNormSpec, Operands

# on a GPU the compiled CUDA backend joins the matrix (tests/test_cuda_sim.py runs its kernels
# on CPU); on CPU the compiled CPU kernels, when this install has them
BACKENDS = (
    ["triton", "torch"]
    + (["cuda"] if DEVICE == "cuda" and resfuse.backends()["cuda"].available else [])
    + (["cpu"] if DEVICE == "cpu" and resfuse.backends()["cpu"].available else [])
)


class SavedBytes:
    """Bytes of distinct activation storages saved for backward (parameters excluded)."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages = {}
        self.tensors = []

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            self.storages[ptr] = t.untyped_storage().nbytes()
            self.tensors.append(t)
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self):
        return sum(self.storages.values())


def hf_add_rms_norm(x, residual, weight, eps):
    """How Hugging Face Llama writes it: add, then RMSNorm with an fp32 upcast."""
    h = residual + x
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    hf = hf * torch.rsqrt(variance + eps)
    return weight * hf.to(x.dtype), h


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_memory_fused_vs_eager(backend):
    """bf16: the fused op saves ~2 bytes/element (h), eager HF-style ~6 (fp32 h + normalized)."""
    B, T, D = 4, 64, 256
    x = torch.randn(B, T, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    r = torch.randn(B, T, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(D, dtype=torch.bfloat16, device=DEVICE))

    with SavedBytes(exclude=[w]) as fused:
        y, h = resfuse.add_rms_norm(x, r, w, 1e-6, backend=backend)
    with SavedBytes(exclude=[w]) as eager:
        y_ref, h_ref = hf_add_rms_norm(x, r, w, 1e-6)

    n = B * T * D
    assert fused.total <= 2 * n + 16 * B * T, f"fused saves {fused.total / n:.2f} B/element"
    assert all(t.dtype != torch.float32 or t.numel() < n for t in fused.tensors), (
        "the fused op saved a full-size fp32 tensor"
    )
    ratio = eager.total / fused.total
    assert ratio >= 2.9, (
        f"eager saves {eager.total / n:.2f} B/elem, fused {fused.total / n:.2f}: {ratio:.2f}x"
    )
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_saved_tensors_are_h_and_row_stats(norm, backend):
    N, D = 32, 128
    x = torch.randn(N, D, device=DEVICE, requires_grad=True)
    r = torch.randn(N, D, device=DEVICE, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(D, device=DEVICE))
    gamma = torch.nn.Parameter(torch.full((D,), 0.1, device=DEVICE))
    fn = (
        resfuse.add_rms_norm
        if norm == "rms"
        else (lambda *a, **k: resfuse.add_layer_norm(a[0], a[1], a[2], None, *a[3:], **k))
    )
    with SavedBytes(exclude=[w, gamma]) as plain:
        fn(x, r, w, 1e-6, backend=backend)
    stats = 0 if norm == "rms" else 4 * N  # the LayerNorm mean, the backward's shift
    assert plain.total == 4 * N * D + stats
    with SavedBytes(exclude=[w, gamma]) as layer_scale:  # + x, for LayerScale's own gradient
        fn(x, r, w, 1e-6, branch_scale=gamma, backend=backend)
    assert layer_scale.total == 2 * 4 * N * D + stats
    with SavedBytes(exclude=[w]) as plain_norm:  # no residual: h is x, saved without a copy
        resfuse.rms_norm(x, w, backend=backend)
    assert plain_norm.total == 4 * N * D and plain_norm.tensors[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["y", "h"])
def test_gradient_through_one_output(used, backend):
    x = torch.randn(6, 48, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 48, device=DEVICE, requires_grad=True)
    w = torch.randn(48, device=DEVICE, requires_grad=True)
    y, h = resfuse.add_rms_norm(x, r, w, backend=backend)
    (y if used == "y" else h).pow(2).sum().backward()
    x2, r2, w2 = (t.detach().clone().requires_grad_() for t in (x, r, w))
    y2, h2 = resfuse.add_rms_norm(x2, r2, w2, backend="torch")
    (y2 if used == "y" else h2).pow(2).sum().backward()
    for a, b in ((x, x2), (r, r2), (w, w2)):
        if b.grad is None:
            assert a.grad is None or not a.grad.any()
        else:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_no_grad_path_skips_autograd():
    x = torch.randn(4, 32, device=DEVICE)
    with torch.no_grad():
        y, h = resfuse.add_rms_norm(x, x.clone(), torch.ones(32, device=DEVICE, requires_grad=True))
    assert y.grad_fn is None and h.grad_fn is None


def test_outputs_never_alias_inputs():
    x = torch.randn(4, 32, device=DEVICE)
    y, h = resfuse.add_rms_norm(x, None, None, branch_scale=None)  # h == x numerically
    assert h.data_ptr() != x.data_ptr() and torch.equal(h, x)


class PreNormBlock(torch.nn.Module):
    def __init__(self, D):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)
        self.norm = resfuse.RMSNorm(D)

    def forward(self, x, residual):
        y, h = self.norm(self.lin(x), residual)
        return y * 2, h


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch.manual_seed(0)
    block = PreNormBlock(32).to(DEVICE)
    x = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    y, h = compiled(x, r)
    (y.sum() + h.pow(2).sum()).backward()
    grads = [t.grad.clone() for t in (x, r, block.lin.weight, block.norm.weight)]
    for t in (x, r, block.lin.weight, block.norm.weight):
        t.grad = None
    y2, h2 = block(x, r)
    (y2.sum() + h2.pow(2).sum()).backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(h, h2)
    for g, t in zip(grads, (x, r, block.lin.weight, block.norm.weight)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def _call(norm, *, layer_scale=False, residual=True, rows=(2, 3)):
    """(spec, operands) of one call, as the entry points build them."""
    D = 24
    x = torch.randn(*rows, D, device=DEVICE, requires_grad=True)
    r = torch.randn(*rows, D, device=DEVICE, requires_grad=True) if residual else None
    w = torch.randn(D, device=DEVICE, requires_grad=True)
    b = torch.randn(D, device=DEVICE, requires_grad=True) if norm == "layer" else None
    bs = torch.randn(D, device=DEVICE, requires_grad=True) if layer_scale else None
    rs = torch.rand(*rows, device=DEVICE)
    spec = AddNormSpec(
        norm=norm,
        eps=1e-5,
        residual_scale=0.5,
        has_residual=residual,
        has_bias=b is not None,
        has_branch_scale=layer_scale,
        has_rowscale=True,
    )
    return spec, Operands(x, r, w, b, bs, rs)


def _op_args(norm, backend, **kw):
    """The registered op's flat arguments: the operands, the spec's flat form, the backend."""
    spec, operands = _call(norm, **kw)
    return (*operands, *spec.flat(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["rms", "layer", "layer_scale", "no_residual"])
def test_opcheck_add_norm(variant, backend):
    args = _op_args(
        "rms" if variant == "rms" else "layer",
        backend,
        layer_scale=variant == "layer_scale",
        residual=variant != "no_residual",
    )
    torch.library.opcheck(torch.ops.resfuse.add_norm.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_add_norm_backward(backend):
    spec, (x, r, w, b, bs, rs, _, _) = _call("layer", layer_scale=True)
    with torch.no_grad():
        y, h, mean, mean_x = torch.ops.resfuse.add_norm(
            *_op_args("layer", backend, layer_scale=True)
        )
    assert spec.dresidual == "kernel"  # the backward stores dresidual: every output exists
    # dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x, the spec, backend
    args = (
        torch.randn_like(y),
        torch.randn_like(h),
        h,
        x.detach(),
        w.detach(),
        bs.detach(),
        rs,
        None,
        mean,
        None,
        *spec.flat(),
        backend,
    )
    torch.library.opcheck(torch.ops.resfuse.add_norm_backward.default, args)


def test_eager_path_matches_registered_op():
    """The dispatcher-free eager path and the registered op give identical results
    (on the 2-D tensors the entry points hand them)."""
    spec, operands = _call("layer", layer_scale=True, rows=(6,))
    out_eager = ops._AddNormFunction.apply(spec, "torch", *operands)
    out_op = torch.ops.resfuse.add_norm(*operands, *spec.flat(), "torch")
    for a, b in zip(out_eager, out_op):  # the eager path returns None where the op has empties
        assert b.numel() == 0 if a is None else torch.equal(a, b)
    leaves = [t for t in operands[:5] if t is not None]
    sum(t.sum() for t in out_eager[:2]).backward()
    eager_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    sum(t.sum() for t in out_op[:2]).backward()
    for g, t in zip(eager_grads, leaves):
        assert torch.equal(g, t.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_can_be_edited_in_place(backend):
    """y of an N-D input is an ordinary tensor: in-place edits work and autograd sees them.
    h is saved for backward (it is what the backward differentiates at), so editing it in
    place is caught by autograd's version check, as for any saved output."""
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    y, h = resfuse.add_rms_norm(x, r, w, backend=backend)
    y.mul_(2)
    (y.sum() + h.pow(2).sum()).backward()
    x2, r2, w2 = (t.detach().clone().requires_grad_() for t in (x, r, w))
    y2, h2 = resfuse.add_rms_norm(x2, r2, w2, backend="torch")
    (2 * y2.sum() + h2.pow(2).sum()).backward()
    for a, b in ((x, x2), (r, r2), (w, w2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    y, h = resfuse.add_rms_norm(x, r, w, backend=backend)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_extension_calls_the_op_behind_its_overload():
    """The compiled backends call the C++ op behind ``OpOverload.__call__`` (a Python frame
    less per call), unless the overload dispatches in Python."""
    from resfuse.extension import _direct

    overload = torch.ops.aten.add.Tensor
    assert _direct(overload) is overload._op

    class PythonDispatched:
        _op = staticmethod(lambda *a: None)
        _pyobj_dispatcher = object()

    dispatched = PythonDispatched()
    assert _direct(dispatched) is dispatched
    assert _direct(object) is object  # no _op: the object itself
