"""The GPU campaign's plan, in one place: its phases in priority order with their deadlines,
what each one measures or checks, on a GPU and in the CPU rehearsal, and the files it
returns. Every number the campaign runs by is here; the phases read them from this module
(and the tests ask it, too).

Why these deadlines: a lent GPU machine gives a session 15 minutes of device time in all,
its start (minutes) included, one command at most 10 minutes. The campaign is one command
of at most ``TOTAL_BUDGET_S`` (8 minutes), run under a 9-minute limit, so a slow start or
transfer still leaves it whole. Each phase gets its own deadline plus whatever the phases
before it left unused; a phase past its deadline is stopped (its results so far are kept)
and the next one starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

TOTAL_BUDGET_S = 480  # the campaign's wall-clock limit on the GPU machine
COMMAND_LIMIT_S = 540  # the limit to give the device tool's command (9 minutes)
CARRY_LIMIT_BYTES = 64 << 20  # what the device tool takes along, tree and carry together
OUT_FILE_LIMIT = 8  # files the device tool brings back from $OUT
SOFT_MARGIN_S = 6  # a phase stops starting new work this long before its deadline
KILL_GRACE_S = 5  # SIGTERM, then SIGKILL this much later


@dataclass(frozen=True)
class Phase:
    name: str
    budget_s: float  # its deadline on the GPU machine (before slack from earlier phases)
    rehearsal_budget_s: float  # on CI's 2-core CPU, where the same code runs on tiny shapes
    what: str


PHASES = (
    Phase("env", 20, 120, "GPU, driver, clocks, versions; device-to-device copy bandwidth"),
    Phase("install", 75, 600, "the carried wheel loaded on this torch (else a source build)"),
    Phase(
        "correctness",
        90,
        400,
        "the GPU tests, sharded: both backends vs float64, graphs, determinism, torch.compile",
    ),
    Phase(
        "bandwidth",
        185,
        600,
        "GB/s and % of copy: resfuse vs baselines and peers; q/k norms; small-batch latency",
    ),
    Phase("model", 45, 400, "patched vs unpatched Llama slice: bf16 training step, peak memory"),
    Phase("sanitize", 45, 120, "compute-sanitizer memcheck and racecheck on kernel paths"),
    Phase("report", 15, 120, "auto table, report (markdown, JSON, PNG), summary"),
)
BY_NAME = {p.name: p for p in PHASES}

# --------------------------------------------------------------------------- returned files
# $OUT (what the device tool brings back, at most OUT_FILE_LIMIT files): the whole results
# folder as one archive, plus the files worth reading at once.
ARCHIVE_NAME = "campaign.tar.gz"
OUT_FILES = (
    "summary.md",
    ARCHIVE_NAME,
    "campaign.json",
    "report.md",
    "auto_table.json",
    "campaign.log",
)
# what the results folder must hold after a run that reached every phase (the rehearsal
# checks this list; the archive holds the folder): the benchmark report's files, then one
# record per phase and the campaign's own under campaign/
RESULT_FILES = (
    "summary.md",
    "report.md",
    "results.json",
    "auto_table.json",
    "campaign/campaign.json",
) + tuple(f"campaign/{p.name}.json" for p in PHASES)
LOG_LIMIT_BYTES = 2 << 20  # each log in the archive keeps its last 2 MiB

# --------------------------------------------------------------------------- carry
CARRY_DIR = "build/carry"
LIGER = ("liger-kernel", "0.8.5")
FLASH_ATTN = ("flash-attn", "2.8.3.post2")
# flash-attn's Triton norm and what it imports, taken from the sdist as they are; the
# package's own __init__ (which loads its CUDA extension) is replaced by an empty one
FLASH_ATTN_FILES = (
    "flash_attn/ops/triton/layer_norm.py",
    "flash_attn/utils/torch.py",
    "flash_attn/utils/library.py",
)
BUILD_TOOLS = ("ninja", "setuptools")  # for the fallback source build, if the machine lacks them
NOT_CARRIED = {
    "quack": "quack-kernels runs on NVIDIA's CUTLASS DSL (nvidia-cutlass-dsl), a few hundred "
    "MB: over the 64 MiB carry",
    "apex": "Apex's fused norms are a compiled extension with no wheel for this torch; a "
    "source build takes longer than the campaign",
}

# --------------------------------------------------------------------------- correctness
# pytest, sharded over processes (the Triton compiles run in parallel). A rule keeps the
# collected tests of one file, or one test function, run on ``backend`` (the test's own
# ``backend`` parameter; None: every test), every ``every``-th of them in collection order;
# a test no rule keeps is not run.


@dataclass(frozen=True)
class TestRule:
    path: str  # "tests/file.py" or "tests/file.py::test_name"
    backend: Optional[str] = None
    every: int = 1
    why: str = ""


CORRECTNESS_RULES = (
    TestRule(
        "tests/test_cuda_gpu.py",
        why="the cuda backend on a GPU: the cluster layouts, "
        "misaligned inputs bitwise, agreement with Triton, streams, CUDA graphs, no host "
        "sync, determinism, opcheck, torch.compile fullgraph; the sandwich layouts alike",
    ),
    TestRule(
        "tests/test_gpu.py",
        why="both kernel backends: streams, graphs, the device guard, "
        "determinism with many programs",
    ),
    TestRule(
        "tests/test_matrix.py::test_every_flag_combination",
        "cuda",
        1,
        "every flag combination x dtype of every op on the cuda kernels (nothing to compile)",
    ),
    TestRule(
        "tests/test_matrix.py::test_every_flag_combination",
        "triton",
        7,
        "a seventh of that matrix on Triton (each one a compile)",
    ),
    TestRule("tests/test_matrix.py::test_flag_combinations_one_row_per_program", "cuda", 2),
    TestRule("tests/test_matrix.py::test_shapes", "cuda", 2, "odd D, leading dims"),
    TestRule("tests/test_matrix.py::test_shapes", "triton", 4, "odd D, leading dims"),
    TestRule("tests/test_matrix.py::test_long_rows", "cuda", why="past each crossover"),
    TestRule("tests/test_matrix.py::test_long_rows", "triton", why="past each crossover"),
    TestRule("tests/test_matrix.py::test_non_contiguous", "cuda", why="strided layouts"),
    TestRule("tests/test_matrix.py::test_non_contiguous", "triton", 2, "strided layouts"),
    TestRule("tests/test_matrix.py::test_mixed_dtypes", "cuda", why="fp32 streams, out_dtype"),
    TestRule("tests/test_matrix.py::test_mixed_dtypes", "triton", why="fp32 streams, out_dtype"),
    TestRule("tests/test_matrix.py::test_backward_is_deterministic", "cuda"),
    TestRule("tests/test_matrix.py::test_backward_is_deterministic", "triton"),
    TestRule(
        "tests/test_matrix.py::test_boundary_sizes_on_gpu",
        why="each crossover and the next size, both kernel backends",
    ),
    TestRule(
        "tests/test_matrix.py::test_rows_spanning_clusters_on_gpu",
        why="D up to 131072: the cluster and streamed paths",
    ),
    TestRule("tests/test_matrix.py::test_many_rows_on_gpu"),
    TestRule("tests/test_matrix.py::test_non_contiguous_on_gpu"),
    TestRule("tests/test_matrix.py::test_large_shapes_on_gpu", every=2),
    TestRule("tests/test_modules.py", "cuda", why="the drop-in modules on cuda"),
)
CORRECTNESS_SHARDS = 12
REHEARSAL_SHARDS = 2
REHEARSAL_TESTS_PER_RULE = 2  # the rehearsal runs the machinery, not the matrix

# --------------------------------------------------------------------------- bandwidth
BANDWIDTH_OPS = ("add_rms_norm", "add_layer_norm", "rms_norm", "norm_add_rms_norm")
# ops measured only for auto's table (resfuse-cuda vs resfuse-triton), after everything else
AUTO_TABLE_OPS = ("layer_norm", "norm_add_layer_norm", "rms_norm_add")
# the implementations in measuring order, one pass each; peers not installed are skipped
PASSES = (
    ("resfuse", ("resfuse-cuda", "resfuse-triton", "eager-torch", "eager-hf")),
    ("peers", ("liger", "flash-attn", "quack", "apex")),
    ("compile", ("torch.compile",)),
)
LATENCY_IMPLS = (
    "resfuse-cuda",
    "resfuse-triton",
    "eager-torch",
    "eager-hf",
    "liger",
    "flash-attn",
    "quack",
    "apex",
    "torch.compile",
)
# the fraction of the bandwidth phase the compile warm-up may take, at most: worker
# processes fill Triton's and Inductor's on-disk caches in parallel (16 CPU cores), so the
# timing process mostly loads compiled code
WARMUP_SHARE = 0.45


@dataclass(frozen=True)
class BandwidthScale:
    shapes: tuple  # (dtype, hidden), the most used first: a phase cut short keeps
    # the shapes that matter most
    rows: Optional[int]  # None: rows_for(hidden), about ELEMENTS per tensor
    qk_norm: tuple  # (op, dtype, rows, hidden)
    compile_hidden: tuple  # torch.compile compiles each (op, dtype, hidden) afresh
    compile_ops: tuple
    auto_table_hidden: tuple
    latency: tuple  # (op, dtype, rows, hidden) of one small call
    latency_calls: int
    latency_skip: tuple  # implementations not timed for latency
    warmup_workers: int
    timer: dict  # benchmarks.timing.TimerSettings
    extra_impls: tuple = ()  # measured in the first pass besides PASSES' own
    copy_bytes: Optional[int] = None


ELEMENTS = 1 << 27  # per tensor: 256 MiB of bf16, several times any L2
GPU_BANDWIDTH = BandwidthScale(
    shapes=tuple(("bfloat16", d) for d in (4096, 8192, 2048, 16384, 1024, 12288, 32768, 65536))
    + (("float16", 4096),),
    rows=None,
    # per-head q/k norms (Qwen3, video DiTs): 27,030 tokens x 24 heads, head_dim 128
    qk_norm=("rms_norm", "bfloat16", 27030 * 24, 128),
    compile_hidden=(2048, 4096, 8192, 16384),
    compile_ops=BANDWIDTH_OPS,
    auto_table_hidden=(1024, 4096, 16384),
    latency=("add_rms_norm", "bfloat16", 1, 4096),
    latency_calls=200,
    latency_skip=(),
    warmup_workers=12,
    # shorter windows than `make bench`: many shapes, little time
    timer=dict(warmup_ms=5.0, rep_ms=25.0, cuda_min_calls=5, cuda_max_calls=100),
)
# on CPU the GPU implementations are unavailable (recorded as such) and resfuse runs its
# reference: the rehearsal times that in their place; torch.compile compiles C++ there, slowly
REHEARSAL_BANDWIDTH = BandwidthScale(
    shapes=(("bfloat16", 64), ("float16", 32)),
    rows=64,
    qk_norm=("rms_norm", "bfloat16", 24, 128),
    compile_hidden=(64,),
    compile_ops=("add_rms_norm",),
    auto_table_hidden=(32,),
    latency=("add_rms_norm", "bfloat16", 1, 64),
    latency_calls=5,
    latency_skip=("torch.compile",),
    warmup_workers=2,
    timer=dict(cpu_budget_s=0.0, cpu_min_calls=2, cpu_max_calls=2),
    extra_impls=("resfuse-torch",),
    copy_bytes=32 << 20,
)


def bandwidth_scale(rehearsal: bool) -> BandwidthScale:
    return REHEARSAL_BANDWIDTH if rehearsal else GPU_BANDWIDTH


def rows_for(hidden: int, elements: int = ELEMENTS) -> int:
    """About ``elements`` per tensor, the row count a multiple of 16: Triton specialises
    integer arguments on divisibility by 16, so the compile warm-up's and the timing's
    calls share compiled code."""
    return max(16, round(elements / hidden / 16) * 16)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelScale:
    llama: dict  # transformers.LlamaConfig keywords
    batch: tuple  # (batch, sequence)
    steps: int  # timed training steps per variant, after warm-up ones
    warmup_steps: int
    reference_layers: int  # benchmarks.transformer's Llama-style stack, after the HF one
    reference: Optional[dict] = None  # TransformerConfig overrides (None: GPU_DEFAULT)


# a Llama slice (Llama-3.2-1B widths, 4 of its 16 layers), bf16, random weights
GPU_MODEL = ModelScale(
    llama=dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    batch=(4, 2048),
    steps=6,
    warmup_steps=2,
    reference_layers=4,
)
REHEARSAL_MODEL = ModelScale(
    llama=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    ),
    batch=(2, 16),
    steps=1,
    warmup_steps=1,
    reference_layers=2,
    reference=dict(hidden=64, heads=4, ffn=128, seq=16, batch=2),
)


def model_scale(rehearsal: bool) -> ModelScale:
    return REHEARSAL_MODEL if rehearsal else GPU_MODEL


# --------------------------------------------------------------------------- sanitize
# tools/sanitize_cases.py case names per tool: memcheck over the paths with boundaries
# (tails, misalignment, clusters, streaming, mixed dtypes); racecheck over the paths that
# share memory between threads (row sums across warps, clusters' DSMEM, the branch bias)
SANITIZE = (
    (
        "memcheck",
        (
            "tiny_layer",
            "tail_misaligned",
            "fp32_stream",
            "cluster_9000",
            "cluster_20000_misaligned",
            "streamed_140000",
            "many_rows",
            "mixed_dtypes",
            "sandwich_misaligned",
            "sandwich_cluster_9000",
            "norm_add_cluster_9000",
            "sandwich_streamed_140000",
        ),
    ),
    (
        "racecheck",
        ("tail_misaligned", "cluster_20000_misaligned", "sandwich_cluster_9000", "many_rows"),
    ),
)
# instrument resfuse's kernels only: every one is in namespace resfuse, so the substring is
# in its mangled and its demangled name (add_norm_fwd/bwd_kernel, reduce_partials_kernel)
SANITIZE_KERNELS = "resfuse"


def deadlines_total() -> float:
    return sum(p.budget_s for p in PHASES)


def phase(name: str) -> Phase:
    if name not in BY_NAME:
        raise ValueError(f"phase must be one of {list(BY_NAME)}, got {name!r}")
    return BY_NAME[name]


def budget(name: str, rehearsal: bool) -> float:
    p = phase(name)
    if rehearsal:  # the tests shorten a rehearsal's phases: RESFUSE_CAMPAIGN_BUDGETS=env:3,...
        override = dict(
            item.split(":")
            for item in os.environ.get("RESFUSE_CAMPAIGN_BUDGETS", "").split(",")
            if item
        )
        return float(override.get(name, p.rehearsal_budget_s))
    return p.budget_s


def total(rehearsal: bool) -> float:
    return sum(budget(p.name, rehearsal) for p in PHASES)


def describe() -> str:
    lines = [f"{'phase':<12} {'deadline':>8}  what"]
    for p in PHASES:
        lines.append(f"{p.name:<12} {p.budget_s:>6.0f} s  {p.what}")
    lines.append(
        f"{'total':<12} {deadlines_total():>6.0f} s  (limit {TOTAL_BUDGET_S} s; "
        f"the device tool's command limit {COMMAND_LIMIT_S} s)"
    )
    return "\n".join(lines)
