"""The kernel sweep on CPU at tiny sizes: the plan, the inputs, what each direction runs, the
correctness gate in front of the timer, and failures turned into records."""

import pytest
import torch

from benchmarks import implementations, kernels, timing
from benchmarks.traffic import DIRECTIONS, OPS, SPECS, minimal_bytes

CPU = torch.device("cpu")
FAST = timing.TimerSettings(cpu_budget_s=0.0, cpu_min_calls=1)
CPU_IMPLS = ["eager-hf", "eager-torch", "resfuse-torch"]


def test_plan_orders_cases_by_compile_group_and_drops_oversized_shapes():
    cases = kernels.plan(
        ["rms_norm", "add_rms_norm"], ["bfloat16"], [64, 16], [128, 32], max_elements=64 * 32
    )
    assert [(c.op, c.rows, c.hidden) for c in cases] == [
        ("rms_norm", 16, 32),
        ("rms_norm", 64, 32),
        ("rms_norm", 16, 128),
        ("add_rms_norm", 16, 32),
        ("add_rms_norm", 64, 32),
        ("add_rms_norm", 16, 128),
    ]
    with pytest.raises(ValueError, match="op must be one of"):
        kernels.plan(["add_norm"], ["bfloat16"], [1], [1])
    with pytest.raises(ValueError, match="dtype must be one of"):
        kernels.plan(["rms_norm"], ["int8"], [1], [1])


def test_target_range():
    assert kernels.in_target_range(4096, 8192)  # 2^25 elements
    assert not kernels.in_target_range(2048, 8192)  # 2^24
    assert not kernels.in_target_range(65536, 768)  # hidden below 1K
    assert not kernels.in_target_range(4096, 32768)  # hidden above 16K


EXPECTED_LEAVES = {  # written out, not derived from the specs
    "add_rms_norm": ("x", "residual", "weight"),
    "add_layer_norm": ("x", "residual", "weight", "bias"),
    "norm_add_rms_norm": ("x", "residual", "weight", "branch_weight"),
    "norm_add_layer_norm": ("x", "residual", "weight", "bias", "branch_weight", "branch_bias"),
    "rms_norm_add": ("x", "residual", "branch_weight"),
    "rms_norm": ("x", "weight"),
    "layer_norm": ("x", "weight", "bias"),
}


@pytest.mark.parametrize("op", OPS)
def test_inputs_are_the_leaves_the_op_needs(op):
    inputs = kernels.make_inputs(op, torch.bfloat16, 8, 16, CPU)
    names = ("x", "residual", "weight", "bias", "branch_weight", "branch_bias")
    assert tuple(n for n in names if getattr(inputs, n) is not None) == EXPECTED_LEAVES[op]
    assert len(inputs.args) == (6 if "branch_weight" in EXPECTED_LEAVES[op] else 4)
    assert len(inputs.leaves) == len(EXPECTED_LEAVES[op])
    assert all(t.requires_grad and t.dtype == torch.bfloat16 for t in inputs.leaves)
    assert inputs.x.shape == inputs.dy.shape == inputs.dh.shape == (8, 16)
    # one upstream gradient per output: dh alone for OLMo2's norm + add
    upstream = {"rms_norm_add": ("dh",), "rms_norm": ("dy",), "layer_norm": ("dy",)}
    expected = tuple(getattr(inputs, g) for g in upstream.get(op, ("dy", "dh")))
    assert len(inputs.grads()) == len(expected)
    assert all(got is want for got, want in zip(inputs.grads(), expected))


