"""The ``"cuda"`` backend: the compiled kernels of csrc/, behind the backend interface of
triton_kernels/launch.py (``forward`` / ``backward``).

The extension (``resfuse/_C.abi3.so``, built by setup.py when nvcc and a CUDA build of torch
are present) registers ``torch.ops.resfuse.cuda_add_norm_fwd`` / ``cuda_add_norm_bwd`` with
the dispatcher; this module loads it, registers their fake implementations (so they trace
under torch.compile and FakeTensor), and reports why the backend is unavailable when it is.
Importing it never fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

import torch

from .extension import Extension

__all__ = [
    "available",
    "unavailable_reason",
    "build_info",
    "architectures",
    "runtime",
    "row_layout",
    "launch_limits",
    "forward",
    "backward",
]

_LIBRARY = "resfuse._C"


def _cpu_only_torch() -> str:
    return f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else ""


def _load_error(e: Exception, path: str) -> str:
    info = build_info()
    built = f" (built with torch {info.get('torch')}, {runtime()})" if info else ""
    return f"the CUDA extension {os.path.basename(path)}{built} failed to load: {e}"


def runtime() -> str:
    """How the extension reaches the CUDA runtime: linked in (the release wheel: any CUDA 12
    or 13 build of torch, a driver from the floor on) or a libcudart of torch's CUDA major."""
    info = build_info()
    if info.get("cuda_runtime") == "static":
        floor = info.get("toolkit", {}).get("driver_floor", {}).get("machine_code", "?")
        return f"CUDA runtime linked in, any CUDA 12/13 build of torch, NVIDIA driver >= {floor}"
    return f"CUDA {info.get('cuda', '?')} runtime of torch's own build"


def architectures() -> str:
    """The GPU architectures the installed build has machine code for, and PTX for newer ones:
    e.g. "sm_80, sm_90, sm_120 + PTX (compute_120)" ("?" when unknown)."""
    arch_list = build_info().get("arch_list")
    if not arch_list:
        return "?"
    names, ptx = [], []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        number = item.replace("+PTX", "").replace(".", "")
        names.append(f"sm_{number}")
        if item.endswith("+PTX"):
            ptx.append(f"compute_{number}")
    return ", ".join(names) + (f" + PTX ({', '.join(ptx)})" if ptx else "")


def outside_architectures(major: int, minor: int) -> str:
    """What a GPU of compute capability major.minor outside the build gets, and how to fix it."""
    return (
        f"the CUDA extension has no kernels for sm_{major}{minor} (this build: "
        f"{architectures()}); backend='auto' runs the Triton kernels on it instead; for the "
        f'CUDA kernels, build from source with TORCH_CUDA_ARCH_LIST="{major}.{minor}" '
        "(README, Install: building from source)"
    )


def _extra_fakes() -> None:
    @torch.library.register_fake("resfuse::cuda_device_supported")
    def _supported_fake(device):
        return True


_EXTENSION = Extension(
    "cuda",
    _LIBRARY,
    not_built=(
        "the CUDA extension was not built (this install has no resfuse/_C*.so: it was "
        "installed without nvcc or a CUDA build of torch, or with "
        "RESFUSE_SKIP_CUDA_BUILD=1; reinstall with RESFUSE_FORCE_CUDA_BUILD=1 to see why)"
    ),
    check=_cpu_only_torch,
    load_error=_load_error,
    extra_ops={
        "supported": "cuda_device_supported",
        "layout": "cuda_row_layout",
        "limits": "cuda_launch_limits",
    },
    extra_fakes=_extra_fakes,
)
_state = _EXTENSION.state
_load = _EXTENSION.load
_ops = _EXTENSION.ops
forward = _EXTENSION.forward
backward = _EXTENSION.backward


def build_info() -> dict:
    """What the extension was built against: torch, CUDA, TORCH_CUDA_ARCH_LIST, stable-ABI
    target (empty when unknown)."""
    try:
        spec = importlib.util.find_spec(_LIBRARY)
        if spec is None or not spec.origin:
            return {}
        with open(os.path.join(os.path.dirname(spec.origin), "_cuda_build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _device_supported(index: int) -> bool:
    cache = _state.setdefault("devices", {})
    if index not in cache:
        cache[index] = bool(_state["supported"](index))
    return cache[index]


def available() -> bool:
    """The extension is loaded and, when a GPU is visible, has kernels for the current one."""
    return unavailable_reason() == ""


def unavailable_reason() -> str:
    reason = _load()
    if reason or not torch.cuda.is_available():
        return reason
    index = torch.cuda.current_device()
    if not _device_supported(index):
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index}: " + outside_architectures(major, minor)
    return ""


def row_layout(
    D: int, *, backward: bool = False, branch_norm: bool = False, device: Optional[int] = None
) -> dict:
    """How the kernels lay out rows of D elements on a GPU (default: the current one):
    threads per row, rows per block, blocks per thread-block cluster (> 1: the row spans a
    cluster, sm_90), and whether the row is held in registers (else streamed in tiles)."""
    index = torch.cuda.current_device() if device is None else int(device)
    tpr, rpb, cluster, single = _ops()["layout"](index, int(D), bool(backward), bool(branch_norm))
    return {
        "threads_per_row": tpr,
        "rows_per_block": rpb,
        "cluster_blocks": cluster,
        "single_tile": bool(single),
    }


# the order of csrc/add_norm_params.h's kLaunchLimits (the cuda_launch_limits op's result)
LIMIT_NAMES = (
    "chunk",
    "fwd_max_threads",
    "fwd_block_row",
    "bwd_max_threads",
    "bwd_block_row",
    "max_cluster_blocks",
)


def launch_limits() -> dict:
    """The numbers the CUDA launch heuristics are built from (csrc/add_norm_params.h): the
    elements per thread access, the largest block of each direction and the longest row one
    such block holds in registers, the largest thread-block cluster. Tests and docs ask here
    instead of restating them; no GPU needed. ``row_layout(D)`` gives a size's layout."""
    return dict(zip(LIMIT_NAMES, _ops()["limits"]()))
