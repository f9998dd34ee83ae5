"""The compiled CPU backend (csrc/cpu/, ``backend="cpu"``) beyond the numerical matrix
(test_matrix.py runs every case on it, once per instruction set this CPU runs).

What the backend promises, and what is tested here:

* the same results for any number of threads, bitwise: rows are independent, a row's sums
  run in a fixed order (``lanes`` partial sums, ``chunk_elems`` chunks) whichever thread
  runs it, and the parameter gradients are sums over fixed row blocks (their bounds depend
  on the shape only: ``cpu_ext.row_blocks``) added in block order. Not promised: the same
  bits across instruction sets (FMA contraction differs) or against the other backends;
* rows anywhere in memory: any row stride, any element offset (no alignment assumed);
* argument errors that name the argument, from the Python layer before any kernel runs and
  from the ops themselves when called directly; inputs never written;
* the ops work under torch.compile (fake tensors) and pass ``torch.library.opcheck``.
"""

import os

import pytest
import torch
from numerics import (
    FULL,
    OLMO2,
    PERI_LN,
    Case,
    backward_op_args,
    full_feature_call,
    make_inputs,
    run_case,
)

import resfuse
from resfuse import backend_registry, cpu_ext

REQUIRED = os.environ.get("RESFUSE_REQUIRE_CPU_EXT", "0") == "1"
REASON = cpu_ext.unavailable_reason()
needs_cpu_ext = pytest.mark.skipif(
    bool(REASON), reason=f"the CPU extension is not available: {REASON}"
)


def test_the_extension_is_built_where_required():
    """`make test` builds it (RESFUSE_FORCE_CPU_BUILD=1) and requires it here."""
    if REQUIRED:
        assert not REASON, REASON
    report = resfuse.backends()["cpu"]
    assert report.available == (not REASON)
    assert report.reason


