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

from .spec import (
    AddNormSpec,
    BackwardInputs,
    Forward,
    Grads,
    Operands,
    absent_to_none,
    backward_outputs,
    backward_present,
    forward_outputs,
    forward_present,
)

_new = tuple.__new__  # a NamedTuple from its fields in order (the per-call path)

__all__ = [
    "available",
    "unavailable_reason",
    "build_info",
    "row_layout",
    "launch_limits",
    "forward",
    "backward",
]

_LIBRARY = "resfuse._C"
_state: dict = {}


def _load() -> str:
    """Load the extension once; returns "" or why it is unusable."""
    if "reason" in _state:
        return _state["reason"]
    reason = ""
    spec = None
    try:
        spec = importlib.util.find_spec(_LIBRARY)
    except Exception as e:  # noqa: BLE001 - a broken package must not break import
        reason = f"cannot look for the extension: {e}"
    if not reason and (spec is None or not spec.origin):
        reason = (
            "the CUDA extension was not built (this install has no resfuse/_C*.so: it was "
            "installed without nvcc or a CUDA build of torch, or with "
            "RESFUSE_SKIP_CUDA_BUILD=1; reinstall with RESFUSE_FORCE_CUDA_BUILD=1 to see why)"
        )
    elif not reason and torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    if not reason:
        try:
            torch.ops.load_library(spec.origin)
            _state["fwd"] = torch.ops.resfuse.cuda_add_norm_fwd.default
            _state["bwd"] = torch.ops.resfuse.cuda_add_norm_bwd.default
            _state["supported"] = torch.ops.resfuse.cuda_device_supported.default
            _state["layout"] = torch.ops.resfuse.cuda_row_layout.default
            _state["limits"] = torch.ops.resfuse.cuda_launch_limits.default
            _register_fakes()
        except Exception as e:  # noqa: BLE001 - e.g. built for another CUDA major version
            info = build_info()
            built = f" (built for torch {info['torch']}, CUDA {info['cuda']})" if info else ""
            reason = (
                f"the CUDA extension {os.path.basename(spec.origin)}{built} failed to load: {e}"
            )
    _state["reason"] = reason
    return reason


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
        archs = build_info().get("arch_list", "?")
        return (
            f"the CUDA extension has no kernels for cuda:{index} (sm_{major}{minor}); it was "
            f"built for TORCH_CUDA_ARCH_LIST={archs!r}: rebuild with {major}.{minor} in it"
        )
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


def _register_fakes():
    # the CUDA schema takes the spec's flat form (csrc/ops.cpp): the fakes read it back
    @torch.library.register_fake("resfuse::cuda_add_norm_fwd")
    def _fwd_fake(
        x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias, *flat
    ):
        return forward_outputs(AddNormSpec.from_flat(*flat), x, x.shape, x.shape[:1])

    @torch.library.register_fake("resfuse::cuda_add_norm_bwd")
    def _bwd_fake(dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x, *flat):
        spec = AddNormSpec.from_flat(*flat)
        like = h if spec.output_norm else dh
        return backward_outputs(spec, like, like.shape)

    @torch.library.register_fake("resfuse::cuda_device_supported")
    def _supported_fake(device):
        return True


def _ops():
    reason = _load()
    if reason:
        raise RuntimeError(f"resfuse's cuda backend is unavailable: {reason}")
    return _state


def forward(spec: AddNormSpec, ops: Operands) -> Forward:
    """(y, h, mean, mean_x), None where absent, for 2-D (rows, D) operands with unit column
    stride; the LayerNorm row means of h and (with the branch norm) of x are the backward's
    shifts."""
    y, h, mean, mean_x = _ops()["fwd"](*ops, *spec.flat())
    present = forward_present(spec)
    return _new(
        Forward,
        (
            y if present[0] else None,
            h if present[1] else None,
            mean if present[2] else None,
            mean_x if present[3] else None,
        ),
    )


def backward(spec: AddNormSpec, inputs: BackwardInputs) -> Grads:
    """(dx, dresidual, dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias): the
    parameter gradients as fp32 sums over rows, None where absent."""
    return Grads(*absent_to_none(_ops()["bwd"](*inputs, *spec.flat()), backward_present(spec)))
