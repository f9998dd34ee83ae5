"""The CUDA backend on a GPU (skipped without one), beyond the numerical matrix (test_matrix.py
runs every case, and the sizes only a GPU affords, with backend="cuda" under `make test-gpu`):
the row layouts sm_90 picks (from the kernels' own launch limits), misaligned inputs bitwise
equal to aligned ones, agreement with Triton, a non-default stream, CUDA-graph capture and
replay of forward and backward, no host synchronisation, determinism, opcheck and
torch.compile; the same for the sandwich layouts (norm_add_norm / norm_add)."""

import pytest
import torch
from numerics import (
    DTYPES,
    FULL,
    LAYOUTS,
    PERI_LN,
    Case,
    backward_op_args,
    cluster_blocks,
    full_feature_call,
    run_case,
)

import resfuse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

AVAILABLE = torch.cuda.is_available() and resfuse.backends()["cuda"].available
needs_cuda_ext = pytest.mark.skipif(
    not AVAILABLE,
    reason="needs a CUDA GPU"
    if not torch.cuda.is_available()
    else f"the cuda backend is not available: {resfuse.backends()['cuda'].reason}",
)
TRITON = torch.cuda.is_available() and resfuse.backends()["triton"].available
DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def test_cuda_backend_is_available_on_this_gpu():
    """On a GPU machine the extension must be there (RESFUSE_REQUIRE_CUDA_EXT=1 makes a missing
    one a failure rather than a skip of everything below)."""
    import os

    if not AVAILABLE and os.environ.get("RESFUSE_REQUIRE_CUDA_EXT") != "1":
        pytest.skip(resfuse.backends()["cuda"].reason)
    assert AVAILABLE, resfuse.backends()["cuda"].reason


SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
needs_sm90 = pytest.mark.skipif(not SM90, reason="thread-block clusters need sm_90 or newer")


def _layout_cases():
    """(D, forward blocks, backward blocks) at each block row and past it, and at the largest
    clusters, from the kernels' own limits (cuda_ext.launch_limits(), no GPU needed)."""
    if not AVAILABLE:
        return []
    from resfuse import cuda_ext

    L = cuda_ext.launch_limits()
    fwd, bwd, most = L["fwd_block_row"], L["bwd_block_row"], L["max_cluster_blocks"]
    sizes = sorted({bwd, bwd + 1, fwd + 1, 2 * fwd, bwd * most, fwd * most})
    return [(D, cluster_blocks(D, fwd, most), cluster_blocks(D, bwd, most)) for D in sizes]


@needs_cuda_ext
@pytest.mark.parametrize("D,fwd_blocks,bwd_blocks", _layout_cases())
def test_long_rows_span_clusters_on_sm90(D, fwd_blocks, bwd_blocks):
    """Rows too long for one block's registers span a thread-block cluster on sm_90 (one read
    and write per element); a row too long for the largest backward cluster streams.
    Elsewhere (sm_80) every such row is streamed in tiles."""
    from resfuse import cuda_ext

    L = cuda_ext.launch_limits()
    fwd, bwd = cuda_ext.row_layout(D), cuda_ext.row_layout(D, backward=True)
    if not SM90:
        fwd_blocks = bwd_blocks = 1
    assert (fwd["cluster_blocks"], bwd["cluster_blocks"]) == (fwd_blocks, bwd_blocks)
    assert fwd["single_tile"] == (fwd_blocks > 1 or D <= L["fwd_block_row"])
    assert bwd["single_tile"] == (bwd_blocks > 1 or D <= L["bwd_block_row"])


def _offset(t, elements):
    buf = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view.requires_grad_(t.requires_grad)


