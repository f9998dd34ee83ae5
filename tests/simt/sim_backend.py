"""The CUDA kernels of csrc/ run on CPU tensors through the SIMT emulator (simt.h).

``SimBackend`` has the ``forward`` / ``backward`` interface of ``resfuse.cuda_ext`` (and of
triton_kernels/launch.py), so the CPU tests run the kernels' own source, launch heuristics
and dtype dispatch through the whole autograd layer. Every output is allocated inside a
guard band of sentinel values that must survive the call: a write past any output fails.

``plan_forward`` / ``plan_backward`` run the same launch heuristics for a GPU the caller
describes and return what would be launched (kernel symbol, grid, block, cluster, shared
memory, parameter bytes) without running anything: the CUDA half of the static kernel model
(tools/kernel_model.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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


# where a tensor's data is: its own pointer, or (planning) an address the caller makes up
Address = Callable[[torch.Tensor], int]


def _data_ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _operand(t: Optional[torch.Tensor], address: Address = _data_ptr) -> SimTensor:
    if t is None:
        return SimTensor(None, 0, 0)
    assert t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] == 1), "rows with unit column stride"
    return SimTensor(address(t), t.stride(0), DTYPE_CODES[t.dtype])


def _param(t: Optional[torch.Tensor], address: Address = _data_ptr) -> SimTensor:
    if t is None:
        return SimTensor(None, 0, 0)
    assert t.dim() == 1 and (t.stride(0) == 1 or t.numel() == 1)
    return SimTensor(address(t), 0, DTYPE_CODES[t.dtype])


def _ptr(t: Optional[torch.Tensor], address: Address = _data_ptr):
    return None if t is None else ctypes.c_void_p(address(t))


def _forward_tensors(ops: Operands, y, h, address: Address = _data_ptr):
    """The harness's tensor list of a forward (csrc/ops.cpp's order)."""
    return (SimTensor * 9)(
        _operand(ops.x, address),
        _operand(ops.residual, address),
        _operand(y, address),
        _operand(h, address),
        _param(ops.weight, address),
        _param(ops.bias, address),
        _param(ops.branch_scale, address),
        _param(ops.branch_weight, address),
        _param(ops.branch_bias, address),
    )


def _backward_tensors(
    spec: AddNormSpec, inputs: BackwardInputs, dx, dr, address: Address = _data_ptr
):
    return (SimTensor * 9)(
        _operand(inputs.dy, address),
        _operand(inputs.dh, address),
        _operand(inputs.h, address),
        _operand(inputs.x, address),
        _operand(dx, address),
        _operand(dr, address),
        _param(inputs.weight if spec.output_norm else None, address),
        _param(inputs.branch_scale, address),
        _param(inputs.branch_weight, address),
    )


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
        tensors = _forward_tensors(ops, y, h)
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
        tensors = _backward_tensors(spec, inputs, dx, dr)
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


# --------------------------------------------------------------------------- launch plans


class _PlannedLaunch(ctypes.Structure):
    _fields_ = [  # sim_harness.cpp's PlannedLaunch
        ("kernel", ctypes.c_char * 256),
        ("grid", ctypes.c_int64 * 3),
        ("block", ctypes.c_int32 * 3),
        ("cluster_blocks", ctypes.c_int32),
        ("smem_bytes", ctypes.c_int64),
        ("param_bytes", ctypes.c_int32),
        ("params", ctypes.c_uint8 * 1024),
        ("threads_per_row", ctypes.c_int32),
        ("rows_per_block", ctypes.c_int32),
        ("single_tile", ctypes.c_int32),
    ]


_BLOCKS_PER_SM = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32, ctypes.c_int64)
_CLUSTERS_RESIDENT = ctypes.CFUNCTYPE(
    ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32
)
_MAX_LAUNCHES = 4


@dataclass(frozen=True)
class PlannedLaunch:
    """A launch as csrc/add_norm_launch.h would issue it on a GPU: the kernel's symbol (the
    instantiation nvcc names the same), grid and block (x, y, z), blocks per cluster, dynamic
    shared memory, the parameter struct's bytes, and (the add+norm kernels) the row layout
    in them: threads per row, rows per block, whether the row is held in registers."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    cluster_blocks: int
    smem_bytes: int
    params: bytes
    threads_per_row: int = 0
    rows_per_block: int = 0
    single_tile: bool = False


@dataclass(frozen=True)
class PlannedGpu:
    """The GPU a plan is for: its SMs, its largest cluster (1: none), and the answers of its
    runtime's occupancy queries for a kernel (symbol, block threads, dynamic shared bytes):
    ``blocks_per_sm(...)`` and ``clusters_resident(..., cluster_blocks)``."""

    sms: int
    max_cluster: int
    blocks_per_sm: Callable[[str, int, int], int]
    clusters_resident: Callable[[str, int, int, int], int]


