"""The kernel sweep: every (op, dtype, rows, hidden) case, every implementation, forward,
backward and forward+backward; median time, GB/s on ``traffic.minimal_bytes`` and the fraction
of the copy bandwidth measured in the same run.

What each direction times (inputs and parameters require grad, as in training):

* ``fwd``: the forward call (it also saves what its backward needs);
* ``bwd``: ``torch.autograd.grad`` of the outputs of a forward (run untimed before each
  timed call), with upstream gradients for every output (``dy`` and, for the pre-norm and
  sandwich ops, ``dh``; ``dh`` alone for ``rms_norm_add``), to every input: x, residual and
  the parameters of both norms;
* ``fwd+bwd``: both, as a training step runs them.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch

from . import implementations as impls_mod
from .timing import TimerSettings, Timing, time_cpu_interleaved, time_fn
from .traffic import DIRECTIONS, OPS, minimal_bytes, spec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The targets the project holds itself to, as fractions of the measured copy bandwidth, for
# hidden sizes 1K-16K and at least 2^25 elements (GPU only).
TARGETS = {"fwd": 0.92, "bwd": 0.88}
TARGET_HIDDEN = (1024, 16384)
TARGET_MIN_ELEMENTS = 1 << 25


def in_target_range(rows: int, hidden: int) -> bool:
    return TARGET_HIDDEN[0] <= hidden <= TARGET_HIDDEN[1] and rows * hidden >= TARGET_MIN_ELEMENTS


# The CPU kernels' targets (issue 16), against baselines measured in the same run: resfuse-cpu
# at least as fast as eager PyTorch (the faster of eager-hf and eager-torch) and as
# torch.compile for every op, dtype, size and direction; and the add + norm forwards at
# hidden >= 1024 in bf16 and fp32 at least at this fraction of the copy bandwidth.
CPU_IMPL = "resfuse-cpu"
CPU_EAGER = ("eager-hf", "eager-torch")
CPU_COMPILED = "torch.compile"
CPU_COPY_TARGET = 0.60
CPU_COPY_TARGET_OPS = ("add_rms_norm", "add_layer_norm")
CPU_COPY_TARGET_DTYPES = ("bfloat16", "float32")
CPU_COPY_TARGET_MIN_HIDDEN = 1024


def cpu_copy_target_applies(op: str, direction: str, dtype: str, hidden: int) -> bool:
    return (
        op in CPU_COPY_TARGET_OPS
        and direction == "fwd"
        and dtype in CPU_COPY_TARGET_DTYPES
        and hidden >= CPU_COPY_TARGET_MIN_HIDDEN
    )


@dataclass(frozen=True)
class KernelCase:
    op: str
    dtype: str
    rows: int
    hidden: int

    @property
    def group(self) -> tuple:
        """Cases that share compiled code (torch.compile's rows are dynamic)."""
        return (self.op, self.dtype, self.hidden)


def plan(
    ops: Iterable[str],
    dtypes: Iterable[str],
    rows: Iterable[int],
    hidden: Iterable[int],
    max_elements: Optional[int] = None,
) -> list[KernelCase]:
    """Every combination, largest shapes dropped above ``max_elements``; ordered so that the
    cases sharing compiled code are adjacent."""
    ops, dtypes = list(ops), list(dtypes)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return [
        KernelCase(op, dtype, r, h)
        for op in ops
        for dtype in dtypes
        for h in sorted(set(hidden))
        for r in sorted(set(rows))
        if max_elements is None or r * h <= max_elements
    ]


@dataclass
class CaseInputs:
    op: str
    x: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    branch_weight: Optional[torch.Tensor]
    branch_bias: Optional[torch.Tensor]
    dy: torch.Tensor
    dh: torch.Tensor

    @property
    def args(self) -> tuple:
        """The op's arguments in the implementations' convention (``traffic.Op.arguments``)."""
        return tuple(getattr(self, name) for name in spec(self.op).arguments)

    @property
    def leaves(self) -> tuple:
        return tuple(t for t in self.args if t is not None)

    def grads(self, n_outputs: Optional[int] = None) -> tuple:
        """The upstream gradients of the op's outputs (``dy`` for y, ``dh`` for h), in order."""
        return tuple({"y": self.dy, "h": self.dh}[o] for o in spec(self.op).outputs)[:n_outputs]


def make_inputs(
    op: str, dtype: torch.dtype, rows: int, hidden: int, device: torch.device, seed: int = 0
) -> CaseInputs:
    """Activations of unit scale, weights near 1 and biases near 0, every one its own draw
    (so a swapped weight is caught); all leaves require grad."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        return (t * scale + shift).to(dtype)

    params = spec(op).parameters

    def vector(name, shift):
        return randn(hidden, scale=0.1, shift=shift).requires_grad_() if name in params else None

    x = randn(rows, hidden).requires_grad_()
    residual = randn(rows, hidden).requires_grad_() if spec(op).residual else None
    # drawn in this order so that the inputs of the ops without a branch norm are unchanged
    weight, bias = vector("weight", 1.0), vector("bias", 0.0)
    branch_weight, branch_bias = vector("branch_weight", 1.0), vector("branch_bias", 0.0)
    return CaseInputs(
        op,
        x,
        residual,
        weight,
        bias,
        branch_weight,
        branch_bias,
        randn(rows, hidden),
        randn(rows, hidden),
    )


def timed_call(
    fn: Callable, inputs: CaseInputs, direction: str
) -> tuple[Callable, Optional[Callable]]:
    """``(call, setup)``: what ``timing.time_fn`` times for ``direction`` of ``fn``. The
    backward's setup is a fresh forward (untimed), so each timed backward is a first one."""

    def forward():
        return fn(*inputs.args)

    def backward(outs):
        return torch.autograd.grad(outs, inputs.leaves, inputs.grads(len(outs)))

    if direction == "fwd":
        return forward, None
    if direction == "bwd":
        return backward, forward
    if direction == "fwd+bwd":
        return (lambda: backward(forward())), None
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _is_oom(e: BaseException) -> bool:
    return (
        isinstance(e, torch.OutOfMemoryError)
        if hasattr(torch, "OutOfMemoryError")
        else ("out of memory" in str(e))
    )


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


CHECK_ROWS = 64  # rows of the correctness check run before an implementation is timed


def run(
    cases: list[KernelCase],
    impls: list[impls_mod.Implementation],
    directions: Iterable[str],
    device: torch.device,
    copy_bytes_per_s: float,
    settings: TimerSettings = TimerSettings(),
    progress: Optional[Callable[[str], None]] = None,
    skip: Optional[set] = None,
    checkpoint: Optional[Callable[[list[dict]], None]] = None,
    stop: Optional[Callable[[], bool]] = None,
) -> list[dict]:
    """Measure every (case, implementation, direction); one record each (see ``record_key``).
    Failures (not supported, wrong results, out of memory) become records with an ``error``
    instead of stopping the run. ``skip``: keys already measured (a resumed run);
    ``checkpoint(records)`` is called after each case, so an interrupted run loses little;
    ``stop()``, asked before each case and each measurement (a direction's implementations,
    timed together), ends the run early when true (a deadline): what was not measured has
    no record."""
    directions = list(directions)
    skip = skip or set()
    records: list[dict] = []
    group = None
    fns: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    for case in cases:
        todo = [
            (impl, d)
            for impl in impls
            for d in directions
            if record_key(case, impl.name, d) not in skip
        ]
        if not todo:
            continue
        if stop is not None and stop():
            break
        dtype = DTYPES[case.dtype]
        if case.group != group:
            group = case.group
            fns, errors = prepare(case, impls, device)
        input_error = None
        try:
            inputs = make_inputs(case.op, dtype, case.rows, case.hidden, device)
        except Exception as e:  # the shape does not fit: every implementation fails alike
            inputs, input_error = None, _short(e)
            _free(device)
        # one measurement: a direction's implementations, timed together in interleaved rounds
        # on the CPU (timing.time_cpu_interleaved: a drifting machine slows all alike), one
        # after another with CUDA events on a GPU (stable to a few percent)
        for direction in directions:
            group_todo = [impl for impl, d in todo if d == direction]
            if not group_todo:
                continue
            if stop is not None and stop():
                break
            nbytes = minimal_bytes(case.op, direction, case.rows, case.hidden, dtype)
            group_records = {}
            for impl in group_todo:
                group_records[impl.name] = {
                    **asdict(case),
                    "direction": direction,
                    "impl": impl.name,
                    "bytes": nbytes,
                    "median_ms": None,
                    "q20_ms": None,
                    "q80_ms": None,
                    "gbps": None,
                    "frac_copy": None,
                    "error": input_error if inputs is None else errors.get(impl.name),
                }
            timed = [impl.name for impl in group_todo if group_records[impl.name]["error"] is None]
            calls = {name: timed_call(fns[name], inputs, direction) for name in timed}
            for name, outcome in _time_group(calls, device, settings).items():
                rec = group_records[name]
                if isinstance(outcome, BaseException):
                    rec["error"] = "out of memory" if _is_oom(outcome) else _short(outcome)
                    continue
                rec.update(outcome.as_dict())
                rec["gbps"] = nbytes / outcome.median_s / 1e9
                rec["frac_copy"] = nbytes / outcome.median_s / copy_bytes_per_s
            for impl in group_todo:
                records.append(group_records[impl.name])
                if progress:
                    progress(
                        f"{case.op} {case.dtype} {case.rows}x{case.hidden} {impl.name} {direction}"
                    )
        del inputs
        _free(device)
        if checkpoint:
            checkpoint(records)
    return records


def _time_group(
    calls: dict[str, tuple[Callable, Optional[Callable]]],
    device: torch.device,
    settings: TimerSettings,
) -> dict[str, "Timing | BaseException"]:
    """Each call's ``Timing``, or the exception it raised (its record then says why)."""
    if device.type != "cuda":
        return time_cpu_interleaved(calls, settings)
    outcome: dict[str, "Timing | BaseException"] = {}
    for name, (call, setup) in calls.items():
        try:
            outcome[name] = time_fn(call, device, settings, setup)
        except Exception as e:
            outcome[name] = e
            _free(device)
    return outcome


def prepare(case: KernelCase, impls, device) -> tuple[dict, dict]:
    """Build each implementation's function for this (op, dtype, hidden) and check it against
    the reference on a few rows; returns the functions and the errors of those that failed.
    (This compiles what an implementation compiles: the GPU campaign's warm-up runs it in
    worker processes to fill the on-disk compile caches before timing.)"""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # fresh compiled code (and cache) per group
    fns, errors = {}, {}
    small = make_inputs(case.op, DTYPES[case.dtype], CHECK_ROWS, case.hidden, device, seed=1)
    for impl in impls:
        reason = impl.unavailable(device)
        if reason is not None:
            errors[impl.name] = f"unavailable: {reason}"
            continue
        try:
            fn = impl.make(case.op)
        except impls_mod.Unsupported as e:
            errors[impl.name] = f"unsupported: {e}"
            continue
        except Exception as e:
            errors[impl.name] = f"unavailable: {_short(e)}"
            continue
        try:
            wrong = impls_mod.check(case.op, fn, small.args, small.grads())
        except Exception as e:
            wrong = _short(e)
        if wrong is not None:
            errors[impl.name] = f"failed the correctness check: {wrong}"
        fns[impl.name] = fn
    return fns, errors


def rescale_to_copy(records: list[dict], copy_bytes_per_s: float) -> None:
    """Recompute every ``frac_copy`` against ``copy_bytes_per_s`` (in place)."""
    for rec in records:
        if rec.get("gbps") is not None:
            rec["frac_copy"] = rec["gbps"] * 1e9 / copy_bytes_per_s


def record_key(case: KernelCase, impl: str, direction: str) -> tuple:
    return (case.op, case.dtype, case.rows, case.hidden, impl, direction)


def key_of(record: dict) -> tuple:
    return (
        record["op"],
        record["dtype"],
        record["rows"],
        record["hidden"],
        record["impl"],
        record["direction"],
    )
