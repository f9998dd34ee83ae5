"""The CUDA kernels' own source (csrc/) on CPU tensors, through the SIMT emulator
(tests/simt/simt.h): the numerical matrices of test_add_norm.py and (the sandwich layouts
norm_add_norm / norm_add) test_norm_add_norm.py with backend="cuda", and the paths the
kernels special-case: scalar tails and misaligned operands (bitwise equal to the vector
path), rows streamed in several passes, the persistent backward loop, partial sums (in
registers and, for the branch norm's bias, in shared memory).

The launch heuristics and dtype dispatch are the real ones (csrc/add_norm_launch.h); every
output sits between guard bands that must come back untouched. What the emulator cannot
show (speed, occupancy, the hardware's rsqrt rounding) is for the GPU tests."""

import math
from pathlib import Path

import pytest
import torch

from numerics import DTYPES, Case, run_case
from test_add_norm import FLAG_CASES, FLAG_DTYPE_CASES, FULL, MIXED, SHAPE_CASES
from test_norm_add_norm import CASES as SANDWICH_CASES
from test_norm_add_norm import LAYOUT_IDS, LAYOUTS, PERI_LN, SHAPES
from test_norm_add_norm import MIXED as SANDWICH_MIXED
from test_norm_add_norm import mixed_case

import resfuse
from resfuse import backend_registry
from resfuse.spec import AddNormSpec, BackwardInputs, Operands

sim_backend = pytest.importorskip("simt.sim_backend", reason="emulator sources missing")

pytestmark = pytest.mark.skipif(bool(sim_backend.unavailable_reason()),
                                reason=sim_backend.unavailable_reason() or "emulator available")

BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "simt"


@pytest.fixture(scope="session")
def sim():
    return sim_backend.SimBackend(sim_backend.build(BUILD_DIR))


@pytest.fixture
def use(monkeypatch):
    """use(backend_module): backend="cuda" runs that module, on CPU tensors."""
    def install(module):
        monkeypatch.setitem(backend_registry._IMPORTED, "resfuse.cuda_ext", (module, ""))
        real = backend_registry.resolve
        monkeypatch.setattr(backend_registry, "resolve",
                            lambda backend, device: "cuda" if backend == "cuda" else real(backend, device))
        return module
    return install


@pytest.fixture
def cuda_sim(sim, use):
    return use(sim)


def _id(case):
    return str(case)


@pytest.mark.parametrize("case", FLAG_DTYPE_CASES, ids=_id)
def test_every_flag_combination(case, cuda_sim):
    run_case(case, "cuda", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [c for c in FLAG_CASES if c.residual != "none"][::5], ids=_id)
def test_flag_combinations_one_row_per_block(case, dtype, cuda_sim):
    # D = 300: 32 threads per row (forward) / 32 (backward), one row group per warp
    run_case(case.replace(dtype=dtype, shape=(3, 300)), "cuda", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [1, 7, 8, 64, 1000, 4097])
@pytest.mark.parametrize("lead", [(), (5,), (3, 5)], ids=lambda s: f"lead{s}")
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_shapes(base, lead, D, dtype, cuda_sim):
    case = base.replace(dtype=dtype, shape=(*lead, D))
    if not lead and case.rowscale:
        case = case.replace(rowscale=False)
    run_case(case, "cuda", "cpu")


# Rows longer than one block's registers, per device kind: (forward, backward) blocks per
# cluster on an sm_90 GPU (8-block clusters), streamed tiles without clusters (sm_80).
LONG_ROWS = {9000: (1, 2), 20000: (2, 4), 65536: (4, 8)}
GPU_KINDS = {"sm90": 8, "sm80": 1}


def _expect_layout(backend, D, max_cluster, table=LONG_ROWS):
    fwd, bwd = table[D] if max_cluster > 1 else (1, 1)
    assert (backend.last["fwd_cluster_blocks"], backend.last["bwd_cluster_blocks"]) == (fwd, bwd)


