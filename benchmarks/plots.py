"""PNG plots of a run (matplotlib, Agg backend: no display needed).

* ``bandwidth_<dtype>.png``: GB/s against the hidden size, one line per implementation, one
  panel per (op, direction), with the measured copy bandwidth as a dashed line (and the
  target as a dotted one). Each point is the largest row count measured at that size: the
  bandwidth-bound regime.
* ``activation_memory.png``: bytes saved for the backward per layer, per style and variant.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .kernels import TARGETS
from .report import impl_order
from .traffic import DIRECTIONS, OPS

MIB = 1 << 20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bandwidth_series(kernels: list[dict], dtype: str) -> dict:
    """``{(op, direction): {impl: [(hidden, gbps), ...]}}``, each hidden size at its largest
    successfully measured row count."""
    best: dict = {}
    for rec in kernels:
        if rec["dtype"] != dtype or rec.get("error") or not rec.get("gbps"):
            continue
        key = (rec["op"], rec["direction"], rec["impl"], rec["hidden"])
        if key not in best or rec["rows"] > best[key]["rows"]:
            best[key] = rec
    series: dict = defaultdict(lambda: defaultdict(list))
    for (op, direction, impl, hidden), rec in sorted(best.items(), key=lambda kv: kv[0][3]):
        series[(op, direction)][impl].append((hidden, rec["gbps"]))
    return series


def plot_bandwidth(results: dict, dtype: str, path: Path) -> Path:
    plt = _pyplot()
    series = bandwidth_series(results["kernels"], dtype)
    ops = [op for op in OPS if any((op, d) in series for d in DIRECTIONS)]
    directions = [d for d in DIRECTIONS if any((op, d) in series for op in ops)]
    impls = impl_order(results)
    copy_gbps = results["copy"]["bytes_per_s"] / 1e9
    fig, axes = plt.subplots(
        len(ops),
        len(directions),
        squeeze=False,
        sharex=True,
        figsize=(4.2 * len(directions), 3.0 * len(ops)),
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, op in enumerate(ops):
        for c, direction in enumerate(directions):
            ax = axes[r][c]
            for k, impl in enumerate(impls):
                points = series.get((op, direction), {}).get(impl)
                if points:
                    xs, ys = zip(*points)
                    ax.plot(
                        xs, ys, marker="o", ms=3, lw=1.2, label=impl, color=colors[k % len(colors)]
                    )
            ax.axhline(copy_gbps, color="black", ls="--", lw=1, label="copy bandwidth")
            if direction in TARGETS and results["meta"]["label"] != "CPU":
                ax.axhline(
                    TARGETS[direction] * copy_gbps, color="gray", ls=":", lw=1, label="target"
                )
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} · {direction}", fontsize=9)
            ax.grid(True, alpha=0.3)
            if c == 0:
                ax.set_ylabel("GB/s")
            if r == len(ops) - 1:
                ax.set_xlabel("hidden size")
    handles = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=min(6, len(handles)),
        fontsize=8,
        frameon=False,
    )
    label = " (CPU run)" if results["meta"]["label"] == "CPU" else ""
    fig.suptitle(
        f"{results['meta']['device']}{label}: {dtype}, bandwidth on the minimal bytes", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_activation_memory(results: dict, path: Path) -> Path:
    plt = _pyplot()
    runs = results["transformer"]
    variants = []
    for res in runs:
        variants += [v["variant"] for v in res["variants"] if v["variant"] not in variants]
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(runs), 3.6))
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        xs, ys = [], []
        for i, res in enumerate(runs):
            for v in res["variants"]:
                if v["variant"] == variant:
                    xs.append(i + (k - (len(variants) - 1) / 2) * width)
                    ys.append(v["saved_bytes_per_layer"] / MIB)
        bars = ax.bar(xs, ys, width, label=variant)
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(
        [
            f"{r['config']['style']}\nhidden {r['config']['hidden']}, "
            f"{r['config']['batch']}×{r['config']['seq']}"
            for r in runs
        ],
        fontsize=8,
    )
    ax.set_ylabel("MiB saved for backward per layer")
    dtype = runs[0]["config"]["dtype"] if runs else ""
    ax.set_title(f"Activation memory per layer ({dtype}; exact on any device)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    """Every plot the results have data for; ``{name: path}``."""
    written = {}
    dtypes = sorted({r["dtype"] for r in results["kernels"] if r.get("gbps")})
    for dtype in dtypes:
        written[f"bandwidth_{dtype}"] = plot_bandwidth(
            results, dtype, out_dir / f"bandwidth_{dtype}.png"
        )
    if results["transformer"]:
        written["activation_memory"] = plot_activation_memory(
            results, out_dir / "activation_memory.png"
        )
    return written
