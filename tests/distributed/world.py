"""A world of ranks for the distributed tests: N CPU processes over gloo, started once per
test module and handed one scenario at a time (``World.run``), every wait bounded.

Starting processes and importing torch + transformers costs seconds; a scenario on a tiny
model costs a fraction of one. So the ranks stay up and take scenarios by name from
``tests/distributed/scenarios.py`` (or ``deepspeed_scenarios.py``); each rank returns what
its scenario returns, or the traceback. A scenario that fails on one rank leaves the others
waiting in a collective: ``run`` then waits ``timeout`` seconds, kills the world and raises,
and the next ``run`` starts a new one.
"""

from __future__ import annotations

import importlib
import os
import queue
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch.multiprocessing as mp

WORLD_SIZE = 2


class ScenarioFailed(AssertionError):
    pass


def _worker(rank: int, world: int, store: str, module: str, env: dict, commands, results):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # two ranks on a two-core machine
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        scenarios = importlib.import_module(module)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        command = commands.get()
        if command is None:
            break
        name, kwargs = command
        try:
            out = scenarios.SCENARIOS[name](**kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class World:
    """``WORLD_SIZE`` ranks running scenarios of ``module`` (a module name importable with the
    tests' sys.path), with ``env`` set in each before anything is imported."""

    def __init__(self, module: str, env: Optional[dict] = None, start_timeout: float = 180.0):
        # the ranks share one machine: CPU tensors and gloo, also where the suite itself runs
        # on a GPU (RESFUSE_TEST_DEVICE=cuda: one GPU cannot host two NCCL ranks)
        self.env = {"RESFUSE_TEST_DEVICE": "cpu", **(env or {})}
        self.module, self.start_timeout = module, start_timeout
        self.procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(WORLD_SIZE)]
        # gloo's rendezvous file (it must not exist yet), removed by close()
        self.store = store = tempfile.mktemp(prefix="resfuse-gloo-")
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, WORLD_SIZE, store, self.module, self.env, self.commands[r], self.results),
                daemon=True,
            )
            for r in range(WORLD_SIZE)
        ]
        for p in self.procs:
            p.start()
        self._collect("start", self.start_timeout, expect="ready")

    def _collect(self, what: str, timeout: float, expect: str = "ok") -> list:
        deadline = time.monotonic() + timeout
        out: list = [None] * WORLD_SIZE
        pending = set(range(WORLD_SIZE))
        errors = []
        while pending:
            left = deadline - time.monotonic()
            try:
                rank, status, value = self.results.get(timeout=max(left, 0.01))
            except queue.Empty:
                self.close()
                died = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise ScenarioFailed(
                    f"{what}: ranks {sorted(pending)} gave no answer in {timeout:.0f} s"
                    + (f" (ranks {died} died)" if died else "")
                    + ("\n" + "\n".join(errors) if errors else "")
                ) from None
            pending.discard(rank)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                if len(errors) == 1:  # the others may wait in a collective: give them a little
                    deadline = min(deadline, time.monotonic() + 20.0)
            else:
                out[rank] = value
        if errors:
            self.close()
            raise ScenarioFailed(f"{what} failed:\n" + "\n".join(errors))
        return out

    def run(self, name: str, timeout: float = 120.0, **kwargs):
        """Every rank's return value of scenario ``name(**kwargs)``."""
        if not self.procs:
            self._start()
        for q in self.commands:
            q.put((name, kwargs))
        return self._collect(f"scenario {name}({kwargs})", timeout)

    def close(self) -> None:
        for q in getattr(self, "commands", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []
        if getattr(self, "store", None):
            Path(self.store).unlink(missing_ok=True)
