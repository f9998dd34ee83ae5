"""First bandwidth figures of the kernel backends on a GPU: the fused pre-norm add + norm and
the sandwich layouts, forward and backward, timed with CUDA events after warm-up, as GB/s of
the bytes the call must move and as a fraction of a device-to-device copy measured in the
same run. The bytes (DOMAIN.md; benchmarks/traffic.py has the full accounting):

- add_norm: forward reads x and r, writes y and h; backward reads dy, dh and h, writes dx
  (which serves as dresidual: unit scales, one dtype): 4 tensors each way;
- norm_add_norm (Gemma2/3, Peri-LN): forward 4 tensors as above; backward reads dy, dh, h and
  x (the branch norm's input), writes dx and dresidual: 6;
- norm_add (OLMo2): forward reads x and r, writes h; backward reads dh and x, writes dx
  (dresidual is dh itself): 3 each way.

    python -m benchmarks.cuda_bandwidth [--dtype bf16] [--backends cuda triton]
                                        [--layouts add_norm norm_add_norm norm_add] [--json out.json]

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
          (2048, 32768), (512, 131072), (16384, 768), (4096, 12288), (262144, 128)]


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


LAYOUTS = ("add_norm", "norm_add_norm", "norm_add")
# full tensors moved (forward, backward), see the docstring
TENSORS_MOVED = {"add_norm": (4, 4), "norm_add_norm": (4, 6), "norm_add": (3, 3)}


def bench_shape(backend: str, rows: int, D: int, dtype: torch.dtype, norm: str,
                layout: str = "add_norm", device: str = "cuda") -> dict:
    impl = backend_registry.implementation(backend)
    is_rms = norm == "rms"
    branch_norm, output_norm = layout != "add_norm", layout != "norm_add"
    x = torch.randn(rows, D, device=device, dtype=dtype)
    r = torch.randn_like(x)

    def vector(wanted=True):
        return torch.randn(D, device=device, dtype=dtype) if wanted else None

    w, b = vector(output_norm), vector(output_norm and not is_rms)
    wb, bb = vector(branch_norm), vector(branch_norm and not is_rms)
    common = dict(eps=1e-6, residual_scale=1.0, branch_scale_value=1.0, is_rms=is_rms,
                  zero_centered_weight=False, branch_norm=branch_norm, branch_weight=wb,
                  output_norm=output_norm)
    fwd = dict(common, store_h=True, residual_dtype=dtype, out_dtype=dtype, branch_bias=bb)
    y, h, mean, mean_x = impl.forward(x, r, w, b, None, None, **fwd)
    fwd_ms = timed(lambda: impl.forward(x, r, w, b, None, None, **fwd))
    dy, dh = (torch.randn_like(y) if output_norm else None), torch.randn_like(h)
    # what the autograd layer asks for: dx serves as dresidual for add_norm, dh itself for
    # norm_add; the sandwich's backward stores dresidual
    bwd = dict(common, has_bias=b is not None, store_dresidual=layout == "norm_add_norm",
               x_dtype=dtype, residual_dtype=dtype, has_branch_bias=bb is not None, mean_x=mean_x)
    saved_x = x if branch_norm else None
    saved_h = h if output_norm else None
    bwd_ms = timed(lambda: impl.backward(dy, dh, saved_h, saved_x, w, None, None, mean, **bwd))
    elem = x.element_size()
    fwd_tensors, bwd_tensors = TENSORS_MOVED[layout]
    fwd_bytes = fwd_tensors * rows * D * elem
    bwd_bytes = bwd_tensors * rows * D * elem
    out = {"backend": backend, "layout": layout, "norm": norm, "rows": rows, "D": D,
           "dtype": str(dtype).split(".")[-1], "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
           "fwd_GBps": fwd_bytes / fwd_ms / 1e6, "bwd_GBps": bwd_bytes / bwd_ms / 1e6}
    if backend == "cuda":  # which path ran: rows in one block, across a cluster, or streamed
        out["fwd_path"] = row_path(impl.row_layout(D))
        out["bwd_path"] = row_path(impl.row_layout(D, backward=True, branch_norm=branch_norm))
    return out


def row_path(layout: dict) -> str:
    if layout["cluster_blocks"] > 1:
        return f"cluster x{layout['cluster_blocks']}"
    return "block" if layout["single_tile"] else "streamed"


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
    ap.add_argument("--layouts", choices=LAYOUTS, nargs="+", default=list(LAYOUTS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    report = backend_registry.backends()
    backends = [b for b in args.backends if report[b].available]
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
          f"device-to-device copy {copy:.0f} GB/s (read + write)")
    print(f"{'backend':<7} {'layout':<13} {'norm':<5} {'rows x D':>14} {'fwd ms':>8} {'fwd GB/s':>9} "
          f"{'of copy':>7} {'bwd ms':>8} {'bwd GB/s':>9} {'of copy':>7}  cuda path fwd / bwd")
    overhead = {b: host_overhead_us(b) for b in backends}
    for b, o in overhead.items():
        print(f"host path per call, 8x1024 bf16 add_rms_norm: {b:<7} {o['no_grad']:6.1f} us "
              f"(inputs without grad), {o['autograd']:6.1f} us (with autograd)")
    results = []
    for layout in args.layouts:
        for norm in args.norm:
            for rows, D in SHAPES:
                for backend in backends:
                    res = bench_shape(backend, rows, D, DTYPES[args.dtype], norm, layout)
                    res["copy_GBps"] = copy
                    results.append(res)
                    print(f"{backend:<7} {layout:<13} {norm:<5} {f'{rows}x{D}':>14} "
                          f"{res['fwd_ms']:8.3f} {res['fwd_GBps']:9.0f} {res['fwd_GBps'] / copy:7.0%} "
                          f"{res['bwd_ms']:8.3f} {res['bwd_GBps']:9.0f} {res['bwd_GBps'] / copy:7.0%}"
                          + (f"  {res['fwd_path']} / {res['bwd_path']}" if "fwd_path" in res else ""),
                          flush=True)
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "copy_GBps": copy, "host_overhead_us": overhead,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
