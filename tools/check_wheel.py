"""Check what `make wheel` built: the wheel and sdist contents, ptxas's report of the wheel's
kernels (every architecture, no register spills), the release properties of its CUDA
extension, and the wheel installed into a fresh virtualenv, imported from outside the source
tree, with its CUDA extension loaded.

The release properties (issue 17, README "Install"): a manylinux tag (``auditwheel show``
agrees, and grafted no library into the wheel); the extension's dynamic dependencies are
torch's libraries and the C/C++ runtime only: no libcudart of any version (the runtime is
linked in), no C++ symbol of torch (only the stable C shim, ``aoti_torch_*`` / ``torch_*``)
and no CUDA runtime symbol left to resolve; machine code for every architecture of the list
and PTX of the newest, relabelled ISA 8.8 (``tools/cuda_toolkit.py``); and the build info
saying so (toolkit, driver floor).

    python tools/check_wheel.py dist --archs "8.0;8.6;8.9;9.0" --ptxas-log build/ptxas-wheel.log
        [--other-torch OTHER_VENV/bin/python ...]

The fresh venv sees the dev venv's torch through a .pth file (no second multi-GB download);
resfuse itself comes only from the wheel. --other-torch repeats the install and import check
against another interpreter's torch (`make wheel-check-torch OTHER_TORCH=2.11.0`): the
stable-ABI claim, one wheel for every torch >= 2.10, without a GPU (the kernels themselves
need one).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_toolkit  # noqa: E402
import ptxas_report  # noqa: E402
import sass  # noqa: E402

# what the CUDA extension may link dynamically: torch's own libraries (present in every CUDA
# build of torch, 12.x or 13.x) and the C/C++ runtime
ALLOWED_NEEDED = re.compile(
    r"^(libc10(_cuda)?\.so|libtorch(_cpu|_cuda)?\.so|libstdc\+\+\.so\.6|libgcc_s\.so\.1|"
    r"libc\.so\.6|libm\.so\.6|libdl\.so\.2|librt\.so\.1|libpthread\.so\.0|"
    r"ld-linux-x86-64\.so\.2)$"
)
# undefined symbols that would tie the library to one torch or CUDA release: torch's C++ API
# (mangled names in the c10/at/torch namespaces) and the CUDA runtime's entry points
FORBIDDEN_UNDEFINED = re.compile(r"^(_ZN?K?\d*(c10|at|torch)|_ZN\d+(c10|at|torch)|cuda[A-Z_])")

WHEEL_FILES = [
    "resfuse/__init__.py",
    "resfuse/cuda_ext.py",
    "resfuse/ops.py",
    "resfuse/triton_kernels/launch.py",
    "resfuse/triton_kernels/add_norm_kernels.py",
]
EXTENSION_FILES = ["resfuse/_C.abi3.so", "resfuse/_cuda_build.json", "resfuse/_C_cpu.abi3.so"]
SDIST_FILES = [
    "setup.py",
    "MANIFEST.in",
    "README.md",
    "csrc/ops.cpp",
    "csrc/add_norm_fwd.cu",
    "csrc/add_norm_bwd.cu",
    "csrc/add_norm_bwd_branch_norm.cu",
    "csrc/add_norm_kernels.cuh",
    "csrc/add_norm_fwd_kernel.cuh",
    "csrc/add_norm_bwd_kernel.cuh",
    "csrc/common.cuh",
    "csrc/add_norm_launch.h",
    "csrc/add_norm_params.h",
    "csrc/add_norm_api.h",
    "csrc/cuda_launcher.cuh",
    "csrc/op_args.h",
    "csrc/cpu/ops_cpu.cpp",
    "csrc/cpu/add_norm_cpu.cpp",
    "csrc/cpu/add_norm_cpu.h",
    "csrc/cpu/add_norm_cpu_rows.h",
    "csrc/cpu/add_norm_cpu_vec.h",
    "csrc/cpu/add_norm_cpu_generic.cpp",
    "csrc/cpu/add_norm_cpu_avx2.cpp",
    "csrc/cpu/add_norm_cpu_avx512.cpp",
    "triton_kernels/launch.py",
]

IMPORT_CHECK = r"""
import json, os, sys
import torch
import resfuse
from resfuse import cpu_ext, cuda_ext
prefix = sys.argv[1]
assert os.path.realpath(resfuse.__file__).startswith(os.path.realpath(prefix)), resfuse.__file__
reason = cuda_ext._load()
assert reason == "", reason
assert torch._C._dispatch_has_kernel_for_dispatch_key("resfuse::cuda_add_norm_fwd", "CUDA")
assert torch._C._dispatch_has_kernel_for_dispatch_key("resfuse::cuda_add_norm_bwd", "CUDA")
assert torch._C._dispatch_has_kernel_for_dispatch_key("resfuse::cuda_row_layout",
                                                      "CompositeExplicitAutograd")