@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_misaligned_inputs_match_aligned_bitwise(norm, dtype):
    """Inputs one element into their storage take the scalar path: same arithmetic, same bits."""
    torch.manual_seed(0)
    D = 1024
    base = dict(
        x=torch.randn(8, 16, D, device="cuda", dtype=dtype),
        residual=torch.randn(8, 16, D, device="cuda", dtype=dtype),
        weight=torch.randn(D, device="cuda", dtype=dtype),
        bias=torch.randn(D, device="cuda", dtype=dtype),
    )

    def run(shift):
        t = {k: (_offset(v, 1) if shift else v.clone()).requires_grad_() for k, v in base.items()}
        fn = resfuse.add_rms_norm if norm == "rms" else resfuse.add_layer_norm
        args = [t["x"], t["residual"], t["weight"]] + ([t["bias"]] if norm == "layer" else [])
        y, h = fn(*args, branch_scale=0.5, backend="cuda")
        torch.autograd.backward([y, h], [torch.ones_like(y), torch.full_like(h, 0.5)])
        return [y, h] + [t[k].grad for k in ("x", "residual", "weight")]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@needs_cuda_ext
@pytest.mark.skipif(not TRITON, reason="triton not available")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [768, 4096, 12288])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_agrees_with_triton(norm, D, dtype):
    """The same call on both kernel backends: h (unit scales, an exact sum rounded once)
    bitwise equal; y and every gradient within the output dtype's rounding."""
    torch.manual_seed(0)
    inputs = [
        torch.randn(512, D, device="cuda", dtype=dtype),
        torch.randn(512, D, device="cuda", dtype=dtype),
        torch.randn(D, device="cuda"),
    ] + ([torch.randn(D, device="cuda")] if norm == "layer" else [])
    gy, gh = (
        torch.randn(512, D, device="cuda", dtype=dtype),
        torch.randn(512, D, device="cuda", dtype=dtype),
    )
    fn = resfuse.add_rms_norm if norm == "rms" else resfuse.add_layer_norm

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, h = fn(*leaves, backend=backend)
        return y, h, torch.autograd.grad([y, h], leaves, [gy, gh])

    y_c, h_c, grads_c = run("cuda")
    y_t, h_t, grads_t = run("triton")
    assert torch.equal(h_c, h_t)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y_c.float(), y_t.float(), atol=tol, rtol=tol)
    for a, b in zip(grads_c, grads_t):
        torch.testing.assert_close(a.float(), b.float(), atol=4 * tol, rtol=4 * tol)


@needs_cuda_ext
def test_runs_on_the_current_stream():
    """With the default stream busy, the op on a side stream finishes first: it was launched
    on the current (side) stream, not on the default one."""
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x)
    w = torch.randn(2048, device="cuda", requires_grad=True)
    y_ref, h_ref = resfuse.add_rms_norm(x, r, w, backend="cuda")
    (gx_ref, gw_ref) = torch.autograd.grad((y_ref.float().sum() + h_ref.float().sum()), (x, w))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    torch.cuda._sleep(2_000_000_000)  # about a second of the default stream
    with torch.cuda.stream(side):
        y, h = resfuse.add_rms_norm(x, r, w, backend="cuda")
        gx, gw = torch.autograd.grad((y.float().sum() + h.float().sum()), (x, w))
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    assert not torch.cuda.default_stream().query(), "the sleep ended early: inconclusive"
    for a, b in ((y, y_ref), (h, h_ref), (gx, gx_ref), (gw, gw_ref)):
        assert torch.equal(a, b)
    torch.cuda.synchronize()


@needs_cuda_ext
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_cuda_graph_capture_and_replay_forward_and_backward(norm):
    torch.manual_seed(0)
    D = 4096
    x = torch.randn(256, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(D, device="cuda", requires_grad=True)
    b = torch.randn(D, device="cuda", requires_grad=True)
    gy = torch.randn_like(x)

    def step():
        if norm == "rms":
            y, h = resfuse.add_rms_norm(x, r, w, branch_scale=0.5, backend="cuda")
            params = (x, r, w)
        else:
            y, h = resfuse.add_layer_norm(x, r, w, b, branch_scale=0.5, backend="cuda")
            params = (x, r, w, b)
        grads = torch.autograd.grad((y * gy).float().sum() + h.float().sum(), params)
        return (y, h) + grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: allocations, lazy init
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            gy.copy_(torch.randn_like(gy))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, step()):
            assert torch.equal(got, want)


