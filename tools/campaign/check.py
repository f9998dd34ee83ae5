"""After ``make gpu-campaign-rehearsal``: did it write everything a GPU run writes, and does the
plan fit the GPU window? Exits non-zero with the list of problems.

    python tools/campaign/check.py OUT_DIR [--carry build/carry]

Checks: the phase deadlines sum to at most plan.TOTAL_BUDGET_S (8 minutes), inside the
9-minute command limit; the carry folder and the tree fit the device tool's 64 MiB; OUT_DIR
holds every file of plan.OUT_FILES and no more than plan.OUT_FILE_LIMIT; the archive holds
every file of plan.RESULT_FILES; every phase ran and none failed.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path[:0] = [
        str(Path(__file__).resolve().parents[1]),
        str(Path(__file__).resolve().parents[2]),
    ]
    from campaign import carry, common, plan  # noqa: E402
else:
    from . import carry, common, plan


def problems(out_dir: Path, carry_dir: Path) -> list[str]:
    found = []
    total = plan.deadlines_total()
    if total > plan.TOTAL_BUDGET_S:
        found.append(f"the phase deadlines sum to {total:.0f} s, over {plan.TOTAL_BUDGET_S} s")
    if plan.TOTAL_BUDGET_S >= plan.COMMAND_LIMIT_S:
        found.append("the campaign's budget leaves no margin inside the command limit")
    manifest, bad = carry.verify(carry_dir)
    found += [f"carry: {b}" for b in bad]
    if manifest:
        size = carry.folder_bytes(carry_dir) + carry.tree_bytes(common.ROOT)
        if size > plan.CARRY_LIMIT_BYTES:
            found.append(
                f"carry + tree {size / 2**20:.1f} MiB > {plan.CARRY_LIMIT_BYTES >> 20} MiB"
            )
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file()) if out_dir.is_dir() else []
    if len(files) > plan.OUT_FILE_LIMIT:
        found.append(f"{out_dir} holds {len(files)} files, over {plan.OUT_FILE_LIMIT}: {files}")
    for name in plan.OUT_FILES:
        path = out_dir / name
        if not path.exists() or path.stat().st_size == 0:
            found.append(f"{out_dir}: {name} missing or empty")
    archive = out_dir / plan.ARCHIVE_NAME
    if archive.exists():
        with tarfile.open(archive) as tar:
            names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
        for rel in plan.RESULT_FILES:
            if rel not in names:
                found.append(f"{plan.ARCHIVE_NAME}: no {rel}")
        for phase in plan.PHASES:
            if f"{common.PHASE_DIR}/logs/{phase.name}.log" not in names:
                found.append(f"{plan.ARCHIVE_NAME}: no log of {phase.name}")
        found += _coverage(tar_path=archive)
    campaign_json = out_dir / "campaign.json"
    if campaign_json.exists():
        campaign = common.read_json(campaign_json)
        ran = {p["phase"]: p for p in campaign["phases"]}
        for phase in plan.PHASES:
            entry = ran.get(phase.name)
            if entry is None or entry["status"] in ("failed", "not run"):
                found.append(
                    f"phase {phase.name}: {entry['status'] + ': ' + entry.get('summary', '') if entry else 'missing'}"
                )
    summary = out_dir / "summary.md"
    if summary.exists() and "| phase | status |" not in summary.read_text():
        found.append("summary.md has no phase table")
    return found


# the report's sections a run that reached every phase has (benchmarks/report.py)
REPORT_SECTIONS = (
    "## Implementations",
    "## resfuse.patch on transformers.LlamaModel",
    "## Reference transformer",
    "## Small-batch latency",
    "## Kernels",
)


def _coverage(tar_path: Path) -> list[str]:
    """Every (op, implementation, direction) of the bandwidth plan has a record (measured or
    with the reason it was not), and the report has its sections: no code path of the
    bandwidth phase was skipped."""
    import json

    from campaign import bandwidth

    found = []
    with tarfile.open(tar_path) as tar:
        members = {Path(*Path(n).parts[1:]).as_posix(): n for n in tar.getnames()}
        if "results.json" not in members or "report.md" not in members:
            return []
        results = json.loads(tar.extractfile(members["results.json"]).read())
        text = tar.extractfile(members["report.md"]).read().decode()
    have = {(r["op"], r["impl"], r["direction"]) for r in results.get("kernels", [])}
    for name, impls, cases, directions in bandwidth.main_cases(plan.bandwidth_scale(True)):
        missing = sorted({(c.op, i, d) for c in cases for i in impls for d in directions} - have)
        if missing:
            found.append(
                f"bandwidth pass {name}: no record for {missing[:4]}"
                + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            )
    if not results.get("latency", {}).get("records"):
        found.append("results.json: no latency records")
    for section in REPORT_SECTIONS:
        if section not in text:
            found.append(f"report.md: no section {section!r}")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--carry", type=Path, default=common.ROOT / plan.CARRY_DIR)
    args = ap.parse_args(argv)
    found = problems(args.out, args.carry)
    if found:
        print("gpu-campaign-rehearsal: problems:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    print(
        f"gpu-campaign-rehearsal: ok: every file a GPU run returns is there ({args.out}); "
        f"deadlines {plan.deadlines_total():.0f} s <= {plan.TOTAL_BUDGET_S} s; carry + tree "
        f"{(carry.folder_bytes(args.carry) + carry.tree_bytes(common.ROOT)) / 2**20:.1f} MiB "
        f"<= {plan.CARRY_LIMIT_BYTES >> 20} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
