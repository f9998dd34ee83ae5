"""Launch heuristics and launchers for the Triton add+norm kernels.

Inputs arrive as 2-D ``(n_rows, D)`` tensors whose last dimension is contiguous (any row
stride); ``rowscale`` as a contiguous fp32 vector of ``n_rows``. The launchers allocate the
outputs and never write into an input.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from resfuse.spec import AddNormSpec, BackwardInputs, Forward, Grads, Operands, backward_present

from .add_norm_kernels import add_norm_bwd_kernel, add_norm_fwd_kernel

# Largest row each kernel keeps whole in registers. Beyond it the kernels stream column
# chunks of CHUNK_D in two passes over BLOCK_M rows (the second pass hits L2). The backward
# holds more live tiles per element (xhat, g and the dweight/dbias accumulators) than the
# forward (h), so its limit is lower: ptxas spills from D = 16K at 16 warps. The variants
# that also read x in the backward (a LayerScale tensor or the branch norm: x's tile and
# more accumulators) spill from 8K. These limits are spill-free for sm_80 and sm_90 in
# fp32/fp16/bf16 (tests/triton_kernels/test_triton_compile.py checks).
MAX_FUSED_D_FWD = 16384
MAX_FUSED_D_BWD = 8192
MAX_FUSED_D_BWD_READS_X = 4096
# Chunked tiles (rows, columns, warps). Several rows per tile divide the backward's
# partial-buffer read-modify-writes by that many; 8 fp32 elements per thread per live tile
# keep every backward variant spill-free (ptxas spilled a few bytes with 2 x 2048 at 8 or
# 16 warps), the forward holds fewer tiles and takes 16 (2 rows with the branch norm).
CHUNK_FWD = (4, 2048, 8)
CHUNK_FWD_BRANCH_NORM = (2, 2048, 8)
CHUNK_BWD = (2, 1024, 4)
# Rows per program for small D: make each program's tile at least this many elements, so a
# 64-wide q/k-norm row does not occupy a whole program (launch and reduction overhead).
MIN_TILE_ELEMENTS = 2048
MAX_BLOCK_M = 64


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_d: int
    num_warps: int
    single_pass: bool


def _warps(elements: int, per_thread: int) -> int:
    # About `per_thread` fp32 elements per thread per live tile: enough independent 128-bit
    # loads in flight per thread to cover DRAM latency, few enough live registers to stay
    # spill-free. Capped at 16 warps so that more than one program fits on an SM.
    n = max(1, min(16, elements // (32 * per_thread)))
    return 1 << (n.bit_length() - 1)  # a power of two, as Triton needs


def _config(D: int, max_fused: int, per_thread: int, chunk: tuple[int, int, int]) -> LaunchConfig:
    block_d = triton.next_power_of_2(D)
    if block_d > max_fused:
        return LaunchConfig(*chunk, single_pass=False)
    block_m = min(MAX_BLOCK_M, max(1, MIN_TILE_ELEMENTS // block_d)) if D <= 256 else 1
    return LaunchConfig(block_m, block_d, _warps(block_m * block_d, per_thread), True)


@functools.lru_cache(maxsize=None)
def fwd_config(D: int, branch_norm: bool = False) -> LaunchConfig:
    return _config(
        D, MAX_FUSED_D_FWD, per_thread=16, chunk=CHUNK_FWD_BRANCH_NORM if branch_norm else CHUNK_FWD
    )


@functools.lru_cache(maxsize=None)
def bwd_config(D: int, reads_x: bool = False) -> LaunchConfig:
    """``reads_x``: the variant reads x in the backward (LayerScale tensor or branch norm)."""
    limit = MAX_FUSED_D_BWD_READS_X if reads_x else MAX_FUSED_D_BWD
    return _config(D, limit, per_thread=8, chunk=CHUNK_BWD)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bwd_programs(n_rows: int, device: torch.device, cfg: LaunchConfig) -> int:
    """Persistent grid size: enough programs to fill every SM with ~32 resident warps."""
    tiles = triton.cdiv(max(n_rows, 1), cfg.block_m)
    if device.type == "cuda":
        per_sm = max(1, 32 // cfg.num_warps)
        return max(1, min(tiles, _sm_count(device.index) * per_sm))
    return max(1, min(tiles, 4))  # interpreter: programs run one after another anyway


class _on_device:
    """Launch under the input's device (Triton launches on the *current* device)."""

    __slots__ = ("index", "prev")

    def __init__(self, device: torch.device):
        self.index = device.index if device.type == "cuda" else None
        self.prev = None

    def __enter__(self):
        if self.index is not None:
            current = torch.cuda.current_device()
            if current != self.index:
                self.prev = current
                torch.cuda.set_device(self.index)

    def __exit__(self, *exc):
        if self.prev is not None:
            torch.cuda.set_device(self.prev)