@needs_cuda_ext
def test_no_host_synchronisation():
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(4096, device="cuda", requires_grad=True)
    b = torch.randn(4096, device="cuda", requires_grad=True)
    resfuse.add_layer_norm(x, r, w, b, backend="cuda")  # first call outside: one-time queries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, h = resfuse.add_layer_norm(x, r, w, b, backend="cuda")
        torch.autograd.backward([y, h], [torch.ones_like(y), torch.ones_like(h)])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda_ext
def test_backward_is_bitwise_deterministic():
    case = Case(norm="layer", dtype=torch.bfloat16, shape=(8192, 2048), bias=True, **FULL)
    first = run_case(case, "cuda", "cuda", seed=1)
    second = run_case(case, "cuda", "cuda", seed=1)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


@needs_cuda_ext
@pytest.mark.parametrize(
    "layout",
    [(False, True), (True, True), (True, False)],
    ids=["add_norm", "norm_add_norm", "norm_add"],
)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_opcheck(norm, layout):
    branch_norm, output_norm = layout
    spec, ops = full_feature_call(
        "cuda", rows=64, D=1000, norm=norm, branch_norm=branch_norm, output_norm=output_norm
    )
    torch.library.opcheck(torch.ops.resfuse.cuda_add_norm_fwd.default, (*ops, *spec.flat()))
    y, h, mean, mean_x = torch.ops.resfuse.cuda_add_norm_fwd(*ops, *spec.flat())
    bwd = backward_op_args(spec, ops, torch.randn_like(y), torch.randn_like(h), h, mean, mean_x)
    torch.library.opcheck(torch.ops.resfuse.cuda_add_norm_bwd.default, bwd)


@needs_cuda_ext
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(4, 128, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)

    def block(x, r, w):
        y, h = resfuse.add_rms_norm(x, r, w, backend="cuda")
        return (y.float() * 2).sum() + h.float().sum()

    eager = block(x, r, w)
    eager_grads = torch.autograd.grad(eager, (x, r, w))
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, r, w)
    grads = torch.autograd.grad(out, (x, r, w))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- sandwich layouts


