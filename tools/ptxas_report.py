"""Resource use of the CUDA kernels as ptxas reports it (``-Xptxas -v``), per kernel and arch.

    python tools/ptxas_report.py [--arch 80 90] [--json]     compile csrc/ and print a table

Compiles the kernel translation units of csrc/ (device code only, no torch needed) to cubins
for each architecture and parses ptxas's report: registers, stack frame, spill bytes and
static shared memory. The tests fail on any spill in the forward and backward kernels
(tests/test_cuda_build.py); the same parser reads the extension build's own log when
setup.py writes one.

``compile_instantiations(symbols, arch)`` compiles just the named kernel instantiations (a
translation unit of explicit instantiations: seconds, not the minutes of the whole build) to
PTX and a cubin, with the extension build's flags: the static kernel model
(tools/kernel_model.py) reads both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = [
    "csrc/add_norm_fwd.cu",
    "csrc/add_norm_bwd.cu",
    "csrc/add_norm_bwd_branch_norm.cu",
]

_FUNCTION = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelResources:
    name: str  # mangled
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int = 0  # static shared memory (ptxas's "bytes smem")

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    @property
    def short_name(self) -> str:
        return demangle(self.name)


def demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or name
    except (OSError, subprocess.SubprocessError):
        return name


def parse(log: str) -> list[KernelResources]:
    """Kernels in a ptxas -v log (several archs and files may be mixed)."""
    out, arch, props = [], "?", None
    spill = None
    for line in log.splitlines():
        if m := _FUNCTION.search(line):
            arch = m.group(2)
        elif m := _PROPS.search(line):
            props, spill = m.group(1), None
        elif (m := _SPILL.search(line)) and props:
            spill = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and props:
            stack, stores, loads = spill or (0, 0, 0)
            smem = _SMEM.search(line)
            out.append(
                KernelResources(
                    props,
                    arch,
                    int(m.group(1)),
                    stack,
                    stores,
                    loads,
                    int(smem.group(1)) if smem else 0,
                )
            )
            props = None
    return out


def nvcc() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else "nvcc"


def ptxas() -> str:
    """The toolkit's ptxas (the one nvcc runs)."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "ptxas"
    return str(path) if path.exists() else "ptxas"


# The headers that define the kernel templates an instantiation names.
KERNEL_HEADERS = ("add_norm_fwd_kernel.cuh", "add_norm_bwd_kernel.cuh")


def extension_nvcc_flags() -> list[str]:
    """The device-code flags of the extension build (setup.py plus torch's own CUDAExtension
    defaults), so that an instantiation compiled here is the binary the wheel ships."""
    flags = ["-std=c++17", "-O3", "-DUSE_CUDA"]
    try:
        from torch.utils import cpp_extension

        flags += [f for f in cpp_extension.COMMON_NVCC_FLAGS if f.startswith(("-D", "--expt"))]
    except Exception:  # noqa: BLE001 - torch absent or changed: the defines only
        pass
    return flags


def instantiation_source(symbols: list[str]) -> str:
    """A translation unit that explicitly instantiates the kernels of these (mangled)
    symbols, e.g. ``void resfuse::add_norm_fwd_kernel<__nv_bfloat16, ..., true>(...)``."""
    lines = [f'#include "{h}"' for h in KERNEL_HEADERS]
    for symbol in symbols:
        signature = demangle(symbol)
        if signature == symbol or not signature.startswith("void resfuse::"):
            raise ValueError(f"not a resfuse kernel symbol: {symbol}")
        lines.append(f"template __global__ {signature};")
    return "\n".join(lines) + "\n"


@dataclass
class CompiledInstantiations:
    """PTX and cubin of a set of kernel instantiations for one architecture, and ptxas's
    report of each (by mangled name)."""

    arch: int
    ptx: str
    cubin: bytes
    resources: dict[str, KernelResources] = field(default_factory=dict)


def compile_instantiations(
    symbols: list[str], arch: int, out_dir: Path | None = None
) -> CompiledInstantiations:
    """nvcc -ptx, then ptxas -v, for the kernel instantiations named by ``symbols``; cached
    in ``out_dir`` (default build/kernel_model/) by the sources' and flags' hash."""
    out_dir = out_dir or ROOT / "build" / "kernel_model"
    source = instantiation_source(sorted(set(symbols)))
    flags = extension_nvcc_flags()
    digest = hashlib.sha256(source.encode() + " ".join(flags).encode() + str(arch).encode())
    for header in sorted((ROOT / "csrc").glob("*.cuh")) + sorted((ROOT / "csrc").glob("*.h")):
        digest.update(header.read_bytes())
    stem = out_dir / f"cuda_sm{arch}_{digest.hexdigest()[:16]}"
    ptx_path, cubin_path, log_path = (stem.with_suffix(s) for s in (".ptx", ".cubin", ".log"))
    if not (ptx_path.exists() and cubin_path.exists() and log_path.exists()):
        out_dir.mkdir(parents=True, exist_ok=True)
        cu = stem.with_suffix(".cu")
        cu.write_text(source)
        tmp = stem.with_suffix(f".{os.getpid()}")
        steps = [
            [
                nvcc(),
                *flags,
                f"-arch=sm_{arch}",
                "-ptx",
                f"-I{ROOT / 'csrc'}",
                str(cu),
                "-o",
                f"{tmp}.ptx",
            ],
            [ptxas(), f"-arch=sm_{arch}", "-O3", "-v", f"{tmp}.ptx", "-o", f"{tmp}.cubin"],
        ]
        logs = []
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}")
            logs.append(proc.stderr + proc.stdout)
        Path(f"{tmp}.log").write_text(logs[1])
        for suffix, final in ((".ptx", ptx_path), (".cubin", cubin_path), (".log", log_path)):
            os.replace(f"{tmp}{suffix}", final)
    log = log_path.read_text()
    resources = {}
    for k in parse(log):
        k.arch = f"sm_{arch}"
        resources[k.name] = k
    return CompiledInstantiations(arch, ptx_path.read_text(), cubin_path.read_bytes(), resources)


def compile_report(arch: int, source: str, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    cubin = out_dir / f"{Path(source).stem}.sm_{arch}.cubin"
    cmd = [
        nvcc(),
        "-std=c++17",
        "-O3",
        "-cubin",
        f"-arch=sm_{arch}",
        "-Xptxas",
        "-v",
        f"-I{ROOT / 'csrc'}",
        str(ROOT / source),
        "-o",
        str(cubin),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}")
    return proc.stderr + proc.stdout


def report(
    archs=(80, 90), out_dir: Path | None = None, jobs: int | None = None
) -> list[KernelResources]:
    out_dir = out_dir or ROOT / "build" / "ptxas"
    tasks = [(a, s) for a in archs for s in KERNEL_SOURCES]
    jobs = jobs or int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        logs = list(pool.map(lambda t: compile_report(t[0], t[1], out_dir), tasks))
    return [k for log in logs for k in parse(log)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    kernels = report(args.arch)
    if args.json:
        print(json.dumps([asdict(k) | {"kernel": k.short_name} for k in kernels], indent=1))
    else:
        print(f"{'arch':<6} {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel")
        for k in sorted(kernels, key=lambda k: (k.arch, k.short_name)):
            print(
                f"{k.arch:<6} {k.registers:>4} {k.stack_bytes:>5} "
                f"{k.spill_store_bytes:>5}/{k.spill_load_bytes:<5}  {k.short_name}"
            )
    return 1 if any(k.spills for k in kernels) else 0


if __name__ == "__main__":
    sys.exit(main())
