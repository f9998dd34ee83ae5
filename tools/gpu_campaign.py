#!/usr/bin/env python3
"""The GPU campaign: everything resfuse owes a GPU, in one command of at most 8 minutes.

How to run it (a lent GPU machine has 15 minutes of device time in all, its start included):

  1. here, on CPU:   make gpu-carry
        fills build/carry/ (checked to be under 64 MiB with the tree): the resfuse wheel
        (sm_80/86/89/90, stable ABI, built against torch 2.14.1), Liger-Kernel's wheel,
        flash-attn's Triton norm from its sdist, ninja and setuptools for a fallback build.
  2. on the GPU:     make gpu-campaign      (= python3 tools/gpu_campaign.py)
        with the device tool: carry ["build/carry"], timeout_s 540 (a 9-minute limit).
  3. here again:     make gpu-campaign-import FROM=<the folder the files came back to>
        unpacks the results into benchmarks/results/<gpu>/ and installs the auto table
        (resfuse/auto_tables/<gpu>.json); then commit both.

Phases, in priority order, each in its own process under its own deadline (tools/campaign/
plan.py has the numbers; `python3 tools/gpu_campaign.py --plan` prints them): env
(GPU facts, copy bandwidth), install (the carried wheel, else a source build), correctness
(the GPU tests, sharded), bandwidth (resfuse vs baselines and peers, q/k norms, latency),
model (patched vs unpatched Llama slice), sanitize (compute-sanitizer), report (auto table,
report, summary). A phase that runs out of time is stopped and keeps what it measured; the
time a phase leaves unused goes to the next ones. Results go to the results folder as they
come; with $OUT set (the device tool's), at most 8 files are refreshed there after every
phase and every 30 s (summary.md, campaign.tar.gz of the whole folder, campaign.json,
report.md, auto_table.json, campaign.log), so a run killed from outside still returns what
it did. Without $OUT the folder is benchmarks/results/<gpu>/. The last lines printed are the
summary table.

`--rehearsal` runs the very same phases on CPU (Triton interpreter, tiny shapes, the same
output files): `make gpu-campaign-rehearsal`, part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign import common, plan, summary  # noqa: E402

PHASE_MODULES = {
    "env": "campaign.env",
    "install": "campaign.install",
    "correctness": "campaign.correctness",
    "bandwidth": "campaign.bandwidth",
    "model": "campaign.model",
    "sanitize": "campaign.sanitize",
    "report": "campaign.report",
}


def run_phase(name: str, ctx: common.Context) -> int:
    """Inside the phase's own process: run it and write its record, whatever happens."""
    import importlib

    start = time.time()
    common.stop_children_on_sigterm()
    if ctx.rehearsal and os.environ.get("RESFUSE_CAMPAIGN_STALL") == name:
        time.sleep(3600)  # the tests' stuck phase: the driver must stop it at its deadline
    try:
        record = importlib.import_module(PHASE_MODULES[name]).run(ctx)
    except Exception as e:  # the record says what broke; the campaign goes on
        traceback.print_exc()
        previous = ctx.read_record(name) or {}
        record = {
            **previous,
            "status": "failed",
            "summary": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            "traceback": traceback.format_exc()[-4000:],
        }
    record.setdefault("status", "ok")
    record["seconds"] = round(time.time() - start, 1)
    ctx.write_record(name, record)
    return 0 if record["status"] in ("ok", "partial", "skipped") else 1


