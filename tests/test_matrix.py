"""The numerical matrix: every op on every backend, each case forward and backward against
the float64 reference (``numerics.run_case``: y, h and every gradient, inputs never
written).

Axes:

* op: ``add_norm`` (the pre-norm / post-norm add + norm and the plain norms),
  ``norm_add_norm`` (the sandwich: Gemma2/3, Peri-LN) and ``norm_add`` (OLMo2);
* backend: on CPU the reference (``torch``), Triton under the interpreter (``triton``), the
  CUDA kernels' own source through the emulator of tests/simt (``cuda-sim``, run as
  backend="cuda") and the compiled CPU kernels (``cpu``, csrc/cpu/, and ``cpu-<isa>``: the
  same with each lower instruction set this CPU runs); on a GPU ``torch``, ``triton`` and the compiled extension (``cuda``);
* the case families below: every flag combination x dtype, one row per program, odd shapes
  and leading dims, long rows at each backend's crossovers (asked of the library, never
  restated), non-contiguous layouts, dtype mixes, determinism; and on a GPU the sizes the
  interpreter and the emulator cannot afford (boundaries, clusters, many rows, up to
  131072), on the kernel backends.

The emulator's and the GPU's own tests (layouts per GPU kind, misaligned operands bitwise,
streams, graphs, compile) are in test_cuda_sim.py, test_cuda_gpu.py and test_gpu.py.
"""

import pytest
import torch
from conftest import DEVICE, cuda_launch_limits
from numerics import (
    DTYPES,
    FLAG_CASES,
    FLAG_DTYPE_CASES,
    FULL,
    LAYOUTS,
    MIXED,
    OLMO2,
    PERI_LN,
    SANDWICH_CASES,
    SANDWICH_MIXED,
    SHAPE_CASES,
    Case,
    dtype_id,
    mixed_case,
    run_case,
)

import resfuse
from resfuse import cpu_ext
from resfuse.triton_kernels import launch as triton_launch

GPU = DEVICE == "cuda"


def _backends():
    if GPU:
        return ["torch", "triton"] + (["cuda"] if resfuse.backends()["cuda"].available else [])
    # the compiled CPU kernels when this install has them (every install with a C++ compiler:
    # `make test` forces the build, so CI runs them), with the best instruction set of this
    # CPU ("cpu") and each lower one it runs ("cpu-avx2", "cpu-generic")
    cpu = []
    if resfuse.backends()["cpu"].available:
        best, *lower = cpu_ext.supported_isas()
        cpu = ["cpu"] + [f"cpu-{isa}" for isa in lower]
    return ["torch", "triton", "cuda-sim"] + cpu


@pytest.fixture(params=_backends())
def backend(request):
    """The backend name a case runs with; ``cuda-sim`` installs the emulator as "cuda";
    ``cpu-<isa>`` runs the CPU kernels with that instruction set's row loops."""
    if request.param == "cuda-sim":
        request.getfixturevalue("cuda_sim")
        yield "cuda"
        return
    if request.param.startswith("cpu-"):
        with cpu_ext.use_isa(request.param[len("cpu-") :]):
            yield "cpu"
        return
    yield request.param


@pytest.fixture(params=[b for b in _backends() if b != "torch"] if GPU else [])
def kernel_backend(request):
    """The GPU's kernel backends, for the sizes only a GPU affords."""
    return request.param


def op_of(case: Case) -> str:
    if not case.branch_norm:
        return "add_norm"
    return "norm_add_norm" if case.output_norm else "norm_add"


def with_op(cases):
    """pytest params of ``cases``, each id led by its op."""
    return [pytest.param(c, id=f"{op_of(c)}-{c}") for c in cases]


# --------------------------------------------------------------------------- crossovers
# Where each backend changes its row layout, from the libraries themselves: Triton's register
# limits (triton_kernels/launch.py) and the CUDA kernels' block rows (csrc/add_norm_params.h
# through cuda_ext.launch_limits(), or the emulator's copy of the same headers).


def crossovers() -> list[int]:
    limits = {
        triton_launch.MAX_FUSED_D_BWD_READS_X,
        triton_launch.MAX_FUSED_D_BWD,
        triton_launch.MAX_FUSED_D_FWD,
        triton_launch.MAX_FUSED_D_FWD_BRANCH_NORM,
        triton_launch.MAX_REGISTER_SUMS_D_BWD,
    }
    cuda = cuda_launch_limits()
    if cuda is not None:
        limits |= {cuda["bwd_block_row"], cuda["fwd_block_row"]}
    return sorted(limits)


def cpu_row_lengths() -> list[int]:
    """Where the CPU kernels' row loops change what they do, for each instruction set this
    CPU runs (resfuse.cpu_ext.limits(): no numbers restated): rows shorter than one vector
    (a tail only), one vector +- 1, the row sums' four accumulators +- 1, and rows that end
    after 1, 2 or 3 further vectors plus a tail (each accumulator of the last partial round)."""
    lengths = set()
    if resfuse.backends()["cpu"].available:
        for isa in cpu_ext.supported_isas():
            with cpu_ext.use_isa(isa):
                limits = cpu_ext.limits()
            width, sums = limits["vector_elems"], limits["sum_elems"]
            lengths |= {width - 1, width, width + 1, sums - 1, sums, sums + 1}
            lengths |= {sums + k * width + 3 for k in (1, 2, 3)}
    return sorted(lengths)