def _callbacks(gpu: PlannedGpu, errors: list):
    """The GPU's answers as C callbacks. An exception cannot cross back into C: it is kept in
    ``errors`` (the caller raises it after the call) and the answer is 0."""

    def blocks(kernel, threads, smem):
        try:
            return int(gpu.blocks_per_sm(kernel.decode(), threads, smem))
        except Exception as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)
            return 0

    def clusters(kernel, threads, smem, cluster):
        try:
            return int(gpu.clusters_resident(kernel.decode(), threads, smem, cluster))
        except Exception as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)
            return 0

    return _BLOCKS_PER_SM(blocks), _CLUSTERS_RESIDENT(clusters)


def _launches(records, count: int) -> list[PlannedLaunch]:
    out = []
    for r in records[:count]:
        out.append(
            PlannedLaunch(
                r.kernel.decode(),
                tuple(r.grid),
                tuple(r.block),
                r.cluster_blocks,
                r.smem_bytes,
                bytes(r.params[: r.param_bytes]),
                r.threads_per_row,
                r.rows_per_block,
                bool(r.single_tile),
            )
        )
    return out


def plan_forward(
    lib_path: Path,
    spec: AddNormSpec,
    ops: Operands,
    outputs: Forward,
    address: Address,
    gpu: PlannedGpu,
) -> list[PlannedLaunch]:
    """What the CUDA forward launches for ``ops`` (tensors of any device, meta included: only
    their shapes, strides and dtypes are read; ``address`` gives each one's data address)
    and the forward's ``outputs`` (None where absent)."""
    lib = ctypes.CDLL(str(lib_path))
    lib.resfuse_sim_last_error.restype = ctypes.c_char_p
    records = (_PlannedLaunch * _MAX_LAUNCHES)()
    count = ctypes.c_int32(0)
    errors: list = []
    blocks, clusters = _callbacks(gpu, errors)
    n_rows, D = ops.x.shape
    rc = lib.resfuse_sim_plan_forward(
        _forward_tensors(ops, outputs.y, outputs.h, address),
        _ptr(ops.rowscale, address),
        _ptr(outputs.mean, address),
        _ptr(outputs.mean_x, address),
        ctypes.c_int64(n_rows),
        ctypes.c_int32(D),
        ctypes.c_float(spec.eps),
        ctypes.c_float(spec.residual_scale),
        ctypes.c_float(spec.branch_scale),
        ctypes.c_uint32(spec.flags),
        ctypes.c_int32(gpu.sms),
        ctypes.c_int32(gpu.max_cluster),
        blocks,
        clusters,
        records,
        ctypes.c_int32(_MAX_LAUNCHES),
        ctypes.byref(count),
    )
    if errors:
        raise errors[0]
    if rc:
        raise RuntimeError(f"plan_forward: {lib.resfuse_sim_last_error().decode()}")
    return _launches(records, count.value)


def plan_backward(
    lib_path: Path,
    spec: AddNormSpec,
    inputs: BackwardInputs,
    dx: torch.Tensor,
    dr: Optional[torch.Tensor],
    grads: list[Optional[torch.Tensor]],
    part_addresses: list[Optional[int]],
    address: Address,
    gpu: PlannedGpu,
) -> tuple[list[PlannedLaunch], int]:
    """What the CUDA backward launches (its kernel, then the reduction of the partial sums)
    and its persistent grid's size: ``grads`` the five parameter gradients (None where not
    wanted), ``part_addresses`` where their (programs, D) partial buffers would be."""
    lib = ctypes.CDLL(str(lib_path))
    lib.resfuse_sim_last_error.restype = ctypes.c_char_p
    records = (_PlannedLaunch * _MAX_LAUNCHES)()
    count, programs = ctypes.c_int32(0), ctypes.c_int32(0)
    errors: list = []
    blocks, clusters = _callbacks(gpu, errors)
    n_rows, D = dx.shape
    rc = lib.resfuse_sim_plan_backward(
        _backward_tensors(spec, inputs, dx, dr, address),
        _ptr(inputs.rowscale, address),
        _ptr(inputs.mean, address),
        _ptr(inputs.mean_x, address),
        (ctypes.c_void_p * 5)(*(_ptr(g, address) for g in grads)),
        (ctypes.c_void_p * 5)(*part_addresses),
        ctypes.c_int64(n_rows),
        ctypes.c_int32(D),
        ctypes.c_float(spec.eps),
        ctypes.c_float(spec.residual_scale),
        ctypes.c_float(spec.branch_scale),
        ctypes.c_uint32(spec.flags),
        ctypes.c_int32(gpu.sms),
        ctypes.c_int32(gpu.max_cluster),
        blocks,
        clusters,
        records,
        ctypes.c_int32(_MAX_LAUNCHES),
        ctypes.byref(count),
        ctypes.byref(programs),
    )
    if errors:
        raise errors[0]
    if rc:
        raise RuntimeError(f"plan_backward: {lib.resfuse_sim_last_error().decode()}")
    return _launches(records, count.value), programs.value
