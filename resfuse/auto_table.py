"""The measured choice of ``backend="auto"`` between ``"cuda"`` and ``"triton"`` on CUDA tensors.

One table per GPU model, ``resfuse/auto_tables/<slug>.json`` (``slug`` of the device name,
as the benchmarks name ``benchmarks/results/<slug>/``), written from a benchmark run by
``python -m benchmarks.build_auto_table RESULTS_JSON`` (``make auto-table``)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3",
     "source": {"date", "command", "torch", "triton", "resfuse"},   # the run's
     "aggregate": "...",                                            # how rows were combined
     "entries": [{"family": "add_norm", "norm": "rms", "dtype": "bfloat16",
                  "direction": "fwd", "hidden": 4096, "backend": "cuda",
                  "cuda_ms": ..., "triton_ms": ..., "rows": [4096, 16384]}, ...]}

``family``: ``add_norm`` (``norm`` without a residual), ``norm_add_norm``, ``norm_add``;
``direction``: ``fwd`` for calls without autograd, ``fwd+bwd`` for training calls (the
backward runs on the forward's backend). Without a table, or an entry, for the call, or
when the backend an entry names is not available, auto keeps its rule: cuda when the
extension loads, else triton (``backend_registry._auto``).

The table is read on first use, never at import, and a missing or unreadable one only
means no table (``reason()`` says which; ``resfuse.backends()`` shows it).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from pathlib import Path
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .spec import FAMILIES, NORMS

FORMAT = 1
TABLE_DIR = Path(__file__).resolve().parent / "auto_tables"
BACKENDS = ("cuda", "triton")
DIRECTIONS = {False: "fwd", True: "fwd+bwd"}  # needs_grad -> the benchmark direction
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: the tables' and the
    benchmark results' name for a device."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def table_path(device_slug: str) -> Path:
    return TABLE_DIR / f"{device_slug}.json"


class Table:
    """A parsed table: for each (family, norm, dtype, needs_grad), the measured hidden
    sizes in order and the faster backend at each."""

    def __init__(self, data: dict):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an auto table of format {FORMAT}")
        self.slug = str(data.get("slug", "?"))
        self.entries = data["entries"]
        points: dict[tuple, list[tuple[int, str]]] = {}
        for e in self.entries:
            if (
                e["family"] not in FAMILIES
                or e["backend"] not in BACKENDS
                or e["direction"] not in DIRECTIONS.values()
            ):
                raise ValueError(f"bad entry {e}")
            needs_grad = e["direction"] == "fwd+bwd"
            if e["norm"] not in NORMS:
                raise ValueError(f"bad entry {e}")
            group = (e["family"], e["norm"], DTYPES[e["dtype"]], needs_grad)
            points.setdefault(group, []).append((int(e["hidden"]), e["backend"]))
        self._index = {}
        for group, pts in points.items():
            pts.sort()
            self._index[group] = ([math.log2(h) for h, _ in pts], [b for _, b in pts])

    def __len__(self) -> int:
        return len(self.entries)

    def choose(
        self, family: str, norm: str, dtype: torch.dtype, hidden: int, needs_grad: bool
    ) -> Optional[str]:
        """The faster backend at the measured hidden size nearest to ``hidden`` on a log
        scale, None when nothing was measured for this family, norm, dtype and direction.
        Nearest-neighbour is enough: the time is smooth in hidden between the layout
        changes the kernels make at powers of two, and the benchmarks measure at those."""
        group = self._index.get((family, norm, dtype, needs_grad))
        if group is None:
            return None
        logs, backends = group
        at = math.log2(max(int(hidden), 1))
        i = bisect.bisect_left(logs, at)
        if i == len(logs) or (i > 0 and at - logs[i - 1] <= logs[i] - at):
            i -= 1  # a tie goes to the smaller size
        return backends[i]


# The table of this process's GPU, loaded on first use: (table or None, why there is none).
# One per process: every call reads the table of the current device's model.
_loaded: dict[str, tuple[Optional[Table], str]] = {}
# key -> the table's choice (None: no entry). Auto's per-call cost is this dict hit.
_choices: dict[tuple, Optional[str]] = {}


def _device_name() -> Optional[str]:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def load(path: Path) -> tuple[Optional[Table], str]:
    """(table, "") or (None, why not): never raises."""
    try:
        return Table(json.loads(path.read_text())), ""
    except FileNotFoundError:
        return None, f"no measured table for {path.stem}"
    except Exception as e:  # a broken file must not break a call: fall back, and say so
        return None, f"the measured table {path.name} is unusable ({type(e).__name__}: {e})"


def current() -> tuple[Optional[Table], str]:
    """This device's table and, when there is none, why."""
    if "current" not in _loaded:
        name = _device_name()
        _loaded["current"] = (
            load(table_path(slug(name)))
            if name is not None
            else (None, "no CUDA device visible, so no measured table")
        )
    return _loaded["current"]


def reset() -> None:
    """Forget the loaded table and the cached choices (a table was installed, or a test)."""
    _loaded.clear()
    _choices.clear()


_UNSEEN = object()


def known_at_trace(n) -> bool:
    """Whether a size has a value while torch.compile traces (it may keep one symbolic, and
    dynamo shows a symbolic size to ``isinstance`` as an int): its parity is known exactly
    when it is."""
    return statically_known_true(n % 2 == 0) or statically_known_true(n % 2 == 1)


# Under torch.compile this runs as plain Python at trace time and its answer becomes a
# constant of the graph (dynamo cannot trace the file read or bisect): sound, as the answer
# depends only on the key, whose dtype and hidden size the graph is specialised on, and on
# the table, fixed for the process.
@torch.compiler.assume_constant_result
def measured_backend(key: tuple) -> Optional[str]:
    """The table's backend for ``key = (family, norm, dtype, hidden, needs_grad)``, None
    where it has none."""
    choice = _choices.get(key, _UNSEEN)
    if choice is _UNSEEN:
        table, _ = current()
        choice = _choices[key] = table.choose(*key) if table is not None else None
    return choice


def describe(fallback: str) -> str:
    """What auto does on CUDA tensors here, for ``resfuse.backends()``; ``fallback`` is the
    backend the rule picks now."""
    table, reason = current()
    rule = "cuda when the extension loads, else triton"
    if table is None:
        return f"{fallback} ({reason}: {rule})"
    return (
        f"per the measured table for {table.slug} ({len(table)} entries); "
        f"where it has none, {fallback} ({rule})"
    )