# just past each crossover (a one-element tail in a new chunk), and an odd row of many chunks
LONG_ROWS = sorted({c + 1 for c in crossovers()} | {65536 - 7})


# --------------------------------------------------------------------------- CPU and GPU


@pytest.mark.parametrize("case", with_op(FLAG_DTYPE_CASES + SANDWICH_CASES))
def test_every_flag_combination(case, backend):
    # (2, 3, 40): several rows per program; D not a power of two exercises the column mask
    run_case(case, backend, DEVICE)


ONE_ROW = [
    c.replace(dtype=d, shape=(3, 300))
    for c in [c for c in FLAG_CASES if c.residual != "none"][::5]
    for d in DTYPES
] + [
    c.replace(dtype=d, shape=(3, 300))
    for c in [c for c in SANDWICH_CASES if c.dtype == torch.float32][::4]
    for d in DTYPES
]


@pytest.mark.parametrize("case", with_op(ONE_ROW))
def test_flag_combinations_one_row_per_program(case, backend):
    # D = 300: one row per program (Triton), one row group per warp (CUDA)
    run_case(case, backend, DEVICE)


LEADS = [(), (1,), (5,), (3, 5), (2, 2, 3)]
SANDWICH_SHAPES = [(7,), (1, 1), (5, 7), (3, 5, 64), (2, 2, 3, 1000), (3, 4097)]
SHAPES = [
    base.replace(dtype=d, shape=(*lead, D), rowscale=base.rowscale and bool(lead))
    for base in SHAPE_CASES
    for lead in LEADS
    for D in (1, 7, 8, 64, 1000, 4097)
    for d in DTYPES
] + [
    base.replace(dtype=d, shape=shape)
    for base in LAYOUTS
    for shape in SANDWICH_SHAPES
    for d in DTYPES
]


@pytest.mark.parametrize("case", with_op(SHAPES))
def test_shapes(case, backend):
    # D = 1, 7: below one 8-element chunk; 1000 and 4097: reductions across warps, a tail
    run_case(case, backend, DEVICE)


# the CPU kernels' row-loop boundaries, on every backend (small rows: cheap everywhere)
CPU_ROW_LENGTHS = [
    base.replace(dtype=d, shape=(3, D))
    for base in SHAPE_CASES
    for D in cpu_row_lengths()
    for d in (torch.float32, torch.bfloat16)
] + [
    base.replace(dtype=torch.bfloat16, shape=(3, D)) for base in LAYOUTS for D in cpu_row_lengths()
]


@pytest.mark.parametrize("case", with_op(CPU_ROW_LENGTHS))
def test_cpu_row_lengths(case, backend):
    run_case(case, backend, DEVICE)


LONG = (
    [
        base.replace(dtype=d, shape=(3, D))
        for base in SHAPE_CASES
        for D in LONG_ROWS
        for d in (torch.float32, torch.bfloat16)
    ]
    + [base.replace(dtype=torch.bfloat16, shape=(3, D)) for base in LAYOUTS for D in LONG_ROWS]
    + [base.replace(dtype=torch.float32, shape=(3, LONG_ROWS[0])) for base in LAYOUTS]
)


@pytest.mark.parametrize("case", with_op(LONG))
def test_long_rows(case, backend):
    # past each crossover the rows leave registers: streamed in chunks (several passes), or
    # across a thread-block cluster (CUDA on sm_90; the emulator's default GPU)
    run_case(case, backend, DEVICE)


NON_CONTIGUOUS = [
    base.replace(dtype=d, shape=(3, 4, 72), layout=layout)
    for base in SHAPE_CASES
    for layout in ("row_strided", "transposed", "col_strided")
    for d in DTYPES
] + [
    base.replace(dtype=torch.bfloat16, shape=(3, 4, 72), layout=layout)
    for base in LAYOUTS
    for layout in ("row_strided", "transposed", "col_strided")
]


@pytest.mark.parametrize("case", with_op(NON_CONTIGUOUS))
def test_non_contiguous(case, backend):
    run_case(case, backend, DEVICE)


MIXED_CASES = [base.replace(shape=(4, 3, 96), **m) for base in SHAPE_CASES for m in MIXED] + [
    mixed_case(base, m) for base in LAYOUTS for m in SANDWICH_MIXED
]


@pytest.mark.parametrize("case", with_op(MIXED_CASES))
def test_mixed_dtypes(case, backend):
    # fp32 residual streams, other output dtypes: the run-time dtype set of the CUDA kernels
    run_case(case, backend, DEVICE)


DETERMINISM = [
    Case(norm="layer", bias=True, dtype=torch.float32, shape=(64, 130), **FULL),
    PERI_LN.replace(shape=(64, 130)),
    OLMO2.replace(norm="layer", branch_bias=True, shape=(64, 130)),
]


