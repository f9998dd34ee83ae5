"""Phase 4, bandwidth: resfuse against the baselines and the carried peers on the same GPU.

What it measures (plan.py has the lists), with the benchmarks' own machinery (benchmarks/
kernels.py: every implementation checked against the float64 reference before it is timed,
CUDA events with the L2 flushed before each call, GB/s on the minimal bytes of
benchmarks/traffic.py and the fraction of a device-to-device copy measured in this run):

* add_rms_norm, add_layer_norm, rms_norm and norm_add_rms_norm (Gemma2/3's sandwich),
  forward, backward and forward + backward, bf16 at hidden 1K ... 64K and fp16 at 4K, about
  2^27 elements per tensor;
* per-head q/k norms (rms_norm over 27,030 x 24 heads of 128);
* one small call (1 x 4096 rows: a decode step) without autograd, eager and replayed from a
  CUDA graph, as microseconds per call;
* last, for auto's table only: layer_norm, the LayerNorm sandwich and OLMo2's norm_add,
  resfuse-cuda against resfuse-triton.

In passes: resfuse's backends and the eager baselines first, then the peers, the latency,
torch.compile (at the scale's compile_hidden only: each hidden size is a fresh compile), the
auto-table extras; the shapes that matter most first within each. Before any timing, worker
processes run every compiled implementation once at every shape (warmup_workers at a
time, at most plan.WARMUP_SHARE of the phase), filling Triton's and Inductor's on-disk
caches, so the timing process mostly loads compiled code instead of compiling it on the
clock. The results go to results.json (report.py's format) after every shape.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Optional

from . import common, plan

_WARM_DEADLINE = [0.0]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- what runs


def main_cases(scale: plan.BandwidthScale) -> list:
    """(pass name, implementation names, cases, directions), in measuring order."""
    from benchmarks.kernels import KernelCase
    from benchmarks.traffic import DIRECTIONS

    def rows(hidden):
        return scale.rows or plan.rows_for(hidden)

    cases = [
        KernelCase(op, dtype, rows(hidden), hidden)
        for dtype, hidden in scale.shapes
        for op in plan.BANDWIDTH_OPS
    ]
    cases.append(KernelCase(*scale.qk_norm))
    passes = []
    for name, impls in plan.PASSES:
        chosen = cases
        if name == "resfuse":
            impls = impls + scale.extra_impls
        if name == "compile":
            chosen = [
                c
                for c in cases
                if c.op in scale.compile_ops
                and (c.hidden in scale.compile_hidden or c == cases[-1])
            ]
        passes.append((name, impls, chosen, DIRECTIONS))
    extras = [
        KernelCase(op, "bfloat16", rows(h), h)
        for h in scale.auto_table_hidden
        for op in plan.AUTO_TABLE_OPS
    ]
    passes.append(("auto-table", ("resfuse-cuda", "resfuse-triton"), extras, ("fwd", "fwd+bwd")))
    return passes


# --------------------------------------------------------------------------- warm-up

# implementations with nothing to compile (eager torch ops, the prebuilt CUDA extension)
NOTHING_TO_COMPILE = ("eager-hf", "eager-torch", "resfuse-cuda", "resfuse-torch")


def _warm_init(deadline: float) -> None:
    _WARM_DEADLINE[0] = deadline


def warm(task: tuple) -> tuple:
    """In a worker: everything ``impl`` compiles for this case, as the timing will call it
    (the check at a few rows, a full-size forward and forward + backward)."""
    impl_name, op, dtype, rows, hidden, latency = task
    if time.time() > _WARM_DEADLINE[0]:
        return task, "skipped: warm-up deadline", 0.0
    import torch

    from benchmarks import implementations, kernels

    device = _device()
    start = time.time()
    impl = implementations.BY_NAME[impl_name]
    reason = impl.unavailable(device)
    if reason:
        return task, f"unavailable: {reason}", 0.0
    try:
        case = kernels.KernelCase(op, dtype, rows, hidden)
        if latency:
            fn = impl.make(op)
            inputs = kernels.make_inputs(op, kernels.DTYPES[dtype], rows, hidden, device)
            with torch.no_grad():
                fn(*inputs.args)
        else:
            fns, errors = kernels.prepare(case, [impl], device)
            if impl_name in errors:
                return task, errors[impl_name][:200], time.time() - start
            inputs = kernels.make_inputs(op, kernels.DTYPES[dtype], rows, hidden, device)
            for direction in ("fwd", "fwd+bwd"):
                call, _ = kernels.timed_call(fns[impl_name], inputs, direction)
                call()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return task, "ok", time.time() - start
    except Exception as e:  # the timing process meets (and records) the same error
        return task, f"{type(e).__name__}: {str(e)[:200]}", time.time() - start


def warm_up(passes, scale: plan.BandwidthScale, deadline: float) -> dict:
    """Run ``warm`` for every compiled (implementation, case) in ``workers`` processes until
    ``deadline``; the costliest first (torch.compile, then autotuned peers)."""
    from benchmarks import implementations

    device = _device()
    cost = {"torch.compile": 0, "flash-attn": 1, "quack": 1, "resfuse-triton": 2, "liger": 3}
    tasks = []
    for _, impls, cases, _ in passes:
        for impl in impls:
            if impl in NOTHING_TO_COMPILE or implementations.BY_NAME[impl].unavailable(device):
                continue
            tasks += [(impl, c.op, c.dtype, c.rows, c.hidden, False) for c in cases]
    op, dtype, rows, hidden = scale.latency
    tasks += [
        (impl, op, dtype, rows, hidden, True)
        for impl in plan.LATENCY_IMPLS
        if impl not in NOTHING_TO_COMPILE + scale.latency_skip
        and not implementations.BY_NAME[impl].unavailable(device)
    ]
    tasks.sort(key=lambda t: cost.get(t[0], 9))
    workers = scale.warmup_workers
    summary = {
        "tasks": len(tasks),
        "workers": workers,
        "done": 0,
        "errors": {},
        "seconds": 0.0,
        "cpu_seconds": 0.0,
        "slowest": [],
    }
    if not tasks:
        return summary
    start = time.time()
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(min(workers, len(tasks)), initializer=_warm_init, initargs=(deadline,))
    timings = []
    try:
        results = pool.imap_unordered(warm, tasks)
        while True:
            try:
                task, outcome, seconds = results.next(timeout=max(0.1, deadline - time.time()))
            except StopIteration:
                break
            except multiprocessing.TimeoutError:
                print(
                    f"  warm-up: deadline reached, {summary['done']} of {len(tasks)} done",
                    flush=True,
                )
                break
            summary["done"] += 1
            timings.append((seconds, task[0], f"{task[1]} {task[2]} {task[3]}x{task[4]}"))
            if outcome != "ok":
                summary["errors"][f"{task[0]} {task[1]} {task[4]}"] = outcome
            if summary["done"] % 10 == 0 or summary["done"] == len(tasks):
                print(
                    f"  warm-up: {summary['done']} of {len(tasks)} compiled "
                    f"({time.time() - start:.0f} s)",
                    flush=True,
                )
    finally:
        pool.terminate()
        pool.join()
    summary["seconds"] = round(time.time() - start, 1)
    summary["cpu_seconds"] = round(sum(t[0] for t in timings), 1)
    summary["slowest"] = [
        {"impl": i, "case": c, "seconds": round(s, 1)}
        for s, i, c in sorted(timings, reverse=True)[:8]
    ]
    return summary


# --------------------------------------------------------------------------- latency


def latency(device, scale: plan.BandwidthScale, stop) -> dict:
    """Microseconds per call of one small forward without autograd: back to back from
    Python (the host path: launch overhead and any CPU work) and replayed from a CUDA graph
    (the GPU's own time per call)."""
    import torch

    from benchmarks import implementations, kernels

    op, dtype, rows, hidden = scale.latency
    calls = scale.latency_calls
    inputs = kernels.make_inputs(op, kernels.DTYPES[dtype], rows, hidden, device)
    args = tuple(None if t is None else t.detach() for t in inputs.args)
    out = {"op": op, "dtype": dtype, "rows": rows, "hidden": hidden, "calls": calls, "records": []}
    per_graph = 20
    for name in plan.LATENCY_IMPLS:
        if stop():
            break
        impl = implementations.BY_NAME[name]
        skipped = "not timed in the rehearsal" if name in scale.latency_skip else None
        rec = {
            "impl": name,
            "eager_us": None,
            "graph_us": None,
            "error": skipped or impl.unavailable(device),
        }
        out["records"].append(rec)
        if rec["error"]:
            continue
        try:
            fn = impl.make(op)
            with torch.no_grad():
                for _ in range(10):
                    fn(*args)
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn(*args)
                _sync(device)
                rec["eager_us"] = (time.perf_counter() - start) / calls * 1e6
                if device.type == "cuda":
                    rec["graph_us"] = _graph_us(fn, args, per_graph, max(1, calls // per_graph))
                else:
                    rec["graph_note"] = "CUDA graphs need a GPU"
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(
            f"  latency {name:<15} eager {_us(rec['eager_us'])}  graph {_us(rec['graph_us'])}"
            + (f"  ({rec['error']})" if rec["error"] else ""),
            flush=True,
        )
    return out


def _us(value: Optional[float]) -> str:
    return f"{value:7.1f} us" if value is not None else "      —   "


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _graph_us(fn, args, per_graph: int, replays: int) -> float:
    """``per_graph`` calls captured in one CUDA graph, replayed ``replays`` times."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up off the capture: allocations, lazy initialisation
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        for _ in range(per_graph):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * per_graph)


# --------------------------------------------------------------------------- the phase


def row_path(layout: dict) -> str:
    """Which path the cuda kernels take for a row: in one block's registers, across a
    thread-block cluster (sm_90), or streamed in tiles."""
    if layout["cluster_blocks"] > 1:
        return f"cluster x{layout['cluster_blocks']}"
    return "block" if layout["single_tile"] else "streamed"


def cuda_paths(hiddens) -> dict:
    """{hidden: {fwd, bwd, bwd with the branch norm}}: the cuda backend's row layouts here."""
    from resfuse import backend_registry

    if not backend_registry.backends()["cuda"].available:
        return {}
    from resfuse import cuda_ext

    return {
        h: {
            "fwd": row_path(cuda_ext.row_layout(h)),
            "bwd": row_path(cuda_ext.row_layout(h, backward=True)),
            "bwd_branch_norm": row_path(cuda_ext.row_layout(h, backward=True, branch_norm=True)),
        }
        for h in sorted(set(hiddens))
    }


def _line(case, recs: list) -> str:
    """One case's measurements in a line: each implementation's % of copy per direction."""
    by_impl: dict = {}
    for r in recs:
        by_impl.setdefault(r["impl"], []).append(
            f"{100 * r['frac_copy']:.0f}%"
            if r.get("frac_copy")
            else (
                "n/a"
                if (r.get("error") or "").startswith(("unavailable", "unsupported"))
                else "err"
            )
        )
    cells = [f"{impl} {'/'.join(v)}" for impl, v in by_impl.items() if set(v) != {"n/a"}]
    return f"  {case.op} {case.dtype} {case.rows}x{case.hidden} (% of copy, fwd/bwd/fwd+bwd): " + (
        "; ".join(cells) or "nothing available"
    )


def run(ctx: common.Context) -> dict:
    import torch

    from benchmarks import cli, implementations, kernels, report
    from benchmarks.timing import TimerSettings, copy_bandwidth

    scale = plan.bandwidth_scale(ctx.rehearsal)
    device = torch.device(ctx.device)
    settings = TimerSettings(**scale.timer)
    passes = main_cases(scale)
    impl_names = list(dict.fromkeys(n for _, names, _, _ in passes for n in names))
    results = cli.new_results(
        device,
        cli.device_info(device),
        "campaign",
        "python3 tools/gpu_campaign.py" + (" --rehearsal" if ctx.rehearsal else ""),
        implementations.select(impl_names),
    )
    record = {"passes": [], "warmup": None}
    results_path = ctx.run_dir / report.JSON_NAME

    def save():
        report.write_json(results, results_path)
        ctx.write_record("bandwidth", {**record, "status": "partial", "summary": "running"})

    results["copy"] = copy_bandwidth(device, scale.copy_bytes, settings)
    save()

    start = time.time()
    warm_deadline = start + plan.WARMUP_SHARE * (ctx.soft_deadline - start)
    print(
        f"compile warm-up: {scale.warmup_workers} workers, for at most "
        f"{warm_deadline - start:.0f} s",
        flush=True,
    )
    record["warmup"] = warm_up(passes, scale, warm_deadline)
    save()

    def stop():
        return ctx.out_of_time()

    for name, names, cases, directions in passes:
        if name == "compile" and "latency" not in results and not stop():
            results["latency"] = latency(device, scale, stop)
            save()
        planned = len(cases) * len(names) * len(directions)
        if stop():
            record["passes"].append(
                {
                    "pass": name,
                    "planned": planned,
                    "reached": 0,
                    "measured": 0,
                    "errors": 0,
                    "note": "not started: out of time",
                }
            )
            continue
        kept = list(results["kernels"])
        printed = [0]

        def checkpoint(new, kept=kept, cases=cases, printed=printed):
            results["kernels"] = kept + new
            save()
            if new:  # the case just finished
                last = new[-1]
                case = next(
                    c
                    for c in cases
                    if (c.op, c.dtype, c.rows, c.hidden)
                    == (last["op"], last["dtype"], last["rows"], last["hidden"])
                )
                print(_line(case, new[printed[0] :]), flush=True)
                printed[0] = len(new)

        print(f"pass {name}: {', '.join(names)} over {len(cases)} shapes", flush=True)
        new = kernels.run(
            cases,
            implementations.select(list(names)),
            directions,
            device,
            results["copy"]["bytes_per_s"],
            settings,
            checkpoint=checkpoint,
            stop=stop,
        )
        results["kernels"] = kept + new
        record["passes"].append(
            {
                "pass": name,
                "planned": planned,
                "reached": len(new),
                "measured": sum(1 for r in new if r.get("gbps")),
                "errors": sum(1 for r in new if r.get("error")),
            }
        )
        save()
    if "latency" not in results and not stop():
        results["latency"] = latency(device, scale, stop)

    record["cuda_paths"] = cuda_paths(c.hidden for _, _, cases, _ in passes for c in cases)
    results["meta"]["cuda_row_paths"] = record["cuda_paths"]
    # the copy again at the end: the faster of the two is the ceiling
    if not ctx.out_of_time(5):
        results["copy"] = cli._best_copy(
            results["copy"], copy_bandwidth(device, scale.copy_bytes, settings)
        )
        kernels.rescale_to_copy(results["kernels"], results["copy"]["bytes_per_s"])
    save()

    planned = sum(p["planned"] for p in record["passes"])
    reached = sum(p["reached"] for p in record["passes"])
    measured = sum(p["measured"] for p in record["passes"])
    wrong = [
        r
        for r in results["kernels"]
        if "correctness check" in (r.get("error") or "") and r["impl"].startswith("resfuse")
    ]
    record["status"] = common.status_of(len(wrong), reached < planned)
    record["wrong"] = [
        {k: r[k] for k in ("op", "dtype", "hidden", "impl", "error")} for r in wrong
    ][:20]
    lat = {r["impl"]: r for r in results.get("latency", {}).get("records", [])}
    cuda_lat = lat.get("resfuse-cuda", {})
    warm = record["warmup"]
    record["summary"] = (
        f"{measured} timings, {reached} of {planned} planned reached; copy "
        f"{results['copy']['bytes_per_s'] / 1e9:,.0f} GB/s; warm-up "
        f"{warm['done']}/{warm['tasks']} in {warm['seconds']:.0f} s"
        + (
            f"; cuda latency {cuda_lat['eager_us']:.1f} us eager / "
            f"{cuda_lat['graph_us']:.1f} us graph"
            if cuda_lat.get("eager_us") and cuda_lat.get("graph_us")
            else ""
        )
        + (f"; {len(wrong)} resfuse results WRONG" if wrong else "")
    )
    return record