# the CPU kernels: registered for the CPU key, and auto's choice for CPU tensors
assert cpu_ext.unavailable_reason() == "", cpu_ext.unavailable_reason()
assert torch._C._dispatch_has_kernel_for_dispatch_key("resfuse::cpu_add_norm_fwd", "CPU")
assert torch._C._dispatch_has_kernel_for_dispatch_key("resfuse::cpu_add_norm_bwd", "CPU")
x = torch.randn(4, 64, dtype=torch.bfloat16)
y, h = resfuse.add_rms_norm(x, x, torch.ones(64), backend="cpu")
ref_y, ref_h = resfuse.add_rms_norm(x, x, torch.ones(64), backend="torch")
assert torch.equal(h, ref_h) and torch.allclose(y.float(), ref_y.float(), atol=2e-2)
print(json.dumps({"resfuse": resfuse.__file__, "torch": torch.__version__,
                  "cuda": torch.version.cuda,
                  "build": cuda_ext.build_info(), "backends": str(resfuse.backends())}))
"""


def fail(message: str):
    sys.exit(f"check_wheel: {message}")


def one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        fail(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dist", type=Path)
    ap.add_argument(
        "--archs", required=True, help="the TORCH_CUDA_ARCH_LIST the wheel was built with"
    )
    ap.add_argument("--ptxas-log", type=Path, required=True)
    ap.add_argument(
        "--other-torch",
        action="append",
        default=[],
        metavar="PYTHON",
        help="also install and import the wheel against this interpreter's torch",
    )
    args = ap.parse_args(argv)

    wheel = one(args.dist, "resfuse-*.whl")
    sdist = one(args.dist, "resfuse-*.tar.gz")
    if not re.search(r"-cp310-abi3-manylinux_\d+_\d+_x86_64\.whl$", wheel.name):
        fail(f"{wheel.name}: expected a cp310-abi3 (limited API) manylinux wheel")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in WHEEL_FILES + EXTENSION_FILES if f not in names]
    if missing:
        fail(f"{wheel.name} lacks {missing}")
    info = json.loads(zipfile.ZipFile(wheel).read("resfuse/_cuda_build.json"))
    if info["arch_list"] != args.archs:
        fail(f"wheel built for {info['arch_list']!r}, expected {args.archs!r}")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    missing = [f for f in SDIST_FILES if f not in members]
    if missing:
        fail(f"{sdist.name} lacks {missing}")

    kernels = ptxas_report.parse(args.ptxas_log.read_text()) if args.ptxas_log.exists() else []
    want = arch_names(args.archs)
    have = {k.arch for k in kernels}
    if not want <= have:
        fail(f"ptxas log {args.ptxas_log} covers {sorted(have)}, expected {sorted(want)}")
    spilling = [k for k in kernels if k.spills or k.stack_bytes]
    if spilling:
        fail(
            "register spills in the wheel's kernels:\n"
            + "\n".join(
                f"  {k.arch} {k.short_name}: {k.spill_store_bytes}/{k.spill_load_bytes} B"
                for k in spilling
            )
        )

    release = check_release(wheel, info, args.archs)
    result = install_and_import(wheel, sys.executable)
    print(release)
    print(
        f"check_wheel: {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB) and {sdist.name} OK; "
        f"kernels for {', '.join(sorted(want))}, {len(kernels)} reported by ptxas, no spills; "
        f"installed in a fresh venv: loads on torch {result['torch']} (CUDA {result['cuda']}; built with "
        f"{result['build']['torch']}, stable ABI >= {result['build']['stable_abi_target']})"
    )
    print(result["backends"])
    for other in args.other_torch:
        result = install_and_import(wheel, other)
        print(
            f"check_wheel: the same wheel loads on torch {result['torch']} (CUDA "
            f"{result['cuda']}; {other}) and registers its ops"
        )
    return 0


def arch_names(archs: str, ptx_only: bool = False) -> set:
    """A TORCH_CUDA_ARCH_LIST as sm_XY names ("8.0;12.0+PTX" -> {"sm_80", "sm_120"}); with
    ``ptx_only``, the entries that also embed PTX."""
    return {
        "sm_" + a.replace(".", "").replace("+PTX", "")
        for a in archs.split(";")
        if a.endswith("+PTX") or not ptx_only
    }


def check_release(wheel: Path, info: dict, archs: str) -> str:
    """The release properties of the module docstring; returns a summary (fails otherwise)."""
    if info.get("cuda_runtime") != "static" or "toolkit" not in info:
        fail(f"build info {info}: not a release build (tools/cuda_toolkit.py's toolkit)")
    if info["toolkit"]["packages"] != cuda_toolkit.PACKAGES:
        fail(f"built with {info['toolkit']['packages']}, expected {cuda_toolkit.PACKAGES}")
    show = subprocess.run(
        [str(Path(sys.executable).parent / "auditwheel"), "show", str(wheel)],
        capture_output=True,
        text=True,
    )
    tag = re.search(r"manylinux_\d+_\d+_x86_64", wheel.name).group(0)
    if show.returncode != 0 or f'"{tag}"' not in show.stdout:
        fail(f"auditwheel show does not confirm {tag}:\n{show.stdout}{show.stderr}")
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheel).extractall(tmp)
        if list(Path(tmp).glob("resfuse.libs/*")):
            fail(
                f"auditwheel grafted libraries into the wheel: {list(Path(tmp).glob('resfuse.libs/*'))}"
            )
        lib = Path(tmp, "resfuse", "_C.abi3.so")
        dynamic = subprocess.run(
            ["readelf", "-d", str(lib)], capture_output=True, text=True, check=True
        ).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
        extra = [n for n in needed if not ALLOWED_NEEDED.match(n)]
        if extra:
            fail(f"_C.abi3.so needs {extra} (allowed: torch's libraries, the C/C++ runtime)")
        symbols = subprocess.run(
            ["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True
        ).stdout.split()
        tied = sorted({s for s in symbols if FORBIDDEN_UNDEFINED.match(s)})
        if tied:
            fail(f"_C.abi3.so leaves torch C++ or CUDA runtime symbols to resolve: {tied[:20]}")
        shim = sorted({s for s in symbols if s.startswith(("aoti_torch_", "torch_"))})
        images = binary_images(lib)
    want_elf, want_ptx = arch_names(archs), arch_names(archs, ptx_only=True)
    if images["elf"] != want_elf or images["ptx"] != want_ptx:
        fail(
            f"embedded images {images}, expected machine code {sorted(want_elf)}, PTX {sorted(want_ptx)}"
        )
    if images["ptx_isa"] != {cuda_toolkit.ASSEMBLER_PTX_ISA}:
        fail(f"embedded PTX ISA {images['ptx_isa']}, expected {cuda_toolkit.ASSEMBLER_PTX_ISA}")
    floor = info["toolkit"]["driver_floor"]
    return (
        f"check_wheel: {wheel.name}: auditwheel confirms {tag}, no library grafted; "
        f"_C.abi3.so needs {', '.join(needed)}: no libcudart (the CUDA runtime is linked in), "
        f"{len(shim)} stable C shim symbols and no torch C++ or CUDA runtime symbol to "
        f"resolve; machine code for {', '.join(sorted(want_elf))}, PTX ISA "
        f"{cuda_toolkit.ASSEMBLER_PTX_ISA} for {', '.join(sorted(want_ptx))}; built with "
        f"{info['toolkit']['front_end']} + {info['toolkit']['assembler']}; driver >= "
        f"{floor['machine_code']} (PTX JIT: >= {floor['ptx_jit']})"
    )


def binary_images(lib: Path) -> dict:
    """The architectures of the machine code and PTX embedded in ``lib`` (cuobjdump), and the
    PTX's ISA versions."""
    tool = sass.cuda_tool("cuobjdump")
    if tool is None:
        fail("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    listing = subprocess.run(
        [str(tool), "-lelf", "-lptx", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    elf = set(re.findall(r"ELF file\s+\d+: \S+\.(sm_\d+a?)\.cubin", listing))
    ptx = set(re.findall(r"PTX file\s+\d+: \S+\.(sm_\d+a?)\.ptx", listing))
    text = subprocess.run(
        [str(tool), "-ptx", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    isa = set(re.findall(r"^\.version (\d+\.\d+)", text, re.M))
    return {
        "elf": {e.rstrip("a") for e in elf},
        "ptx": {p.rstrip("a") for p in ptx},
        "ptx_isa": isa,
    }


def install_and_import(wheel: Path, torch_python) -> dict:
    """Install the wheel into a fresh venv that sees `torch_python`'s torch, import it from
    outside the source tree and load the extension; returns IMPORT_CHECK's report."""
    with tempfile.TemporaryDirectory(prefix="resfuse-wheel-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"

        def purelib(interpreter) -> str:
            return subprocess.run(
                [interpreter, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()

        # torch (and its CUDA libraries) from that environment; not its .pth files, so no
        # editable resfuse
        Path(purelib(python), "_dev_torch.pth").write_text(purelib(torch_python) + "\n")
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-deps", str(wheel.resolve())], check=True
        )
        proc = subprocess.run(
            [python, "-c", IMPORT_CHECK, str(env_dir)], capture_output=True, text=True, cwd=tmp
        )
        if proc.returncode != 0:
            fail(
                f"the installed wheel does not import cleanly on {torch_python}'s torch:\n"
                f"{proc.stderr[-4000:]}"
            )
        return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