def _sandwich_inputs(norm, D, dtype, rows=512, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    return dict(
        x=randn(rows, D, dtype=dtype),
        residual=randn(rows, D, dtype=dtype),
        branch_weight=randn(D),
        weight=randn(D),
        branch_bias=randn(D) if norm == "layer" else None,
        bias=randn(D) if norm == "layer" else None,
    )


def _sandwich(t, norm, backend, output_norm=True):
    """(outputs, leaves) of norm_add_norm (or norm_add) on the tensors of t."""
    if output_norm:
        out = resfuse.norm_add_norm(
            t["x"],
            t["residual"],
            t["branch_weight"],
            t["weight"],
            norm=norm,
            branch_bias=t["branch_bias"],
            bias=t["bias"],
            backend=backend,
        )
        leaves = [t[k] for k in ("x", "residual", "branch_weight", "weight", "branch_bias", "bias")]
    else:
        out = (
            resfuse.norm_add(
                t["x"],
                t["residual"],
                t["branch_weight"],
                norm=norm,
                branch_bias=t["branch_bias"],
                backend=backend,
            ),
        )
        leaves = [t[k] for k in ("x", "residual", "branch_weight", "branch_bias")]
    return out, [v for v in leaves if v is not None]


@needs_cuda_ext
@pytest.mark.skipif(not TRITON, reason="triton not available")
@pytest.mark.parametrize("output_norm", [True, False], ids=["norm_add_norm", "norm_add"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [768, 4608, 12288])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_sandwich_agrees_with_triton(norm, D, dtype, output_norm):
    """y, h and every gradient within the output dtype's rounding of Triton's."""
    inputs = _sandwich_inputs(norm, D, dtype)
    grads_out = [torch.randn(512, D, device="cuda", dtype=dtype) for _ in range(2)]

    def run(backend):
        t = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
        out, leaves = _sandwich(t, norm, backend, output_norm)
        return out, torch.autograd.grad(out, leaves, grads_out[: len(out)])

    out_c, grads_c = run("cuda")
    out_t, grads_t = run("triton")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for a, b in zip(out_c, out_t):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    for a, b in zip(grads_c, grads_t):
        torch.testing.assert_close(a.float(), b.float(), atol=4 * tol, rtol=4 * tol)


@needs_cuda_ext
@pytest.mark.parametrize("output_norm", [True, False], ids=["norm_add_norm", "norm_add"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_sandwich_misaligned_inputs_match_aligned_bitwise(norm, dtype, output_norm):
    inputs = _sandwich_inputs(norm, 1024, dtype, rows=128)
    grads_out = [torch.randn(128, 1024, device="cuda", dtype=dtype) for _ in range(2)]

    def run(shift):
        t = {
            k: None if v is None else (_offset(v, 1) if shift else v.clone()).requires_grad_()
            for k, v in inputs.items()
        }
        out, leaves = _sandwich(t, norm, "cuda", output_norm)
        return list(out) + list(torch.autograd.grad(out, leaves, grads_out[: len(out)]))

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@needs_cuda_ext
@pytest.mark.parametrize("output_norm", [True, False], ids=["norm_add_norm", "norm_add"])
def test_sandwich_cuda_graph_capture_and_replay(output_norm):
    inputs = {
        k: None if v is None else v.requires_grad_()
        for k, v in _sandwich_inputs("layer", 4096, torch.bfloat16, rows=256).items()
    }
    gy = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)

    def step():
        out, leaves = _sandwich(inputs, "layer", "cuda", output_norm)
        loss = (out[0] * gy).float().sum() + (out[1].float().sum() if output_norm else 0)
        return tuple(out) + torch.autograd.grad(loss, leaves)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            inputs["x"].copy_(torch.randn_like(inputs["x"]))
            gy.copy_(torch.randn_like(gy))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, step()):
            assert torch.equal(got, want)


@needs_cuda_ext
@pytest.mark.parametrize(
    "base",
    [PERI_LN, LAYOUTS[2].replace(norm="layer", branch_bias=True)],
    ids=["peri_ln", "norm_add_layer"],
)
def test_sandwich_backward_is_bitwise_deterministic(base):
    case = base.replace(dtype=torch.bfloat16, shape=(8192, 2048))
    first = run_case(case, "cuda", "cuda", seed=1)
    second = run_case(case, "cuda", "cuda", seed=1)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


@needs_cuda_ext
def test_sandwich_no_host_synchronisation():
    inputs = {
        k: None if v is None else v.requires_grad_()
        for k, v in _sandwich_inputs("layer", 4096, torch.bfloat16, rows=1024).items()
    }
    _sandwich(inputs, "layer", "cuda")  # first call outside: one-time queries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for output_norm in (True, False):
            out, _ = _sandwich(inputs, "layer", "cuda", output_norm)
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda_ext
def test_sandwich_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(4, 128, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    wb = torch.randn(1024, device="cuda", requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)

    def block(x, r, wb, w):
        y, h = resfuse.norm_add_norm(x, r, wb, w, zero_centered_weight=True, backend="cuda")
        h2 = resfuse.norm_add(y, h, wb, backend="cuda")
        return (y.float() * 2).sum() + h2.float().sum()

    eager = block(x, r, wb, w)
    eager_grads = torch.autograd.grad(eager, (x, r, wb, w))
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, r, wb, w)
    grads = torch.autograd.grad(out, (x, r, wb, w))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
