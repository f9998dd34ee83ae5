"""Writers for a benchmark run: the raw JSON, the markdown report and (``plots``) the PNGs.

A run's results are one JSON-able dict (``cli.run`` builds it)::

    {"meta": {...device, versions, date, label "GPU" | "CPU", command...},
     "copy": {"bytes_per_s", "buffer_bytes", "median_ms"},
     "implementations": {name: {"family", "description", "unavailable"}},
     "kernels": [kernels.run records], "transformer": [transformer.compare results],
     "plots": [file names]}
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Optional

from . import build_auto_table
from .implementations import BY_NAME
from .kernels import (
    CPU_COMPILED,
    CPU_COPY_TARGET,
    CPU_COPY_TARGET_MIN_HIDDEN,
    CPU_EAGER,
    CPU_IMPL,
    TARGET_HIDDEN,
    TARGET_MIN_ELEMENTS,
    TARGETS,
    cpu_copy_target_applies,
    in_target_range,
)
from .traffic import DIRECTIONS, OPS, SPECS, full_tensors_moved, tensors_moved
from .transformer import AGREEMENT_TOLERANCE

JSON_NAME = "results.json"
AUTO_TABLE_NAME = "auto_table.json"
REPORT_NAME = "report.md"
BASELINE = "eager-hf"
COMPILED = "torch.compile"
DIRECTION_NAMES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward + backward"}
MIB = 1 << 20


def write_json(results: dict, path: os.PathLike) -> Path:
    """Atomically: a partial file from a checkpoint is never left half-written."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- formatting


def _table(header: list[str], rows: Iterable[list[str]], align: Optional[str] = None) -> str:
    rows = list(rows)
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _shape(rows: int, hidden: int) -> str:
    return f"{rows:,} × {hidden:,}"


def _gbps(rec: dict) -> str:
    if not rec["gbps"]:
        return "—"
    gbps = f"{rec['gbps']:,.0f}" if rec["gbps"] >= 100 else f"{rec['gbps']:.3g}"
    return f"{gbps} ({100 * rec['frac_copy']:.0f}%)"


def _size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "—"
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def _ok(rec: dict) -> bool:
    return rec.get("error") is None and rec.get("median_ms") is not None


