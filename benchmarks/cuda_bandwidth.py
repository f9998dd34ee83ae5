"""First bandwidth figures of the kernel backends on a GPU: the fused pre-norm add + norm,
forward and backward, timed with CUDA events after warm-up, as GB/s of the bytes the call
must move (DOMAIN.md: forward reads x and r, writes y and h; backward reads dy, dh and h,
writes dx, and dresidual unless dx serves as it) and as a fraction of a device-to-device
copy measured in the same run.

    python -m benchmarks.cuda_bandwidth [--dtype bf16] [--backends cuda triton] [--json out.json]

The backends' forward/backward are called directly (no autograd, no validation): these are
kernel figures, not per-call overhead (benchmarks/host_overhead.py measures that).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from resfuse import backend_registry

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (rows, D): about 64 M elements each, from per-head norms to very wide rows
SHAPES = [(65536, 1024), (32768, 2048), (16384, 4096), (8192, 8192), (4096, 16384),
          (2048, 32768), (16384, 768), (4096, 12288), (262144, 128)]


def timed(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds per call over `reps` CUDA-event timings."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6  # GB/s, read + write


def bench_shape(backend: str, rows: int, D: int, dtype: torch.dtype, norm: str) -> dict:
    impl = backend_registry.implementation(backend)
    is_rms = norm == "rms"
    x = torch.randn(rows, D, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(D, device="cuda", dtype=dtype)
    b = None if is_rms else torch.randn(D, device="cuda", dtype=dtype)
    fwd = dict(eps=1e-6, residual_scale=1.0, branch_scale_value=1.0, is_rms=is_rms,
               zero_centered_weight=False, store_h=True, residual_dtype=dtype, out_dtype=dtype)
    y, h, mean = impl.forward(x, r, w, b, None, None, **fwd)
    fwd_ms = timed(lambda: impl.forward(x, r, w, b, None, None, **fwd))
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    # unit scales and one dtype: dx serves as dresidual (the core's choice), 4 tensors move
    bwd = dict(eps=1e-6, residual_scale=1.0, branch_scale_value=1.0, is_rms=is_rms,
               zero_centered_weight=False, has_bias=b is not None, store_dresidual=False,
               x_dtype=dtype, residual_dtype=dtype)
    bwd_ms = timed(lambda: impl.backward(dy, dh, h, None, w, None, None, mean, **bwd))
    elem = x.element_size()
    fwd_bytes = 4 * rows * D * elem
    bwd_bytes = 4 * rows * D * elem
    return {"backend": backend, "norm": norm, "rows": rows, "D": D, "dtype": str(dtype).split(".")[-1],
            "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
            "fwd_GBps": fwd_bytes / fwd_ms / 1e6, "bwd_GBps": bwd_bytes / bwd_ms / 1e6}


def host_overhead_us(backend: str, calls: int = 300) -> dict:
    """Microseconds per call of the public API on a tiny input (the GPU work is negligible,
    so this is the host path: validation, dispatch, allocation, launch), with and without
    autograd."""
    import time
    import resfuse
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    out = {}
    for grad in (False, True):
        xs = x.clone().requires_grad_(grad)
        for _ in range(20):
            resfuse.add_rms_norm(xs, r, w, backend=backend)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            resfuse.add_rms_norm(xs, r, w, backend=backend)
        torch.cuda.synchronize()
        out["autograd" if grad else "no_grad"] = (time.perf_counter() - start) / calls * 1e6
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--norm", choices=["rms", "layer"], nargs="+", default=["rms", "layer"])
    ap.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    report = backend_registry.backends()
    backends = [b for b in args.backends if report[b].available]
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
          f"device-to-device copy {copy:.0f} GB/s (read + write)")
    print(f"{'backend':<7} {'norm':<5} {'rows x D':>14} {'fwd ms':>8} {'fwd GB/s':>9} {'of copy':>7} "
          f"{'bwd ms':>8} {'bwd GB/s':>9} {'of copy':>7}")
    overhead = {b: host_overhead_us(b) for b in backends}
    for b, o in overhead.items():
        print(f"host path per call, 8x1024 bf16 add_rms_norm: {b:<7} {o['no_grad']:6.1f} us "
              f"(inputs without grad), {o['autograd']:6.1f} us (with autograd)")
    results = []
    for norm in args.norm:
        for rows, D in SHAPES:
            for backend in backends:
                res = bench_shape(backend, rows, D, DTYPES[args.dtype], norm)
                res["copy_GBps"] = copy
                results.append(res)
                print(f"{backend:<7} {norm:<5} {f'{rows}x{D}':>14} {res['fwd_ms']:8.3f} "
                      f"{res['fwd_GBps']:9.0f} {res['fwd_GBps'] / copy:7.0%} {res['bwd_ms']:8.3f} "
                      f"{res['bwd_GBps']:9.0f} {res['bwd_GBps'] / copy:7.0%}", flush=True)
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "copy_GBps": copy, "host_overhead_us": overhead,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
