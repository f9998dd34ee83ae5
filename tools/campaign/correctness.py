"""Phase 3, correctness on the GPU: the project's own GPU tests and a reduced but covering part
of the numerical matrices (plan.CORRECTNESS_RULES: both backends against the float64
reference, forward and backward, every dtype, the flag families, odd D up to 131072 with the
cluster and streamed paths, the sandwich layouts, non-contiguous and misaligned inputs, CUDA
graph capture and replay, bitwise determinism, torch.compile fullgraph).

pytest runs in plan.CORRECTNESS_SHARDS processes at once (the Triton compiles are CPU work:
16 cores), each keeping its share of the selected tests (tools/campaign/pytest_plugin.py);
tests not started by the deadline are reported as not reached. Every test's outcome is in
campaign/correctness.json, the failures with their messages."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

from . import common, plan

FILES = (
    "tests/test_cuda_gpu.py",
    "tests/test_gpu.py",
    "tests/test_matrix.py",
    "tests/test_modules.py",
)  # in priority order


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(common.read_json_text(line))
        except ValueError:
            continue
    return out


def summarise(shards: list[list[dict]]) -> dict:
    heads = [lines[0] for lines in shards if lines and "shard" in lines[0]]
    tests = [t for lines in shards for t in lines if "nodeid" in t]
    outcomes = Counter(t["outcome"] for t in tests)
    selected = heads[0]["selected_all_shards"] if heads else 0
    unreported = selected - len(tests) if heads and len(heads) == len(shards) else None
    return {
        "selected": selected,
        "reported": len(tests),
        "outcomes": dict(outcomes),
        "unreported": unreported,
        "rules": heads[0]["rules"] if heads else [],
        "failures": [t for t in tests if t["outcome"] == "failed"],
        "skip_reasons": dict(
            Counter(
                t["message"].splitlines()[0][:120] for t in tests if t["outcome"] == "skipped"
            ).most_common(8)
        ),
        "slowest": sorted(
            ({"nodeid": t["nodeid"], "seconds": t["seconds"]} for t in tests),
            key=lambda t: -t["seconds"],
        )[:10],
    }


def run(ctx: common.Context) -> dict:
    shards = plan.REHEARSAL_SHARDS if ctx.rehearsal else plan.CORRECTNESS_SHARDS
    limit = plan.REHEARSAL_TESTS_PER_RULE if ctx.rehearsal else 0
    out_dir = ctx.phase_dir / "correctness"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = common.child_env(ctx, {"RESFUSE_REQUIRE_CUDA_EXT": "0" if ctx.rehearsal else "1"})
    # pytest's own deadline: leave time to collect the shards' results
    pytest_deadline = ctx.soft_deadline - 4
    procs = []
    for i in range(shards):
        results = out_dir / f"shard{i}.jsonl"
        results.unlink(missing_ok=True)
        cmd = [
            common.python(),
            "-m",
            "pytest",
            "-q",
            "-p",
            "campaign.pytest_plugin",
            "-p",
            "no:cacheprovider",
            "--campaign-shard",
            f"{i}/{shards}",
            "--campaign-limit",
            str(limit),
            "--campaign-deadline",
            repr(pytest_deadline),
            "--campaign-results",
            str(results),
            "-o",
            "console_output_style=classic",
            *FILES,
        ]
        log = open(ctx.log_dir / f"correctness-shard{i}.log", "w")
        procs.append(
            (
                common.spawn(cmd, cwd=ctx.root, env=env, stdout=log, stderr=subprocess.STDOUT),
                log,
                results,
            )
        )
    print(f"{shards} pytest shards over {', '.join(FILES)}", flush=True)
    last = 0.0
    while any(p.poll() is None for p, _, _ in procs) and time.time() < ctx.deadline - 2:
        time.sleep(1)
        if time.time() - last > 10:
            last = time.time()
            done = summarise([_read_lines(r) for _, _, r in procs])
            print(
                f"  {done['reported']} of {done['selected']} tests done: {done['outcomes']}",
                flush=True,
            )
            ctx.write_record("correctness", {"status": "partial", "summary": "running", **done})
    killed = 0
    for p, log, _ in procs:
        if p.poll() is None:
            killed += 1
        common.kill_group(p)  # and whatever it started (torch.compile's workers)
        log.close()
    record = summarise([_read_lines(r) for _, _, r in procs])
    record["shards"] = shards
    record["exit_codes"] = [p.returncode for p, _, _ in procs]
    o = record["outcomes"]
    not_reached = o.get("not reached", 0) + (record["unreported"] or 0)
    errors = [c for c in record["exit_codes"] if c not in (0, 1, 5)]  # 5: no tests in a shard
    failed = o.get("failed", 0) + o.get("error", 0)
    record["status"] = common.status_of(failed + len(errors), not_reached > 0 or killed > 0)
    # every rule must name tests that exist (a typo is caught in the rehearsal); on the GPU
    # every rule must also find tests of its backend (no cuda tests: the extension is missing)
    empty = [
        r["rule"]
        for r in record["rules"]
        if r["collected"] == 0 or (not ctx.rehearsal and r["matched"] == 0)
    ]
    if empty:
        record["status"] = "failed"
        record["empty_rules"] = empty
    record["summary"] = (
        f"{o.get('passed', 0)} passed, {failed} failed, {o.get('skipped', 0)} "
        f"skipped, {not_reached} not reached of {record['selected']} selected "
        f"({shards} shards)"
        + (f"; pytest exit codes {errors}" if errors else "")
        + (
            f"; rules matching no test: {record['empty_rules']}"
            if record.get("empty_rules")
            else ""
        )
    )
    if record["failures"]:
        record["summary"] += "; first failure: " + record["failures"][0]["nodeid"]
    return record