@pytest.mark.parametrize("gpu", GPU_KINDS)
@pytest.mark.parametrize("D", LONG_ROWS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_long_rows(base, D, gpu, sim, use):
    # sm80: 9000: the backward streams its rows; 20000 and 65536: both directions do.
    # sm90: those rows span clusters of 1024- (forward) and 512-thread (backward) blocks.
    backend = use(sim.configured(max_cluster=GPU_KINDS[gpu], sms=4, per_sm=2))  # room for 8
    run_case(base.replace(dtype=torch.bfloat16, shape=(3, D)), "cuda", "cpu")
    _expect_layout(backend, D, GPU_KINDS[gpu])


@pytest.mark.parametrize("layout", ["row_strided", "transposed", "col_strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_non_contiguous(base, dtype, layout, cuda_sim):
    run_case(base.replace(dtype=dtype, shape=(3, 4, 72), layout=layout), "cuda", "cpu")


@pytest.mark.parametrize("mixed", MIXED, ids=lambda m: str(Case(**m)))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_mixed_dtypes(base, mixed, cuda_sim):
    run_case(base.replace(shape=(4, 3, 96), **mixed), "cuda", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_rows_streamed_in_tiles(base, dtype, sim, use):
    """Small thread caps force the two-pass (streamed) paths at small D, several tiles per row,
    with warp-level reductions (at the default caps they reduce across warps); no clusters."""
    backend = use(sim.configured(max_threads_fwd=32, max_threads_bwd=32, max_cluster=1))
    run_case(base.replace(dtype=dtype, shape=(3, 2, 1100)), "cuda", "cpu")
    assert backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == 1


# D -> blocks per cluster with 32-thread blocks (both directions: 2 chunks of 8 per thread)
SMALL_CLUSTERS = {520: 2, 1100: 4, 4000: 8}


@pytest.mark.parametrize("D", SMALL_CLUSTERS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_rows_span_a_cluster(base, dtype, D, sim, use):
    """Small thread caps put rows across the blocks of a thread-block cluster at small D:
    the chunks dealt across the cluster, the row sums exchanged through distributed shared
    memory; in the backward 3 persistent clusters walk 6 rows."""
    backend = use(sim.configured(max_threads_fwd=32, max_threads_bwd=32, sms=3, per_sm=SMALL_CLUSTERS[D]))
    run_case(base.replace(dtype=dtype, shape=(3, 2, D)), "cuda", "cpu")
    blocks = SMALL_CLUSTERS[D]
    assert backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == blocks
    assert backend.last["bwd_programs"] == 3


def test_a_cluster_that_cannot_be_placed_falls_back_to_streaming(sim, use):
    # one SM holding one block: no room for a 2-block cluster
    backend = use(sim.configured(sms=1, per_sm=1))
    run_case(SHAPE_CASES[0].replace(dtype=torch.bfloat16, shape=(2, 20000)), "cuda", "cpu")
    assert backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == 1


@pytest.mark.parametrize("programs", [1, 3, 5, 8])
def test_persistent_loop_and_partial_sums(programs, sim, use):
    """1 to 8 programs walk 128 rows in 8 row groups of 16 (uneven shares for 3 and 5): the
    parameter gradients are the fixed-order sums of their partials, equal to the reference."""
    backend = use(sim.configured(sms=programs, per_sm=1))
    grads = run_case(Case(norm="layer", bias=True, dtype=torch.float32, shape=(128, 130), **FULL),
                     "cuda", "cpu")
    assert backend.last["bwd_programs"] == programs
    assert set(grads) == {"x", "residual", "weight", "bias", "branch_scale"}


def test_backward_is_deterministic(cuda_sim):
    case = Case(norm="layer", bias=True, dtype=torch.float32, shape=(64, 130), **FULL)
    first = run_case(case, "cuda", "cpu", seed=3)
    second = run_case(case, "cuda", "cpu", seed=3)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


def _offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values as t, starting `offset` elements into a fresh buffer (misaligned)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_misaligned_operands_match_the_vector_path_bitwise(norm, dtype, sim):
    """Offsetting every input by one element forces the scalar path; the arithmetic is the
    same, so outputs and gradients are bitwise equal to the aligned (128-bit) run."""
    g = torch.Generator().manual_seed(0)
    rows, D = 6, 256
    x = torch.randn(rows, D, generator=g).to(dtype)
    r = torch.randn(rows, D, generator=g).to(dtype)
    w = torch.randn(D, generator=g).to(dtype)
    b = torch.randn(D, generator=g).to(dtype) if norm == "layer" else None
    bs = torch.randn(D, generator=g)
    rs = torch.rand(rows, generator=g)
    dy = torch.randn(rows, D, generator=g).to(dtype)
    dh = torch.randn(rows, D, generator=g).to(dtype)
    spec = AddNormSpec(norm=norm, eps=1e-5, residual_scale=0.5, branch_scale=1.5,
                       zero_centered_weight=True, has_bias=b is not None, has_branch_scale=True,
                       has_rowscale=True, x_dtype=dtype, residual_dtype=dtype, h_dtype=dtype,
                       out_dtype=dtype)
    assert spec.dresidual == "kernel"

    def run(shift):
        o = (lambda t: None if t is None else _offset_view(t, 1)) if shift else (lambda t: t)
        y, h, mean, _ = sim.forward(spec, Operands(o(x), o(r), o(w), o(b), o(bs), o(rs)))
        grads = sim.backward(spec, BackwardInputs(o(dy), o(dh), o(h), o(x), o(w), o(bs), o(rs),
                                                  mean=o(mean)))
        return (y, h, mean, *grads[:5])

    for name, a, m in zip(("y", "h", "mean", "dx", "dr", "dw", "db", "dbs"), run(False), run(True)):
        assert (a is None) == (m is None), name
        if a is not None:
            assert torch.equal(a, m), f"{name}: the scalar path differs from the vector path"


def test_misaligned_inputs_through_the_api(cuda_sim):
    """A view one element into its storage goes through the whole stack (no copies)."""
    torch.manual_seed(0)
    x = _offset_view(torch.randn(4, 3, 256, dtype=torch.bfloat16), 1).requires_grad_()
    r = _offset_view(torch.randn(4, 3, 256, dtype=torch.bfloat16), 3).requires_grad_()
    w = torch.randn(256, requires_grad=True)
    y, h = resfuse.add_rms_norm(x, r, w, backend="cuda")
    y_ref, h_ref = resfuse.add_rms_norm(x, r, w, backend="torch")
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("D", [1, 7, 16, 17, 64, 1000, 4096, 4097, 8192, 16384, 16385, 65536])
def test_threads_per_row_scale_with_D(D, sim):
    """Threads per row: the power of two giving each thread at most 2 chunks of 8, up to 1024
    (forward); beyond 16384 the rows span clusters of 1024-thread blocks (sm_90)."""
    x = torch.randn(2, D)
    sim.forward(AddNormSpec(eps=1e-5, has_residual=False, has_weight=False, store_h=False),
                Operands(x))
    threads = 1 << math.ceil(math.log2(max(1, math.ceil(math.ceil(D / 8) / 2))))
    assert sim.last["fwd_threads_per_row"] == min(1024, threads)
    assert sim.last["fwd_cluster_blocks"] == max(1, threads // 1024)


def test_no_rows_gives_zero_parameter_gradients(cuda_sim):
    x = torch.randn(0, 3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    y, h = resfuse.add_layer_norm(x, torch.randn(0, 3, 64), w, b, backend="cuda")
    (y.sum() + h.sum()).backward()
    assert torch.equal(w.grad, torch.zeros(64)) and torch.equal(b.grad, torch.zeros(64))


def test_rms_norm_with_a_bias_gets_its_bias_gradient(cuda_sim):
    """RMSNorm + bias (the API allows it through the core op): the backward's bias
    accumulator follows has_bias, not the norm kind (it once left dbias unwritten)."""
    from resfuse import ops
    g = torch.Generator().manual_seed(0)
    for D in (40, 9000):  # rows in registers, streamed rows
        x, r = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
        w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
        grads = {}
        for backend in ("cuda", "torch"):
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            y, h = ops.add_norm(*leaves, 1e-5, norm="rms", backend=backend)
            grads[backend] = torch.autograd.grad([y, h], leaves, [torch.ones_like(y), torch.ones_like(h)])
        for name, a, e in zip(("x", "residual", "weight", "bias"), grads["cuda"], grads["torch"]):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=f"d{name}, D={D}")


# --------------------------------------------------------------------------- sandwich layouts
# norm_add_norm (Gemma2/3, Peri-LN) and norm_add (OLMo2): the branch norm in the forward
# kernel (run-time flag) and the backward's branch-norm instantiations.


@pytest.mark.parametrize("case", SANDWICH_CASES, ids=_id)
def test_sandwich_every_flag_combination(case, cuda_sim):
    # (2, 3, 40): several row groups per block (the branch bias's shared-memory accumulator
    # summed across them)
    run_case(case, "cuda", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [c for c in SANDWICH_CASES if c.dtype == torch.float32][::4], ids=_id)
def test_sandwich_flag_combinations_one_row_group_per_warp(case, dtype, cuda_sim):
    run_case(case.replace(dtype=dtype, shape=(3, 300)), "cuda", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_sandwich_shapes(base, shape, dtype, cuda_sim):
    # 1000 and 4097: reductions across warps; 4097: one row per block, a tail of one element
    run_case(base.replace(dtype=dtype, shape=shape), "cuda", "cpu")


@pytest.mark.parametrize("D,dtype", [(9000, torch.float32), (20000, torch.bfloat16),
                                     (65536 - 7, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("gpu", GPU_KINDS)
def test_sandwich_long_rows(base, D, dtype, gpu, sim, use):
    # sm80: 9000: the backward streams its rows (three passes with the branch norm); 20000
    # and ~64K: the forward too (a pass over x for the branch norm's statistics first).
    # sm90: clusters, as in test_long_rows.
    backend = use(sim.configured(max_cluster=GPU_KINDS[gpu], sms=4, per_sm=2))  # room for 8
    run_case(base.replace(dtype=dtype, shape=(3, D)), "cuda", "cpu")
    _expect_layout(backend, D, GPU_KINDS[gpu], {9000: (1, 2), 20000: (2, 4), 65536 - 7: (4, 8)})


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_sandwich_rows_streamed_in_tiles(base, dtype, sim, use):
    """Small thread caps: the streamed paths at small D, several tiles per row, reductions
    within a warp (no clusters)."""
    use(sim.configured(max_threads_fwd=32, max_threads_bwd=32, max_cluster=1))
    run_case(base.replace(dtype=dtype, shape=(3, 2, 1100)), "cuda", "cpu")


@pytest.mark.parametrize("D", SMALL_CLUSTERS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_sandwich_rows_span_a_cluster(base, dtype, D, sim, use):
    """The branch norm's statistics and gradient sums through the cluster too (two or three
    cluster-wide reductions per row)."""
    backend = use(sim.configured(max_threads_fwd=32, max_threads_bwd=32, sms=3, per_sm=SMALL_CLUSTERS[D]))
    run_case(base.replace(dtype=dtype, shape=(3, 2, D)), "cuda", "cpu")
    assert backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == SMALL_CLUSTERS[D]


@pytest.mark.parametrize("layout", ["row_strided", "transposed", "col_strided"])
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_sandwich_non_contiguous(base, layout, cuda_sim):
    run_case(base.replace(dtype=torch.bfloat16, shape=(3, 4, 72), layout=layout), "cuda", "cpu")


@pytest.mark.parametrize("mixed", SANDWICH_MIXED, ids=lambda m: str(Case(**m)))
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
def test_sandwich_mixed_dtypes(base, mixed, cuda_sim):
    # the run-time dtype set (its lean branch-norm kernel re-reads dy and x), and the
    # 16-bit branch with an fp32 residual stream
    run_case(mixed_case(base, mixed), "cuda", "cpu")


@pytest.mark.parametrize("gpu", GPU_KINDS)
@pytest.mark.parametrize("D", [130, 9000], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("programs", [1, 3, 8])
@pytest.mark.parametrize("base", [PERI_LN, LAYOUTS[2].replace(norm="layer", branch_bias=True)],
                         ids=["peri_ln", "norm_add_layer"])
def test_sandwich_persistent_loop_and_partial_sums(base, programs, D, gpu, sim, use):
    """The branch norm's weight and bias gradients: per-program partials (registers and
    shared memory, or rows of the partial buffers when streamed), summed in a fixed order.
    At D = 9000 on sm90 a program is a 2-block cluster, each block its slice of the columns."""
    blocks = 2 if D == 9000 and gpu == "sm90" else 1
    backend = use(sim.configured(sms=programs * blocks, per_sm=1, max_cluster=GPU_KINDS[gpu]))
    rows = 128 if D < 1000 else 8
    grads = run_case(base.replace(shape=(rows, D)), "cuda", "cpu")
    assert (backend.last["bwd_programs"], backend.last["bwd_cluster_blocks"]) == (programs, blocks)
    expected = {"x", "residual", "branch_weight", "branch_bias"}
    assert set(grads) == (expected | {"weight", "bias"} if base.output_norm else expected)


def test_sandwich_backward_is_deterministic(cuda_sim):
    case = PERI_LN.replace(shape=(64, 130))
    first = run_case(case, "cuda", "cpu", seed=3)
    second = run_case(case, "cuda", "cpu", seed=3)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


@pytest.mark.parametrize("output_norm", [True, False], ids=["norm_add_norm", "norm_add"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_sandwich_misaligned_operands_match_the_vector_path_bitwise(dtype, norm, output_norm, sim):
    g = torch.Generator().manual_seed(0)
    rows, D = 6, 256
    x = torch.randn(rows, D, generator=g).to(dtype)
    r = torch.randn(rows, D, generator=g).to(dtype)
    w, b, wb, bb = (torch.randn(D, generator=g).to(dtype) for _ in range(4))
    if not output_norm:
        w = b = None
    dy = torch.randn(rows, D, generator=g).to(dtype) if output_norm else None
    dh = torch.randn(rows, D, generator=g).to(dtype)
    spec = AddNormSpec(norm=norm, eps=1e-5, zero_centered_weight=True, branch_norm=True,
                       output_norm=output_norm, has_weight=w is not None, has_bias=b is not None,
                       has_branch_weight=True, has_branch_bias=True, x_dtype=dtype,
                       residual_dtype=dtype, h_dtype=dtype, out_dtype=dtype)

    def run(shift):
        o = (lambda t: None if t is None else _offset_view(t, 1)) if shift else (lambda t: t)
        y, h, mean, mean_x = sim.forward(spec, Operands(o(x), o(r), o(w), o(b), None, None, o(wb),
                                                        o(bb)))
        grads = sim.backward(spec, BackwardInputs(
            o(dy), o(dh), o(h) if output_norm else None, o(x), o(w), None, None, o(wb),
            mean=o(mean), mean_x=o(mean_x)))
        return (y, h, mean, mean_x, *grads)

    names = ("y", "h", "mean", "mean_x", "dx", "dr", "dw", "db", "dbs", "dbw", "dbb")
    for name, a, m in zip(names, run(False), run(True)):
        assert (a is None) == (m is None), name
        if a is not None:
            assert torch.equal(a, m), f"{name}: the scalar path differs from the vector path"


def test_sandwich_misaligned_inputs_through_the_api(cuda_sim):
    torch.manual_seed(0)
    x = _offset_view(torch.randn(4, 3, 256, dtype=torch.bfloat16), 1).requires_grad_()
    r = _offset_view(torch.randn(4, 3, 256, dtype=torch.bfloat16), 3).requires_grad_()
    wb, w = torch.randn(256, requires_grad=True), torch.randn(256, requires_grad=True)
    for fn in (lambda be: resfuse.norm_add_norm(x, r, wb, w, norm="layer", backend=be),
               lambda be: (resfuse.norm_add(x, r, wb, backend=be),)):
        got, want = fn("cuda"), fn("torch")
        for a, e in zip(got, want):
            torch.testing.assert_close(a.float(), e.float(), atol=1.6e-2, rtol=1.6e-2)
