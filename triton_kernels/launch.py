"""Launch heuristics and launchers for the Triton add+norm kernels.

Inputs arrive as 2-D ``(n_rows, D)`` tensors whose last dimension is contiguous (any row
stride); ``rowscale`` as a contiguous fp32 vector of ``n_rows``. The launchers allocate the
outputs and never write into an input.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .add_norm_kernels import add_norm_bwd_kernel, add_norm_fwd_kernel

# Largest row each kernel keeps whole in registers. Beyond it the kernels stream column
# chunks of CHUNK_D in two passes over BLOCK_M rows (the second pass hits L2). The backward
# holds more live tiles per element (xhat, g and the dweight/dbias accumulators) than the
# forward (h), so its limit is lower: ptxas spills from D = 16K at 16 warps. These limits
# are spill-free for sm_80 and sm_90 (tests/triton_kernels/test_compile.py checks).
MAX_FUSED_D_FWD = 16384
MAX_FUSED_D_BWD = 8192
CHUNK_D = 2048
# Rows per chunked tile: the backward's partial-buffer read-modify-writes are divided by
# this; 2 keeps its fp32 all-features variant spill-free on sm_80 at 16 warps.
CHUNK_ROWS_FWD = 4
CHUNK_ROWS_BWD = 2
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


def _config(D: int, max_fused: int, per_thread: int, chunk_rows: int) -> LaunchConfig:
    block_d = triton.next_power_of_2(D)
    if block_d > max_fused:
        return LaunchConfig(chunk_rows, CHUNK_D, _warps(chunk_rows * CHUNK_D, per_thread), False)
    block_m = min(MAX_BLOCK_M, max(1, MIN_TILE_ELEMENTS // block_d)) if D <= 256 else 1
    return LaunchConfig(block_m, block_d, _warps(block_m * block_d, per_thread), True)


@functools.lru_cache(maxsize=None)
def fwd_config(D: int) -> LaunchConfig:
    return _config(D, MAX_FUSED_D_FWD, per_thread=16, chunk_rows=CHUNK_ROWS_FWD)


@functools.lru_cache(maxsize=None)
def bwd_config(D: int) -> LaunchConfig:
    return _config(D, MAX_FUSED_D_BWD, per_thread=8, chunk_rows=CHUNK_ROWS_BWD)


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


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forward(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    branch_scale: Optional[torch.Tensor],
    rowscale: Optional[torch.Tensor],
    *,
    eps: float,
    residual_scale: float,
    branch_scale_value: float,
    is_rms: bool,
    zero_centered_weight: bool,
    store_h: bool,
    residual_dtype: torch.dtype,
    out_dtype: torch.dtype,
):
    n_rows, D = x.shape
    dev = x.device
    y = torch.empty((n_rows, D), dtype=out_dtype, device=dev)
    h = torch.empty((n_rows, D), dtype=residual_dtype, device=dev) if store_h else None
    mean = None if is_rms else torch.empty((n_rows,), dtype=torch.float32, device=dev)
    if n_rows == 0:
        return y, h, mean
    cfg = fwd_config(D)
    with _on_device(dev):
        add_norm_fwd_kernel[(triton.cdiv(n_rows, cfg.block_m),)](
            x, residual if residual is not None else x,
            weight if weight is not None else x, bias if bias is not None else x,
            branch_scale if branch_scale is not None else x,
            rowscale if rowscale is not None else x,
            y, h if h is not None else y, mean if mean is not None else y,
            n_rows, D, x.stride(0), residual.stride(0) if residual is not None else 0,
            y.stride(0), h.stride(0) if h is not None else 0,
            eps, residual_scale, branch_scale_value,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_BRANCH_SCALE=branch_scale is not None,
            HAS_ROWSCALE=rowscale is not None, ZERO_CENTERED=zero_centered_weight,
            STORE_H=store_h, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
            SINGLE_PASS=cfg.single_pass, num_warps=cfg.num_warps,
        )
    return y, h, mean


def backward(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    h: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    branch_scale: Optional[torch.Tensor],
    rowscale: Optional[torch.Tensor],
    mean: Optional[torch.Tensor],
    *,
    eps: float,
    residual_scale: float,
    branch_scale_value: float,
    is_rms: bool,
    zero_centered_weight: bool,
    has_bias: bool,
    store_dresidual: bool,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype,
):
    """Returns (dx, dresidual or None, dweight_fp32 or None, dbias_fp32 or None,
    dbranch_scale_fp32 or None); the parameter gradients are fp32 sums over rows."""
    n_rows, D = h.shape
    dev = h.device
    dx = torch.empty((n_rows, D), dtype=x_dtype, device=dev)
    dr = torch.empty((n_rows, D), dtype=residual_dtype, device=dev) if store_dresidual else None
    cfg = bwd_config(D)
    programs = bwd_programs(n_rows, dev, cfg)
    rows_per_program = triton.cdiv(triton.cdiv(max(n_rows, 1), programs), cfg.block_m) * cfg.block_m

    def partial(needed: bool):
        return torch.empty((programs, D), dtype=torch.float32, device=dev) if needed else None

    dw_part = partial(weight is not None)
    db_part = partial(has_bias)
    dbs_part = partial(branch_scale is not None)
    dummy = dx
    with _on_device(dev):
        add_norm_bwd_kernel[(programs,)](
            dy, dh if dh is not None else dy, h, x if x is not None else h,
            weight if weight is not None else dummy,
            branch_scale if branch_scale is not None else dummy,
            rowscale if rowscale is not None else dummy,
            mean if mean is not None else dummy,
            dx, dr if dr is not None else dx,
            dw_part if dw_part is not None else dummy,
            db_part if db_part is not None else dummy,
            dbs_part if dbs_part is not None else dummy,
            n_rows, D, rows_per_program,
            dy.stride(0), dh.stride(0) if dh is not None else 0, h.stride(0),
            x.stride(0) if x is not None else 0, dx.stride(0), dr.stride(0) if dr is not None else 0,
            eps, residual_scale, branch_scale_value,
            IS_RMS=is_rms, HAS_DH=dh is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias, HAS_BRANCH_SCALE=branch_scale is not None,
            HAS_ROWSCALE=rowscale is not None, ZERO_CENTERED=zero_centered_weight,
            STORE_DR=store_dresidual, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
            SINGLE_PASS=cfg.single_pass, num_warps=cfg.num_warps,
        )

    # Second step of the deterministic reduction: a fixed-order sum over the programs' rows.
    def reduce(part):
        return part.sum(0) if part is not None else None

    return dx, dr, reduce(dw_part), reduce(db_part), reduce(dbs_part)
