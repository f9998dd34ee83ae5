"""The static kernel model: what resfuse's compiled kernels will do on a GPU, without one.

    python -m tools.kernel_model [--gpu H100 H200 B200] [--D 1024 ...] [--dtype bf16]
        [--backend triton cuda] [--direction fwd bwd] [--spec add_rms_norm add_layer_norm]
        [--rows N] [--markdown | --json] [--check]
        [--compare benchmarks/results/<gpu>/results.json] [--results <a run's results.json>]

A MODEL, not a measurement. For every kernel x direction x D x dtype, at the launch
configuration resfuse itself picks (both backends), it compiles the kernel for the GPU's
architecture and reads:

* registers, spill bytes and shared memory (ptxas -v), hence resident warps per SM
  (``launch.programs_per_sm``: the register file, warp slots and shared memory);
* the launch: Triton's from ``launch.forward`` / ``launch.backward`` themselves (the
  arguments, constexprs and grid they make, the grid sized from this binary's resources:
  triton_kernels/aot.py's ``plan_launch``); CUDA's from csrc/add_norm_launch.h itself (run
  by the CPU emulator's planner, tests/simt, with the GPU's occupancy answered from the
  compiled binary's registers and shared memory): the instantiation, grid, block, cluster;
* what one thread does: the kernel's PTX is *run* for thread 0 of program 0 with the launch's
  parameter values (tools/ptx.py): every global access it makes, with its width and the
  tensor its address falls in, the reductions (shuffles) in between;
* the SASS (nvdisasm): the binary's global accesses by width, its local-memory accesses.

From those it derives, per launch: loads per element of each tensor (1 = each element read
once; 2 = re-read, a second pass), bytes in flight per SM (resident threads x the bytes of
(rows, D) operands each thread has requested when it reaches its first row reduction),
programs against SMs at the representative size (rows = 2**25 // D: waves, utilisation, idle
SMs), and DRAM bytes per element: one read of each input and one write of each output, plus
every re-read that does not find its data in L2 (``launch.rereads_fit_l2``, the launcher's own
rule, decides), the fp32 partial sums of the backward and their reduction, against the
minimal traffic of benchmarks/traffic.py (``minimal_bytes``).

``DESIGN`` says what each backend promises; ``problems`` checks a row against it (the tests,
tests/tools/test_kernel_model.py, fail on any): no local memory (spills), every access of
row data 128-bit, one DRAM read per input up to the promised D, at least
``MIN_BYTES_IN_FLIGHT`` per SM, no idle SMs (see ``grid_use``). ``compare`` sets the predictions against a GPU run's results
(benchmarks/report.py's format, written by ``make bench`` / tools/gpu_campaign.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file, too
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import traffic  # noqa: E402
from resfuse.spec import (  # noqa: E402
    AddNormSpec,
    BackwardInputs,
    Forward,
    Operands,
    backward_present,
)
from tools import ptx, sass  # noqa: E402

REPRESENTATIVE_ELEMENTS = 2**25  # rows = 2**25 // D: 64 MiB of bf16 per tensor
DEFAULT_DS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
BACKENDS = ("triton", "cuda")
DIRECTIONS = ("fwd", "bwd")
GPU_ARCH = {"H100": 90, "H200": 90, "B200": 100}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# The calls the table models: the two plain pre-norm adds the "done when" is about,
# then triton_kernels/aot.py's spill-test specs (every feature on, the sandwich, OLMo2's).
MODEL_SPECS = {
    "add_rms_norm": AddNormSpec(norm="rms"),
    "add_layer_norm": AddNormSpec(norm="layer", has_bias=True),
}
PLAIN_SPECS = ("add_rms_norm", "add_layer_norm")


@dataclass(frozen=True)
class Promise:
    """What a backend's design promises for a direction: every element of every input read
    from DRAM once up to ``one_dram_read_up_to`` (D), row data moved in 128-bit accesses."""

    one_dram_read_up_to: int
    vectorised: bool = True
    # lengths where the design accepts a grid short of the SMs (see problems(): only while
    # the SMs that do run keep the whole GPU's bytes in flight), and why
    idle_sms_accepted_at: tuple = ()
    idle_sms_reason: str = ""


# The design, per (backend, direction). The CUDA kernels hold rows up to 64K in registers
# (clusters on sm_90+); the Triton forward streams long rows through an L2-sized persistent
# grid, its backward holds the parameter-gradient sums in registers up to 16K.
DESIGN = {
    ("cuda", "fwd"): Promise(65536),
    # a 64K backward row needs 8 blocks' registers (512 threads x 123 registers: one block
    # per SM), so clusters of 8: 132 SMs hold 16 of them, 4 SMs stay idle. The alternative,
    # the streamed path, reads h and dy twice.
    ("cuda", "bwd"): Promise(
        65536,
        idle_sms_accepted_at=(65536,),
        idle_sms_reason="clusters of 8 blocks at one block per SM: SMs % 8 stay idle",
    ),
    ("triton", "fwd"): Promise(65536),
    ("triton", "bwd"): Promise(16384),
}
# Little's law on an H100: ~3.35 TB/s x ~600-800 ns of DRAM latency / 132 SMs = 15-20 KiB
# must be requested per SM at any time to keep DRAM busy.
MIN_BYTES_IN_FLIGHT = 16 * 1024
# A grid leaves SMs idle when it has fewer programs than SMs, or when its waves (or, for a
# persistent grid, its programs' shares of the rows) leave more than this share of the SM
# slot-time empty: see grid_use.
MIN_GRID_UTILISATION = 0.9
# compare(): a measured time within this factor of the predicted DRAM time agrees
MODEL_TOLERANCE = 1.5

# Each tensor's role, by the names of resfuse.spec (the CUDA plans) and of the Triton
# kernels' arguments: (rows, D) row data, (D,) parameters, (rows,) per-row values, the
# backward's (programs, D) fp32 partial sums.
_TRITON_NAMES = {
    "X": "x",
    "R": "residual",
    "W": "weight",
    "B": "bias",
    "BS": "branch_scale",
    "RS": "rowscale",
    "WB": "branch_weight",
    "BB": "branch_bias",
    "Y": "y",
    "H": "h",
    "MEAN": "mean",
    "MEAN_X": "mean_x",
    "DY": "dy",
    "DH": "dh",
    "DX": "dx",
    "DR": "dresidual",
    "DW_PART": "dweight_part",
    "DB_PART": "dbias_part",
    "DBS_PART": "dbranch_scale_part",
    "DWB_PART": "dbranch_weight_part",
    "DBB_PART": "dbranch_bias_part",
}
_ROW = {"x", "residual", "y", "h", "dy", "dh", "dx", "dresidual"}
_PARAM = {"weight", "bias", "branch_scale", "branch_weight", "branch_bias"}
_PER_ROW = {"rowscale", "mean", "mean_x"}
_SHORT = {"residual": "r", "dresidual": "dr", "weight": "w", "bias": "b"}


def role_of(name: str) -> str:
    if name in _ROW:
        return "row"
    if name in _PARAM:
        return "param"
    if name in _PER_ROW:
        return "per_row"
    if name.endswith("_part"):
        return "partial"
    return "other"


# --------------------------------------------------------------------------- the result


@dataclass
class TensorTraffic:
    """One tensor of a launch, as the traced thread uses it."""

    name: str
    role: str  # row | param | per_row | partial
    elements: int
    element_bytes: int
    loads_per_element: float  # how often the thread loads each element it loads (1: once)
    stores_per_element: float
    first_access: str  # "load" | "store"
    widths: dict  # access bytes -> count, in the trace
    dram_bytes: float = 0.0  # predicted


@dataclass
class ModelRow:
    """The model of one launch (see the module's docstring for how each field is read)."""

    backend: str
    direction: str
    spec: str
    D: int
    dtype: str
    gpu: str
    rows: int
    kernel: str = ""
    symbol: str = ""  # the kernel's symbol in the binary (mangled for CUDA)
    config: str = ""
    path: str = ""  # registers | streamed | cluster xN (CUDA), single pass | streamed (Triton)
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    static_shared: int = 0
    dynamic_shared: int = 0
    block_threads: int = 0
    cluster_blocks: int = 1
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    grid_blocks: int = 0
    sms: int = 0
    waves: float = 0.0
    utilisation: float = 0.0
    idle_sms: int = 0
    sass_widths: dict = field(default_factory=dict)  # "kind bits" -> count, whole binary
    sass_local_accesses: int = 0
    local_bytes: int = 0  # local memory per thread (cuobjdump): spills and stack arrays
    sass_matches_ptx: bool = True  # the SASS's global accesses have the PTX's widths
    path_widths: dict = field(default_factory=dict)  # "kind bits" -> count, row data, traced
    narrow_accesses: list = field(default_factory=list)
    thread_elements: int = 0  # elements of an input the traced thread loads (its share)
    bytes_before_reduction: int = 0  # per thread, (rows, D) operands
    prefetch_before_reduction: int = 0
    bytes_in_flight_per_sm: int = 0
    prefetch_in_flight_per_sm: int = 0
    tensors: list = field(default_factory=list)  # TensorTraffic
    rereads_fit_l2: Optional[bool] = None  # None: nothing is re-read
    dram_bytes_per_element: float = 0.0
    minimal_bytes_per_element: Optional[float] = None
    reduction_bytes_per_element: float = 0.0  # of the above: the partial sums' second step
    notes: list = field(default_factory=list)
    error: str = ""

    @property
    def key(self) -> tuple:
        return (self.backend, self.direction, self.spec, self.D, self.dtype, self.gpu)

    def tensor(self, name: str) -> Optional[TensorTraffic]:
        return next((t for t in self.tensors if t.name == name), None)

    def inputs(self) -> list[TensorTraffic]:
        """The row data the launch reads before writing: its inputs."""
        return [t for t in self.tensors if t.role == "row" and t.first_access == "load"]

    def dram_reads_per_element(self, t: TensorTraffic) -> float:
        return t.dram_bytes / (t.elements * t.element_bytes) if t.elements else 0.0


# --------------------------------------------------------------------------- the operands


def _meta(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def typed_spec(spec: AddNormSpec, dtype: torch.dtype) -> AddNormSpec:
    """The spec with every activation in ``dtype`` (the benchmarks' calls)."""
    return spec._replace(x_dtype=dtype, residual_dtype=dtype, h_dtype=dtype, out_dtype=dtype)


def forward_operands(spec: AddNormSpec, rows: int, D: int, dtype: torch.dtype) -> Operands:
    """Meta tensors of a forward call: activations and parameters in ``dtype`` (as models
    keep them and the benchmarks pass them), rowscale fp32."""

    def vec(present: bool):
        return _meta(D, dtype=dtype) if present else None

    return Operands(
        _meta(rows, D, dtype=dtype),
        _meta(rows, D, dtype=dtype) if spec.has_residual else None,
        vec(spec.has_weight),
        vec(spec.has_bias),
        vec(spec.has_branch_scale),
        _meta(rows, dtype=torch.float32) if spec.has_rowscale else None,
        vec(spec.branch_norm and spec.has_branch_weight),
        vec(spec.branch_norm and spec.has_branch_bias),
    )


def backward_inputs(spec: AddNormSpec, rows: int, D: int, dtype: torch.dtype) -> BackwardInputs:
    """Meta tensors of a backward call, h's upstream gradient present (a pre-norm layer's
    residual stream carries one), the means saved by the forward."""
    layer = spec.norm == "layer"

    def row(present: bool):
        return _meta(rows, D, dtype=dtype) if present else None

    def vec(present: bool):
        return _meta(D, dtype=dtype) if present else None

    return BackwardInputs(
        row(spec.output_norm),
        row(True),
        row(spec.output_norm),
        row(spec.reads_x_in_backward),
        vec(spec.output_norm and spec.has_weight),
        vec(spec.has_branch_scale),
        _meta(rows, dtype=torch.float32) if spec.has_rowscale else None,
        vec(spec.branch_norm and spec.has_branch_weight),
        _meta(rows, dtype=torch.float32) if layer and spec.output_norm else None,
        _meta(rows, dtype=torch.float32) if layer and spec.branch_norm else None,
    )


class _Addresses:
    """Made-up, distinct data addresses for the tensors of one launch, one trace region each
    (tools/ptx.py's tensor_base), and what each region holds."""

    def __init__(self):
        self.by_id: dict[int, int] = {}
        self.regions: list[tuple[str, torch.Tensor]] = []

    def add(self, name: str, t: torch.Tensor) -> int:
        if id(t) not in self.by_id:
            self.by_id[id(t)] = len(self.regions)
            self.regions.append((name, t))
        return ptx.tensor_base(self.by_id[id(t)])

    def __call__(self, t: torch.Tensor) -> int:
        if id(t) not in self.by_id:
            raise KeyError("a tensor without a name")
        return ptx.tensor_base(self.by_id[id(t)])


# --------------------------------------------------------------------------- launches


@dataclass
class PlannedKernel:
    """One launch of one compiled kernel, backend-neutral: what the trace and the model need."""

    kernel: ptx.Kernel
    cubin: bytes
    symbol: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_shared: int
    dynamic_shared: int
    grid_blocks: int
    block_threads: int
    cluster_blocks: int
    params: dict[str, bytes]  # the PTX parameters' bytes
    tensors: dict[int, tuple[str, torch.Tensor]]  # trace region -> (name, tensor)
    config: str
    path: str
    block_m: int  # rows a program holds between the passes (for the L2 rule)
    launch_config: object  # a launch.LaunchConfig for rereads_fit_l2
    notes: list = field(default_factory=list)
    label: str = ""  # the kernel as the table names it (default: its symbol, shortened)


@functools.lru_cache(maxsize=None)
def _parsed(ptx_text: str) -> dict[str, ptx.Kernel]:
    return ptx.parse_module(ptx_text)


def _parse(ptx_text: str, name: str) -> ptx.Kernel:
    kernels = _parsed(ptx_text)
    if name not in kernels:
        raise KeyError(f"no .entry {name} in the PTX")
    return kernels[name]


@functools.lru_cache(maxsize=None)
def _sass_of(cubin_digest: str, cubin: bytes) -> dict[str, list]:
    return sass.disassemble(cubin)


def sass_of(cubin: bytes) -> dict[str, list]:
    return _sass_of(hashlib.sha1(cubin).hexdigest(), cubin)


@functools.lru_cache(maxsize=None)
def _resources_of(cubin_digest: str, cubin: bytes) -> dict[str, dict]:
    return sass.resource_usage(cubin)


def _launch_module():
    from resfuse.triton_kernels import launch

    return launch


def gpu_data(gpu: str):
    """The data sheet of a model GPU (triton_kernels/launch.py's GPUS)."""
    return _launch_module().GPUS[gpu]


def _triton_plan(
    direction: str, spec: AddNormSpec, rows: int, D: int, dtype, gpu: str
) -> PlannedKernel:
    from resfuse.triton_kernels import aot

    tensors = (
        forward_operands(spec, rows, D, dtype)
        if direction == "fwd"
        else backward_inputs(spec, rows, D, dtype)
    )
    plan = aot.plan_launch(direction, spec, tensors, gpu_data(gpu), GPU_ARCH[gpu])
    c = plan.compiled
    kernel = _parse(c.ptx, c.name)
    values = []
    # each pointer argument its own region, named by the argument (the launcher passes one
    # tensor for several absent operands; the kernel never touches those)
    regions: dict[int, tuple[str, torch.Tensor]] = {}
    for arg in plan.ptx_arguments:
        v = plan.arguments[arg]
        if isinstance(v, torch.Tensor):
            slot = len(regions)
            regions[slot] = (_TRITON_NAMES.get(arg, arg.lower()), v)
            values.append(ptx.tensor_base(slot))
        elif isinstance(v, bool):
            values.append(int(v))
        else:
            values.append(v)
    values += [0] * (len(kernel.params) - len(values))  # Triton's scratch pointers
    cfg = plan.config
    notes = []
    if plan.sizing_registers != c.registers:
        notes.append(
            f"grid sized from a binary of {plan.sizing_registers} registers; the launch runs "
            f"one of {c.registers} (another specialisation of its integer arguments)"
        )
    if c.spill_stores or c.spill_loads:
        notes.append(f"spills {c.spill_stores}/{c.spill_loads} bytes")
    config = f"BLOCK_M={cfg.block_m} BLOCK_D={cfg.block_d} warps={plan.num_warps}" + (
        f" register_chunks={cfg.register_chunks}" if getattr(cfg, "register_chunks", 0) else ""
    )
    return PlannedKernel(
        kernel,
        c.cubin,
        c.name,
        c.registers,
        c.spill_stores,
        c.spill_loads,
        0,
        c.shared,
        plan.grid,
        plan.num_warps * 32,
        1,
        ptx.param_values(kernel, values),
        regions,
        config,
        "single pass" if cfg.single_pass else "streamed",
        cfg.block_m,
        cfg,
        notes,
        # the specialisation that is not in the config column: the call's flags
        f"{c.name}[FLAGS={plan.arguments.get('FLAGS')}"
        + (f", HAS_DH={plan.arguments['HAS_DH']}" if "HAS_DH" in plan.arguments else "")
        + "]",
    )


@functools.lru_cache(maxsize=None)
def _simulator() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from simt import sim_backend

    reason = sim_backend.unavailable_reason()
    if reason:
        raise RuntimeError(f"the CUDA launch plans need the CPU emulator's build: {reason}")
    return sim_backend.build(ROOT / "build" / "simt")


def _sim_backend():
    _simulator()
    from simt import sim_backend

    return sim_backend


@functools.lru_cache(maxsize=None)
def _cuda_compiled(symbol: str, arch: int):
    from tools import ptxas_report

    return ptxas_report.compile_instantiations([symbol], arch)


def _cuda_resources(symbol: str, arch: int):
    compiled = _cuda_compiled(symbol, arch)
    return compiled, compiled.resources[symbol]


def _planned_gpu(gpu: str, occupancy_known: bool):
    """The emulator planner's GPU: blocks per SM and resident clusters as the CUDA runtime
    would compute them from the compiled binary (registers, static + dynamic shared memory:
    launch.programs_per_sm, the same arithmetic as cudaOccupancyMaxActiveBlocksPerMultiprocessor).
    Resident clusters: the SMs' blocks divided into clusters, an upper bound of
    cudaOccupancyMaxActiveClusters, which also needs each cluster's blocks in one GPC (a
    layout the data sheet does not give). Before the kernels are known (occupancy_known
    False): one block per SM."""
    sb = _sim_backend()
    launch = _launch_module()
    g = gpu_data(gpu)
    arch = GPU_ARCH[gpu]
    limits = _cuda_limits()

    def blocks_per_sm(symbol: str, threads: int, smem: int) -> int:
        if not occupancy_known:
            return 1
        _, res = _cuda_resources(symbol, arch)
        warps = -(-threads // 32)
        return launch.programs_per_sm(g, warps, res.registers, res.shared_bytes + smem)

    def clusters_resident(symbol: str, threads: int, smem: int, cluster: int) -> int:
        return g.sms * blocks_per_sm(symbol, threads, smem) // cluster

    max_cluster = limits["max_cluster_blocks"] if arch >= 90 else 1
    return sb.PlannedGpu(g.sms, max_cluster, blocks_per_sm, clusters_resident)


@functools.lru_cache(maxsize=None)
def _cuda_limits() -> dict:
    sb = _sim_backend()
    return sb.SimBackend(_simulator()).limits


def _cuda_plan(
    direction: str, spec: AddNormSpec, rows: int, D: int, dtype, gpu: str
) -> PlannedKernel:
    sb = _sim_backend()
    launch = _launch_module()
    arch = GPU_ARCH[gpu]
    lib = _simulator()
    addresses = _Addresses()
    if direction == "fwd":
        ops = forward_operands(spec, rows, D, dtype)
        layer = spec.norm == "layer"
        outputs = Forward(
            _meta(rows, D, dtype=dtype) if spec.output_norm else None,
            _meta(rows, D, dtype=dtype) if spec.store_h else None,
            _meta(rows, dtype=torch.float32) if layer and spec.output_norm else None,
            _meta(rows, dtype=torch.float32) if layer and spec.branch_norm else None,
        )
        for name, t in list(ops._asdict().items()) + list(outputs._asdict().items()):
            if t is not None:
                addresses.add(name, t)

        def plan(occupancy_known: bool):
            launches = sb.plan_forward(
                lib, spec, ops, outputs, addresses, _planned_gpu(gpu, occupancy_known)
            )
            return launches, None

    else:
        inputs = backward_inputs(spec, rows, D, dtype)
        present = backward_present(spec)
        dx = _meta(rows, D, dtype=dtype)
        dr = _meta(rows, D, dtype=dtype) if present[1] else None
        grads = [_meta(D, dtype=torch.float32) if p else None for p in present[2:]]
        for name, t in inputs._asdict().items():
            if t is not None:
                addresses.add(name, t)
        addresses.add("dx", dx)
        if dr is not None:
            addresses.add("dresidual", dr)
        grad_names = ("dweight", "dbias", "dbranch_scale", "dbranch_weight", "dbranch_bias")
        for name, g in zip(grad_names, grads):
            if g is not None:
                addresses.add(name, g)
        part_slots = {}
        for name, g in zip(grad_names, grads):
            if g is not None:  # the partial buffers: their own regions, sized once planned
                part_slots[name] = len(addresses.regions)
                addresses.regions.append((name + "_part", None))
        parts = [ptx.tensor_base(part_slots[n]) if n in part_slots else None for n in grad_names]

        def plan(occupancy_known: bool):
            return sb.plan_backward(
                lib,
                spec,
                inputs,
                dx,
                dr,
                grads,
                parts,
                addresses,
                _planned_gpu(gpu, occupancy_known),
            )

    # the kernels first (the symbol does not depend on occupancy), then the real plan
    first, _ = plan(False)
    for planned in first:
        _cuda_compiled(planned.kernel, arch)
    launches, programs = plan(True)
    main, rest = launches[0], launches[1:]
    compiled, res = _cuda_resources(main.kernel, arch)
    kernel = _parse(compiled.ptx, main.kernel)
    if programs is not None:  # the partial buffers, now that their rows are known
        for i, (name, t) in enumerate(addresses.regions):
            if t is None:
                addresses.regions[i] = (name, _meta(programs, D, dtype=torch.float32))
    regions = dict(enumerate(addresses.regions))
    if direction == "bwd" and not rest:
        raise RuntimeError("the backward's plan has no reduction of its partial sums")
    if main.cluster_blocks > 1:
        path = f"cluster x{main.cluster_blocks}"
    else:
        path = "registers" if main.single_tile else "streamed"
    block_threads = main.block[0] * main.block[1] * main.block[2]
    config = (
        f"{block_threads} thr/block, {main.threads_per_row} thr/row, "
        f"{main.rows_per_block} rows/block"
        + (f", cluster {main.cluster_blocks}" if main.cluster_blocks > 1 else "")
    )
    notes = []
    arch_list = _extension_arch_list()
    if arch_list and f"{arch // 10}.{arch % 10}" not in arch_list.split(";"):
        notes.append(f"the extension is built for {arch_list}: no sm_{arch} code ships")
    cfg = launch.LaunchConfig(
        max(1, main.rows_per_block), D, max(1, block_threads // 32), single_pass=main.single_tile
    )
    return PlannedKernel(
        kernel,
        compiled.cubin,
        main.kernel,
        res.registers,
        res.spill_store_bytes,
        res.spill_load_bytes,
        res.shared_bytes,
        main.smem_bytes,
        main.grid[0] * main.grid[1] * main.grid[2],
        block_threads,
        main.cluster_blocks,
        {kernel.params[0].name: main.params},
        regions,
        config,
        path,
        max(1, main.rows_per_block),
        cfg,
        notes,
    )


def _extension_arch_list() -> str:
    try:
        from resfuse import cuda_ext

        return cuda_ext.build_info().get("arch_list", "")
    except Exception:  # noqa: BLE001 - no extension: nothing to say
        return ""


# --------------------------------------------------------------------------- the model


def grid_use(grid_blocks: int, sms: int, blocks_per_sm: int, work_share: float) -> tuple:
    """``(waves, utilisation, idle SMs)`` of a grid of ``grid_blocks`` blocks on ``sms`` SMs
    holding ``blocks_per_sm`` each, ``work_share`` the (largest) block's share of the rows
    times the blocks (1: every block has as much work).

    Definition: the SM slots of one wave are sms x blocks_per_sm. A grid of at most one wave
    is dealt to the SMs round-robin, so the busiest SM holds ceil(G / sms) blocks and the
    wave's balance is G / (sms x ceil(G / sms)); a longer grid runs ceil(G / slots) waves,
    balance G / (waves x slots) (the last wave's empty slots). Utilisation = balance /
    work_share: the share of the SM slot-time that holds work. Idle SMs: those without any
    block (G < sms). The grid "leaves SMs idle" when there are idle SMs or the utilisation
    is under MIN_GRID_UTILISATION."""
    slots = max(1, sms * blocks_per_sm)
    waves = grid_blocks / slots
    if grid_blocks <= 0:
        return 0.0, 0.0, sms
    if grid_blocks <= slots:
        balance = grid_blocks / (sms * math.ceil(grid_blocks / sms))
    else:
        balance = grid_blocks / (math.ceil(grid_blocks / slots) * slots)
    return waves, balance / max(work_share, 1.0), max(0, sms - grid_blocks)


def _rereads_fit(gpu, resident_programs: int, cfg, D: int, reread_bytes: float) -> bool:
    """launch.rereads_fit_l2 (the launcher's rule for its persistent grids)."""
    launch = _launch_module()
    rule = getattr(launch, "rereads_fit_l2", None)
    if rule is None:  # an older launcher: the same rule, its budget unknown (all of L2)
        return resident_programs * cfg.block_m * D * reread_bytes <= gpu.l2_bytes
    return rule(gpu, resident_programs, cfg, D, reread_bytes)


@functools.lru_cache(maxsize=None)
def model_row(
    backend: str,
    direction: str,
    spec_name: str,
    D: int,
    dtype: str = "bf16",
    gpu: str = "H100",
    rows: Optional[int] = None,
) -> ModelRow:
    """The model of one launch; errors (a compile failure, a trace that cannot continue) are
    in ``row.error``. Cached: the table and compare() share the rows they both need."""
    rows = rows if rows is not None else max(1, REPRESENTATIVE_ELEMENTS // D)
    row = ModelRow(backend, direction, spec_name, D, dtype, gpu, rows)
    try:
        _fill(row)
    except Exception as e:  # noqa: BLE001 - one row's failure is reported in the table
        row.error = f"{type(e).__name__}: {e}"
    return row


def _spec_of(name: str) -> AddNormSpec:
    if name in MODEL_SPECS:
        return MODEL_SPECS[name]
    from resfuse.triton_kernels import aot

    return aot.SPECS[name]


def _fill(row: ModelRow) -> None:
    launch = _launch_module()
    g = gpu_data(row.gpu)
    dtype = DTYPES[row.dtype]
    spec = typed_spec(_spec_of(row.spec), dtype)
    planner = _triton_plan if row.backend == "triton" else _cuda_plan
    k = planner(row.direction, spec, row.rows, row.D, dtype, row.gpu)
    row.kernel, row.symbol = k.label or sass_name(k.symbol), k.symbol
    row.config, row.path = k.config, k.path
    row.registers, row.static_shared, row.dynamic_shared = (
        k.registers,
        k.static_shared,
        k.dynamic_shared,
    )
    row.spill_store_bytes, row.spill_load_bytes = k.spill_store_bytes, k.spill_load_bytes
    row.block_threads, row.cluster_blocks, row.grid_blocks, row.sms = (
        k.block_threads,
        k.cluster_blocks,
        k.grid_blocks,
        g.sms,
    )
    row.notes += k.notes
    warps = -(-k.block_threads // 32)
    row.blocks_per_sm = launch.programs_per_sm(
        g, warps, k.registers, k.static_shared + k.dynamic_shared
    )
    row.warps_per_sm = row.blocks_per_sm * warps

    # SASS: the whole binary
    functions = sass_of(k.cubin)
    code = functions.get(k.symbol) or next(iter(functions.values()))
    row.sass_widths = {
        f"{kind} {bits}": n for (kind, bits), n in sass.global_access_widths(code).items()
    }
    row.sass_local_accesses = sass.local_accesses(code)
    # the binary's own account (cuobjdump): its local memory per thread (spills and stack
    # arrays), and the registers ptxas reported
    usage = _resources_of(hashlib.sha1(k.cubin).hexdigest(), k.cubin).get(k.symbol, {})
    row.local_bytes = usage.get("local", 0)
    if usage and usage["registers"] != k.registers:
        row.notes.append(f"cuobjdump counts {usage['registers']} registers, ptxas {k.registers}")
    # ptxas keeps each access's width (it may duplicate code, so the counts can differ): the
    # trace's widths (PTX) are then the binary's
    in_ptx = {(kind, 8 * b) for kind, b in ptx.global_accesses(k.kernel)}
    row.sass_matches_ptx = in_ptx == set(sass.global_access_widths(code))
    if not row.sass_matches_ptx:
        row.notes.append("the SASS's global access widths differ from the PTX's: unverified")

    # the trace of thread 0 of program 0
    launch_ = ptx.Launch(
        k.params,
        grid=(k.grid_blocks, 1, 1),
        block=(k.block_threads, 1, 1),
        cluster=(k.cluster_blocks, 1, 1),
    )
    trace = ptx.trace(k.kernel, launch_)
    _read_trace(row, k, trace)
    _grid(row, k)
    _dram(row, k, g)


def sass_name(symbol: str) -> str:
    """A kernel's readable name: Triton's as it is, a CUDA instantiation demangled, its
    namespace and types shortened (``add_norm_fwd_kernel<bf16, bf16, bf16, bf16, true>``)."""
    if not symbol.startswith("_Z"):
        return symbol
    from tools import ptxas_report

    text = ptxas_report.demangle(symbol)
    text = text.replace("resfuse::", "").replace("void ", "").split("(")[0]
    text = text.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")
    return text


@dataclass
class _TensorUse:
    """What the traced thread did with one tensor."""

    tensor: Optional[torch.Tensor]
    loaded_bytes: int = 0
    stored_bytes: int = 0
    loaded: dict = field(default_factory=dict)  # address -> bytes (distinct loads)
    stored: dict = field(default_factory=dict)
    first: Optional[str] = None
    widths: Counter = field(default_factory=Counter)  # (kind, bytes) -> accesses

    def add(self, kind: str, address: int, size: int) -> None:
        self.first = self.first or kind
        self.widths[(kind, size)] += 1
        if kind in ("load", "atomic"):
            self.loaded_bytes += size
            self.loaded[address] = max(size, self.loaded.get(address, 0))
        if kind in ("store", "atomic"):
            self.stored_bytes += size
            self.stored[address] = max(size, self.stored.get(address, 0))

    def per_element(self, total: int, distinct: dict) -> float:
        spread = sum(distinct.values())
        return total / spread if spread else 0.0


# the trace's access kinds as the model counts them
_KINDS = {"load": "load", "async_copy": "load", "store": "store", "atomic": "atomic"}
# a prefetch asks L2 for the line of one chunk: the kernels' chunks are 16 bytes
PREFETCH_CHUNK_BYTES = 16


def _read_trace(row: ModelRow, k: PlannedKernel, trace: ptx.Trace) -> None:
    """Per tensor: loads and stores per element, widths; the (rows, D) bytes requested
    before the first shuffle (the first row reduction), and the L2 prefetches by then."""
    uses: dict[str, _TensorUse] = {}
    unknown = uncertain = 0
    reduced = False
    before = prefetched = 0
    for e in trace.events:
        if e.kind == "shuffle":
            reduced = True
            continue
        if e.kind not in _KINDS and e.kind != "prefetch":
            continue  # barriers
        uncertain += not e.certain
        slot = ptx.tensor_slot(e.address) if e.address is not None else None
        if slot not in k.tensors:
            unknown += 1
            continue
        name, tensor = k.tensors[slot]
        if e.kind == "prefetch":
            prefetched += PREFETCH_CHUNK_BYTES if not reduced and role_of(name) == "row" else 0
            continue
        use = uses.setdefault(name, _TensorUse(tensor))
        use.add(_KINDS[e.kind], e.address, e.bytes)
        if not reduced and role_of(name) == "row" and e.kind == "load":
            before += e.bytes
    if unknown:
        row.notes.append(f"{unknown} traced accesses outside every tensor")
    if uncertain:
        row.notes.append(f"{uncertain} traced accesses under a predicate the trace cannot decide")
    path_widths: Counter = Counter()
    narrow = set()
    for name, use in uses.items():
        t = use.tensor
        traffic_ = TensorTraffic(
            name,
            role_of(name),
            t.numel() if t is not None else 0,
            t.element_size() if t is not None else 4,
            use.per_element(use.loaded_bytes, use.loaded),
            use.per_element(use.stored_bytes, use.stored),
            use.first or "load",
            {f"{kind} {8 * b}": n for (kind, b), n in sorted(use.widths.items())},
        )
        row.tensors.append(traffic_)
        if traffic_.role in ("row", "param", "partial"):  # per-row scalars are one value
            for (kind, b), n in use.widths.items():
                path_widths[f"{kind} {8 * b}"] += n
                if b < 16:
                    narrow.add(f"{name} {kind} {8 * b}-bit")
    row.path_widths = dict(path_widths)
    row.narrow_accesses = sorted(narrow)
    row.bytes_before_reduction = before
    row.prefetch_before_reduction = prefetched
    # the thread's share of the rows (its distinct elements of the largest input), for the
    # grid's balance
    row.thread_elements = max(
        (
            sum(uses[t.name].loaded.values()) // t.element_bytes
            for t in row.tensors
            if t.role == "row" and t.first_access == "load"
        ),
        default=0,
    )


def _grid(row: ModelRow, k: PlannedKernel) -> None:
    resident = min(row.blocks_per_sm, max(1, row.grid_blocks // max(1, row.sms)))
    row.bytes_in_flight_per_sm = resident * k.block_threads * row.bytes_before_reduction
    row.prefetch_in_flight_per_sm = resident * k.block_threads * row.prefetch_before_reduction
    per_block = row.thread_elements * k.block_threads
    work_share = (row.grid_blocks * per_block) / (row.rows * row.D) if per_block else 1.0
    row.waves, row.utilisation, row.idle_sms = grid_use(
        row.grid_blocks, row.sms, max(1, row.blocks_per_sm), work_share
    )


def _dram(row: ModelRow, k: PlannedKernel, g) -> None:
    # what is touched again after its first touch: re-read (or re-written) row data, and
    # the partial sums' rows read back (a read-modify-write)
    reread = sum(
        t.element_bytes
        for t in row.tensors
        if t.role == "row" and (t.loads_per_element > 1.001 or t.stores_per_element > 1.001)
    )
    rmw = sum(4 for t in row.tensors if t.role == "partial" and t.loads_per_element > 0)
    miss = 0.0
    if reread or rmw:
        programs = row.grid_blocks // max(1, row.cluster_blocks)
        resident = min(programs, row.sms * max(1, row.blocks_per_sm) // max(1, row.cluster_blocks))
        open_bytes = reread + rmw / k.block_m  # per element of the rows a program holds open
        row.rereads_fit_l2 = bool(_rereads_fit(g, resident, k.launch_config, row.D, open_bytes))
        miss = 0.0 if row.rereads_fit_l2 else 1.0
        if not row.rereads_fit_l2:
            # why: what the resident programs hold open between their passes, against the
            # launcher's share of L2
            budget = getattr(_launch_module(), "L2_BUDGET", 1.0) * g.l2_bytes
            held = resident * k.block_m * row.D * open_bytes
            row.notes.append(
                f"re-reads miss L2: {resident} resident programs x {k.block_m} rows x "
                f"{open_bytes:g} B/element open between the passes (re-read rows"
                + (f", {rmw // 4} partial-sum row(s) per {k.block_m} rows" if rmw else "")
                + f") = {held / 2**20:.0f} MiB > {budget / 2**20:.1f} MiB of L2"
            )
    total = 0.0
    for t in row.tensors:
        size = t.elements * t.element_bytes
        if t.role in ("param", "per_row"):  # hot in L2 (parameters), or read once
            t.dram_bytes = size * ((t.loads_per_element > 0) + (t.stores_per_element > 0))
        else:
            first_load = 1.0 if t.first_access == "load" and t.loads_per_element > 0 else 0.0
            reads = first_load + max(0.0, t.loads_per_element - first_load) * miss
            writes = (1.0 + (t.stores_per_element - 1.0) * miss) if t.stores_per_element else 0.0
            t.dram_bytes = size * (reads + writes)
        total += t.dram_bytes
    # the backward's second step (launch.py's p.sum(0), csrc's reduce_partials_kernel): each
    # partial buffer the kernel wrote read once, its (D,) fp32 sum written
    reduction = 0.0
    if row.direction == "bwd":
        reduction = sum(
            t.elements * 4 + row.D * 4
            for t in row.tensors
            if t.role == "partial" and t.stores_per_element > 0
        )
    total += reduction
    elements = row.rows * row.D
    row.dram_bytes_per_element = total / elements
    row.reduction_bytes_per_element = reduction / elements
    op = traffic_op(_spec_of(row.spec))
    if op is not None:
        layer_scale = _spec_of(row.spec).has_branch_scale
        try:
            minimal = traffic.minimal_bytes(
                op, row.direction, row.rows, row.D, DTYPES[row.dtype], layer_scale=layer_scale
            )
            row.minimal_bytes_per_element = minimal / elements
        except ValueError:
            pass


def traffic_op(spec: AddNormSpec) -> Optional[str]:
    """benchmarks/traffic.py's op for a spec (None where it has none)."""
    if spec.branch_norm:
        name = f"norm_add_{spec.norm}_norm" if spec.output_norm else f"{spec.norm}_norm_add"
    elif spec.has_residual:
        name = f"add_{spec.norm}_norm"
    else:
        name = f"{spec.norm}_norm"
    return name if name in traffic.OPS else None


# --------------------------------------------------------------------------- the checks


# the checks problems() makes, by name
CHECKS = (
    "modelled",
    "local memory",
    "narrow access",
    "extra DRAM pass",
    "bytes in flight",
    "idle SMs",
)


def problems(row: ModelRow) -> dict[str, str]:
    """What in this row breaks the design (DESIGN, and the limits above), by check (CHECKS);
    empty: nothing."""
    if row.error:
        return {"modelled": f"not modelled: {row.error}"}
    out = {}
    promise = DESIGN.get((row.backend, row.direction))
    if row.spill_store_bytes or row.spill_load_bytes or row.sass_local_accesses or row.local_bytes:
        out["local memory"] = (
            f"local memory: spills {row.spill_store_bytes}/{row.spill_load_bytes} bytes "
            f"(stores/loads), {row.local_bytes} bytes per thread, "
            f"{row.sass_local_accesses} LDL/STL in the SASS"
        )
    if promise and promise.vectorised and row.narrow_accesses:
        out["narrow access"] = "accesses narrower than 128 bits: " + ", ".join(row.narrow_accesses)
    if promise and row.D <= promise.one_dram_read_up_to:
        extra = [
            f"{t.name} x{row.dram_reads_per_element(t):.2g}"
            for t in row.inputs()
            if row.dram_reads_per_element(t) > 1.001
        ]
        if extra:
            loads = ", ".join(f"{t.name} {t.loads_per_element:.2g}" for t in row.inputs())
            out["extra DRAM pass"] = (
                "more than one DRAM read per input element: "
                + ", ".join(extra)
                + f" (loads per element {loads}; the re-reads "
                + ("fit" if row.rereads_fit_l2 else "do not fit")
                + " in L2)"
            )
    if row.bytes_in_flight_per_sm < MIN_BYTES_IN_FLIGHT:
        out["bytes in flight"] = (
            f"{row.bytes_in_flight_per_sm / 1024:.1f} KiB in flight per SM "
            f"(< {MIN_BYTES_IN_FLIGHT // 1024} KiB)"
        )
    idle = row.idle_sms or row.utilisation < MIN_GRID_UTILISATION
    if idle and promise and row.D in promise.idle_sms_accepted_at:
        # accepted by design while the SMs that run keep the whole GPU's DRAM busy
        busy = row.sms - row.idle_sms
        flight = busy * (row.bytes_in_flight_per_sm + row.prefetch_in_flight_per_sm)
        if flight >= row.sms * MIN_BYTES_IN_FLIGHT:
            note = f"{row.idle_sms} SMs idle by design: {promise.idle_sms_reason}"
            if note not in row.notes:
                row.notes.append(note)
            idle = False
    if idle:
        out["idle SMs"] = (
            f"grid leaves SMs idle: {row.grid_blocks} blocks on {row.sms} SMs x "
            f"{row.blocks_per_sm}, utilisation {100 * row.utilisation:.0f}%"
            + (f", {row.idle_sms} SMs without a block" if row.idle_sms else "")
        )
    return out


# --------------------------------------------------------------------------- the table


def build(
    gpus=("H100",),
    Ds=DEFAULT_DS,
    dtypes=("bf16",),
    backends=BACKENDS,
    directions=DIRECTIONS,
    specs=PLAIN_SPECS,
    rows: Optional[int] = None,
) -> list[ModelRow]:
    """The table's rows, in its order (GPU, dtype, spec, backend, direction, D)."""
    return [
        model_row(b, d, s, D, dt, g, rows=rows)
        for g in gpus
        for dt in dtypes
        for s in specs
        for b in backends
        for d in directions
        for D in Ds
    ]


MODEL_BANNER = (
    "STATIC KERNEL MODEL: predicted from the compiled code (ptxas, SASS, the PTX run for one "
    "thread at the launch resfuse makes), not measured on a GPU."
)


def _kib(n: float) -> str:
    """Bytes as 64K (KiB) or 32B."""
    return f"{n / 1024:.0f}K" if n >= 1024 else f"{n:.0f}B"


def _loads(row: ModelRow) -> str:
    cells = [f"{_SHORT.get(t.name, t.name)} {t.loads_per_element:.3g}" for t in row.inputs()]
    rmw = [t for t in row.tensors if t.role == "partial" and t.loads_per_element > 0]
    if rmw:
        cells.append(f"part rmw {rmw[0].loads_per_element:.3g}")
    return " · ".join(cells)


def _sass_cell(row: ModelRow) -> str:
    total = sum(row.sass_widths.values())
    wide = sum(n for key, n in row.sass_widths.items() if key.endswith(" 128"))
    return f"{wide}/{total} 128b"


def _path_cell(row: ModelRow) -> str:
    total = sum(row.path_widths.values())
    wide = sum(n for key, n in row.path_widths.items() if key.endswith(" 128"))
    return "all 128b" if total and wide == total else f"{wide}/{total} 128b"


HEADER = [
    "backend",
    "dir",
    "spec",
    "D",
    "config (path)",
    "regs",
    "spill",
    "smem",
    "warps/SM",
    "grid: blocks, waves, use",
    "path accesses",
    "SASS global",
    "loads/elem",
    "in flight/SM",
    "DRAM B/elem (min)",
    "checks",
]


def cells(row: ModelRow) -> list[str]:
    if row.error:
        return [row.backend, row.direction, row.spec, str(row.D)] + ["—"] * 11 + [row.error[:80]]
    found = problems(row)
    dram = f"{row.dram_bytes_per_element:.2f}"
    if row.minimal_bytes_per_element is not None:
        dram += f" ({row.minimal_bytes_per_element:.2f})"
    if row.rereads_fit_l2 is not None:
        dram += " L2 ok" if row.rereads_fit_l2 else " L2 miss"
    flight = _kib(row.bytes_in_flight_per_sm)
    if row.prefetch_in_flight_per_sm:
        flight += f" +pf {_kib(row.prefetch_in_flight_per_sm)}"
    return [
        row.backend,
        row.direction,
        row.spec,
        str(row.D),
        f"{row.config} ({row.path})",
        str(row.registers),
        f"{row.spill_store_bytes}/{row.spill_load_bytes}"
        if row.spill_store_bytes or row.spill_load_bytes
        else "0",
        _kib(row.static_shared + row.dynamic_shared),
        f"{row.warps_per_sm} ({row.blocks_per_sm} blk)",
        f"{row.grid_blocks}, {row.waves:.2f}, {100 * row.utilisation:.0f}%",
        _path_cell(row),
        _sass_cell(row),
        _loads(row),
        flight,
        dram,
        "ok" if not found else "; ".join(found.values()),
    ]


def _gpu_line(gpu: str) -> str:
    g = gpu_data(gpu)
    return (
        f"GPU {g.name}: {g.sms} SMs, {g.l2_bytes / 2**20:.0f} MiB L2, "
        f"{g.dram_bytes_per_s / 1e12:.2f} TB/s DRAM, sm_{GPU_ARCH[gpu]}; "
        f"rows = 2**25 // D unless said"
    )


def _kernels_analysed(rows: list[ModelRow]) -> list[str]:
    """Which binary each (backend, direction, spec) runs: the Triton kernel, the CUDA
    instantiation (its template arguments) the launch code picks."""
    seen: dict = {}
    for r in rows:
        if r.kernel:
            seen.setdefault((r.backend, r.direction, r.spec), set()).add(r.kernel)
    return [f"{b} {d} {s}: {', '.join(sorted(k))}" for (b, d, s), k in seen.items()]


def markdown(rows: list[ModelRow]) -> str:
    out = [f"**{MODEL_BANNER}**", ""]
    for gpu in dict.fromkeys(r.gpu for r in rows):
        out += [_gpu_line(gpu), ""]
        out.append("| " + " | ".join(HEADER) + " |")
        out.append("| " + " | ".join("---" for _ in HEADER) + " |")
        for r in rows:
            if r.gpu == gpu:
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |")
        out.append("")
    out.append("Kernels analysed:")
    out += [f"- {line}" for line in _kernels_analysed(rows)]
    notes = [(r, n) for r in rows for n in r.notes]
    if notes:
        out += ["", "Notes:"]
        for r, n in notes:
            out.append(f"- {r.backend} {r.direction} {r.spec} D={r.D} {r.gpu}: {n}")
    return "\n".join(out) + "\n"


def text(rows: list[ModelRow]) -> str:
    out = [MODEL_BANNER]
    for gpu in dict.fromkeys(r.gpu for r in rows):
        out += ["", _gpu_line(gpu)]
        table = [HEADER] + [cells(r) for r in rows if r.gpu == gpu]
        widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
        for line in table:
            out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    out += ["", "kernels analysed:"] + [f"  {line}" for line in _kernels_analysed(rows)]
    notes = [
        f"  {r.backend} {r.direction} {r.spec} D={r.D} {r.gpu}: {n}" for r in rows for n in r.notes
    ]
    if notes:
        out += ["", "notes:"] + notes
    return "\n".join(out) + "\n"


def as_json(rows: list[ModelRow]) -> dict:
    def one(r: ModelRow) -> dict:
        d = asdict(r)
        d["problems"] = problems(r)
        return d

    return {"model": MODEL_BANNER, "markdown": markdown(rows), "rows": [one(r) for r in rows]}


# --------------------------------------------------------------------------- measurements


_IMPLS = {"triton": "resfuse-triton", "cuda": "resfuse-cuda"}


def gpu_of_device(device: str) -> Optional[str]:
    """The model GPU a results file's device name is (``NVIDIA H100 80GB HBM3`` -> H100)."""
    for name in GPU_ARCH:
        if name in device.upper():
            return name
    return None


@dataclass
class Comparison:
    """A measured launch beside its prediction."""

    impl: str
    op: str
    direction: str
    dtype: str
    rows: int
    hidden: int
    measured_ms: float
    predicted_ms: float  # the predicted DRAM bytes at the run's copy bandwidth
    measured_gbps: float  # the record's (minimal bytes / time)
    ratio: float  # measured / predicted: 1 = as fast as the predicted traffic allows
    verdict: str
    path_measured: str = ""  # the CUDA row path the GPU chose, when the run recorded it
    path_predicted: str = ""


def compare(results: dict, specs=PLAIN_SPECS) -> tuple[list[Comparison], list[str]]:
    """Each resfuse-cuda / resfuse-triton record of a GPU run (benchmarks/report.py's
    results format) beside the model of the same launch (its rows and hidden size): the
    predicted time is the predicted DRAM bytes at the run's measured copy bandwidth (else
    the data sheet's). Returns the comparisons and why records were skipped."""
    meta = results.get("meta", {})
    skipped: list[str] = []
    if meta.get("label") != "GPU":
        return [], [f"not a GPU run ({meta.get('label', '?')}): nothing to compare"]
    gpu = gpu_of_device(meta.get("device", ""))
    if gpu is None:
        return [], [f"no model of the GPU {meta.get('device')!r} (models: {', '.join(GPU_ARCH)})"]
    bandwidth = (results.get("copy") or {}).get("bytes_per_s") or gpu_data(gpu).dram_bytes_per_s
    ops = {traffic_op(_spec_of(s)): s for s in specs}
    dtypes = {v: k for k, v in DTYPE_NAMES.items()}
    names = {v: k for k, v in DTYPES.items()}
    paths = meta.get("cuda_row_paths") or {}
    out = []
    for rec in results.get("kernels", []):
        backend = next((b for b, impl in _IMPLS.items() if rec.get("impl") == impl), None)
        if backend is None or rec.get("direction") not in DIRECTIONS:
            continue
        if rec.get("op") not in ops or rec.get("dtype") not in dtypes:
            skipped.append(f"{rec.get('impl')} {rec.get('op')} {rec.get('dtype')}: not modelled")
            continue
        if rec.get("error") or not rec.get("median_ms"):
            skipped.append(f"{rec['impl']} {rec['op']} {rec['hidden']}: not measured")
            continue
        row = model_row(
            backend,
            rec["direction"],
            ops[rec["op"]],
            rec["hidden"],
            names[dtypes[rec["dtype"]]],
            gpu,
            rows=rec["rows"],
        )
        if row.error:
            skipped.append(f"{rec['impl']} {rec['op']} {rec['hidden']}: {row.error}")
            continue
        predicted_ms = row.dram_bytes_per_element * row.rows * row.D / bandwidth * 1e3
        ratio = rec["median_ms"] / predicted_ms if predicted_ms else float("inf")
        if ratio > MODEL_TOLERANCE:
            verdict = f"slower than the model by x{ratio:.2f}: not DRAM-bound as predicted"
        elif ratio < 1 / MODEL_TOLERANCE:
            verdict = f"faster than the model by x{1 / ratio:.2f}: it moves less than predicted"
        else:
            verdict = "agrees"
        measured_path = ""
        predicted_path = ""
        if backend == "cuda":
            by_hidden = paths.get(str(rec["hidden"])) or paths.get(rec["hidden"]) or {}
            measured_path = by_hidden.get(rec["direction"], "")
            predicted_path = {"registers": "block"}.get(row.path, row.path)
            if measured_path and measured_path != predicted_path:
                verdict += f"; the GPU took the {measured_path} path, the model {predicted_path}"
        out.append(
            Comparison(
                rec["impl"],
                rec["op"],
                rec["direction"],
                rec["dtype"],
                rec["rows"],
                rec["hidden"],
                rec["median_ms"],
                predicted_ms,
                rec.get("gbps") or 0.0,
                ratio,
                verdict,
                measured_path,
                predicted_path,
            )
        )
    return out, skipped


def comparison_markdown(comparisons: list[Comparison], skipped: list[str]) -> str:
    out = [
        "Model against measurement: predicted time = predicted DRAM bytes at the run's copy "
        f"bandwidth; agreement within x{MODEL_TOLERANCE}.",
        "",
    ]
    if comparisons:
        header = ["impl", "op", "dir", "shape", "measured ms", "model ms", "ratio", "verdict"]
        out.append("| " + " | ".join(header) + " |")
        out.append("| " + " | ".join("---" for _ in header) + " |")
        for c in comparisons:
            out.append(
                f"| {c.impl} | {c.op} | {c.direction} | {c.rows}x{c.hidden} | {c.measured_ms:.4g} | "
                f"{c.predicted_ms:.4g} | {c.ratio:.2f} | {c.verdict} |"
            )
    else:
        out.append("No measured resfuse record to compare.")
    if skipped:
        out += ["", f"Skipped: {len(skipped)} records ({'; '.join(sorted(set(skipped))[:5])})"]
    return "\n".join(out) + "\n"


def unavailable_reason() -> str:
    """Why the model cannot run here ("" when it can): the tools it needs."""
    if sass.cuda_tool("nvdisasm") is None:
        return "nvdisasm not found (pip install nvidia-cuda-nvdisasm)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    from tools import ptxas_report

    if not Path(ptxas_report.nvcc()).exists():
        return f"nvcc not found ({ptxas_report.nvcc()}; set CUDA_HOME)"
    return ""


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.kernel_model",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--gpu", nargs="+", default=["H100"], choices=sorted(GPU_ARCH))
    ap.add_argument("--D", nargs="+", type=int, default=list(DEFAULT_DS))
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    ap.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--direction", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    ap.add_argument(
        "--spec",
        nargs="+",
        default=list(PLAIN_SPECS),
        help=f"{', '.join(MODEL_SPECS)} or a spec of triton_kernels/aot.py's SPECS",
    )
    ap.add_argument("--rows", type=int, default=None, help="rows (default 2**25 // D)")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 when a row breaks the design")
    ap.add_argument(
        "--compare", nargs="*", default=[], help="GPU results.json files to set the model against"
    )
    ap.add_argument(
        "--results",
        type=Path,
        help="a benchmark run's results.json: model the GPU it ran on (H100 for any other "
        "device) and compare with it (what `make bench` puts in its report)",
    )
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"kernel model unavailable: {reason}", file=sys.stderr)
        return 2
    note = ""
    if args.results is not None:
        meta = json.loads(args.results.read_text()).get("meta", {})
        device = meta.get("device", "?")
        args.gpu = [gpu_of_device(device) or "H100"]
        if gpu_of_device(device) is None:
            note = f"The run is on {device}: the model is of an {args.gpu[0]}.\n\n"
        if meta.get("label") == "GPU":
            args.compare = [str(args.results)]
    rows = build(args.gpu, args.D, args.dtype, args.backend, args.direction, args.spec, args.rows)
    comparisons = [compare(json.loads(Path(p).read_text()), args.spec) for p in args.compare]
    if args.json:
        out = as_json(rows)
        out["markdown"] = note + out["markdown"]
        out["comparison_markdown"] = "\n".join(comparison_markdown(*c) for c in comparisons)
        out["comparisons"] = [
            {"file": p, "rows": [asdict(c) for c in cs], "skipped": sk}
            for p, (cs, sk) in zip(args.compare, comparisons)
        ]
        print(json.dumps(out, indent=1, default=str))
    else:
        print(markdown(rows) if args.markdown else text(rows), end="")
        for p, (cs, sk) in zip(args.compare, comparisons):
            print(f"\n{p}:\n" + comparison_markdown(cs, sk), end="")
    return 1 if args.check and any(problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