def _or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """Pointer argument for an optional tensor (the kernel never reads a disabled one)."""
    return t if t is not None else dummy


def _stride(t: Optional[torch.Tensor]) -> int:
    return t.stride(0) if t is not None else 0


def forward(spec: AddNormSpec, ops: Operands) -> Forward:
    """(y, h, mean, mean_x), None where absent: the LayerNorm row means of h and (with the
    branch norm) of x are the backward's shifts."""
    if spec.branch_norm and (ops.branch_scale is not None or ops.rowscale is not None):
        raise NotImplementedError(
            "the branch norm does not combine with branch_scale tensors or rowscale"
        )
    x = ops.x
    n_rows, D = x.shape
    dev = x.device
    y = torch.empty((n_rows, D), dtype=spec.out_dtype, device=dev) if spec.output_norm else None
    h = torch.empty((n_rows, D), dtype=spec.h_dtype, device=dev) if spec.store_h else None

    def row_vector(needed: bool):
        return torch.empty((n_rows,), dtype=torch.float32, device=dev) if needed else None

    layer = spec.norm == "layer"
    mean = row_vector(layer and spec.output_norm)
    mean_x = row_vector(layer and spec.branch_norm)
    if n_rows == 0:
        return Forward(y, h, mean, mean_x)
    cfg = fwd_config(D, spec.branch_norm)
    with _on_device(dev):
        add_norm_fwd_kernel[(triton.cdiv(n_rows, cfg.block_m),)](
            x,
            _or(ops.residual, x),
            _or(ops.weight, x),
            _or(ops.bias, x),
            _or(ops.branch_scale, x),
            _or(ops.rowscale, x),
            _or(ops.branch_weight, x),
            _or(ops.branch_bias, x),
            _or(y, x),
            _or(h, x),
            _or(mean, x),
            _or(mean_x, x),
            n_rows,
            D,
            x.stride(0),
            _stride(ops.residual),
            _stride(y),
            _stride(h),
            spec.eps,
            spec.residual_scale,
            spec.branch_scale,
            FLAGS=spec.flags,
            BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d,
            SINGLE_PASS=cfg.single_pass,
            num_warps=cfg.num_warps,
        )
    return tuple.__new__(Forward, (y, h, mean, mean_x))  # a NamedTuple without argument binding


def backward(spec: AddNormSpec, inputs: BackwardInputs) -> Grads:
    """(dx, dresidual or None, dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias):
    the parameter gradients as fp32 sums over rows, None where absent."""
    dy, dh, h, x = inputs.dy, inputs.dh, inputs.h, inputs.x
    n_rows, D = (h if h is not None else dh).shape
    dev = (h if h is not None else dh).device
    dx = torch.empty((n_rows, D), dtype=spec.x_dtype, device=dev)
    store_dr = spec.dresidual == "kernel"
    dr = torch.empty((n_rows, D), dtype=spec.residual_dtype, device=dev) if store_dr else None
    cfg = bwd_config(D, reads_x=spec.reads_x_in_backward)
    programs = bwd_programs(n_rows, dev, cfg)
    rows_per_program = triton.cdiv(triton.cdiv(max(n_rows, 1), programs), cfg.block_m) * cfg.block_m

    def partial(needed: bool):
        return torch.empty((programs, D), dtype=torch.float32, device=dev) if needed else None

    # the gradients of weight, bias, branch_scale, branch_weight, branch_bias
    parts = [partial(p) for p in backward_present(spec)[2:]]
    some = dh if dy is None else dy
    with _on_device(dev):
        add_norm_bwd_kernel[(programs,)](
            _or(dy, some),
            _or(dh, some),
            _or(h, some),
            _or(x, some),
            _or(inputs.weight, dx),
            _or(inputs.branch_scale, dx),
            _or(inputs.rowscale, dx),
            _or(inputs.branch_weight, dx),
            _or(inputs.mean, dx),
            _or(inputs.mean_x, dx),
            dx,
            _or(dr, dx),
            *(_or(p, dx) for p in parts),
            n_rows,
            D,
            rows_per_program,
            _stride(dy),
            _stride(dh),
            _stride(h),
            _stride(x),
            dx.stride(0),
            _stride(dr),
            spec.eps,
            spec.residual_scale,
            spec.branch_scale,
            FLAGS=spec.flags,
            HAS_DH=dh is not None,
            BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d,
            SINGLE_PASS=cfg.single_pass,
            num_warps=cfg.num_warps,
        )
    # Second step of the deterministic reduction: a fixed-order sum over the programs' rows.
    return Grads(dx, dr, *(p.sum(0) if p is not None else None for p in parts))
