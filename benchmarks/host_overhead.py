"""Per-call host (CPU) overhead of resfuse's Python layer, without the math.

The backend is swapped for a null one that hands back preallocated outputs, so the timings
are validation + backend choice + the autograd layer + (for the op paths) the dispatcher:
the part that costs as much as the kernel itself for small inputs. Compare the eager path
(what a training step calls) with going through the registered custom op (what
torch.compile graphs call).

    python -m benchmarks.host_overhead [--iters N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from contextlib import contextmanager

import torch

import resfuse
from resfuse import backend_registry
from resfuse.spec import AddNormSpec, Forward, Grads


@contextmanager
def null_backend(D: int, rows: int):
    """Every backend returns preallocated outputs of the right shape."""
    y = torch.empty(rows, D)
    h = torch.empty(rows, D)

    def forward(spec, ops):  # built as the real backends build it (tuple.__new__)
        return tuple.__new__(Forward, (y, h if spec.store_h else None, None, None))

    def backward(spec, inputs):
        return Grads(y, None, torch.zeros(D), None, None, None, None)

    null = types.SimpleNamespace(forward=forward, backward=backward)
    original = backend_registry.implementation
    backend_registry.implementation = lambda name: null
    try:
        yield
    finally:
        backend_registry.implementation = original


def _time(fn, iters: int, repeats: int = 5) -> float:
    """Median over repeats of the mean time per call, in microseconds."""
    for _ in range(min(iters, 200)):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(samples)


def measure(iters: int = 2000, D: int = 64, rows: int = 8) -> dict[str, float]:
    x = torch.randn(rows, D)
    r = torch.randn(rows, D)
    w = torch.ones(D)
    wg = torch.ones(D, requires_grad=True)
    # the registered op's arguments: the operands, the spec's flat form, the backend
    op_args = (x, r, w, None, None, None, None, None, *AddNormSpec().flat(), "torch")
    results = {}
    with null_backend(D, rows):
        with torch.no_grad():
            results["eager call, no grad"] = _time(lambda: resfuse.add_rms_norm(x, r, w), iters)
            results["custom op via dispatcher, no grad"] = _time(
                lambda: torch.ops.resfuse.add_norm(*op_args), iters
            )
        results["eager call + autograd.Function"] = _time(
            lambda: resfuse.add_rms_norm(x, r, wg), iters
        )
        grad_args = (x, r, wg) + op_args[3:]
        results["custom op via dispatcher + autograd"] = _time(
            lambda: torch.ops.resfuse.add_norm(*grad_args), iters
        )
    with torch.no_grad():
        results["for scale: torch backend doing the math (8x64)"] = _time(
            lambda: resfuse.add_rms_norm(x, r, w, backend="torch"), iters
        )
    return results


def report(results: dict[str, float]) -> str:
    width = max(map(len, results))
    lines = [f"{'path (CPU, host overhead only)':<{width}}  us/call", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {us:7.2f}" for name, us in results.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args(argv)
    print(report(measure(args.iters)))


if __name__ == "__main__":
    main()
