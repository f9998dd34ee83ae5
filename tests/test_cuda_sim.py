"""The CUDA kernels' own source (csrc/) on CPU tensors, through the SIMT emulator
(tests/simt/simt.h), beyond the numerical matrix (test_matrix.py runs every case there with
the emulator as backend="cuda"): the paths the kernels special-case, on the GPUs the
emulator can be (with clusters like sm_90, without like sm_80, small blocks, few SMs):
rows spanning clusters or streamed in several passes, a cluster that cannot be placed, the
persistent backward loop and its partial sums (in registers and, for the branch norm's
bias, in shared memory), scalar tails and misaligned operands (bitwise equal to the vector
path). Every expected layout is derived from the kernels' own launch limits
(``SimBackend.limits``: csrc/add_norm_params.h), never restated.

The launch heuristics and dtype dispatch are the real ones (csrc/add_norm_launch.h); every
output sits between guard bands that must come back untouched. What the emulator cannot
show (speed, occupancy, the hardware's rsqrt rounding) is for the GPU tests."""

import math

import pytest
import torch
from conftest import cuda_launch_limits, emulator_unavailable
from numerics import (
    DTYPES,
    FULL,
    LAYOUT_IDS,
    LAYOUTS,
    PERI_LN,
    SHAPE_CASES,
    Case,
    cluster_blocks,
    run_case,
)

import resfuse
from resfuse.spec import AddNormSpec, BackwardInputs, Operands

pytestmark = pytest.mark.skipif(
    bool(emulator_unavailable()), reason=emulator_unavailable() or "emulator available"
)


def _id(case):
    return str(case)


# Rows longer than one block's registers (the backward's block row is the shorter), per
# device kind: clusters on an sm_90-like GPU, streamed tiles without clusters (sm_80).
GPU_KINDS = {"sm90": None, "sm80": 1}  # None: the kernels' largest cluster


def long_rows(sim) -> list[int]:
    """Just past the backward's block row, past the forward's, and a row spanning the
    largest backward cluster."""
    L = sim.limits
    return [
        L["bwd_block_row"] + 1,
        L["fwd_block_row"] + 1,
        L["bwd_block_row"] * L["max_cluster_blocks"],
    ]


def _expect_layout(backend, D):
    L = backend.limits
    expected = (
        cluster_blocks(D, L["fwd_block_row"], backend.max_cluster),
        cluster_blocks(D, L["bwd_block_row"], backend.max_cluster),
    )
    assert (backend.last["fwd_cluster_blocks"], backend.last["bwd_cluster_blocks"]) == expected


@pytest.mark.parametrize("gpu", GPU_KINDS)
@pytest.mark.parametrize("which", range(3), ids=["past_bwd_block", "past_fwd_block", "bwd_cluster"])
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_long_rows(base, which, gpu, sim, use):
    # sm80: the backward streams its rows past its block row; both directions past the
    # forward's. sm90: those rows span clusters of the largest blocks instead.
    backend = use(
        sim.configured(
            max_cluster=GPU_KINDS[gpu] or sim.limits["max_cluster_blocks"], sms=4, per_sm=2
        )
    )  # room for 8
    D = long_rows(sim)[which]
    run_case(base.replace(dtype=torch.bfloat16, shape=(3, D)), "cuda", "cpu")
    _expect_layout(backend, D)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_rows_streamed_in_tiles(base, dtype, sim, use):
    """Small thread caps force the two-pass (streamed) paths at small D, several tiles per row,
    with warp-level reductions (at the default caps they reduce across warps); no clusters."""
    backend = use(sim.configured(max_threads_fwd=32, max_threads_bwd=32, max_cluster=1))
    run_case(base.replace(dtype=dtype, shape=(3, 2, 1100)), "cuda", "cpu")
    assert backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == 1


# D of rows across 2, 4 and 8 blocks of 32 threads (both directions)
SMALL_CLUSTERS = (520, 1100, 4000)


def _small_blocks(sim, D: int) -> int:
    """Blocks of a row of D with 32-thread blocks: their block row is 32 threads' elements."""
    per_thread = sim.limits["fwd_block_row"] // sim.limits["fwd_max_threads"]
    assert per_thread == sim.limits["bwd_block_row"] // sim.limits["bwd_max_threads"]
    return cluster_blocks(D, 32 * per_thread, sim.limits["max_cluster_blocks"])