@pytest.fixture
def threads():
    """Set torch's intra-op thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


CASES = [
    Case(norm="layer", bias=True, dtype=torch.bfloat16, shape=(257, 1000), **FULL),
    Case(norm="rms", dtype=torch.float16, shape=(3, 7, 4097), **{**FULL, "residual": "fp32"}),
    Case(norm="rms", dtype=torch.float32, shape=(130, 64)),
    PERI_LN.replace(dtype=torch.bfloat16, shape=(200, 300)),
    OLMO2.replace(shape=(65, 520)),
]


def _run(case: Case, seed: int = 5) -> dict:
    """Outputs and gradients of one forward + backward on the CPU backend."""
    inp = make_inputs(case, "cpu", seed)
    common = dict(backend="cpu")
    if case.branch_norm and case.output_norm:
        out = resfuse.norm_add_norm(
            inp["x"],
            inp["residual"],
            inp["branch_weight"],
            inp["weight"],
            1e-5,
            norm=case.norm,
            branch_bias=inp["branch_bias"],
            bias=inp["bias"],
            **common,
        )
    elif case.branch_norm:
        out = resfuse.norm_add(
            inp["x"],
            inp["residual"],
            inp["branch_weight"],
            1e-5,
            norm=case.norm,
            branch_bias=inp["branch_bias"],
            **common,
        )
    elif case.norm == "rms":
        out = resfuse.add_rms_norm(
            inp["x"],
            inp["residual"],
            inp["weight"],
            residual_scale=0.75,
            branch_scale=inp["branch_scale"],
            rowscale=inp["rowscale"],
            zero_centered_weight=case.zero_centered,
            **common,
        )
    else:
        out = resfuse.add_layer_norm(
            inp["x"],
            inp["residual"],
            inp["weight"],
            inp["bias"],
            residual_scale=0.75,
            branch_scale=inp["branch_scale"],
            rowscale=inp["rowscale"],
            zero_centered_weight=case.zero_centered,
            **common,
        )
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    for name, t in inp.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            result[f"d{name}"] = t.grad
    return result


@needs_cpu_ext
@pytest.mark.parametrize("case", CASES, ids=str)
def test_same_bits_for_any_thread_count(case, threads):
    """1, 2, 3 and 8 threads (more than this machine's cores too): every output and every
    gradient, parameter gradients included, bitwise the same."""
    threads(1)
    first = _run(case)
    for n in (2, 3, 8):
        threads(n)
        again = _run(case)
        for name, value in first.items():
            assert torch.equal(value, again[name]), f"{name} differs with {n} threads"


@needs_cpu_ext
@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize(
    "case",
    # several parallel_for tasks of rows (forward: about 64K elements each) and of row blocks
    # (backward); sizes within the oracle's absolute tolerance of summed parameter gradients
    [CASES[0].replace(dtype=torch.float32), CASES[1], CASES[3].replace(shape=(64, 300))],
    ids=str,
)
def test_correct_with_one_and_many_threads(case, n, threads):
    threads(n)
    run_case(case, "cpu", "cpu")


@needs_cpu_ext
def test_row_blocks_depend_on_the_shape_only(threads):
    limits = cpu_ext.limits()
    for rows, D in [(1, 8), (5, 64), (64, 64), (10_000, 4096), (3, 1 << 20), (100_000, 1 << 17)]:
        blocks = cpu_ext.row_blocks(rows, D)
        assert 1 <= blocks <= min(rows, limits["max_row_blocks"])
        assert blocks == 1 or blocks * D <= limits["partial_budget"]
        threads(1)
        assert cpu_ext.row_blocks(rows, D) == blocks
        threads(2)


@needs_cpu_ext
@pytest.mark.parametrize(
    "case",
    [
        # more rows than blocks (several rows per block), and a row too long for the
        # budget's 64 blocks: fewer, longer blocks
        Case(norm="layer", bias=True, shape=(1000, 40), **FULL),
        Case(norm="rms", shape=(80, 70_000), **FULL),
    ],
    ids=str,
)
def test_parameter_gradients_over_row_blocks(case, threads):
    D = case.shape[-1]
    rows = case.shape[0]
    assert cpu_ext.row_blocks(rows, D) < rows
    threads(2)
    first = run_case(case, "cpu", "cpu", seed=1)
    threads(1)
    second = run_case(case, "cpu", "cpu", seed=1)
    for name in first:
        assert torch.equal(first[name], second[name]), name


MISALIGNED = [
    Case(norm=norm, dtype=d, shape=(5, 3, D), layout="misaligned", bias=norm == "layer", **FULL)
    for norm in ("rms", "layer")
    for d in (torch.float32, torch.bfloat16, torch.float16)
    for D in (1, 17, 256, 1001)
] + [
    base.replace(dtype=torch.bfloat16, shape=(4, 3, 300), layout="misaligned")
    for base in (PERI_LN, OLMO2)
]


@needs_cpu_ext
@pytest.mark.parametrize("case", MISALIGNED, ids=str)
def test_misaligned_rows(case):
    """Every row at an odd element offset (row stride D + 1, storage offset 1), used in
    place through the row stride."""
    run_case(case, "cpu", "cpu")


@needs_cpu_ext
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_each_instruction_set_against_the_reference(isa):
    if isa not in cpu_ext.supported_isas():
        pytest.skip(f"this CPU does not run {isa} (it runs {cpu_ext.supported_isas()})")
    case = Case(norm="layer", bias=True, dtype=torch.bfloat16, shape=(9, 1031), **FULL)
    with cpu_ext.use_isa(isa):
        assert cpu_ext.isa() == isa
        run_case(case, "cpu", "cpu")
    assert cpu_ext.isa() == cpu_ext.supported_isas()[0]


@needs_cpu_ext
def test_use_isa_refuses_unknown_names():
    with pytest.raises(ValueError, match="one of"):
        with cpu_ext.use_isa("neon"):
            pass
    with pytest.raises(RuntimeError, match="unknown name"):
        torch.ops.resfuse.cpu_limit("warp_size")


# --------------------------------------------------------------------------- the backend


@needs_cpu_ext
def test_auto_runs_the_cpu_kernels_on_cpu_tensors(monkeypatch):
    seen = []
    real = backend_registry.implementation

    def spy(name):
        seen.append(name)
        return real(name)

    monkeypatch.setattr(backend_registry, "implementation", spy)
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    y, h = resfuse.add_rms_norm(x, r, w)
    assert seen == ["cpu"]
    torch.testing.assert_close(
        y, resfuse.add_rms_norm(x, r, w, backend="torch")[0], atol=1e-6, rtol=1e-6
    )
    assert "compiled CPU kernels" in resfuse.backends()["cpu"].reason


def test_backend_cpu_refuses_what_it_cannot_run(monkeypatch):
    if not REASON:
        with pytest.raises(resfuse.BackendUnavailableError, match="CPU tensors only"):
            backend_registry.resolve("cpu", torch.device("cuda"))
    monkeypatch.setitem(cpu_ext._state, "reason", "the CPU extension was not built (test)")
    with pytest.raises(resfuse.BackendUnavailableError, match="not built"):
        resfuse.rms_norm(torch.randn(2, 8), torch.ones(8), backend="cpu")
    assert backend_registry.resolve("auto", torch.device("cpu")) == "torch"
    assert "not built" in resfuse.backends()["cpu"].reason
    assert "CPU tensors: torch" in resfuse.backends()["auto"].reason


@needs_cpu_ext
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(weight=torch.randn(23)), "weight must have shape \\(24\\)"),
        (dict(residual=torch.randn(6, 25, dtype=torch.bfloat16)), "residual must have shape"),
        (dict(x=torch.randn(6, 24).to(torch.float64)), "x must be float32, float16 or bfloat16"),
        (dict(rowscale=torch.rand(5)), "rowscale must have shape \\(6\\)"),
        (dict(x=torch.randn(6, 48, dtype=torch.bfloat16)[:, ::2]), "x must have a unit stride"),
        (dict(bias=torch.randn(48)[::2]), "bias must be contiguous"),
    ],
    ids=["weight", "residual", "dtype", "rowscale", "stride", "param-stride"],
)
def test_the_ops_name_the_bad_argument(bad, match):
    """Called directly (not through resfuse's checks), the ops still refuse bad operands
    with the argument's name, before writing anything."""
    spec, ops = full_feature_call()
    ops = ops._replace(**bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.resfuse.cpu_add_norm_fwd(*ops, *spec.flat())


@needs_cpu_ext
@pytest.mark.parametrize(
    "layout",
    [(False, True), (True, True), (True, False)],
    ids=["add_norm", "norm_add_norm", "norm_add"],
)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_opcheck(norm, layout):
    branch_norm, output_norm = layout
    spec, ops = full_feature_call(norm=norm, branch_norm=branch_norm, output_norm=output_norm)
    torch.library.opcheck(torch.ops.resfuse.cpu_add_norm_fwd.default, (*ops, *spec.flat()))
    y, h, mean, mean_x = torch.ops.resfuse.cpu_add_norm_fwd(*ops, *spec.flat())
    bwd = backward_op_args(spec, ops, torch.randn_like(y), torch.randn_like(h), h, mean, mean_x)
    torch.library.opcheck(torch.ops.resfuse.cpu_add_norm_bwd.default, bwd)


@needs_cpu_ext
@pytest.mark.parametrize(
    "layout",
    [(False, True), (True, True), (True, False)],
    ids=["add_norm", "norm_add_norm", "norm_add"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_backward_takes_the_means_as_a_shift(layout, dtype):
    """The LayerNorm backward sums around the forward's row means in one pass and corrects
    for the difference (add_norm_cpu_rows.h, norm_backward): with the means it is given, a
    far shift, or none (an exact mean pass first), the gradients agree to fp32 rounding."""
    branch_norm, output_norm = layout
    spec, ops = full_feature_call(
        dtype=dtype, rows=37, D=1000, branch_norm=branch_norm, output_norm=output_norm
    )
    y, h, mean, mean_x = torch.ops.resfuse.cpu_add_norm_fwd(*ops, *spec.flat())
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=g).to(y.dtype) if output_norm else None
    dh = torch.randn(h.shape, generator=g).to(h.dtype)

    def grads(shift):
        means = (None, None) if shift is None else (mean + shift, mean_x - shift)
        outs = torch.ops.resfuse.cpu_add_norm_bwd(*backward_op_args(spec, ops, dy, dh, h, *means))
        return [o for o in outs if o.numel()]

    given = grads(0.0)
    assert len(given) >= 3
    for other in (grads(None), grads(3.0)):
        for a, b in zip(given, other):
            # 16-bit gradients may round the other way: one unit in their last place
            tol = 2e-4 if a.dtype == torch.float32 else 2**-7
            torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


class SandwichBlock(torch.nn.Module):
    """A Gemma2-style layer on the CPU kernels: branch norm, add, next norm."""

    def __init__(self, D):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)
        self.branch_weight = torch.nn.Parameter(torch.randn(D))
        self.weight = torch.nn.Parameter(torch.randn(D))

    def forward(self, x, residual):
        y, h = resfuse.norm_add_norm(
            self.lin(x), residual, self.branch_weight, self.weight, 1e-6, backend="cpu"
        )
        return y * 2, h


@needs_cpu_ext
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = SandwichBlock(48)
    x = torch.randn(3, 5, 48, requires_grad=True)
    r = torch.randn(3, 5, 48, requires_grad=True)
    leaves = (x, r, block.lin.weight, block.branch_weight, block.weight)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    y, h = compiled(x, r)
    (y.sum() + h.pow(2).sum()).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    y2, h2 = block(x, r)
    (y2.sum() + h2.pow(2).sum()).backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(h, h2)
    for g, t in zip(grads, leaves):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("env", [None, "torch", "cpu", "auto"])
@pytest.mark.parametrize("backend", backend_registry.BACKEND_NAMES)
@pytest.mark.parametrize("built", [True, False])
def test_resolve_cpu_is_resolve_on_cpu(backend, env, built, monkeypatch):
    """The per-call shortcut for CPU tensors answers as resolve() does: the same backend, or
    the same error, for every backend= and $RESFUSE_BACKEND, with and without the
    extension."""
    if env is None:
        monkeypatch.delenv(backend_registry.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(backend_registry.ENV_VAR, env)
    if not built:
        monkeypatch.setitem(cpu_ext._state, "reason", "the CPU extension was not built (test)")

    def answer(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - compared below
            return type(e), str(e)

    cpu = torch.device("cpu")
    assert answer(lambda: backend_registry.resolve_cpu(backend)) == answer(
        lambda: backend_registry.resolve(backend, cpu)
    )
