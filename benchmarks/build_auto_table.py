"""The table ``backend="auto"`` chooses by (``resfuse.auto_table``), from a GPU benchmark run.

    python -m benchmarks.build_auto_table benchmarks/results/<gpu>/results.json   # into the package
    python -m benchmarks.build_auto_table RESULTS_JSON -o table.json

For each (op, dtype, direction, hidden) where both ``resfuse-cuda`` and ``resfuse-triton``
have error-free records, the faster of the two: the one with the smaller sum of median times
over the row counts both measured. A sum, not a majority of row counts: auto picks one
backend for every row count, and the sum weighs each shape by the time at stake there, where
a majority would let three small shapes that differ by microseconds outvote a large one that
differs by milliseconds. Directions: ``fwd`` (auto's choice for calls without autograd) and
``fwd+bwd`` (training calls, whose backward runs on the forward's backend); ``bwd`` alone is
never chosen by itself.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

from resfuse import auto_table
from resfuse.spec import family

from .traffic import OPS, spec

IMPLS = {"resfuse-cuda": "cuda", "resfuse-triton": "triton"}
AGGREGATE = "the backend with the smaller sum of median times over the row counts both measured"


def _ok(rec: dict) -> bool:
    return rec.get("error") is None and rec.get("median_ms") is not None


def build(results: dict) -> Optional[dict]:
    """The table of a run (``resfuse.auto_table``'s format), None when no (op, dtype,
    direction, hidden) has both backends measured."""
    # (op, dtype, direction, hidden) -> rows -> backend -> median ms
    times: dict[tuple, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for rec in results.get("kernels", []):
        if rec["impl"] in IMPLS and rec["direction"] in auto_table.DIRECTIONS.values() and _ok(rec):
            key = (rec["op"], rec["dtype"], rec["direction"], rec["hidden"])
            times[key][rec["rows"]][IMPLS[rec["impl"]]] = rec["median_ms"]
    entries = []
    order = {op: i for i, op in enumerate(OPS)}
    for (op, dtype, direction, hidden), by_rows in sorted(
        times.items(), key=lambda kv: (order[kv[0][0]], *kv[0][1:])
    ):
        rows = sorted(r for r, t in by_rows.items() if len(t) == len(IMPLS))
        if not rows:
            continue
        total = {b: sum(by_rows[r][b] for r in rows) for b in IMPLS.values()}
        op_spec = spec(op)
        entries.append(
            {
                "op": op,
                "family": family(op_spec.residual, op_spec.branch_norm, op_spec.output_norm),
                "norm": op_spec.norm,
                "dtype": dtype,
                "direction": direction,
                "hidden": hidden,
                "backend": min(total, key=lambda b: (total[b], b)),
                **{f"{b}_ms": round(t, 6) for b, t in total.items()},
                "rows": rows,
            }
        )
    if not entries:
        return None
    meta = results.get("meta", {})
    return {
        "format": auto_table.FORMAT,
        "device": meta.get("device"),
        "slug": meta.get("slug") or auto_table.slug(meta.get("device", "")),
        "source": {k: meta.get(k) for k in ("date", "command", "torch", "triton", "resfuse")},
        "aggregate": AGGREGATE,
        "entries": entries,
    }


def write(table: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.build_auto_table",
        description="Write the table backend='auto' chooses by from a "
        "GPU benchmark run's results.json.",
    )
    p.add_argument("results", type=Path, help="benchmarks/results/<gpu>/results.json")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        help=f"default: the package's {auto_table.TABLE_DIR.name}/<gpu>.json",
    )
    return p


def main(argv: Optional[list[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    results = json.loads(args.results.read_text())
    table = build(results)
    if table is None:
        raise SystemExit(
            f"{args.results}: no shape with both resfuse-cuda and resfuse-triton "
            "measured (a GPU run with the CUDA extension built makes them)"
        )
    path = write(table, args.out or auto_table.table_path(table["slug"]))
    print(f"{len(table['entries'])} entries for {table['device']}: {path}")
    return path


if __name__ == "__main__":
    main()
