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
    return _config(D, MAX_FUSED_D_FWD, per_thread=16,
                   chunk=CHUNK_FWD_BRANCH_NORM if branch_norm else CHUNK_FWD)


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
    branch_norm: bool = False,
    branch_weight: Optional[torch.Tensor] = None,
    branch_bias: Optional[torch.Tensor] = None,
    output_norm: bool = True,
):
    """Returns (y or None, h or None, mean or None, mean_x or None): the LayerNorm row means
    of h and (with the branch norm) of x are the backward's shifts. Without ``output_norm``
    there is no y (``h = r + norm(x)``)."""
    if branch_norm and (branch_scale is not None or rowscale is not None):
        raise NotImplementedError("the branch norm does not combine with branch_scale tensors or rowscale")
    n_rows, D = x.shape
    dev = x.device
    y = torch.empty((n_rows, D), dtype=out_dtype, device=dev) if output_norm else None
    h = torch.empty((n_rows, D), dtype=residual_dtype, device=dev) if store_h else None

    def row_vector(needed: bool):
        return torch.empty((n_rows,), dtype=torch.float32, device=dev) if needed else None

    mean = row_vector(not is_rms and output_norm)
    mean_x = row_vector(not is_rms and branch_norm)
    if n_rows == 0:
        return y, h, mean, mean_x
    cfg = fwd_config(D, branch_norm)
    with _on_device(dev):
        add_norm_fwd_kernel[(triton.cdiv(n_rows, cfg.block_m),)](
            x, _or(residual, x), _or(weight, x), _or(bias, x), _or(branch_scale, x),
            _or(rowscale, x), _or(branch_weight, x), _or(branch_bias, x),
            _or(y, x), _or(h, x), _or(mean, x), _or(mean_x, x),
            n_rows, D, x.stride(0), _stride(residual), _stride(y), _stride(h),
            eps, residual_scale, branch_scale_value,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_BRANCH_SCALE=branch_scale is not None,
            HAS_ROWSCALE=rowscale is not None, ZERO_CENTERED=zero_centered_weight,
            STORE_H=store_h, BRANCH_NORM=branch_norm,
            HAS_BRANCH_WEIGHT=branch_weight is not None, HAS_BRANCH_BIAS=branch_bias is not None,
            OUTPUT_NORM=output_norm, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, SINGLE_PASS=cfg.single_pass,
            num_warps=cfg.num_warps,
        )
    return y, h, mean, mean_x


def backward(
    dy: Optional[torch.Tensor],
    dh: Optional[torch.Tensor],
    h: Optional[torch.Tensor],
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
    branch_norm: bool = False,
    branch_weight: Optional[torch.Tensor] = None,
    has_branch_bias: bool = False,
    mean_x: Optional[torch.Tensor] = None,
    output_norm: bool = True,
):
    """Returns (dx, dresidual or None, dweight, dbias, dbranch_scale, dbranch_weight,
    dbranch_bias): the parameter gradients as fp32 sums over rows, None where absent."""
    n_rows, D = (h if h is not None else dh).shape
    dev = (h if h is not None else dh).device
    dx = torch.empty((n_rows, D), dtype=x_dtype, device=dev)
    dr = torch.empty((n_rows, D), dtype=residual_dtype, device=dev) if store_dresidual else None
    cfg = bwd_config(D, reads_x=branch_norm or branch_scale is not None)
    programs = bwd_programs(n_rows, dev, cfg)
    rows_per_program = triton.cdiv(triton.cdiv(max(n_rows, 1), programs), cfg.block_m) * cfg.block_m

    def partial(needed: bool):
        return torch.empty((programs, D), dtype=torch.float32, device=dev) if needed else None

    parts = [partial(weight is not None), partial(has_bias), partial(branch_scale is not None),
             partial(branch_weight is not None), partial(has_branch_bias)]
    some = dh if dy is None else dy
    with _on_device(dev):
        add_norm_bwd_kernel[(programs,)](
            _or(dy, some), _or(dh, some), _or(h, some), _or(x, some), _or(weight, dx), _or(branch_scale, dx),
            _or(rowscale, dx), _or(branch_weight, dx), _or(mean, dx), _or(mean_x, dx),
            dx, _or(dr, dx), *(_or(p, dx) for p in parts),
            n_rows, D, rows_per_program,
            _stride(dy), _stride(dh), _stride(h), _stride(x), dx.stride(0), _stride(dr),
            eps, residual_scale, branch_scale_value,
            IS_RMS=is_rms, HAS_DH=dh is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias, HAS_BRANCH_SCALE=branch_scale is not None,
            HAS_ROWSCALE=rowscale is not None, ZERO_CENTERED=zero_centered_weight,
            STORE_DR=store_dresidual, BRANCH_NORM=branch_norm,
            HAS_BRANCH_WEIGHT=branch_weight is not None, HAS_BRANCH_BIAS=has_branch_bias,
            OUTPUT_NORM=output_norm, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, SINGLE_PASS=cfg.single_pass,
            num_warps=cfg.num_warps,
        )
    # Second step of the deterministic reduction: a fixed-order sum over the programs' rows.
    return (dx, dr, *(p.sum(0) if p is not None else None for p in parts))
