"""The release build's CUDA toolkit: CUDA 13's compiler front end, CUDA 12.9's assembler and
static runtime, all from the package registry, assembled into one directory that torch's
extension builder uses as ``CUDA_HOME``.

Why this mix (README "Install", issue 17): one wheel has to load beside every CUDA 12.x and
13.x build of torch and run on CUDA 12 drivers.

* **Runtime**: the CUDA runtime is linked statically (``libcudart_static.a`` of 12.9), so the
  library needs no ``libcudart.so`` of any version; it needs a driver that runs CUDA 12.9
  code: a CUDA 12 driver (>= 525, minor-version compatibility) for the machine code.
* **Headers**: the host code is compiled against the 12.9 headers of that same runtime (the
  structs it passes, e.g. ``cudaFuncAttributes`` and ``cudaLaunchConfig_t``, and the symbol
  names the headers map calls to, must be the runtime's own).
* **Machine code**: CUDA 12.9's ``ptxas`` assembles every architecture, so the cubins are a
  12.x toolkit's, loadable by CUDA 12 drivers. The registry's 12.9 compiler package has no
  front end (no ``nvcc``/``cicc``), so CUDA 13's front end writes the PTX; it labels it PTX
  ISA 9.0, which 12.9's ``ptxas`` does not read. ``bin/ptxas`` here is a wrapper that relabels
  the PTX as ISA 8.8 (12.9's) before assembling it: an instruction 8.8 lacks would fail the
  build there, so a build that succeeds is valid 8.8. The wrapper rewrites the file in place,
  so the PTX that ``fatbinary`` then embeds (``+PTX``, for GPUs newer than the list; JIT-
  compiled by the driver) is 8.8 too: JIT needs a driver >= 12.9 (575).

    python tools/cuda_toolkit.py [--packages build/cuda-pkgs] [--out build/cuda-toolkit]

prints the toolkit directory; ``--check`` also compiles a test kernel through it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what the wheel is built with: pinned, so a release is reproducible (the build info records it)
FRONT_END = {  # CUDA 13.0: nvcc, cudafe++, cicc, fatbinary (nvidia/cu13/)
    "nvidia-cuda-nvcc": "13.0.88",
    "nvidia-nvvm": "13.0.88",
    "nvidia-cuda-crt": "13.0.88",
}
BACK_END = {  # CUDA 12.9: ptxas (nvidia/cuda_nvcc/), the static runtime + headers, CCCL headers
    "nvidia-cuda-nvcc-cu12": "12.9.86",
    "nvidia-cuda-runtime-cu12": "12.9.79",
    "nvidia-cuda-cccl-cu12": "12.9.27",  # <nv/target>, which cuda_fp16.h includes
}
PACKAGES = {**FRONT_END, **BACK_END}
ASSEMBLER_CUDA = "12.9"
ASSEMBLER_PTX_ISA = "8.8"  # the newest PTX ISA 12.9's ptxas reads
# the driver floors (NVIDIA's CUDA compatibility tables): machine code built by a 12.x
# toolkit runs on any CUDA 12 driver; PTX of ISA 8.8 is JIT-compiled by 12.9 drivers and newer
DRIVER_FLOOR = {"machine_code": "525.60.13", "ptx_jit": "575.51.03"}

_PTXAS_WRAPPER = """#!/bin/sh
# resfuse's release toolkit (tools/cuda_toolkit.py): relabel CUDA 13's PTX (ISA 9.x) as ISA
# {isa}, which CUDA {cuda}'s ptxas reads, then assemble it with that ptxas. In place: the PTX
# that fatbinary embeds afterwards is the relabelled one.
for arg in "$@"; do
  case "$arg" in
    *.ptx) [ -f "$arg" ] && sed -i 's/^\\.version 9\\.[0-9]*$/.version {isa}/' "$arg" ;;
  esac
done
exec "{ptxas}" "$@"
"""

_PROFILE = """# resfuse's release toolkit (tools/cuda_toolkit.py): CUDA 13's front end, CUDA {cuda}'s
# ptxas (through the wrapper in this directory), headers and static runtime
TOP              = {top}

CICC_PATH        = {nvvm}/bin
NVVMIR_LIBRARY_DIR = {nvvm}/libdevice

PATH            += $(CICC_PATH):$(_HERE_):

INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)

LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64"

CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
"""


def install_packages(dest: str, python: str = sys.executable) -> None:
    """pip-install the pinned packages into ``dest`` (once; a stamp names the pins)."""
    stamp = os.path.join(dest, ".resfuse-packages.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == PACKAGES:
                return
    shutil.rmtree(dest, ignore_errors=True)
    pins = [f"{name}=={version}" for name, version in PACKAGES.items()]
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--target", dest, *pins], check=True
    )
    with open(stamp, "w") as f:
        json.dump(PACKAGES, f)


def _link_tree(src: str, dst: str) -> None:
    """Symlink every file under ``src`` into ``dst`` (directories created)."""
    for base, _, files in os.walk(src):
        rel = os.path.relpath(base, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            target = os.path.join(dst, rel, name)
            if not os.path.lexists(target):
                os.symlink(os.path.abspath(os.path.join(base, name)), target)


def assemble(packages: str, out: str) -> str:
    """Build the toolkit directory ``out`` from the packages under ``packages``."""
    cu13 = os.path.join(packages, "nvidia", "cu13")
    nvcc12 = os.path.join(packages, "nvidia", "cuda_nvcc")
    rt12 = os.path.join(packages, "nvidia", "cuda_runtime")
    for path in (os.path.join(cu13, "bin", "nvcc"), os.path.join(nvcc12, "bin", "ptxas")):
        if not os.path.exists(path):
            raise SystemExit(f"cuda_toolkit: {path} is missing (install_packages first)")
    shutil.rmtree(out, ignore_errors=True)
    bin_dir = os.path.join(out, "bin")
    os.makedirs(bin_dir)
    # nvcc finds nvcc.profile and its tools next to its own (resolved) path: a copy, not a link
    shutil.copy2(os.path.join(cu13, "bin", "nvcc"), bin_dir)
    for name in os.listdir(os.path.join(cu13, "bin")):
        if name not in ("nvcc", "nvcc.profile", "ptxas"):
            os.symlink(
                os.path.abspath(os.path.join(cu13, "bin", name)), os.path.join(bin_dir, name)
            )
    wrapper = os.path.join(bin_dir, "ptxas")
    with open(wrapper, "w") as f:
        f.write(
            _PTXAS_WRAPPER.format(
                isa=ASSEMBLER_PTX_ISA,
                cuda=ASSEMBLER_CUDA,
                ptxas=os.path.abspath(os.path.join(nvcc12, "bin", "ptxas")),
            )
        )
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    with open(os.path.join(bin_dir, "nvcc.profile"), "w") as f:
        f.write(
            _PROFILE.format(
                cuda=ASSEMBLER_CUDA,
                top=os.path.abspath(out),
                nvvm=os.path.abspath(os.path.join(cu13, "nvvm")),
            )
        )
    # headers: the 12.9 runtime's and 12.9's crt/, but for crt/host_runtime.h: CUDA 13's
    # cudafe++ writes host stubs for its own version of that file (which differs from 12.9's
    # only by a tile-kernel flag of the __cudaLaunch macro; the runtime entry points it calls
    # are in 12.9's static runtime: the link proves it)
    include = os.path.join(out, "include")
    os.makedirs(os.path.join(include, "crt"))
    os.symlink(
        os.path.abspath(os.path.join(cu13, "include", "crt", "host_runtime.h")),
        os.path.join(include, "crt", "host_runtime.h"),
    )
    _link_tree(os.path.join(rt12, "include"), include)
    _link_tree(os.path.join(nvcc12, "include"), include)
    _link_tree(os.path.join(packages, "nvidia", "cuda_cccl", "include"), include)
    # the static runtime only: no libcudart.so here, so nothing can link it by accident
    lib = os.path.join(out, "lib64")
    os.makedirs(lib)
    for name in ("libcudart_static.a", "libculibos.a"):
        os.symlink(os.path.abspath(os.path.join(rt12, "lib", name)), os.path.join(lib, name))
    with open(os.path.join(out, "resfuse-toolkit.json"), "w") as f:
        json.dump(toolkit_info(), f, indent=1)
        f.write("\n")
    return out


def toolkit_info() -> dict:
    """What the build info records about the toolkit (resfuse/_cuda_build.json)."""
    return {
        "front_end": f"CUDA {FRONT_END['nvidia-cuda-nvcc']} (nvcc, cicc)",
        "assembler": f"CUDA {BACK_END['nvidia-cuda-nvcc-cu12']} ptxas (PTX ISA {ASSEMBLER_PTX_ISA})",
        "runtime": f"CUDA {BACK_END['nvidia-cuda-runtime-cu12']} libcudart_static (linked in)",
        "driver_floor": DRIVER_FLOOR,
        "packages": PACKAGES,
    }


def is_release_toolkit(cuda_home: str) -> bool:
    return os.path.exists(os.path.join(cuda_home, "resfuse-toolkit.json"))


def check(out: str) -> None:
    """Compile a kernel for the newest architecture with PTX through the toolkit (the wheel
    check reads the PTX version the build embeds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.cu")
        with open(src, "w") as f:
            f.write("__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n")
        obj = os.path.join(tmp, "k.o")
        subprocess.run(
            [
                os.path.join(out, "bin", "nvcc"),
                "-c",
                src,
                "-o",
                obj,
                "-gencode=arch=compute_120,code=[sm_120,compute_120]",
            ],
            check=True,
        )
        print(f"cuda_toolkit: compiled a kernel for sm_120 + PTX through {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", default=os.path.join(ROOT, "build", "cuda-pkgs"))
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "cuda-toolkit"))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    install_packages(args.packages)
    assemble(args.packages, args.out)
    if args.check:
        check(args.out)
    print(os.path.abspath(args.out))


if __name__ == "__main__":
    main()