def _sections(kernels: list[dict]):
    """{(op, direction, dtype): {(rows, hidden): {impl: record}}} in a stable order."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for rec in kernels:
        out[(rec["op"], rec["direction"], rec["dtype"])][(rec["rows"], rec["hidden"])][
            rec["impl"]
        ] = rec
    order = {op: i for i, op in enumerate(OPS)}
    dorder = {d: i for i, d in enumerate(DIRECTIONS)}
    return sorted(out.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], dorder[kv[0][1]]))


def impl_order(results: dict) -> list[str]:
    """The run's implementations in the registry's order (baselines, resfuse, peers),
    whatever order a JSON file kept them in."""
    rank = {name: i for i, name in enumerate(BY_NAME)}
    names = list(results.get("implementations", {}))
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


# --------------------------------------------------------------------------- sections


def _header(results: dict) -> list[str]:
    meta, copy = results["meta"], results["copy"]
    cpu = meta["label"] == "CPU"
    title = f"# resfuse benchmarks: {meta['device']}" + (" (CPU run)" if cpu else "")
    out = [title, ""]
    if cpu:
        out += [
            "> **CPU run: these are not GPU numbers.** On CPU tensors resfuse runs its CPU "
            'kernels (the `resfuse-cpu` row: the `"cpu"` backend, what `"auto"` picks '
            "there) or, in an install without them, its PyTorch reference (`resfuse-torch`, "
            "the oracle); the GPU rows are absent and the GPU targets do not apply: the CPU "
            "targets below do. The activation-memory comparison of the reference transformer "
            "is exact on any device.",
            "",
        ]
    info = [
        [
            "device",
            meta["device"] + (f" ({meta['device_detail']})" if meta.get("device_detail") else ""),
        ],
        ["date (UTC)", meta["date"]],
        [
            "torch / triton / resfuse",
            f"{meta['torch']} / {meta.get('triton') or 'not installed'} / {meta['resfuse']}",
        ],
        ["python", meta["python"]],
        ["resfuse backends", meta.get("backends_summary", "")],
        [
            "copy bandwidth",
            f"{copy['bytes_per_s'] / 1e9:,.1f} GB/s (`dst.copy_(src)` of "
            f"{copy['buffer_bytes'] / MIB:,.0f} MiB, read + write, median; "
            + _copy_samples(copy)
            + ")"
            + (
                f"; into freshly mapped pages: {copy['fresh_output_bytes_per_s'] / 1e9:,.1f} GB/s"
                if copy.get("fresh_output_bytes_per_s")
                else ""
            ),
        ],
        ["command", f"`{meta['command']}`"],
    ]
    if meta.get("cpu_memory"):
        info.insert(-1, ["CPU memory", meta["cpu_memory"]])
    return out + [_table(["", ""], info, "ll"), ""]


def _copy_samples(copy: dict) -> str:
    samples = copy.get("samples_bytes_per_s")
    if not samples or len(samples) < 2:
        return "measured once"
    return (
        "the faster of "
        + " and ".join(f"{b / 1e9:,.1f}" for b in samples)
        + " GB/s, before and after the kernels"
    )


def _how_to_read(results: dict) -> list[str]:
    return [
        "## How to read this",
        "",
        "* **GB/s** = the minimal bytes the op must move ([`benchmarks/traffic.py`]"
        "(../../traffic.py): e.g. bf16 add + RMSNorm forward reads x and the residual and "
        "writes y and h) divided by the median time. **%** = that bandwidth as a fraction "
        "of the device-to-device copy bandwidth measured in the same run: 100% would be "
        "a kernel as fast as a copy of the same bytes.",
        "* **fwd** times the training forward (inputs require grad); **bwd** the backward "
        "alone (its forward runs untimed before each call), with gradients flowing into "
        "every output (both y and h of the pre-norm and sandwich ops) and out to every "
        "input and parameter; **fwd+bwd** both. Every implementation is checked against "
        "resfuse's float64 reference (outputs and every gradient) before it is timed.",
        f"* **×{BASELINE}** / **×{COMPILED}**: how many times faster than those baselines "
        "(their median time over the implementation's).",
        f"* Targets (GPU): forward ≥ {TARGETS['fwd']:.0%} and backward ≥ {TARGETS['bwd']:.0%}"
        f" of the copy bandwidth, for hidden {TARGET_HIDDEN[0]:,}–{TARGET_HIDDEN[1]:,} and "
        f"at least 2^{TARGET_MIN_ELEMENTS.bit_length() - 1} elements.",
        "* Reference transformer: **saved for backward** is what autograd keeps between "
        "forward and backward (saved-tensor hooks, each storage once, parameters excluded): "
        "exact, and the same on any device. **Peak** is `torch.cuda.max_memory_allocated` "
        "during a step, above what was resident before it (CUDA only).",
        "",
    ]


def _ops(results: dict) -> list[str]:
    """What each op of the run computes and the tensors its minimal traffic counts."""
    measured = {r["op"] for r in results["kernels"]}
    rows = []
    for op in (o for o in OPS if o in measured):
        moves = []
        for direction in ("fwd", "bwd"):
            reads, writes = tensors_moved(op, direction)
            moves.append(
                f"{', '.join(reads)} → {', '.join(writes)} ({full_tensors_moved(op, direction)})"
            )
        rows.append([f"`{op}`", SPECS[op].computes, SPECS[op].layout, *moves])
    if not rows:
        return []
    return [
        "## Ops",
        "",
        "Norm_b is the branch norm, with its own weight w_b (and bias b_b); w, b are the "
        "output norm's. Moves: the tensors the minimal traffic counts, read → written, at "
        "equal dtypes (full tensors in brackets; the rest are vectors of hidden). The add "
        "ops' dx serves as dresidual too; rms_norm_add's dresidual is dh itself.",
        "",
        _table(["op", "computes", "layout", "forward moves", "backward moves"], rows, "lllll"),
        "",
    ]


def _implementations(results: dict) -> list[str]:
    rows = []
    for name in impl_order(results):
        info = results["implementations"][name]
        here = "yes" if info["unavailable"] is None else f"no: {info['unavailable']}"
        rows.append([f"`{name}`", info["description"], here])
    if not rows:
        return []
    return ["## Implementations", "", _table(["name", "what", "measured here"], rows, "lll"), ""]


def _targets(results: dict) -> list[str]:
    out = ["## Targets", ""]
    if results["meta"]["label"] == "CPU":
        return out + _cpu_targets(results)
    rows = []
    for (op, direction, dtype), shapes in _sections(results["kernels"]):
        if direction not in TARGETS:
            continue
        by_impl = defaultdict(list)
        for (r, h), recs in shapes.items():
            if in_target_range(r, h):
                for impl, rec in recs.items():
                    if (
                        _ok(rec)
                        and results["implementations"].get(impl, {}).get("family") == "resfuse"
                    ):
                        by_impl[impl].append(rec["frac_copy"])
        for impl, fracs in sorted(by_impl.items()):
            fracs.sort()
            met = fracs[0] >= TARGETS[direction]
            rows.append(
                [
                    op,
                    DIRECTION_NAMES[direction],
                    dtype,
                    f"`{impl}`",
                    str(len(fracs)),
                    f"{100 * fracs[0]:.0f}%",
                    f"{100 * fracs[len(fracs) // 2]:.0f}%",
                    f"{100 * TARGETS[direction]:.0f}%",
                    "**met**" if met else "missed",
                ]
            )
    if not rows:
        return out + ["No resfuse measurement falls in the target range in this run.", ""]
    return out + [
        _table(
            [
                "op",
                "direction",
                "dtype",
                "implementation",
                "shapes",
                "worst",
                "median",
                "target",
                "",
            ],
            rows,
            "llllrrrrl",
        ),
        "",
    ]


def cpu_target_rows(results: dict) -> list[dict]:
    """The CPU kernels' targets per (op, direction, dtype): over the sizes where resfuse-cpu
    and the baselines were measured, the worst speed-up over eager (the faster of eager-hf and
    eager-torch at each size) and over torch.compile, the worst fraction of the copy bandwidth
    where that target applies (else None), and whether all are met."""
    rows = []
    for (op, direction, dtype), shapes in _sections(results["kernels"]):
        vs_eager, vs_compiled, fracs, missing = [], [], [], []
        for (r, h), recs in sorted(shapes.items()):
            ours = recs.get(CPU_IMPL)
            if ours is None:
                continue
            if not _ok(ours):
                missing.append(f"{_shape(r, h)}: {ours.get('error') or 'not timed'}")
                continue
            eager = [recs[e]["median_ms"] for e in CPU_EAGER if e in recs and _ok(recs[e])]
            if eager:
                vs_eager.append(min(eager) / ours["median_ms"])
            if CPU_COMPILED in recs and _ok(recs[CPU_COMPILED]):
                vs_compiled.append(recs[CPU_COMPILED]["median_ms"] / ours["median_ms"])
            if cpu_copy_target_applies(op, direction, dtype, h):
                fracs.append(ours["frac_copy"])
        if not (vs_eager or vs_compiled or missing):
            continue
        worst_eager = min(vs_eager, default=None)
        worst_compiled = min(vs_compiled, default=None)
        worst_frac = min(fracs, default=None)
        met = (
            not missing
            and (worst_eager is None or worst_eager >= 1.0)
            and (worst_compiled is None or worst_compiled >= 1.0)
            and (worst_frac is None or worst_frac >= CPU_COPY_TARGET)
        )
        rows.append(
            {
                "op": op,
                "direction": direction,
                "dtype": dtype,
                "shapes": len(vs_eager or vs_compiled),
                "worst_vs_eager": worst_eager,
                "worst_vs_compiled": worst_compiled,
                "worst_frac_copy": worst_frac,
                "missing": missing,
                "met": met,
            }
        )
    return rows


def _cpu_targets(results: dict) -> list[str]:
    rows = cpu_target_rows(results)
    if not rows:
        return [
            f"No `{CPU_IMPL}` measurement in this run (the CPU extension is not built here, "
            "or the run left it out): the CPU targets are not assessed.",
            "",
        ]

    def times(v):
        return "—" if v is None else f"×{v:.2f}"

    table = [
        [
            r["op"],
            DIRECTION_NAMES[r["direction"]],
            r["dtype"],
            str(r["shapes"]),
            times(r["worst_vs_eager"]),
            times(r["worst_vs_compiled"]),
            "—" if r["worst_frac_copy"] is None else f"{100 * r['worst_frac_copy']:.0f}%",
            ("**met**" if r["met"] else "missed")
            + (f" ({'; '.join(r['missing'])})" if r["missing"] else ""),
        ]
        for r in rows
    ]
    met = sum(r["met"] for r in rows)
    fresh = results["copy"].get("fresh_output_bytes_per_s")
    fresh_line = []
    if fresh:
        fresh_line = [
            "Memory: by default glibc's malloc gives each allocation of 32 MiB and more "
            "freshly mapped pages, whose first writes fault them in; the same copy into fresh "
            f"pages runs at {fresh / 1e9:,.1f} GB/s here "
            f"({fresh / results['copy']['bytes_per_s']:.0%} of the copy bandwidth), which "
            "would bound every implementation at the sizes whose outputs are that large. "
            + (
                "This run kept freed memory instead (header: CPU memory), as a caching "
                "allocator does, for every implementation alike."
                if "keeps freed memory" in results["meta"].get("cpu_memory", "")
                else "This run left the allocator as it is."
            ),
            "",
        ]
    model = patched_model_target(results)
    model_line = []
    if model is not None:
        model_line = [
            f"A patched {model['model']} ({model['dtype']}, below) trains no slower than "
            f"unpatched: step {model['unpatched_ms']:,.1f} ms unpatched, "
            f"{model['patched_ms']:,.1f} ms patched (×{model['speedup']:.2f}"
            + ("" if model["agrees"] else ", **disagrees with unpatched**")
            + "): "
            + ("**met**." if model["met"] else "missed."),
            "",
        ]
    return [
        f"`{CPU_IMPL}` against the baselines of this run, at every size measured: at least as "
        f"fast as eager PyTorch (the faster of {' and '.join(CPU_EAGER)} at each size) and as "
        f"`{CPU_COMPILED}` (worst speed-up ≥ ×1.00), and the add + norm forwards at hidden ≥ "
        f"{CPU_COPY_TARGET_MIN_HIDDEN:,} in bf16 and fp32 at ≥ {CPU_COPY_TARGET:.0%} of the "
        f"copy bandwidth. **{met} of {len(rows)} met.**",
        "",
        _table(
            [
                "op",
                "direction",
                "dtype",
                "shapes",
                "worst ×eager",
                f"worst ×{CPU_COMPILED}",
                "worst % of copy",
                "",
            ],
            table,
            "llllrrrl",
        ),
        "",
        *fresh_line,
        *model_line,
    ]


def _auto_choice(table: Optional[dict]) -> list[str]:
    """Which backend ``backend="auto"`` would pick, from this run's measurements."""
    if table is None:
        return []
    rows = [
        [
            e["op"],
            e["dtype"],
            DIRECTION_NAMES[e["direction"]],
            f"{e['hidden']:,}",
            f"{e['cuda_ms']:.3f}",
            f"{e['triton_ms']:.3f}",
            f"`{e['backend']}`",
        ]
        for e in table["entries"]
    ]
    return [
        "## auto's choice",
        "",
        f"Where both `resfuse-cuda` and `resfuse-triton` were measured, `{AUTO_TABLE_NAME}` "
        "(next to this report) records the faster: " + build_auto_table.AGGREGATE + " (the sums "
        "below). "
        "`make auto-table RESULTS=<this folder>/results.json` installs it into the package, "
        'and `backend="auto"` then picks per op, dtype and direction at the nearest '
        "measured hidden size.",
        "",
        _table(
            [
                "op",
                "dtype",
                "direction",
                "hidden",
                "cuda ms (sum)",
                "triton ms (sum)",
                "auto picks",
            ],
            rows,
            "lllrrrl",
        ),
        "",
    ]


