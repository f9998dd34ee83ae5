"""The ``"cpu"`` backend: the compiled CPU kernels of csrc/cpu/, behind the backend interface
(``forward`` / ``backward``).

The extension (``resfuse/_C_cpu.abi3.so``, built by setup.py whenever a C++ compiler is
there, with or without nvcc) registers ``torch.ops.resfuse.cpu_add_norm_fwd`` /
``cpu_add_norm_bwd`` for CPU tensors: one pass over memory each way, rows on PyTorch's
intra-op threads (``torch.get_num_threads()``), SIMD loops compiled for SSE2, AVX2 and
AVX-512 and picked at run time (:func:`isa`), every flag of API.md, fp32 math, and parameter
gradients summed over fixed row blocks in a fixed order: bitwise the same for any number of
threads. Without the extension (no compiler at install time), CPU tensors run the reference,
as before. Importing this module never fails.
"""

from __future__ import annotations

import contextlib

from .extension import Extension

__all__ = [
    "available",
    "unavailable_reason",
    "isa",
    "supported_isas",
    "use_isa",
    "row_blocks",
    "limits",
    "forward",
    "backward",
]

_EXTENSION = Extension(
    "cpu",
    "resfuse._C_cpu",
    not_built=(
        "the CPU extension was not built (this install has no resfuse/_C_cpu*.so: no C++ "
        "compiler, torch < 2.10, or RESFUSE_SKIP_CPU_BUILD=1 at install time)"
    ),
    extra_ops={
        "isa": "cpu_isa",
        "isa_supported": "cpu_isa_supported",
        "use_isa": "cpu_use_isa",
        "row_blocks": "cpu_row_blocks",
        "limit": "cpu_limit",
    },
)
_state = _EXTENSION.state
_load = _EXTENSION.load
forward = _EXTENSION.forward
backward = _EXTENSION.backward


def available() -> bool:
    return _load() == ""


def unavailable_reason() -> str:
    return _load()


ISAS = ("avx512", "avx2", "generic")


def isa() -> str:
    """The instruction set the row loops run with: "avx512" (F/BW/VL/BF16), "avx2" (with FMA
    and F16C) or "generic" (SSE2 on x86-64, or any other CPU), the best this CPU runs unless
    :func:`use_isa` chose another."""
    return _EXTENSION.ops()["isa"]()


def supported_isas() -> tuple:
    """The instruction sets this CPU runs, best first."""
    ops = _EXTENSION.ops()
    return tuple(name for name in ISAS if ops["isa_supported"](name))


@contextlib.contextmanager
def use_isa(name: str):
    """Run the row loops of ``name`` inside the block (process-wide: e.g. to test or time a
    lower instruction set on a machine that has a higher one)."""
    if name not in ISAS:
        raise ValueError(f"use_isa: name must be one of {ISAS}, got {name!r}")
    ops = _EXTENSION.ops()
    previous = ops["use_isa"](name)
    try:
        yield
    finally:
        ops["use_isa"](previous)


def row_blocks(rows: int, D: int) -> int:
    """How many fixed row blocks the backward sums the parameter gradients over (their
    partial sums are added in block order: the same bits for any number of threads)."""
    return _EXTENSION.ops()["row_blocks"](int(rows), int(D))


LIMIT_NAMES = ("vector_elems", "sum_elems", "max_row_blocks", "partial_budget")


def limits() -> dict:
    """The row loops' layout constants (csrc/cpu/add_norm_cpu.h), for tests that cover each
    size on both sides: ``vector_elems`` (the fp32 lanes of the instruction set in use: a
    row is processed this many elements at a time, the rest at its tail), ``sum_elems`` (the
    elements of a row sum's independent partial sums), ``max_row_blocks`` and
    ``partial_budget`` (the backward's fixed row blocks, :func:`row_blocks`)."""
    limit = _EXTENSION.ops()["limit"]
    return {name: limit(name) for name in LIMIT_NAMES}
