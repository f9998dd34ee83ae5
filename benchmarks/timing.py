"""Timing: the median time of a call on a CUDA device or on the CPU, and the device-to-device
copy bandwidth that every GB/s figure is compared with.

``time_fn(fn, device, settings, setup=None)`` times ``fn(setup())`` (or ``fn()``): ``setup``
runs before each timed call and is not timed. The backward is timed that way, with a fresh
forward as the untimed setup, so no implementation needs ``retain_graph`` (which compiled
backwards with donated buffers refuse) and every timed backward is a first backward.

* CUDA: CUDA events around each call; before each, the L2 cache is flushed (a 256 MiB write)
  so no call reads what the previous one (or the setup) left in L2 — in a training step the
  backward of a norm runs long after its forward. Warm-up and repetition counts follow from
  time windows, as in ``triton.testing.do_bench``.
* CPU: ``time.perf_counter`` around each call after one warm-up call, within a time budget.
  ``time_cpu_interleaved`` times several implementations of one case in rounds (one call of
  each per round, the order rotating), so a machine whose speed drifts over seconds (a shared
  VM: 15-20% between runs) slows every implementation alike instead of whichever ran last.

Both report the median and the 20th / 80th percentiles of the per-call times.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Timing:
    median_s: float
    q20_s: float
    q80_s: float
    calls: int

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median_s * 1e3,
            "q20_ms": self.q20_s * 1e3,
            "q80_ms": self.q80_s * 1e3,
            "calls": self.calls,
        }


@dataclass(frozen=True)
class TimerSettings:
    """CUDA: warm-up and measurement windows (ms) and bounds on the timed calls. CPU: the
    time budget per measurement and the bounds on the timed calls."""

    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    cuda_min_calls: int = 10
    cuda_max_calls: int = 500
    cpu_budget_s: float = 0.4
    cpu_min_calls: int = 3
    cpu_max_calls: int = 50


def _quantile(sorted_values: list[float], q: float) -> float:
    # nearest rank: the samples are few on the CPU
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def _summary(samples: list[float]) -> Timing:
    samples = sorted(samples)
    return Timing(
        statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples)
    )


def time_cpu(
    fn: Callable, settings: TimerSettings = TimerSettings(), setup: Optional[Callable] = None
) -> Timing:
    """One call's timing: ``time_cpu_interleaved`` with a single implementation (its error, if
    it raises, propagates)."""
    outcome = time_cpu_interleaved({"call": (fn, setup)}, settings)["call"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def time_cpu_interleaved(
    calls: dict[str, tuple[Callable, Optional[Callable]]],
    settings: TimerSettings = TimerSettings(),
) -> dict[str, "Timing | BaseException"]:
    """Time each ``name: (fn, setup)`` as ``time_cpu`` does, but in interleaved rounds: one
    warm-up call each, then rounds of one timed call each, the order rotated by one per round
    (no implementation always runs right after the same other one), until every one has
    ``cpu_min_calls`` samples and the budget (``cpu_budget_s`` per implementation) is spent
    or ``cpu_max_calls`` rounds are done. An implementation that raises gets its exception instead of a
    ``Timing`` and leaves the rotation; the others go on."""
    outcome: dict[str, "Timing | BaseException"] = {}
    samples: dict[str, list[float]] = {}

    def once(name: str) -> None:
        fn, setup = calls[name]
        try:
            arg = setup() if setup is not None else None
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            samples[name].append(time.perf_counter() - t0)
        except Exception as e:
            outcome[name] = e

    names = list(calls)
    for name in names:
        samples[name] = []
        once(name)  # warm-up: allocator, lazy initialisation, compiled code loading
        samples[name].clear()
    budget_s = settings.cpu_budget_s * len(names)
    start = time.perf_counter()
    rounds = 0
    while rounds < settings.cpu_min_calls or (
        rounds < settings.cpu_max_calls and time.perf_counter() - start < budget_s
    ):
        live = [n for n in names if n not in outcome]
        if not live:
            break
        shift = rounds % len(live)
        for name in live[shift:] + live[:shift]:
            once(name)
        rounds += 1
    for name in names:
        if name not in outcome:
            outcome[name] = _summary(samples[name])
    return outcome


def time_cuda(
    fn: Callable, settings: TimerSettings = TimerSettings(), setup: Optional[Callable] = None
) -> Timing:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def run(n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends):
            arg = setup() if setup is not None else None
            flush.zero_()
            start.record()
            fn(arg) if setup is not None else fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]

    torch.cuda.synchronize()
    estimate_s = statistics.median(run(3))  # also the first warm-up (compiles, autotunes)
    per_call_ms = max(estimate_s * 1e3, 1e-3)
    run(max(1, int(settings.warmup_ms / per_call_ms)))
    n = int(settings.rep_ms / per_call_ms)
    n = min(settings.cuda_max_calls, max(settings.cuda_min_calls, n))
    return _summary(run(n))


def time_fn(
    fn: Callable,
    device: torch.device,
    settings: TimerSettings = TimerSettings(),
    setup: Optional[Callable] = None,
) -> Timing:
    """Time ``fn()``, or ``fn(setup())`` with ``setup`` untimed, on ``device``."""
    if device.type == "cuda":
        return time_cuda(fn, settings, setup)
    return time_cpu(fn, settings, setup)


def default_copy_buffer_bytes(device: torch.device) -> int:
    # far larger than any L2 (50 MB on H100) or CPU cache, so the copy runs DRAM to DRAM
    return (1 << 30) if device.type == "cuda" else (256 << 20)


def copy_bandwidth(
    device: torch.device, nbytes: Optional[int] = None, settings: TimerSettings = TimerSettings()
) -> dict:
    """Device-to-device copy (``dst.copy_(src)``) of a large buffer: bytes read + written
    per second. The ceiling a memory-bound kernel is judged against, measured in the run."""
    nbytes = nbytes or default_copy_buffer_bytes(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, settings)
    moved = 2 * src.numel() * src.element_size()
    out = {
        "bytes_per_s": moved / timing.median_s,
        "buffer_bytes": nbytes,
        "median_ms": timing.median_s * 1e3,
    }
    if device.type == "cpu":
        del dst
        out["fresh_output_bytes_per_s"] = fresh_page_copy_bandwidth(src)
    return out


def fresh_page_copy_bandwidth(src: torch.Tensor, repeats: int = 3) -> float:
    """The same copy into freshly mapped memory each time (an anonymous mmap, as glibc's
    malloc gives allocations of 32 MiB and more unless told to keep freed memory): its first
    writes fault the pages in. Context for a CPU report, not the ceiling."""
    import mmap

    nbytes = src.numel() * src.element_size()
    times = []
    for _ in range(repeats):
        mapping = mmap.mmap(-1, nbytes)
        dst = torch.frombuffer(mapping, dtype=src.dtype, count=src.numel())
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
        del dst
        mapping.close()
    return 2 * nbytes / statistics.median(times)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str:
    """On CPU, make glibc's malloc keep and reuse freed memory (no mmap per large block, no
    trimming), as PyTorch's caching allocator does on a GPU and jemalloc / tcmalloc do on
    CPU: the timings are then of the kernels, not of the page faults of each call's new
    outputs, for every implementation alike. Returns what was done, for the report."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc: the allocator's defaults (new outputs may fault their pages in)"
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "glibc refused mallopt: its defaults (outputs of 32 MiB and more are new pages)"
    return (
        "glibc malloc keeps freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1), "
        "as a caching allocator would: steady-state timings without page faults"
    )
