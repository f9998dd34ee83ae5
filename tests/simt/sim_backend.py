"""The CUDA kernels of csrc/ run on CPU tensors through the SIMT emulator (simt.h).

``SimBackend`` has the ``forward`` / ``backward`` interface of ``resfuse.cuda_ext`` (and of
triton_kernels/launch.py), so the CPU tests run the kernels' own source, launch heuristics
and dtype dispatch through the whole autograd layer. Every output is allocated inside a
guard band of sentinel values that must survive the call: a write past any output fails.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from resfuse.cuda_ext import LIMIT_NAMES
from resfuse.spec import (
    AddNormSpec,
    BackwardInputs,
    Forward,
    Grads,
    Operands,
    backward_present,
    forward_present,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
# no _FORTIFY_SOURCE: its longjmp check rejects the emulator's jumps between fiber stacks
FLAGS = [
    "-std=c++20",
    "-O1",
    "-fPIC",
    "-shared",
    "-U_FORTIFY_SOURCE",
    "-DRESFUSE_SIMT",
    f"-I{ROOT / 'csrc'}",
    f"-I{HERE}",
    f"-I{CUDA_HOME / 'include'}",
]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GUARD = 64  # sentinel elements before and after every output
SENTINEL = 1234.5  # exactly representable in every dtype


def sources() -> list[Path]:
    return sorted(
        [
            HERE / "sim_harness.cpp",
            HERE / "simt.h",
            *ROOT.glob("csrc/*.h"),
            *ROOT.glob("csrc/*.cuh"),
        ]
    )


def unavailable_reason() -> str:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) to build the emulator"
    if not (CUDA_HOME / "include" / "cuda_bf16.h").exists():
        return f"no CUDA headers under {CUDA_HOME} (set CUDA_HOME)"
    return ""


def build(out_dir: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the harness (cached by a hash of the sources and flags)."""
    flags = FLAGS + list(extra_flags)
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.read_bytes())
    digest.update(" ".join(flags).encode())
    lib = out_dir / f"resfuse_simt_{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [os.environ.get("CXX", "g++"), *flags, str(HERE / "sim_harness.cpp"), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building the emulator failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}"
            )
        os.replace(tmp, lib)
    return lib


class SimTensor(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("row_stride", ctypes.c_int64), ("dtype", ctypes.c_int32)]


def _operand(t: Optional[torch.Tensor]) -> SimTensor:
    if t is None:
        return SimTensor(None, 0, 0)
    assert t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] == 1), "rows with unit column stride"
    return SimTensor(t.data_ptr(), t.stride(0), DTYPE_CODES[t.dtype])


def _param(t: Optional[torch.Tensor]) -> SimTensor:
    if t is None:
        return SimTensor(None, 0, 0)
    assert t.dim() == 1 and (t.stride(0) == 1 or t.numel() == 1)
    return SimTensor(t.data_ptr(), 0, DTYPE_CODES[t.dtype])


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class _Guarded:
    """Outputs carved out of buffers with sentinel guard bands on both sides."""

    def __init__(self):
        self.buffers = []

    def empty(self, shape, dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype)
        self.buffers.append((buf, n))
        return buf[GUARD : GUARD + n].view(shape)

    def check(self, what: str):
        for buf, n in self.buffers:
            guards = torch.cat([buf[:GUARD], buf[GUARD + n :]])
            assert torch.all(guards == SENTINEL), f"{what} wrote outside an output"