@pytest.mark.parametrize("D", SMALL_CLUSTERS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("base", SHAPE_CASES, ids=lambda c: c.norm)
def test_rows_span_a_cluster(base, dtype, D, sim, use):
    """Small thread caps put rows across the blocks of a thread-block cluster at small D:
    the chunks dealt across the cluster, the row sums exchanged through distributed shared
    memory; in the backward 3 persistent clusters walk 6 rows."""
    blocks = _small_blocks(sim, D)
    backend = use(sim.configured(max_threads_fwd=32, max_threads_bwd=32, sms=3, per_sm=blocks))
    run_case(base.replace(dtype=dtype, shape=(3, 2, D)), "cuda", "cpu")
    assert (
        blocks > 1
        and backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == blocks
    )
    assert backend.last["bwd_programs"] == 3


def test_a_cluster_that_cannot_be_placed_falls_back_to_streaming(sim, use):
    # one SM holding one block: no room for a 2-block cluster
    backend = use(sim.configured(sms=1, per_sm=1))
    D = long_rows(sim)[1]  # forward and backward both want clusters
    run_case(SHAPE_CASES[0].replace(dtype=torch.bfloat16, shape=(2, D)), "cuda", "cpu")
    assert backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == 1


@pytest.mark.parametrize("programs", [1, 3, 5, 8])
def test_persistent_loop_and_partial_sums(programs, sim, use):
    """1 to 8 programs walk 128 rows in 8 row groups of 16 (uneven shares for 3 and 5): the
    parameter gradients are the fixed-order sums of their partials, equal to the reference."""
    backend = use(sim.configured(sms=programs, per_sm=1))
    grads = run_case(
        Case(norm="layer", bias=True, dtype=torch.float32, shape=(128, 130), **FULL), "cuda", "cpu"
    )
    assert backend.last["bwd_programs"] == programs
    assert set(grads) == {"x", "residual", "weight", "bias", "branch_scale"}


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
    spec = AddNormSpec(
        norm=norm,
        eps=1e-5,
        residual_scale=0.5,
        branch_scale=1.5,
        zero_centered_weight=True,
        has_bias=b is not None,
        has_branch_scale=True,
        has_rowscale=True,
        x_dtype=dtype,
        residual_dtype=dtype,
        h_dtype=dtype,
        out_dtype=dtype,
    )
    assert spec.dresidual == "kernel"

    def run(shift):
        o = (lambda t: None if t is None else _offset_view(t, 1)) if shift else (lambda t: t)
        y, h, mean, _ = sim.forward(spec, Operands(o(x), o(r), o(w), o(b), o(bs), o(rs)))
        grads = sim.backward(
            spec, BackwardInputs(o(dy), o(dh), o(h), o(x), o(w), o(bs), o(rs), mean=o(mean))
        )
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


def _thread_sizes() -> list[int]:
    """Small sizes, and around the forward's block row (from the kernels' limits)."""
    L = cuda_launch_limits()
    if L is None:  # no emulator (the module is skipped)
        return []
    row = L["fwd_block_row"]
    return [1, 7, 16, 17, 64, 1000, 4096, 4097, row // 2, row, row + 1, 4 * row]


@pytest.mark.parametrize("D", _thread_sizes())
def test_threads_per_row_scale_with_D(D, sim):
    """Threads per row: the power of two giving each thread at most its share of chunks, up
    to the largest block (forward); longer rows span clusters of such blocks (sm_90)."""
    L = sim.limits
    x = torch.randn(2, D)
    sim.forward(
        AddNormSpec(eps=1e-5, has_residual=False, has_weight=False, store_h=False), Operands(x)
    )
    chunks_per_thread = L["fwd_block_row"] // (L["fwd_max_threads"] * L["chunk"])
    threads = 1 << math.ceil(
        math.log2(max(1, math.ceil(math.ceil(D / L["chunk"]) / chunks_per_thread)))
    )
    assert sim.last["fwd_threads_per_row"] == min(L["fwd_max_threads"], threads)
    assert sim.last["fwd_cluster_blocks"] == cluster_blocks(
        D, L["fwd_block_row"], L["max_cluster_blocks"]
    )


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
    from resfuse import functional

    g = torch.Generator().manual_seed(0)
    for D in (40, long_rows(cuda_sim)[0]):  # rows in registers, a row past the backward's block
        x, r = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
        w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
        grads = {}
        for backend in ("cuda", "torch"):
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            y, h = functional.add_norm(*leaves, 1e-5, norm="rms", backend=backend)
            grads[backend] = torch.autograd.grad(
                [y, h], leaves, [torch.ones_like(y), torch.ones_like(h)]
            )
        for name, a, e in zip(("x", "residual", "weight", "bias"), grads["cuda"], grads["torch"]):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=f"d{name}, D={D}")


# --------------------------------------------------------------------------- sandwich layouts
# norm_add_norm (Gemma2/3, Peri-LN) and norm_add (OLMo2): the branch norm in the forward
# kernel (run-time flag) and the backward's branch-norm instantiations.


@pytest.mark.parametrize(
    "which,dtype",
    [(0, torch.float32), (1, torch.bfloat16), (2, torch.bfloat16)],
    ids=["past_bwd_block-fp32", "past_fwd_block-bf16", "bwd_cluster-bf16"],
)
@pytest.mark.parametrize("base", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("gpu", GPU_KINDS)
def test_sandwich_long_rows(base, which, dtype, gpu, sim, use):
    # sm80: the backward streams its rows (three passes with the branch norm), past the
    # forward's block row the forward too (a pass over x for the branch norm's statistics
    # first). sm90: clusters, as in test_long_rows.
    backend = use(
        sim.configured(
            max_cluster=GPU_KINDS[gpu] or sim.limits["max_cluster_blocks"], sms=4, per_sm=2
        )
    )  # room for 8
    D = long_rows(sim)[which] - (7 if which == 2 else 0)  # an odd row across the largest cluster
    run_case(base.replace(dtype=dtype, shape=(3, D)), "cuda", "cpu")
    _expect_layout(backend, D)


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
    blocks = _small_blocks(sim, D)
    backend = use(sim.configured(max_threads_fwd=32, max_threads_bwd=32, sms=3, per_sm=blocks))
    run_case(base.replace(dtype=dtype, shape=(3, 2, D)), "cuda", "cpu")
    assert backend.last["fwd_cluster_blocks"] == backend.last["bwd_cluster_blocks"] == blocks


@pytest.mark.parametrize("gpu", GPU_KINDS)
@pytest.mark.parametrize("long", [False, True], ids=["D130", "past_bwd_block"])
@pytest.mark.parametrize("programs", [1, 3, 8])
@pytest.mark.parametrize(
    "base",
    [PERI_LN, LAYOUTS[2].replace(norm="layer", branch_bias=True)],
    ids=["peri_ln", "norm_add_layer"],
)
def test_sandwich_persistent_loop_and_partial_sums(base, programs, long, gpu, sim, use):
    """The branch norm's weight and bias gradients: per-program partials (registers and
    shared memory, or rows of the partial buffers when streamed), summed in a fixed order.
    Past the backward's block row on sm90 a program is a 2-block cluster, each block its slice
    of the columns."""
    D = long_rows(sim)[0] if long else 130
    max_cluster = GPU_KINDS[gpu] or sim.limits["max_cluster_blocks"]
    blocks = cluster_blocks(D, sim.limits["bwd_block_row"], max_cluster)
    backend = use(sim.configured(sms=programs * blocks, per_sm=1, max_cluster=max_cluster))
    rows = 128 if D < 1000 else 8
    grads = run_case(base.replace(shape=(rows, D)), "cuda", "cpu")
    assert (backend.last["bwd_programs"], backend.last["bwd_cluster_blocks"]) == (programs, blocks)
    expected = {"x", "residual", "branch_weight", "branch_bias"}
    assert set(grads) == (expected | {"weight", "bias"} if base.output_norm else expected)


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
    spec = AddNormSpec(
        norm=norm,
        eps=1e-5,
        zero_centered_weight=True,
        branch_norm=True,
        output_norm=output_norm,
        has_weight=w is not None,
        has_bias=b is not None,
        has_branch_weight=True,
        has_branch_bias=True,
        x_dtype=dtype,
        residual_dtype=dtype,
        h_dtype=dtype,
        out_dtype=dtype,
    )

    def run(shift):
        o = (lambda t: None if t is None else _offset_view(t, 1)) if shift else (lambda t: t)
        y, h, mean, mean_x = sim.forward(
            spec, Operands(o(x), o(r), o(w), o(b), None, None, o(wb), o(bb))
        )
        grads = sim.backward(
            spec,
            BackwardInputs(
                o(dy),
                o(dh),
                o(h) if output_norm else None,
                o(x),
                o(w),
                None,
                None,
                o(wb),
                mean=o(mean),
                mean_x=o(mean_x),
            ),
        )
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
    for fn in (
        lambda be: resfuse.norm_add_norm(x, r, wb, w, norm="layer", backend=be),
        lambda be: (resfuse.norm_add(x, r, wb, backend=be),),
    ):
        got, want = fn("cuda"), fn("torch")
        for a, e in zip(got, want):
            torch.testing.assert_close(a.float(), e.float(), atol=1.6e-2, rtol=1.6e-2)
