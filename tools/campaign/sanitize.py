"""Phase 6, compute-sanitizer: memcheck and racecheck over a few kernel paths of the cuda
backend (plan.SANITIZE names tools/sanitize_cases.py's cases), resfuse's kernels only
instrumented (torch's own are left alone, which keeps the run short). Each tool's errors
are counted from its ERROR SUMMARY; its log is in campaign/logs/. Without compute-sanitizer
(the CPU rehearsal) the same cases run on the reference, so their names and arguments are
checked, and the record says the sanitizer did not run."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

from . import common, plan

SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in ("/usr/local/cuda", "/opt/cuda"):
        path = Path(home) / "bin" / "compute-sanitizer"
        if path.exists():
            return str(path)
    return None


def kernel_filter(sanitizer: str, ctx: common.Context) -> list[str]:
    """Only resfuse's kernels instrumented: the option's name differs between releases."""
    helped = common.run_child(
        [sanitizer, "--help"], timeout=30, echo=False, env=common.child_env(ctx), tail_lines=5000
    )
    for option in ("--kernel-name", "--kernel-regex"):
        if option in helped.tail:
            return [option, f"kns={plan.SANITIZE_KERNELS}"]
    return []


def run(ctx: common.Context) -> dict:
    script = str(ctx.root / "tools" / "sanitize_cases.py")
    sanitizer = find_sanitizer()
    record: dict = {"sanitizer": sanitizer, "tools": []}
    env = common.child_env(ctx)
    if sanitizer is None or ctx.rehearsal:
        names = sorted({n for _, cases in plan.SANITIZE for n in cases})
        child = common.run_child(
            [
                common.python(),
                script,
                "--only",
                *names,
                "--device",
                ctx.device,
                "--backend",
                "cuda" if not ctx.rehearsal else "torch",
            ],
            timeout=ctx.remaining(),
            env=env,
            cwd=ctx.root,
            log_path=ctx.log_dir / "sanitize-cases.log",
            prefix="  ",
        )
        record["cases_without_sanitizer"] = {"ok": child.ok, "cases": names}
        reason = "compute-sanitizer not found" if sanitizer is None else "CPU rehearsal"
        record["status"] = "skipped" if child.ok else "failed"
        record["summary"] = (
            f"not run ({reason}); the {len(names)} cases ran "
            f"{'fine' if child.ok else 'with an ERROR'} without it"
        )
        return record
    filt = kernel_filter(sanitizer, ctx)
    record["kernel_filter"] = filt
    # the tools run side by side: each one's start (the sanitizer's, then torch's under it)
    # takes most of its time, and the GPU has room for both
    children: dict = {}

    def one(tool, names):
        cmd = [
            sanitizer,
            "--tool",
            tool,
            "--error-exitcode",
            "7",
            "--print-limit",
            "20",
            *filt,
            common.python(),
            script,
            "--only",
            *names,
        ]
        children[tool] = common.run_child(
            cmd,
            timeout=ctx.remaining(),
            env=env,
            cwd=ctx.root,
            log_path=ctx.log_dir / f"sanitize-{tool}.log",
            prefix=f"  {tool}: ",
            tail_lines=300,
        )

    threads = [threading.Thread(target=one, args=item) for item in plan.SANITIZE]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures = 0
    incomplete = False
    for tool, names in plan.SANITIZE:
        child = children[tool]
        found = SUMMARY.findall(child.tail)
        errors = int(found[-1]) if found else None
        done = [n for n in names if f"ok {n}" in child.tail]
        record["tools"].append(
            {
                "tool": tool,
                "cases": list(names),
                "completed": done,
                "errors": errors,
                "exit": child.returncode,
                "seconds": round(child.seconds, 1),
            }
        )
        if child.timed_out or len(done) < len(names):
            incomplete = True
        if errors or child.returncode not in (0, None):
            failures += 1
    record["status"] = common.status_of(failures, incomplete)
    record["summary"] = "; ".join(
        f"{t['tool']}: {t['errors'] if t['errors'] is not None else '?'} errors, "
        f"{len(t['completed'])}/{len(t['cases'])} cases"
        + (" (stopped)" if t["exit"] is None else "")
        for t in record["tools"]
    )
    return record