def _kernel_sections(results: dict) -> list[str]:
    if not results["kernels"]:
        return []
    out = ["## Kernels", ""]
    order = impl_order(results)
    for (op, direction, dtype), shapes in _sections(results["kernels"]):
        present = [
            i for i in order if any(_ok(recs.get(i, {"error": 1})) for recs in shapes.values())
        ]
        if not present:
            continue
        tensors = full_tensors_moved(op, direction)
        out += [
            f"### {op} · {DIRECTION_NAMES[direction]} · {dtype}",
            "",
            f"Minimal traffic: {tensors} full tensors (plus the parameter vectors). "
            "GB/s (% of copy bandwidth):",
            "",
        ]
        rows = []
        for (r, h), recs in sorted(shapes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            nbytes = next(iter(recs.values()))["bytes"]
            rows.append(
                [_shape(r, h), f"{nbytes / 1e6:,.1f}"]
                + [_gbps(recs[i]) if i in recs and _ok(recs[i]) else "—" for i in present]
            )
        out += [_table(["rows × hidden", "MB"] + [f"`{i}`" for i in present], rows), ""]

        fast = [i for i in present if results["implementations"][i]["family"] != "baseline"]
        base = [i for i in (BASELINE, COMPILED) if i in present]
        if not fast:
            continue
        header = ["rows × hidden"] + [f"`{i}` ms" for i in base]
        for i in fast:
            header += [f"`{i}` ms"] + [f"×{b}" for b in base]
        rows = []
        for (r, h), recs in sorted(shapes.items(), key=lambda kv: (kv[0][1], kv[0][0])):

            def ms(i):
                return recs[i]["median_ms"] if i in recs and _ok(recs[i]) else None

            row = [_shape(r, h)] + [f"{ms(b):.3f}" if ms(b) else "—" for b in base]
            for i in fast:
                row.append(f"{ms(i):.3f}" if ms(i) else "—")
                row += [f"{ms(b) / ms(i):.2f}" if ms(i) and ms(b) else "—" for b in base]
            rows.append(row)
        out += ["Median time and speedup:", "", _table(header, rows), ""]
    return out


def _transformer_sections(results: dict) -> list[str]:
    if not results["transformer"]:
        return []
    out = [
        "## Reference transformer",
        "",
        "One model per style, the same weights and input for every variant; a training step "
        "is forward + backward (no optimizer). Relative error: 2-norm of the difference "
        "from the reference's output / gradient over its 2-norm, the worst over the output "
        "and every gradient; the reference of a 16-bit run is eager-hf on an fp32 copy of "
        "the same weights, which tells rounding differences from wrong results. Tolerance: "
        + ", ".join(f"{k} {v:.0e}" for k, v in AGREEMENT_TOLERANCE.items())
        + ".",
        "",
    ]
    for res in results["transformer"]:
        cfg = res["config"]
        out += [
            f"### {cfg['style']}: hidden {cfg['hidden']:,}, {cfg['layers']} layers, "
            f"{cfg['heads']} heads, ffn {cfg['ffn']:,}, batch {cfg['batch']} × seq "
            f"{cfg['seq']:,}, {cfg['dtype']} ({res['params'] / 1e6:,.1f}M parameters)",
            "",
        ]
        rows = []
        for v in res["variants"]:
            step = f"{v['step_median_ms']:,.1f}" if v.get("step_median_ms") is not None else "—"
            rows.append(
                [
                    f"`{v['variant']}`" + (f" ({v['backend']})" if v["backend"] else ""),
                    step,
                    _size(v["peak_step_bytes"]),
                    _size(v["saved_bytes"]),
                    _size(v["saved_bytes_per_layer"]),
                    "—"
                    if v["variant"] == res["reference"]
                    else f"{v['max_rel_err']:.1e} ({v['worst']})",
                    "yes" if v["agrees"] else "**NO**",
                ]
            )
        out += [
            _table(
                [
                    "variant",
                    "step ms",
                    "peak",
                    "saved for backward",
                    "per layer",
                    f"rel. error vs {res['reference']}",
                    "within tolerance",
                ],
                rows,
                "lrrrrll",
            ),
            "",
        ]
        outside = [
            f"`{v['variant']}`"
            for v in res["variants"]
            if not v["agrees"] and v["variant"] != "fused"
        ]
        if outside:
            out += [
                f"{', '.join(outside)}: outside the tolerance by its own rounding against the "
                "fp32 run (the worst tensor is named above); a baseline is reported as "
                "measured.",
                "",
            ]
        by = {v["variant"]: v for v in res["variants"]}
        if "eager-hf" in by and "fused" in by:
            measured = by["eager-hf"]["saved_bytes"] - by["fused"]["saved_bytes"]
            expected = res["expected_saving"]
            verdict = "as expected" if measured == expected else "**differs from the expectation**"
            share = measured / by["eager-hf"]["saved_bytes"] if by["eager-hf"]["saved_bytes"] else 0
            out += [
                f"Fused saves {_size(measured)} ({share:.0%}) fewer for the backward "
                f"than eager-hf; expected {_size(expected)} (4 bytes per element per "
                f"norm{', plus 4 per row' if cfg['style'] == 'llama' else ''}, "
                f"`transformer.expected_saving`): {verdict}.",
                "",
            ]
            if "step_median_ms" in by["fused"] and by["eager-hf"].get("step_median_ms"):
                out += [
                    f"Step time: fused {by['fused']['step_median_ms']:,.1f} ms vs eager-hf "
                    f"{by['eager-hf']['step_median_ms']:,.1f} ms "
                    f"(×{by['eager-hf']['step_median_ms'] / by['fused']['step_median_ms']:.2f}).",
                    "",
                ]
    return out


def _latency_section(results: dict) -> list[str]:
    """One small call without autograd (a decode step): host-bound back to back, and the
    GPU's own time per call when replayed from a CUDA graph."""
    lat = results.get("latency")
    if not lat or not lat.get("records"):
        return []
    rows = []
    for rec in lat["records"]:

        def us(key):
            return f"{rec[key]:,.1f}" if rec.get(key) is not None else "—"

        note = rec.get("error") or rec.get("graph_note") or ""
        rows.append([f"`{rec['impl']}`", us("eager_us"), us("graph_us"), note.replace("|", "\\|")])
    return [
        "## Small-batch latency",
        "",
        f"`{lat['op']}` of {lat['rows']:,} × {lat['hidden']:,} {lat['dtype']} without "
        f"autograd: microseconds per call, {lat['calls']} calls back to back from Python "
        "(launch overhead and host work included), and replayed from a CUDA graph of 20 "
        "calls (the GPU's time per call).",
        "",
        _table(["implementation", "eager µs", "CUDA graph µs", "note"], rows, "lrrl"),
        "",
    ]


def _patched_models_section(results: dict) -> list[str]:
    """A Hugging Face model unpatched and after ``resfuse.patch`` (the GPU campaign's model
    phase): forward + backward, the optimizer step apart, memory, agreement."""
    models = results.get("patched_models") or []
    out = []
    for m in models:
        if "skipped" in m:
            out += [f"## resfuse.patch on {m['model']}", "", f"Not run: {m['skipped']}.", ""]
            continue
        cfg = m["config"]
        out += [
            f"## resfuse.patch on {m['model']} (transformers {m['transformers']})",
            "",
            f"hidden {cfg['hidden_size']:,}, {cfg['num_hidden_layers']} layers, "
            f"{cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV), ffn "
            f"{cfg['intermediate_size']:,}; batch {m['batch']} × seq {m['seq']:,}, "
            f"{m['dtype']}, {m['params'] / 1e6:,.1f}M parameters, random weights. "
            "Relative error: against the unpatched model on the same weights and input, "
            "the worst over the output and every parameter gradient. Times: medians of "
            f"{_timed_steps(m)} training steps per variant, the variants' steps interleaved.",
            "",
        ]
        rows = []
        for v in m["variants"]:

            def ms(key):
                return f"{v[key]:,.1f}" if v.get(key) is not None else "—"

            err = f"{v['max_rel_err']:.1e} ({v['worst']})" if "max_rel_err" in v else "—"
            rows.append(
                [
                    f"`{v['variant']}`",
                    ms("fwd_bwd_ms"),
                    ms("step_ms"),
                    _size(v.get("peak_step_bytes")),
                    _size(v.get("saved_bytes")),
                    err,
                    v.get("error") or ("yes" if v.get("agrees", True) else "**NO**"),
                ]
            )
        out += [
            _table(
                [
                    "variant",
                    "fwd+bwd ms",
                    "step ms (AdamW)",
                    "peak",
                    "saved for backward",
                    "rel. error vs unpatched",
                    "agrees",
                ],
                rows,
                "lrrrrll",
            ),
            "",
        ]
    return out


def _timed_steps(model: dict) -> str:
    counts = sorted({v.get("timed_steps") for v in model["variants"] if v.get("timed_steps")})
    return "/".join(str(c) for c in counts) or "no"


def patched_model_target(results: dict) -> Optional[dict]:
    """The CPU target "a patched tiny Llama trains no slower than unpatched": the step times
    of the run's patched-model record, or None when it has none."""
    for m in results.get("patched_models") or []:
        by = {v["variant"]: v for v in m.get("variants", [])}
        base, fused = by.get("unpatched", {}), by.get("patched", {})
        if base.get("step_ms") and fused.get("step_ms"):
            speedup = base["step_ms"] / fused["step_ms"]
            return {
                "model": m["model"],
                "dtype": m["dtype"],
                "unpatched_ms": base["step_ms"],
                "patched_ms": fused["step_ms"],
                "speedup": speedup,
                "agrees": fused.get("agrees", True),
                "met": speedup >= 1.0 and fused.get("agrees", True),
            }
    return None


def _kernel_model_section(results: dict) -> list[str]:
    """The static kernel model's table (tools/kernel_model.py: predictions from the compiled
    kernels, not measurements) and, on a GPU run, its predictions against this run's
    measurements; ``cli.run`` computes it into ``results["kernel_model"]``."""
    model = results.get("kernel_model")
    out = ["## Static kernel model (a prediction, not a measurement)", ""]
    if not model:
        return out + [
            "Not computed for this run (`python -m benchmarks` computes it where nvcc, Triton "
            'and nvdisasm are installed; `make kernel-model` prints it; README: "Reading the '
            'static kernel model").',
            "",
        ]
    if model.get("skipped"):
        return out + [f"Not computed: {model['skipped']}", ""]
    out += [model["markdown"].rstrip(), ""]
    if model.get("comparison_markdown"):
        out += [model["comparison_markdown"].rstrip(), ""]
    return out


def _plots(results: dict) -> list[str]:
    names = results.get("plots") or []
    if not names:
        return []
    return ["## Plots", ""] + [f"![{Path(n).stem}]({n})\n" for n in names]


def _problems(results: dict) -> list[str]:
    """Every failure, once per (implementation, reason): unavailable implementations are in
    the implementations table instead."""
    seen = Counter(
        (r["impl"], r["error"])
        for r in results["kernels"]
        if r.get("error") and not r["error"].startswith("unavailable")
    )
    if not seen:
        return []
    rows = [
        [f"`{impl}`", err.replace("|", "\\|"), str(n)] for (impl, err), n in sorted(seen.items())
    ]
    return ["## Not measured", "", _table(["implementation", "reason", "records"], rows, "llr"), ""]


def markdown(results: dict) -> str:
    parts = (
        _header(results)
        + _how_to_read(results)
        + _ops(results)
        + _implementations(results)
        + _targets(results)
        + _auto_choice(build_auto_table.build(results))
        + _patched_models_section(results)
        + _transformer_sections(results)
        + _latency_section(results)
        + _kernel_sections(results)
        + _kernel_model_section(results)
        + _plots(results)
        + _problems(results)
    )
    return "\n".join(parts).rstrip() + "\n"


def write_markdown(results: dict, path: os.PathLike) -> Path:
    path = Path(path)
    path.write_text(markdown(results))
    return path


def write_all(results: dict, out_dir: os.PathLike) -> dict[str, Path]:
    """results.json, the plots (when matplotlib is installed) and report.md in ``out_dir``."""
    from . import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    try:
        written.update(plots.write_all(results, out_dir))
        results["plots"] = sorted(p.name for p in written.values())
    except ImportError as e:  # matplotlib is a benchmark extra, not a requirement
        results["plots"] = []
        results["meta"]["plots_skipped"] = f"{e} (pip install matplotlib)"
    written["json"] = write_json(results, out_dir / JSON_NAME)
    table = build_auto_table.build(results)
    if table is not None:  # both resfuse-cuda and resfuse-triton were measured: a GPU run
        written["auto_table"] = build_auto_table.write(table, out_dir / AUTO_TABLE_NAME)
    written["report"] = write_markdown(results, out_dir / REPORT_NAME)
    return written