@pytest.mark.parametrize("case", with_op(DETERMINISM))
def test_backward_is_deterministic(case, backend):
    """Bitwise the same gradients twice: the parameter gradients are fixed-order sums of
    per-program partials (no atomics)."""
    first = run_case(case, backend, DEVICE, seed=3)
    second = run_case(case, backend, DEVICE, seed=3)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


# --------------------------------------------------------------------------- GPU only


def _boundaries() -> list[int]:
    """Odd sizes and each crossover and the next size (on a GPU only: 64 rows of them)."""
    return sorted(
        {1, 7, 8, 1000, 4096, 4097, 65536}
        | {c for c in crossovers()}
        | {c + 1 for c in crossovers()}
    )


GPU_BOUNDARIES = [
    Case(norm=norm, dtype=d, shape=(64 if D <= 8192 else 6, D), bias=norm == "layer", **FULL)
    for norm in ("rms", "layer")
    for D in _boundaries()
    for d in DTYPES
] + [
    base.replace(dtype=d, shape=(64 if D <= 8192 else 6, D))
    for base in LAYOUTS
    for D in _boundaries()
    for d in DTYPES
]
GPU_CLUSTERS = [
    Case(norm=norm, dtype=d, shape=(4, D), bias=norm == "layer", **FULL)
    for norm in ("rms", "layer")
    for D in (9000, 20000, 32768, 65536 - 7, 131072)
    for d in DTYPES
] + [base.replace(dtype=torch.bfloat16, shape=(4, D)) for base in LAYOUTS for D in (20000, 65536)]
MANY_ROWS = [(1 << 20, 64), (300_000, 7), (4096, 768), (5, 3, 4096)]
GPU_MANY_ROWS = [
    Case(norm="layer", dtype=torch.bfloat16, shape=s, bias=True, **FULL) for s in MANY_ROWS
] + [base.replace(dtype=torch.bfloat16, shape=s) for base in LAYOUTS for s in MANY_ROWS]
GPU_NON_CONTIGUOUS = [
    Case(norm="layer", bias=True, dtype=d, shape=(16, 8, 520), layout=layout, **FULL)
    for layout in ("row_strided", "transposed", "col_strided")
    for d in DTYPES
] + [
    base.replace(dtype=torch.bfloat16, shape=(16, 8, 520), layout=layout)
    for base in LAYOUTS
    for layout in ("row_strided", "transposed", "col_strided")
]
LARGE = [
    Case(norm=norm, dtype=d, shape=shape, bias=norm == "layer", **FULL)
    for norm in ("rms", "layer")
    for shape in [(4096, 768), (2048, 4096), (512, 8192), (256, 16384), (64, 65536), (8, 3, 131072)]
    for d in DTYPES
]


@pytest.mark.parametrize("case", with_op(GPU_BOUNDARIES))
def test_boundary_sizes_on_gpu(case, kernel_backend):
    # each crossover and the next size: the switch to streamed rows or to clusters
    run_case(case, kernel_backend, "cuda")


@pytest.mark.parametrize("case", with_op(GPU_CLUSTERS))
def test_rows_spanning_clusters_on_gpu(case, kernel_backend):
    # rows longer than one block: clusters of 2 to 8 blocks on sm_90 (CUDA), streamed
    # chunks otherwise; 131072 is too long for an 8-block backward cluster: streamed
    run_case(case, kernel_backend, "cuda")


@pytest.mark.parametrize("case", with_op(GPU_MANY_ROWS))
def test_many_rows_on_gpu(case, kernel_backend):
    """Many row groups per block and many iterations of the persistent backward loop."""
    run_case(case, kernel_backend, "cuda")


@pytest.mark.parametrize("case", with_op(GPU_NON_CONTIGUOUS))
def test_non_contiguous_on_gpu(case, kernel_backend):
    run_case(case, kernel_backend, "cuda")


@pytest.mark.parametrize("case", with_op(LARGE))
def test_large_shapes_on_gpu(case, kernel_backend):
    run_case(case, kernel_backend, "cuda")


def test_the_matrix_covers_every_op_and_family():
    """Every op appears in every CPU family (a new op or family cannot silently miss one)."""
    families = {
        "flags": FLAG_DTYPE_CASES + SANDWICH_CASES,
        "one_row": ONE_ROW,
        "shapes": SHAPES,
        "long": LONG,
        "cpu_row_lengths": CPU_ROW_LENGTHS,
        "non_contiguous": NON_CONTIGUOUS,
        "mixed": MIXED_CASES,
        "determinism": DETERMINISM,
        "gpu_boundaries": GPU_BOUNDARIES,
        "gpu_clusters": GPU_CLUSTERS,
        "gpu_many_rows": GPU_MANY_ROWS,
        "gpu_non_contiguous": GPU_NON_CONTIGUOUS,
    }
    for name, cases in families.items():
        assert {op_of(c) for c in cases} == {"add_norm", "norm_add_norm", "norm_add"}, name
    assert dtype_id(torch.bfloat16) == "bfloat16"
    assert LONG_ROWS[0] > 4096 and all(d > c for d, c in zip(LONG_ROWS, crossovers()))
