"""What every phase of the GPU campaign shares: its context (where results go, its deadline,
GPU or rehearsal), atomic JSON files, the environment of child processes, and running a child
under a deadline with its output echoed and logged."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import plan

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
PHASE_DIR = "campaign"  # inside the results folder: one JSON per phase, and logs/


@dataclass
class Context:
    """One phase's view of the run. ``deadline``: time.time() by which the phase must have
    ended (it is killed then); it stops starting new work ``plan.SOFT_MARGIN_S`` earlier."""

    run_dir: Path
    rehearsal: bool
    deadline: float
    root: Path = ROOT
    carry_dir: Path = field(default_factory=lambda: ROOT / plan.CARRY_DIR)
    work_dir: Path = field(default_factory=lambda: ROOT / "build" / "campaign")

    @property
    def device(self) -> str:
        return "cpu" if self.rehearsal else "cuda"

    @property
    def soft_deadline(self) -> float:
        return self.deadline - plan.SOFT_MARGIN_S

    def remaining(self) -> float:
        return self.soft_deadline - time.time()

    def out_of_time(self, needed_s: float = 0.0) -> bool:
        return time.time() + needed_s > self.soft_deadline

    @property
    def phase_dir(self) -> Path:
        return self.run_dir / PHASE_DIR

    @property
    def log_dir(self) -> Path:
        return self.phase_dir / "logs"

    @property
    def site_dir(self) -> Path:
        """Where the install phase unpacks the carried pure-Python wheels (Liger, build tools)."""
        return self.work_dir / "site"

    def record_path(self, phase: str) -> Path:
        return self.phase_dir / f"{phase}.json"

    def write_record(self, phase: str, record: dict) -> Path:
        return write_json(self.record_path(phase), record)

    def read_record(self, phase: str) -> Optional[dict]:
        path = self.record_path(phase)
        return read_json(path) if path.exists() else None


def write_json(path: Path, obj) -> Path:
    """Atomically (a reader, or a killed run, never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_json_text(text: str):
    return json.loads(text)


def log(message: str) -> None:
    print(message, flush=True)


def sources_digest(root: Path = ROOT) -> str:
    """What the compiled extension is built from (csrc/ and setup.py): a wheel carried from
    other sources than the tree's is not used."""
    digest = hashlib.sha256()
    for path in sorted([*root.glob("csrc/*"), root / "setup.py"]):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def child_env(ctx: Context, extra: Optional[dict] = None) -> dict:
    """The environment of every process the campaign starts: the tree's packages and the
    campaign's modules importable, the carried peers and wheels after them, no hub access,
    unbuffered output; on CPU the Triton interpreter."""
    env = dict(os.environ)
    paths = [str(ctx.root), str(TOOLS), str(ctx.site_dir), str(ctx.carry_dir / "peers")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    if ctx.rehearsal:
        env["TRITON_INTERPRET"] = "1"
        env["RESFUSE_TEST_DEVICE"] = "cpu"
    else:
        env.pop("TRITON_INTERPRET", None)
        env["RESFUSE_TEST_DEVICE"] = "cuda"
    tools_bin = ctx.site_dir / "bin"
    if tools_bin.is_dir():
        env["PATH"] = f"{tools_bin}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


@dataclass
class ChildResult:
    returncode: Optional[int]  # None: killed at its deadline
    seconds: float
    tail: str  # the last lines it printed

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# every child started through spawn(), each in its own process group: a phase stopped from
# outside (SIGTERM) stops them all first (stop_children_on_sigterm)
_LIVE: set = set()


def spawn(cmd: Sequence[str], **kwargs) -> subprocess.Popen:
    """Popen in a process group of its own, remembered until it is reaped."""
    proc = subprocess.Popen([str(c) for c in cmd], start_new_session=True, **kwargs)
    _LIVE.add(proc)
    return proc


def stop_children_on_sigterm() -> None:
    """In a phase's process: on SIGTERM (the driver's deadline), kill every child's process
    group, then exit at once (threads waiting on children are not waited for)."""

    def handler(*_):
        for proc in list(_LIVE):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


def kill_group(proc: subprocess.Popen) -> None:
    """Stop ``proc``'s process group: SIGTERM, then SIGKILL if it is still there after
    plan.KILL_GRACE_S; a process already ended has what it left behind killed at once."""
    _LIVE.discard(proc)
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for sig, wait in ((signal.SIGTERM, plan.KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: Optional[dict] = None,
    cwd: Optional[Path] = None,
    log_path: Optional[Path] = None,
    prefix="",
    echo: bool = True,
    on_line: Optional[Callable[[str], None]] = None,
    tail_lines: int = 40,
) -> ChildResult:
    """Run ``cmd`` in its own process group; its output goes to ``log_path`` and (with
    ``prefix``, a string or a function returning one) to our stdout as it comes. At
    ``timeout`` seconds the whole group is stopped (SIGTERM, then SIGKILL), children
    included."""
    start = time.time()
    tail: list[str] = []
    log_file = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a", buffering=1)
        log_file.write(f"$ {' '.join(map(str, cmd))}\n")
    try:
        proc = spawn(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as e:
        if log_file:
            log_file.write(f"could not start: {e}\n")
            log_file.close()
        return ChildResult(127, 0.0, f"could not start {cmd[0]}: {e}")

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if log_file:
                log_file.write(line + "\n")
            if echo:
                print(f"{prefix() if callable(prefix) else prefix}{line}", flush=True)
            tail.append(line)
            del tail[:-tail_lines]
            if on_line:
                on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        returncode = None
    except BaseException:  # we are being stopped ourselves: the child goes first
        kill_group(proc)
        raise
    reader.join(timeout=2)  # its own children may hold the pipe open: they are killed next
    kill_group(proc)  # a child's own children (shards, workers) must not outlive it
    seconds = time.time() - start
    if log_file:
        log_file.write(
            f"[exit {'timeout' if returncode is None else returncode} after {seconds:.1f} s]\n"
        )
        log_file.close()
    return ChildResult(returncode, seconds, "\n".join(tail))


def python() -> str:
    return sys.executable


def status_of(failures: int, incomplete: bool) -> str:
    """A phase's status word: failed beats partial beats ok."""
    return "failed" if failures else "partial" if incomplete else "ok"
