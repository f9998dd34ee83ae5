"""SASS of a cubin, read: the machine code ptxas made of a kernel, per function.

``disassemble(cubin)`` runs nvdisasm and parses its listing into ``SassInstruction``s;
``global_access_widths`` counts the global memory instructions by kind and width (LDG.E.128
is a 128-bit load), ``local_accesses`` the local-memory ones (spills). The disassembler and
cuobjdump come from the package registry (``nvidia-cuda-nvdisasm``, ``nvidia-cuda-cuobjdump``
in requirements-dev.txt); ``cuda_tool`` finds them in the installed package, else in the CUDA
toolkit or on PATH.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# the registry packages that ship each binary
_PACKAGES = {"nvdisasm": "nvidia-cuda-nvdisasm", "cuobjdump": "nvidia-cuda-cuobjdump"}


def cuda_tool(name: str) -> Optional[Path]:
    """Where the CUDA binary ``name`` ("nvdisasm", "cuobjdump") is: in its pip package's
    files (site-packages/nvidia/cu*/bin/), else $CUDA_HOME/bin, else PATH; None if nowhere."""
    package = _PACKAGES.get(name)
    if package is not None:
        try:
            for f in importlib.metadata.files(package) or []:
                if f.name == name and f.parent.name == "bin":
                    path = Path(f.locate())
                    if path.exists():
                        if not os.access(path, os.X_OK):  # some installers drop the mode bits
                            path.chmod(path.stat().st_mode | 0o111)
                        return path
        except importlib.metadata.PackageNotFoundError:
            pass
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    if home.exists():
        return home
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass(frozen=True)
class SassInstruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # with its modifiers: "LDG.E.128", "STG.E.EF.128", "SHFL.BFLY"
    operands: str
    labels: tuple[str, ...] = ()  # the labels just before it

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_FUNCTION = re.compile(r"^\s*\.text\.(\S+):")


def parse_line(line: str) -> Optional[SassInstruction]:
    """One instruction of an nvdisasm listing (``/*0040*/  @P0 LDG.E.128 R4, desc[UR4][R2.64] ;``),
    or None for anything else."""
    m = _LINE.search(line)
    if not m:
        return None
    return SassInstruction(
        int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()
    )


def parse_listing(text: str) -> dict[str, list[SassInstruction]]:
    """{function: instructions} of an nvdisasm listing."""
    functions: dict[str, list[SassInstruction]] = {}
    current, labels = None, []
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current, labels = m.group(1), []
            functions[current] = []
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            labels.append(m.group(1))
            continue
        ins = parse_line(line)
        if ins is not None:
            functions[current].append(
                SassInstruction(ins.address, ins.predicate, ins.opcode, ins.operands, tuple(labels))
            )
            labels = []
    return functions


def disassemble(cubin: bytes) -> dict[str, list[SassInstruction]]:
    """{function: instructions} of a cubin, by nvdisasm."""
    tool = cuda_tool("nvdisasm")
    if tool is None:
        raise RuntimeError("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-c", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {out.stderr[-2000:]}")
    return parse_listing(out.stdout)


# --------------------------------------------------------------------------- accesses

_GLOBAL_KINDS = {
    "LDG": "load",
    "STG": "store",
    "ATOMG": "atomic",
    "REDG": "atomic",
    "RED": "atomic",
}
_WIDTHS = (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1))


def access_bytes(opcode: str) -> int:
    """Bytes per thread of a SASS memory instruction: LDG.E.128 16, LDG.E.64 8, LDG.E.U16 2,
    LDG.E 4 (32 bits is the default width)."""
    modifiers = opcode.split(".")[1:]
    for mod, size in _WIDTHS:
        if mod in modifiers:
            return size
    return 4


def global_kind(ins: SassInstruction) -> Optional[str]:
    """ "load" / "store" / "atomic" for a global memory instruction, else None (LDGSTS, the
    asynchronous copy into shared memory, counts as a load)."""
    if ins.base == "LDGSTS":
        return "load"
    return _GLOBAL_KINDS.get(ins.base)


def global_access_widths(instructions: list[SassInstruction]) -> Counter:
    """Counter of (kind, bits) over the global memory instructions."""
    out: Counter = Counter()
    for ins in instructions:
        kind = global_kind(ins)
        if kind is not None:
            out[(kind, 8 * access_bytes(ins.opcode))] += 1
    return out


def local_accesses(instructions: list[SassInstruction]) -> int:
    """LDL / STL instructions: spill code (and stack arrays)."""
    return sum(1 for ins in instructions if ins.base in ("LDL", "STL"))


def format_widths(widths: Counter) -> str:
    """``ld 128b x12, st 128b x4, ld 32b x2`` (widest first)."""
    names = {"load": "ld", "store": "st", "atomic": "atom"}
    order = sorted(widths.items(), key=lambda kv: (-kv[0][1], kv[0][0]))
    return ", ".join(f"{names[k]} {b}b x{n}" for (k, b), n in order) or "none"


# --------------------------------------------------------------------------- cuobjdump


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function: {registers, stack, shared, local}} from ``cuobjdump -res-usage`` (shared
    includes what the driver reserves per block on sm_80+; local is spills and stack)."""
    tool = cuda_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [str(tool), "-res-usage", str(path)], capture_output=True, text=True
        ).stdout
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if current and m:
            regs, stack, shared, local = (int(g) for g in m.groups())
            out[current] = {"registers": regs, "stack": stack, "shared": shared, "local": local}
    return out
