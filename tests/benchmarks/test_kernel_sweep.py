"""The kernel sweep on CPU at tiny sizes: the plan, the inputs, what each direction runs, the
correctness gate in front of the timer, and failures turned into records."""

import pytest
import torch

from benchmarks import implementations, kernels, timing
from benchmarks.traffic import DIRECTIONS, OPS, minimal_bytes

CPU = torch.device("cpu")
FAST = timing.TimerSettings(cpu_budget_s=0.0, cpu_min_calls=1)
CPU_IMPLS = ["eager-hf", "eager-torch", "resfuse-torch"]


def test_plan_orders_cases_by_compile_group_and_drops_oversized_shapes():
    cases = kernels.plan(["rms_norm", "add_rms_norm"], ["bfloat16"], [64, 16], [128, 32],
                         max_elements=64 * 32)
    assert [(c.op, c.rows, c.hidden) for c in cases] == [
        ("rms_norm", 16, 32), ("rms_norm", 64, 32), ("rms_norm", 16, 128),
        ("add_rms_norm", 16, 32), ("add_rms_norm", 64, 32), ("add_rms_norm", 16, 128)]
    with pytest.raises(ValueError, match="op must be one of"):
        kernels.plan(["add_norm"], ["bfloat16"], [1], [1])
    with pytest.raises(ValueError, match="dtype must be one of"):
        kernels.plan(["rms_norm"], ["int8"], [1], [1])


def test_target_range():
    assert kernels.in_target_range(4096, 8192)        # 2^25 elements
    assert not kernels.in_target_range(2048, 8192)    # 2^24
    assert not kernels.in_target_range(65536, 768)    # hidden below 1K
    assert not kernels.in_target_range(4096, 32768)   # hidden above 16K


@pytest.mark.parametrize("op", OPS)
def test_inputs_are_the_leaves_the_op_needs(op):
    inputs = kernels.make_inputs(op, torch.bfloat16, 8, 16, CPU)
    assert (inputs.residual is not None) == op.startswith("add_")
    assert (inputs.bias is not None) == op.endswith("layer_norm")
    assert all(t.requires_grad and t.dtype == torch.bfloat16 for t in inputs.leaves)
    assert inputs.x.shape == inputs.dy.shape == inputs.dh.shape == (8, 16)


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
    assert implementations.check(op, fn, *inputs.args, inputs.grads(2)) is None


def test_the_correctness_check_catches_wrong_implementations():
    inputs = kernels.make_inputs("add_layer_norm", torch.bfloat16, 16, 48, CPU)
    args, grads = inputs.args, inputs.grads(2)
    good = implementations.BY_NAME["eager-hf"].make("add_layer_norm")
    swapped = lambda *a: good(*a)[::-1]  # noqa: E731  (h, y) instead of (y, h)
    no_bias = lambda x, r, w, b: good(x, r, w, torch.zeros_like(b) + 0 * b)  # noqa: E731
    rms = lambda x, r, w, b: (implementations.hf_rms_norm(r + x, w, None, 1e-5), r + x)  # noqa: E731
    only_y = lambda *a: good(*a)[:1]  # noqa: E731
    assert implementations.check("add_layer_norm", good, *args, grads) is None
    assert "y:" in implementations.check("add_layer_norm", swapped, *args, grads)
    assert "y:" in implementations.check("add_layer_norm", no_bias, *args, grads)
    assert "y:" in implementations.check("add_layer_norm", rms, *args, grads)
    detached_bias = lambda x, r, w, b: good(x, r, w, b.detach())  # noqa: E731
    assert "dbias: no gradient" in implementations.check("add_layer_norm", detached_bias, *args,
                                                         grads)
    assert "outputs" in implementations.check("add_layer_norm", only_y, *args, grads)

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
    assert "dx:" in implementations.check("add_layer_norm", broken_dh, *args, grads)


def test_run_records_every_measurement_and_the_failures():
    cases = kernels.plan(["add_rms_norm", "layer_norm"], ["bfloat16"], [32], [16, 64])
    broken = implementations.Implementation(
        "broken", "peer", "returns the residual sum as y", lambda op: lambda x, r, w, b: (
            (x * 2,) if r is None else (r + x, r + x)), lambda device: None)
    only_rms = implementations.Implementation(
        "only-rms", "peer", "RMSNorm only", _only_rms, lambda device: None)
    impls = implementations.select(["eager-hf", "resfuse-triton"]) + [broken, only_rms]
    progress = []
    checkpoints = []
    records = kernels.run(cases, impls, DIRECTIONS, CPU, copy_bytes_per_s=1e10, settings=FAST,
                          progress=progress.append, checkpoint=lambda r: checkpoints.append(len(r)))
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
            assert by[(case.op, case.hidden, "resfuse-triton", d)]["error"].startswith("unavailable")
            assert by[(case.op, case.hidden, "broken", d)]["error"].startswith(
                "failed the correctness check")
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
        assert implementations.check("add_rms_norm", fn, *inputs.args, inputs.grads(2)) is None
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
