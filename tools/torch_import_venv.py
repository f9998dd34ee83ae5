"""A virtualenv with one torch release that can be imported, for `make wheel-check`'s second
torch (a CUDA 12 build): everything ``import torch`` loads, nothing it only loads on first
use.

    python tools/torch_import_venv.py build/venv-torch2.10.0 --torch 2.10.0 --cuda 12.

A plain ``pip install torch`` of a CUDA 12 build is about 7 GB, most of it CUDA libraries. The
check only installs resfuse's wheel beside that torch, imports both and runs a CPU op, so
the packages below are left out (1.3 GB): torch ``dlopen``s them on first use, never at
import (libtorch_cuda_linalg.so needs cuSOLVER, libcaffe2_nvrtc.so NVRTC, and both are
loaded lazily; Triton and cuda-bindings are imported by torch.compile and torch.cuda's
graph tools). Each is checked: the requirement must exist (a new torch that drops or renames
it fails here rather than silently keeping it), and ``import torch`` must then work.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

# torch's requirements that `import torch` does not load (see the module docstring)
LOADED_ON_FIRST_USE = ("triton", "cuda-bindings", "nvidia-cusolver-", "nvidia-cuda-nvrtc-")

READ_REQUIREMENTS = r"""
import json
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
wanted = []
for line in requires("torch") or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        wanted.append(str(req).split(";")[0].strip())
print(json.dumps(wanted))
"""

IMPORT_TORCH = "import torch; print(torch.__version__, torch.version.cuda or '')"


def skipped(requirement: str) -> bool:
    name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()
    return any(name == p or (p.endswith("-") and name.startswith(p)) for p in LOADED_ON_FIRST_USE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("venv", type=Path)
    ap.add_argument("--torch", required=True, help="the torch release, e.g. 2.10.0")
    ap.add_argument("--cuda", default="", help="the CUDA version prefix torch must report")
    args = ap.parse_args(argv)

    shutil.rmtree(args.venv, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(args.venv)
    python = str(args.venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-cache-dir"]
    subprocess.run([*pip, "--no-deps", f"torch=={args.torch}"], check=True)
    requirements = json.loads(
        subprocess.run(
            [python, "-c", READ_REQUIREMENTS], capture_output=True, text=True, check=True
        ).stdout
    )
    for prefix in LOADED_ON_FIRST_USE:
        if not any(skipped(r) and r.lower().startswith(prefix) for r in requirements):
            sys.exit(
                f"torch_import_venv: torch {args.torch} no longer requires {prefix!r}: "
                "review LOADED_ON_FIRST_USE"
            )
    keep = [r for r in requirements if not skipped(r)]
    subprocess.run([*pip, *keep], check=True)

    proc = subprocess.run([python, "-c", IMPORT_TORCH], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(
            f"torch_import_venv: torch {args.torch} does not import without "
            f"{', '.join(LOADED_ON_FIRST_USE)}:\n{proc.stderr[-3000:]}"
        )
    version, cuda = proc.stdout.split()[0], (proc.stdout.split() + [""])[1]
    if not cuda.startswith(args.cuda):
        sys.exit(f"torch_import_venv: torch {version} is not a CUDA {args.cuda} build: {cuda!r}")
    size = sum(f.stat().st_size for f in args.venv.rglob("*") if f.is_file()) / 2**30
    print(
        f"torch_import_venv: torch {version} (CUDA {cuda}) in {args.venv}, {size:.1f} GiB, "
        f"without {', '.join(LOADED_ON_FIRST_USE)} (loaded on first use)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