def test_the_two_weights_of_a_sandwich_differ_and_old_inputs_are_unchanged():
    inputs = kernels.make_inputs("norm_add_rms_norm", torch.float32, 8, 16, CPU)
    assert not torch.equal(inputs.weight, inputs.branch_weight)
    # a new op's draws must not move the inputs of the existing ops (comparable runs)
    old = kernels.make_inputs("add_rms_norm", torch.float32, 8, 16, CPU)
    g = torch.Generator().manual_seed(0)
    draws = [torch.randn(*shape, generator=g) for shape in ((8, 16), (8, 16), (16,))]
    assert torch.equal(old.x, draws[0]) and torch.equal(old.residual, draws[1])
    assert torch.equal(old.weight, draws[2] * 0.1 + 1.0)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_timed_call_runs_forward_backward_or_both(direction):
    calls = []
    fn = implementations.BY_NAME["eager-hf"].make("add_rms_norm")

    def counting(*args):
        calls.append("forward")
        return fn(*args)

    inputs = kernels.make_inputs("add_rms_norm", torch.float32, 8, 16, CPU)
    call, setup = kernels.timed_call(counting, inputs, direction)
    result = call(setup()) if setup else call()
    assert calls == ["forward"]
    if direction == "fwd":
        assert len(result) == 2  # (y, h)
    else:  # gradients for x, residual, weight
        assert [g.shape for g in result] == [(8, 16), (8, 16), (16,)]
    assert (setup is not None) == (direction == "bwd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_implementations_pass_the_correctness_check(impl, op, dtype):
    inputs = kernels.make_inputs(op, dtype, 16, 48, CPU)
    fn = implementations.BY_NAME[impl].make(op)
    assert implementations.check(op, fn, inputs.args, inputs.grads()) is None


def test_the_correctness_check_catches_wrong_implementations():
    inputs = kernels.make_inputs("add_layer_norm", torch.bfloat16, 16, 48, CPU)
    args, grads = inputs.args, inputs.grads()
    good = implementations.BY_NAME["eager-hf"].make("add_layer_norm")
    swapped = lambda *a: good(*a)[::-1]  # noqa: E731  (h, y) instead of (y, h)
    no_bias = lambda x, r, w, b: good(x, r, w, torch.zeros_like(b) + 0 * b)  # noqa: E731
    rms = lambda x, r, w, b: (implementations.hf_rms_norm(r + x, w, None, 1e-5), r + x)  # noqa: E731
    only_y = lambda *a: good(*a)[:1]  # noqa: E731
    assert implementations.check("add_layer_norm", good, args, grads) is None
    assert "y:" in implementations.check("add_layer_norm", swapped, args, grads)
    assert "y:" in implementations.check("add_layer_norm", no_bias, args, grads)
    assert "y:" in implementations.check("add_layer_norm", rms, args, grads)
    detached_bias = lambda x, r, w, b: good(x, r, w, b.detach())  # noqa: E731
    assert "dbias: no gradient" in implementations.check(
        "add_layer_norm", detached_bias, args, grads
    )
    assert "outputs" in implementations.check("add_layer_norm", only_y, args, grads)

    # a backward that drops the gradient flowing into h
    class NoDh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.clone()

        @staticmethod
        def backward(ctx, dh):
            return torch.zeros_like(dh)

    def broken_dh(x, r, w, b):
        y, h = good(x, r, w, b)
        return y, NoDh.apply(h)

    assert "dx:" in implementations.check("add_layer_norm", broken_dh, args, grads)


class _NoGrad(torch.autograd.Function):
    """The identity, with a backward that loses the gradient: a kernel that forgets one."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


@pytest.mark.parametrize("op", ["norm_add_rms_norm", "norm_add_layer_norm"])
def test_the_correctness_check_catches_wrong_sandwiches(op):
    inputs = kernels.make_inputs(op, torch.bfloat16, 16, 48, CPU)
    args, grads = inputs.args, inputs.grads()
    hf = implementations.NORMS["eager-hf"][SPECS[op].norm]
    eps = implementations.EPS[SPECS[op].norm]
    good = implementations.BY_NAME["eager-hf"].make(op)

    def sandwich(branch):  # h = r + branch(x, ...), y = norm(h)
        def fn(x, r, w, b, wb, bb):
            h = r + branch(x, w, b, wb, bb)
            return hf(h, w, b, eps), h

        return fn

    def check(fn):
        return implementations.check(op, fn, args, grads)

    assert check(good) is None
    # the branch added raw, as add + norm would (y is compared first)
    assert check(sandwich(lambda x, w, b, wb, bb: x)).startswith("y:")
    # the output norm's weight on the branch and the branch's on the output
    swapped = lambda x, r, w, b, wb, bb: good(x, r, wb, bb, w, b)  # noqa: E731
    assert check(swapped).startswith("y:")
    # the outputs in the wrong order, or only one of them
    assert check(lambda *a: good(*a)[::-1]).startswith("y:")
    assert "outputs" in check(lambda *a: good(*a)[:1])
    # the branch weight detached: its gradient is missing
    assert "dbranch_weight: no gradient" in check(
        lambda x, r, w, b, wb, bb: good(x, r, w, b, wb.detach(), bb)
    )
    # the gradient reaching h lost on its way to the residual: dresidual is dh_total
    assert check(lambda x, r, w, b, wb, bb: good(x, _NoGrad.apply(r), w, b, wb, bb)).startswith(
        "dresidual:"
    )
    # the upstream dh dropped: every gradient of the branch is wrong, dx first
    assert check(lambda *a: (good(*a)[0], _NoGrad.apply(good(*a)[1]))).startswith("dx:")
    if op == "norm_add_layer_norm":
        # the branch bias left out of h
        assert check(
            sandwich(lambda x, w, b, wb, bb: hf(x, wb, torch.zeros_like(bb) + 0 * bb, eps))
        ).startswith("y:")
    else:
        # a LayerNorm on the branch instead of an RMSNorm
        ln = implementations.hf_layer_norm
        assert check(
            sandwich(lambda x, w, b, wb, bb: ln(x, wb, torch.zeros_like(wb), eps))
        ).startswith("y:")


def test_the_correctness_check_catches_a_wrong_norm_add():
    op = "rms_norm_add"
    inputs = kernels.make_inputs(op, torch.bfloat16, 16, 48, CPU)
    args, grads = inputs.args, inputs.grads()
    good = implementations.BY_NAME["eager-torch"].make(op)
    hf = implementations.hf_rms_norm
    assert implementations.check(op, good, args, grads) is None
    wrong = {
        "no branch norm": lambda x, r, w, b, wb, bb: (r + x,),
        "normalised after the add": lambda x, r, w, b, wb, bb: (hf(r + x, wb, None, 1e-6),),
        "returns (y, h)": lambda x, r, w, b, wb, bb: (r + hf(x, wb, None, 1e-6),) * 2,
        "loses dresidual": lambda x, r, w, b, wb, bb: (_NoGrad.apply(r) + hf(x, wb, None, 1e-6),),
    }
    expected = {
        "no branch norm": "h:",
        "normalised after the add": "h:",
        "returns (y, h)": "returned 2 outputs",
        "loses dresidual": "dresidual:",
    }
    for what, fn in wrong.items():
        assert implementations.check(op, fn, args, grads).startswith(expected[what]), what
    with pytest.raises(ValueError, match="takes 6 arguments"):
        implementations.check(op, good, args[:4], grads)


def test_peers_do_not_offer_the_sandwich_ops():
    for peer in ("liger", "flash-attn", "quack", "apex"):
        for op in ("norm_add_rms_norm", "norm_add_layer_norm", "rms_norm_add"):
            with pytest.raises(implementations.Unsupported, match="no fused norm of the branch"):
                implementations.BY_NAME[peer].make(op)


def test_run_records_every_measurement_and_the_failures():
    cases = kernels.plan(["add_rms_norm", "layer_norm"], ["bfloat16"], [32], [16, 64])
    broken = implementations.Implementation(
        "broken",
        "peer",
        "returns the residual sum as y",
        lambda op: lambda x, r, w, b: (x * 2,) if r is None else (r + x, r + x),
        lambda device: None,
    )
    only_rms = implementations.Implementation(
        "only-rms", "peer", "RMSNorm only", _only_rms, lambda device: None
    )
    impls = implementations.select(["eager-hf", "resfuse-triton"]) + [broken, only_rms]
    progress = []
    checkpoints = []
    records = kernels.run(
        cases,
        impls,
        DIRECTIONS,
        CPU,
        copy_bytes_per_s=1e10,
        settings=FAST,
        progress=progress.append,
        checkpoint=lambda r: checkpoints.append(len(r)),
    )
    assert len(records) == len(progress) == len(cases) * len(impls) * len(DIRECTIONS)
    assert checkpoints == [12, 24, 36, 48]  # after each case
    by = {(r["op"], r["hidden"], r["impl"], r["direction"]): r for r in records}
    for case in cases:
        for d in DIRECTIONS:
            ok = by[(case.op, case.hidden, "eager-hf", d)]
            assert ok["error"] is None
            assert ok["bytes"] == minimal_bytes(case.op, d, case.rows, case.hidden, torch.bfloat16)
            assert ok["gbps"] == pytest.approx(ok["bytes"] / ok["median_ms"] / 1e6)
            assert ok["frac_copy"] == pytest.approx(ok["gbps"] * 1e9 / 1e10)
            assert by[(case.op, case.hidden, "resfuse-triton", d)]["error"].startswith(
                "unavailable"
            )
            assert by[(case.op, case.hidden, "broken", d)]["error"].startswith(
                "failed the correctness check"
            )
            assert by[(case.op, case.hidden, "broken", d)]["median_ms"] is None
    assert by[("layer_norm", 16, "only-rms", "fwd")]["error"] == "unsupported: no LayerNorm"
    assert by[("add_rms_norm", 16, "only-rms", "fwd")]["error"] is None

    # a resumed run measures only what is missing
    skip = {kernels.key_of(r) for r in records if r["error"] is None}
    again = kernels.run(cases, impls, DIRECTIONS, CPU, 1e10, FAST, skip=skip)
    assert len(again) == len(records) - len(skip)
    assert all(r["error"] for r in again)


def _only_rms(op):
    if implementations.norm_kind(op) == "layer":
        raise implementations.Unsupported("no LayerNorm")
    return implementations.BY_NAME["eager-torch"].make(op)


def test_select_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown implementation"):
        implementations.select(["eager-hf", "fastest"])


def test_peers_and_gpu_backends_say_why_they_are_not_measured_on_cpu():
    reasons = implementations.availability(implementations.select(), CPU)
    assert reasons["eager-hf"] is None and reasons["resfuse-torch"] is None
    assert "CUDA" in reasons["resfuse-triton"] and "CUDA" in reasons["resfuse-cuda"]
    for peer in ("liger", "flash-attn", "quack", "apex"):
        assert reasons[peer]  # not installed here, or no CUDA device


def test_compiled_baseline_is_correct_and_compiles_once_for_all_row_counts():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = implementations.BY_NAME["torch.compile"].make("add_rms_norm")
    for rows in (16, 40):
        inputs = kernels.make_inputs("add_rms_norm", torch.float32, rows, 32, CPU)
        assert implementations.check("add_rms_norm", fn, inputs.args, inputs.grads()) is None
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("op", ["norm_add_rms_norm", "norm_add_layer_norm", "rms_norm_add"])
def test_resfuse_triton_sandwich_under_the_interpreter_passes_the_check(op):
    # the benchmark's call of the Triton kernels (argument order, outputs), on CPU tensors
    # under TRITON_INTERPRET=1 (tests/conftest.py)
    inputs = kernels.make_inputs(op, torch.float32, 16, 48, CPU)
    fn = implementations.BY_NAME["resfuse-triton"].make(op)
    assert implementations.check(op, fn, inputs.args, inputs.grads()) is None


def test_run_stops_when_asked_and_leaves_no_record_for_the_rest():
    cases = kernels.plan(["add_rms_norm", "rms_norm"], ["bfloat16"], [16], [32, 64])
    impls = implementations.select(["eager-hf", "eager-torch"])
    asked = []

    def stop():  # asked before the first case, then before each measurement (a direction's
        asked.append(1)  # implementations, timed together): a deadline that passes after two
        return len(asked) > 3

    records = kernels.run(cases, impls, DIRECTIONS, CPU, 1e10, FAST, stop=stop)
    assert len(records) == 4 and all(r["error"] is None for r in records)
    assert [kernels.key_of(r) for r in records] == [
        (cases[0].op, "bfloat16", 16, cases[0].hidden, i, d)
        for d in DIRECTIONS[:2]
        for i in ("eager-hf", "eager-torch")
    ]