class Publisher:
    """Copies the results where they are wanted: $OUT (at most plan.OUT_FILE_LIMIT files,
    one of them the whole folder as an archive) or a results folder, now and every
    ``period`` seconds from a thread while a phase runs."""

    def __init__(self, run_dir: Path, out_dir: Path | None, results_root: Path, period: float = 30):
        self.run_dir, self.out_dir, self.results_root = run_dir, out_dir, results_root
        self.period = period
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def publish(self) -> None:
        with self.lock:
            try:
                if self.out_dir is not None:
                    self._to_out()
                else:
                    self._to_results()
            except Exception as e:  # never let publishing stop the campaign
                print(f"[campaign] publishing failed: {type(e).__name__}: {e}", flush=True)

    def _to_out(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        archive = self.out_dir / f".{plan.ARCHIVE_NAME}.tmp"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(self.run_dir.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    arcname = str(Path(self.run_dir.name) / path.relative_to(self.run_dir))
                    if path.suffix == ".log" and path.stat().st_size > plan.LOG_LIMIT_BYTES:
                        _add_tail(tar, path, arcname)
                    else:
                        tar.add(path, arcname=arcname)
        os.replace(archive, self.out_dir / plan.ARCHIVE_NAME)
        for name in plan.OUT_FILES:
            if name == plan.ARCHIVE_NAME:
                continue
            src = self.run_dir / name
            if not src.exists():
                src = self.run_dir / common.PHASE_DIR / name
            if src.exists():
                tmp = self.out_dir / f".{name}.tmp"
                if src.suffix == ".log" and src.stat().st_size > plan.LOG_LIMIT_BYTES:
                    with open(src, "rb") as f:
                        f.seek(-plan.LOG_LIMIT_BYTES, os.SEEK_END)
                        tmp.write_bytes(f.read())
                else:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, self.out_dir / name)

    def _to_results(self) -> None:
        env = (
            common.read_json(self.run_dir / common.PHASE_DIR / "env.json")
            if (self.run_dir / common.PHASE_DIR / "env.json").exists()
            else {}
        )
        dest = self.results_root / env.get("slug", "unknown-device")
        dest.mkdir(parents=True, exist_ok=True)
        for path in self.run_dir.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                target = dest / path.relative_to(self.run_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.period):
                self.publish()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _add_tail(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    import io

    with open(path, "rb") as f:
        f.seek(-plan.LOG_LIMIT_BYTES, os.SEEK_END)
        data = b"[... earlier lines left out: the log keeps its last 2 MiB]\n" + f.read()
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime = len(data), int(time.time())
    tar.addfile(info, io.BytesIO(data))


class Tee:
    """Everything printed also goes to campaign.log."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


def drive(args) -> int:
    rehearsal = args.rehearsal
    if not rehearsal and not args.allow_no_gpu and not _has_gpu():
        print(
            "gpu_campaign: no CUDA GPU here (torch.cuda.is_available() is False); on CPU run "
            "the rehearsal: make gpu-campaign-rehearsal",
            file=sys.stderr,
        )
        return 2
    run_dir = Path(args.run_dir).resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / common.PHASE_DIR / "logs").mkdir(parents=True)
    sys.stdout = Tee(sys.stdout, run_dir / "campaign.log")
    out = args.out or os.environ.get("OUT") or None
    out_dir = Path(out).resolve() if out else None
    publisher = Publisher(run_dir, out_dir, Path(args.results_root).resolve())

    selected = [p for p in plan.PHASES if not args.only or p.name in args.only]
    # the selected phases' budgets (on the GPU with the plan's margin, within its limit)
    total = sum(plan.budget(p.name, rehearsal) for p in selected)
    if not rehearsal:
        total = min(plan.TOTAL_BUDGET_S, total + plan.TOTAL_BUDGET_S - plan.deadlines_total())
    start = time.time()
    end = start + total
    mode = "rehearsal on CPU (Triton interpreter, tiny shapes)" if rehearsal else "GPU"
    print(
        f"[campaign] {mode}: {len(selected)} phases, {total:.0f} s in all; results in "
        f"{run_dir}" + (f", published to {out_dir}" if out_dir else ""),
        flush=True,
    )
    print(plan.describe(), flush=True)
    campaign = {
        "mode": "rehearsal" if rehearsal else "gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
        "budget_s": total,
        "phases": [],
    }
    ctx_base = dict(run_dir=run_dir, rehearsal=rehearsal)
    # stopped from outside (a limit, ^C): the current phase's processes are stopped and what
    # was done is still published (a SIGKILL leaves the last periodic publication)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    publisher.start()
    try:
        for i, phase in enumerate(selected):
            later = sum(plan.budget(p.name, rehearsal) for p in selected[i + 1 :])
            now = time.time()
            deadline = end - later  # its own budget plus what the phases before left unused
            entry = {
                "phase": phase.name,
                "budget_s": plan.budget(phase.name, rehearsal),
                "allowed_s": round(deadline - now, 1),
            }
            if deadline - now < 3:
                entry.update(status="not run", summary="out of time")
                campaign["phases"].append(entry)
                continue
            print(
                f"\n[campaign] === {phase.name} ({phase.what}): up to {deadline - now:.0f} s "
                f"[{now - start:.0f} s into the run]",
                flush=True,
            )
            ctx = common.Context(deadline=deadline, **ctx_base)
            cmd = [
                common.python(),
                str(Path(__file__).resolve()),
                "--phase",
                phase.name,
                "--run-dir",
                str(run_dir),
                "--deadline",
                repr(deadline),
            ]
            if rehearsal:
                cmd.append("--rehearsal")
            child = common.run_child(
                cmd,
                timeout=deadline - time.time(),
                env=common.child_env(ctx),
                cwd=ctx.root,
                log_path=ctx.log_dir / f"{phase.name}.log",
                prefix=lambda name=phase.name: f"[{name} {time.time() - start:5.0f}s] ",
            )
            record = ctx.read_record(phase.name) or {}
            if child.timed_out:  # what it wrote so far stands; it did not finish
                record["status"] = "failed" if record.get("status") == "failed" else "partial"
                so_far = record.get("summary", "")
                record["summary"] = "stopped at its deadline" + (
                    f": {so_far}"
                    if so_far and so_far != "running"
                    else f"; what it did is in {common.PHASE_DIR}/{phase.name}.json"
                )
                ctx.write_record(phase.name, record)
            elif not record:
                record = {
                    "status": "failed",
                    "summary": f"exited {child.returncode} without a "
                    f"record: {child.tail.splitlines()[-1] if child.tail else ''}"[:300],
                }
            entry.update(
                status=record.get("status", "failed"),
                summary=record.get("summary", ""),
                seconds=round(child.seconds, 1),
                exit=child.returncode,
            )
            campaign["phases"].append(entry)
            campaign["elapsed_s"] = round(time.time() - start, 1)
            common.write_json(run_dir / common.PHASE_DIR / "campaign.json", campaign)
            summary.write(run_dir, campaign)
            publisher.publish()
            print(
                f"[campaign] {phase.name}: {entry['status']} in {entry['seconds']} s: "
                f"{entry['summary']}",
                flush=True,
            )
    finally:
        publisher.stop()
        campaign["elapsed_s"] = round(time.time() - start, 1)
        common.write_json(run_dir / common.PHASE_DIR / "campaign.json", campaign)
        text = summary.write(run_dir, campaign)
        publisher.publish()
    print("\n" + summary.terminal(text), flush=True)
    failed = [p for p in campaign["phases"] if p["status"] == "failed"]
    return 1 if failed else 0


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rehearsal", action="store_true", help="on CPU: every phase, tiny shapes")
    ap.add_argument("--out", help="where the returned files go (default: $OUT, else none)")
    ap.add_argument(
        "--run-dir",
        default=str(common.ROOT / "build" / "campaign" / "run"),
        help="the results folder being written",
    )
    ap.add_argument(
        "--results-root",
        default=str(common.ROOT / "benchmarks" / "results"),
        help="without $OUT: the results land in RESULTS_ROOT/<gpu>/",
    )
    ap.add_argument("--only", nargs="+", choices=list(PHASE_MODULES), help="run these phases only")
    ap.add_argument("--plan", action="store_true", help="print the phases and their deadlines")
    ap.add_argument("--allow-no-gpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=list(PHASE_MODULES), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plan:
        print(plan.describe())
        return 0
    if args.phase:
        ctx = common.Context(
            run_dir=Path(args.run_dir),
            rehearsal=args.rehearsal,
            deadline=args.deadline or time.time() + plan.budget(args.phase, args.rehearsal),
        )
        return run_phase(args.phase, ctx)
    return drive(args)


if __name__ == "__main__":
    raise SystemExit(main())
