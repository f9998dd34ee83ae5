"""Launch heuristics and launchers for the Triton add+norm kernels.

Inputs arrive as 2-D ``(n_rows, D)`` tensors whose last dimension is contiguous (any row
stride); ``rowscale`` as a contiguous fp32 vector of ``n_rows``. The launchers allocate the
outputs and never write into an input.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton

from resfuse.spec import AddNormSpec, BackwardInputs, Forward, Grads, Operands, backward_present

from .add_norm_kernels import add_norm_bwd_kernel, add_norm_fwd_kernel

# Largest row each kernel keeps whole in registers (rows, BLOCK_M at a time, read once).
# The backward holds more live tiles per element (xhat, g and the dweight/dbias accumulators)
# than the forward (h), so its limit is lower: ptxas spills from D = 16K at 16 warps. The
# variants that also read x in the backward (a LayerScale tensor or the branch norm: x's tile
# and more accumulators) spill from 8K. These limits are spill-free for sm_80 and sm_90 in
# fp32/fp16/bf16 (tests/triton_kernels/test_triton_compile.py checks). An fp32 row of 32K is
# already half an SM's register file, so longer rows cannot stay in one program's registers.
MAX_FUSED_D_FWD = 16384
# the sandwich layout's forward holds x's tile through the branch norm as well: ptxas
# spilled 4 bytes at 16K (LayerNorm, 128 registers at 16 warps)
MAX_FUSED_D_FWD_BRANCH_NORM = 8192
MAX_FUSED_D_BWD = 8192
MAX_FUSED_D_BWD_READS_X = 4096
# Longer rows are streamed in column chunks, two passes per row (statistics, then outputs),
# by a persistent grid that keeps the second pass in L2 (rereads_fit_l2). Chunks are (rows,
# columns, warps): one row, so that the data open between the passes is as small as it can
# be; 16 fp32 elements per thread per live tile (16 warps x 32 threads x 16 = 8192 columns)
# keep enough 128-bit loads in flight per SM with one or two programs per SM.
CHUNK_FWD = (1, 8192, 16)
CHUNK_FWD_BRANCH_NORM = (1, 4096, 8)
# The backward of the plain add + norm (no x read back) up to this length streams its rows
# in N chunks whose parameter-gradient sums stay in registers across rows, one accumulator
# per chunk and gradient (a static unroll): the row is read from DRAM once and no partial
# row is read back. 16K = 4 chunks of 4096 at 16 warps: 8 fp32 per thread per chunk, 32
# registers per gradient. Past it (and for the variants that read x) the backward adds each
# chunk's sums into this program's partial row (a read-modify-write per tile of CHUNK_BWD
# rows, in L2 where the grid's working set fits: bwd_programs). Its registers per gradient
# would be 64 at 32K (16 warps): LayerNorm's two gradients alone fill the 128 a thread has.
MAX_REGISTER_SUMS_D_BWD = 16384
REGISTER_SUMS_CHUNKS = 4
REGISTER_SUMS_WARPS = 16
# One row of 8192 columns at 16 warps: 16 elements per thread, so that one program per SM
# (which is what L2 allows at 32K) still has 32 KiB of h and dy in flight (2 x 1024 at 4
# warps had 8 KiB at one per SM); 98-127 registers, spill-free in every variant.
CHUNK_BWD = (1, 8192, 16)
# The variants that read x as well (three row tensors per chunk): ptxas held some sandwich
# variants to 64 registers and spilled 4-24 bytes with 1 x 8192 at 16 warps, 1 x 4096 at 16
# or 8 and 1 x 2048 at 4; 2 x 2048 at 8 warps compiles all 208 of them spill-free.
CHUNK_BWD_READS_X = (2, 2048, 8)
# The backward's rows in registers keep the norms' weights in registers for the whole
# program up to this block size (D <= 2048 at 8 fp32 per thread). Measured with ptxas
# (sm_90, bf16/fp32, the plain and the heaviest specs): multi-row tiles need fewer registers
# so (the weight is not rebuilt per tile: 163 -> 128 at D = 256), at 1K-2K it costs at
# most one of 3-10 programs per SM, and at 4K (16 warps) it halves LayerNorm's occupancy.
WEIGHTS_RESIDENT_MAX_WARPS = 8
# Rows per program for small D: make each program's tile at least this many elements, so a
# 64-wide q/k-norm row does not occupy a whole program (launch and reduction overhead).
MIN_TILE_ELEMENTS = 2048
MAX_BLOCK_M = 64
# The share of L2 the data open between the two passes of the resident programs may take:
# those lines are loaded with evict_last and the stores stream with evict_first, the rest
# is margin for the other traffic and for the uneven hashing of lines over L2's slices.
L2_BUDGET = 0.75


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_d: int
    num_warps: int
    single_pass: bool
    # streamed backward only: the number of column chunks whose parameter-gradient sums
    # stay in registers (0: they go to the partial rows tile by tile)
    register_chunks: int = 0
    # backward rows in registers only: the norms' weights stay in registers for the whole
    # program (else reloaded per tile, from L1)
    weights_resident: bool = False


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
    if branch_norm:
        return _config(D, MAX_FUSED_D_FWD_BRANCH_NORM, per_thread=16, chunk=CHUNK_FWD_BRANCH_NORM)
    return _config(D, MAX_FUSED_D_FWD, per_thread=16, chunk=CHUNK_FWD)


def register_sums_fit(spec: AddNormSpec, activation: torch.dtype) -> bool:
    """Whether the streamed backward of a call keeps its parameter-gradient sums in registers
    spill-free (ptxas, sm_80 and sm_90, 16 warps, 4 chunks of 4096): the add + norm whose
    backward reads no x, in bf16 (``activation``: the dtype of every activation tensor;
    with fp16 or fp32 tiles ptxas spilled 8-270 bytes at 128 registers). The others add
    each tile's sums into the program's partial row."""
    return spec.output_norm and not spec.reads_x_in_backward and activation == torch.bfloat16


def _activation_dtype(spec: AddNormSpec) -> Optional[torch.dtype]:
    """The one dtype of every activation of a call, or None when they differ."""
    dtypes = {spec.x_dtype, spec.residual_dtype, spec.h_dtype, spec.out_dtype}
    return dtypes.pop() if len(dtypes) == 1 else None


@functools.lru_cache(maxsize=None)
def bwd_config(D: int, reads_x: bool = False, register_sums: bool = False) -> LaunchConfig:
    """``reads_x``: the variant reads x in the backward (LayerScale tensor or branch norm);
    ``register_sums``: its streamed rows may keep the gradient sums in registers
    (register_sums_fit)."""
    limit = MAX_FUSED_D_BWD_READS_X if reads_x else MAX_FUSED_D_BWD
    block_d = triton.next_power_of_2(D)
    if block_d > limit and register_sums and block_d <= MAX_REGISTER_SUMS_D_BWD:
        return LaunchConfig(
            1,
            block_d // REGISTER_SUMS_CHUNKS,
            REGISTER_SUMS_WARPS,
            single_pass=False,
            register_chunks=REGISTER_SUMS_CHUNKS,
        )
    cfg = _config(D, limit, per_thread=8, chunk=CHUNK_BWD_READS_X if reads_x else CHUNK_BWD)
    if cfg.single_pass and cfg.num_warps <= WEIGHTS_RESIDENT_MAX_WARPS:
        cfg = dataclasses.replace(cfg, weights_resident=True)
    return cfg


@dataclass(frozen=True)
class Gpu:
    """What the launch heuristics need to know of a GPU (``gpu_of`` reads it from the device;
    ``GPUS`` holds the data sheets the static kernel model uses without one)."""

    name: str
    sms: int
    l2_bytes: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_programs_per_sm: int = 32
    smem_per_sm: int = 233472  # what the blocks of an SM may use together (sm_90: 228 KiB)
    smem_reserved_per_program: int = 1024  # the driver's reservation per block (sm_80+)
    dram_bytes_per_s: float = 0.0  # peak, for the model's estimates only


# The static kernel model's machines (tools/kernel_model.py); a real device is read by gpu_of.
GPUS = {
    "H100": Gpu("H100 SXM", 132, 50 * 2**20, dram_bytes_per_s=3.35e12),
    "H200": Gpu("H200 SXM", 132, 50 * 2**20, dram_bytes_per_s=4.8e12),
    "B200": Gpu("B200", 148, 126 * 2**20, smem_per_sm=232448, dram_bytes_per_s=8.0e12),
}


@functools.lru_cache(maxsize=None)
def gpu_of(device_index: int) -> Gpu:
    p = torch.cuda.get_device_properties(device_index)
    return Gpu(
        p.name,
        p.multi_processor_count,
        getattr(p, "L2_cache_size", 0) or 40 * 2**20,
        getattr(p, "regs_per_multiprocessor", 65536),
        getattr(p, "max_threads_per_multi_processor", 2048) // 32,
        32,
        getattr(p, "shared_memory_per_multiprocessor", 233472),
    )


def programs_per_sm(gpu: Gpu, num_warps: int, registers: int, shared: int) -> int:
    """How many programs of a compiled kernel (its registers per thread and shared memory
    per program, as ptxas / the loaded binary report them) are resident on one SM at once."""
    # registers are allocated per warp in units of 256
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = gpu.regs_per_sm // (regs_per_warp * num_warps)
    by_warps = gpu.max_warps_per_sm // num_warps
    smem = -(-(shared + gpu.smem_reserved_per_program) // 128) * 128
    by_shared = gpu.smem_per_sm // smem
    return max(0, min(by_registers, by_warps, by_shared, gpu.max_programs_per_sm))


def rereads_fit_l2(
    gpu: Gpu, resident_programs: int, cfg: LaunchConfig, D: int, reread_bytes_per_element: int
) -> bool:
    """Whether a streamed pass that re-reads its tile finds it in L2: the tiles all resident
    programs hold open between their two passes (``cfg.block_m`` rows of ``D``, the re-read
    tensors' bytes per element together) fit in ``L2_BUDGET`` of the L2."""
    open_bytes = resident_programs * cfg.block_m * D * reread_bytes_per_element
    return open_bytes <= L2_BUDGET * gpu.l2_bytes


def _persistent_programs(
    tiles: int, cfg: LaunchConfig, gpu: Gpu, registers: int, shared: int, D: int, reread: int
) -> int:
    # As many programs as are resident at once (the compiled kernel's occupancy), whole
    # waves of SMs; fewer where their open tiles would not fit in L2, but never fewer than
    # one per SM (an idle SM costs more than a share of the rows read twice).
    per_sm = max(1, programs_per_sm(gpu, cfg.num_warps, registers, shared))
    while per_sm > 1 and not rereads_fit_l2(gpu, gpu.sms * per_sm, cfg, D, reread):
        per_sm -= 1
    return max(1, min(tiles, gpu.sms * per_sm))


def fwd_programs(
    n_rows: int,
    cfg: LaunchConfig,
    gpu: Gpu,
    registers: int,
    shared: int,
    D: int = 0,
    reread_bytes_per_element: int = 4,
) -> int:
    """The forward's grid: a program per tile of rows held in registers; for streamed rows a
    persistent grid (see _persistent_programs). ``reread_bytes_per_element``: the bytes of x
    and residual together, which the second pass reads again."""
    tiles = triton.cdiv(max(n_rows, 1), cfg.block_m)
    if cfg.single_pass:
        return tiles
    return _persistent_programs(tiles, cfg, gpu, registers, shared, D, reread_bytes_per_element)


def bwd_programs(
    n_rows: int,
    cfg: LaunchConfig,
    gpu: Gpu,
    registers: int,
    shared: int,
    D: int = 0,
    reread_bytes_per_element: int = 4,
    partial_gradients: int = 0,
) -> int:
    """The backward's persistent grid: every program holds its parameter-gradient sums, so
    there are as many programs as are resident at once (the compiled kernel's occupancy), and
    for streamed rows as few as keep the re-read tiles (h and dy: ``reread_bytes_per_element``
    together) in L2, and, where the sums go to the partial rows tile by tile, those rows
    too (``partial_gradients`` fp32 rows of D per program)."""
    tiles = triton.cdiv(max(n_rows, 1), cfg.block_m)
    if not cfg.single_pass and not cfg.register_chunks:
        # per tile row: the program's partial rows count once per tile of block_m rows
        reread_bytes_per_element += -(-4 * partial_gradients // cfg.block_m)
    return _persistent_programs(tiles, cfg, gpu, registers, shared, D, reread_bytes_per_element)


# programs of a kernel the interpreter runs (one after another: a few are enough to cover the
# persistent loops)
INTERPRETER_PROGRAMS = 4
_RESOURCES: dict = {}


def _compiled_resources(kernel, key: tuple, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(registers per thread, shared bytes) of the binary a launch will run, compiled ahead
    of the launch (the grid depends on them); cached per specialisation. If this Triton
    cannot say, the grid assumes one resident program per SM: (255 registers, 0)."""
    res = _RESOURCES.get(key)
    if res is None:
        try:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            compiled._init_handles()
            res = (int(compiled.n_regs), int(compiled.metadata.shared))
        except Exception:  # pragma: no cover - a Triton without these internals
            res = (255, 0)
        _RESOURCES[key] = res
    return res


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


def _fp32_placeholder(device: torch.device) -> torch.Tensor:
    """An fp32 pointer for compiling a kernel ahead of its launch (the partial buffers are
    sized by the grid, which the compiled kernel decides)."""
    return torch.empty(1, dtype=torch.float32, device=device)


# (kernel, args, kwargs) -> (the GPU, registers per thread, shared bytes per program) of the
# binary a launch will run; None: the interpreter
Sizing = Callable[[object, tuple, dict], tuple[Gpu, int, int]]


def device_sizing(device: torch.device) -> Optional[Sizing]:
    """The sizing of launches on ``device``: its own data and the binary compiled ahead of
    the launch (the static kernel model passes its own, for a GPU on paper)."""
    if device.type != "cuda":
        return None
    gpu = gpu_of(device.index)

    def sizing(kernel, args: tuple, kwargs: dict) -> tuple[Gpu, int, int]:
        # what decides the binary: the constexprs, the pointers' dtypes, the JIT's
        # 16-divisibility specialisation of the integers
        key = (
            kernel.fn.__name__ if hasattr(kernel, "fn") else repr(kernel),
            tuple(sorted(kwargs.items())),
            tuple(
                a.dtype if isinstance(a, torch.Tensor) else (a % 16 == 0, a == 1)
                for a in args
                if not isinstance(a, float)
            ),
        )
        return (gpu, *_compiled_resources(kernel, key, args, kwargs))

    return sizing


def _programs(
    grid_rule, kernel, sizing: Optional[Sizing], n_rows, D, cfg, args, kwargs, reread, *extra
) -> int:
    """The grid of a launch by ``grid_rule`` (fwd_programs / bwd_programs), from the
    resources of the binary it will run (a program per tile needs none of that)."""
    tiles = triton.cdiv(max(n_rows, 1), cfg.block_m)
    if cfg.single_pass and grid_rule is fwd_programs:
        return tiles
    if sizing is None:
        return max(1, min(tiles, INTERPRETER_PROGRAMS))
    gpu, registers, shared = sizing(kernel, args, kwargs)
    return grid_rule(n_rows, cfg, gpu, registers, shared, D, reread, *extra)


@dataclass(frozen=True)
class KernelLaunch:
    """One launch as the launcher issues it: what the static kernel model reads
    (triton_kernels/aot.py plan_launch) and what forward / backward run."""

    kernel: object  # the @triton.jit function
    programs: int
    args: tuple
    kwargs: dict  # constexprs and num_warps
    cfg: LaunchConfig
    reread_bytes_per_element: int  # what a second pass over a row reads again

    def run(self, device: torch.device) -> None:
        with _on_device(device):
            self.kernel[(self.programs,)](*self.args, **self.kwargs)


def forward(spec: AddNormSpec, ops: Operands) -> Forward:
    """(y, h, mean, mean_x), None where absent: the LayerNorm row means of h and (with the
    branch norm) of x are the backward's shifts."""
    plan, outputs = plan_forward(spec, ops, device_sizing(ops.x.device))
    if plan is not None:
        plan.run(ops.x.device)
    return outputs


def plan_forward(
    spec: AddNormSpec, ops: Operands, sizing: Optional[Sizing]
) -> tuple[Optional[KernelLaunch], Forward]:
    """The forward's launch (None for no rows) and its outputs, allocated, not yet written."""
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
    outputs = tuple.__new__(Forward, (y, h, mean, mean_x))  # a NamedTuple, no binding
    if n_rows == 0:
        return None, outputs
    cfg = fwd_config(D, spec.branch_norm)
    args = (
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
    )
    kwargs = dict(
        FLAGS=spec.flags,
        BLOCK_M=cfg.block_m,
        BLOCK_D=cfg.block_d,
        SINGLE_PASS=cfg.single_pass,
        num_warps=cfg.num_warps,
    )
    reread = x.element_size() + (ops.residual.element_size() if ops.residual is not None else 0)
    programs = _programs(
        fwd_programs, add_norm_fwd_kernel, sizing, n_rows, D, cfg, args, kwargs, reread
    )
    return KernelLaunch(add_norm_fwd_kernel, programs, args, kwargs, cfg, reread), outputs


def backward(spec: AddNormSpec, inputs: BackwardInputs) -> Grads:
    """(dx, dresidual or None, dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias):
    the parameter gradients as fp32 sums over rows, None where absent."""
    some = inputs.h if inputs.h is not None else inputs.dh
    plan, (dx, dr, parts) = plan_backward(spec, inputs, device_sizing(some.device))
    plan.run(some.device)
    # Second step of the deterministic reduction: a fixed-order sum over the programs' rows.
    return Grads(dx, dr, *(p.sum(0) if p is not None else None for p in parts))


def plan_backward(
    spec: AddNormSpec, inputs: BackwardInputs, sizing: Optional[Sizing]
) -> tuple[KernelLaunch, tuple]:
    """The backward's launch and its outputs (dx, dresidual or None, the partial-sum buffers
    of the parameter gradients: weight, bias, branch_scale, branch_weight, branch_bias, None
    where absent), allocated, not yet written."""
    dy, dh, h, x = inputs.dy, inputs.dh, inputs.h, inputs.x
    n_rows, D = (h if h is not None else dh).shape
    dev = (h if h is not None else dh).device
    dx = torch.empty((n_rows, D), dtype=spec.x_dtype, device=dev)
    store_dr = spec.dresidual == "kernel"
    dr = torch.empty((n_rows, D), dtype=spec.residual_dtype, device=dev) if store_dr else None
    cfg = bwd_config(
        D,
        reads_x=spec.reads_x_in_backward,
        register_sums=register_sums_fit(spec, _activation_dtype(spec)),
    )
    some = dh if dy is None else dy
    present = backward_present(spec)[2:]  # weight, bias, branch_scale, branch_weight, branch_bias

    def arguments(programs: int, parts: list) -> tuple:
        rows_per_program = cfg.block_m * triton.cdiv(
            triton.cdiv(max(n_rows, 1), programs), cfg.block_m
        )
        return (
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
        )

    kwargs = dict(
        FLAGS=spec.flags,
        HAS_DH=dh is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_D=cfg.block_d,
        SINGLE_PASS=cfg.single_pass,
        REGISTER_CHUNKS=cfg.register_chunks,
        WEIGHTS_RESIDENT=cfg.weights_resident,
        num_warps=cfg.num_warps,
    )
    # the second pass re-reads h and dy (and x where the variant reads it)
    reread = sum(t.element_size() for t in (h, dy) if t is not None)
    if spec.reads_x_in_backward and x is not None:
        reread += x.element_size()
    programs = _programs(
        bwd_programs,
        add_norm_bwd_kernel,
        sizing,
        n_rows,
        D,
        cfg,
        arguments(1, [_fp32_placeholder(dev) if p else None for p in present]),
        kwargs,
        reread,
        sum(present),
    )
    # the partial sums of each parameter gradient: one row per program
    parts = [
        torch.empty((programs, D), dtype=torch.float32, device=dev) if p else None for p in present
    ]
    plan = KernelLaunch(
        add_norm_bwd_kernel, programs, arguments(programs, parts), kwargs, cfg, reread
    )
    return plan, (dx, dr, parts)