class SimBackend:
    """``forward`` / ``backward`` of resfuse.cuda_ext on CPU tensors. ``max_threads_*``
    lower the threads per block (forcing the cluster or streamed paths for small D; default:
    the kernels' own maxima); ``sms`` and ``per_sm`` set the backward's persistent grid
    (programs = min(row groups, sms * per_sm), or that many blocks' worth of clusters);
    ``max_cluster`` is the largest thread-block cluster the emulated GPU launches (default the
    kernels' maximum, like sm_90; 1: none, like sm_80). ``limits``: the kernels' launch limits,
    read from the compiled headers."""

    def __init__(
        self,
        lib_path: Path,
        *,
        max_threads_fwd: Optional[int] = None,
        max_threads_bwd: Optional[int] = None,
        sms: int = 3,
        per_sm: int = 2,
        max_cluster: Optional[int] = None,
    ):
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.resfuse_sim_last_error.restype = ctypes.c_char_p
        out = (ctypes.c_int64 * len(LIMIT_NAMES))()
        self.lib.resfuse_sim_limits(out, len(LIMIT_NAMES))
        # the kernels' own numbers (csrc/add_norm_params.h), as cuda_ext.launch_limits() has them
        self.limits = dict(zip(LIMIT_NAMES, out))
        self.max_threads_fwd = max_threads_fwd or self.limits["fwd_max_threads"]
        self.max_threads_bwd = max_threads_bwd or self.limits["bwd_max_threads"]
        self.sms = sms
        self.per_sm = per_sm
        self.max_cluster = max_cluster or self.limits["max_cluster_blocks"]
        self.last = {}  # layout of the last call, for the tests

    def configured(self, **kw) -> "SimBackend":
        other = object.__new__(SimBackend)
        other.__dict__.update(self.__dict__)
        other.__dict__.update(kw)
        other.last = {}
        return other

    def _fail(self, what: str):
        raise RuntimeError(f"{what}: {self.lib.resfuse_sim_last_error().decode()}")

    def forward(self, spec: AddNormSpec, ops: Operands) -> Forward:
        if spec.branch_norm and (ops.branch_scale is not None or ops.rowscale is not None):
            raise NotImplementedError(
                "the branch norm does not combine with branch_scale tensors or rowscale"
            )
        n_rows, D = ops.x.shape
        out = _Guarded()
        shapes = ((n_rows, D), (n_rows, D), (n_rows,), (n_rows,))
        dtypes = (spec.out_dtype, spec.h_dtype, torch.float32, torch.float32)
        y, h, mean, mean_x = (
            out.empty(s, d) if present else None
            for present, s, d in zip(forward_present(spec), shapes, dtypes)
        )
        tensors = (SimTensor * 9)(
            _operand(ops.x),
            _operand(ops.residual),
            _operand(y),
            _operand(h),
            _param(ops.weight),
            _param(ops.bias),
            _param(ops.branch_scale),
            _param(ops.branch_weight),
            _param(ops.branch_bias),
        )
        threads, blocks = ctypes.c_int32(0), ctypes.c_int32(0)
        rc = self.lib.resfuse_sim_forward(
            tensors,
            _ptr(ops.rowscale),
            _ptr(mean),
            _ptr(mean_x),
            ctypes.c_int64(n_rows),
            ctypes.c_int32(D),
            ctypes.c_float(spec.eps),
            ctypes.c_float(spec.residual_scale),
            ctypes.c_float(spec.branch_scale),
            ctypes.c_uint32(spec.flags),
            ctypes.c_int32(self.max_threads_fwd),
            ctypes.c_int32(self.sms),
            ctypes.c_int32(self.per_sm),
            ctypes.c_int32(self.max_cluster),
            ctypes.byref(threads),
            ctypes.byref(blocks),
        )
        if rc:
            self._fail("forward")
        out.check("forward")
        self.last["fwd_threads_per_row"] = threads.value
        self.last["fwd_cluster_blocks"] = blocks.value
        return Forward(y, h, mean, mean_x)

    def backward(self, spec: AddNormSpec, inputs: BackwardInputs) -> Grads:
        n_rows, D = (inputs.h if spec.output_norm else inputs.dh).shape
        out = _Guarded()
        present = backward_present(spec)
        dx = out.empty((n_rows, D), spec.x_dtype)
        dr = out.empty((n_rows, D), spec.residual_dtype) if present[1] else None
        grads = [out.empty((D,), torch.float32) if p else None for p in present[2:]]
        tensors = (SimTensor * 9)(
            _operand(inputs.dy),
            _operand(inputs.dh),
            _operand(inputs.h),
            _operand(inputs.x),
            _operand(dx),
            _operand(dr),
            _param(inputs.weight if spec.output_norm else None),
            _param(inputs.branch_scale),
            _param(inputs.branch_weight),
        )
        programs, blocks = ctypes.c_int32(0), ctypes.c_int32(0)
        rc = self.lib.resfuse_sim_backward(
            tensors,
            _ptr(inputs.rowscale),
            _ptr(inputs.mean),
            _ptr(inputs.mean_x),
            (ctypes.c_void_p * 5)(*map(_ptr, grads)),
            ctypes.c_int64(n_rows),
            ctypes.c_int32(D),
            ctypes.c_float(spec.eps),
            ctypes.c_float(spec.residual_scale),
            ctypes.c_float(spec.branch_scale),
            ctypes.c_uint32(spec.flags),
            ctypes.c_int32(self.max_threads_bwd),
            ctypes.c_int32(self.sms),
            ctypes.c_int32(self.per_sm),
            ctypes.c_int32(self.max_cluster),
            ctypes.byref(programs),
            ctypes.byref(blocks),
        )
        if rc:
            self._fail("backward")
        out.check("backward")
        self.last["bwd_programs"] = programs.value
        self.last["bwd_cluster_blocks"] = blocks.value
        return Grads(dx, dr, *grads)
