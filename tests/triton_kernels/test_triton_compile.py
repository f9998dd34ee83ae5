"""The Triton kernels compile for real GPU targets (sm_80, sm_90, and Blackwell's sm_100 and
sm_120: the release wheel's architectures) without a GPU, and ptxas
reports no register spills forced by register pressure at their default launch
configurations.

Runs in a subprocess: the test session uses TRITON_INTERPRET=1, which replaces the kernels'
JIT objects with the interpreter's."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

DIMS = [1024, 4096, 8192, 16384, 32768, 65536]
# the calls of aot.SPECS: every add+norm feature on (the most registers), the plain pre-norm
# add + RMSNorm users run most, and the sandwich layouts (norm_add_norm with every feature it
# allows; norm_add)
SPEC_NAMES = ["all", "rms", "norm_add_norm", "norm_add"]
HEAVIEST = ("all", "norm_add_norm")  # also checked in fp16 and fp32

# the compute capabilities checked: Ampere, Hopper, data-centre and consumer Blackwell
ARCHS = (80, 90, 100, 120)

SCRIPT = r"""
import json, sys
from resfuse.triton_kernels import aot
dims, names, heaviest, archs = (json.loads(a) for a in sys.argv[1:5])
out = []
for arch in archs:
    for dtype in ("bf16", "fp16", "fp32"):
        for D in dims:
            for direction in ("fwd", "bwd"):
                for name in names:
                    if dtype != "bf16" and name not in heaviest:
                        continue
                    c = aot.compile_kernel(direction, D, dtype, arch, name)
                    out.append(dict(arch=arch, dtype=dtype, D=D, direction=direction, flags=name,
                                    regs=c.registers, warps=c.num_warps, spill_stores=c.spill_stores,
                                    spill_loads=c.spill_loads, ptx_bytes=len(c.ptx)))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            json.dumps(DIMS),
            json.dumps(SPEC_NAMES),
            json.dumps(HEAVIEST),
            json.dumps(ARCHS),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compiles_for_every_release_architecture(compiled):
    seen = {(r["arch"], r["direction"], r["D"]) for r in compiled}
    assert seen == {(a, d, D) for a in ARCHS for d in ("fwd", "bwd") for D in DIMS}
    assert all(r["ptx_bytes"] > 1000 and r["regs"] > 0 for r in compiled)


def register_cap(warps: int) -> int:
    """The most registers a thread may use at this block size (64K per SM, 255 per thread,
    allocated in steps of 8)."""
    return min(255, 65536 // (warps * 32) // 8 * 8)


# ptxas sometimes parks one cold value in local memory to meet its own occupancy target while
# registers are to spare (seen with triton 3.6's PTX for norm_add: 8 bytes at 64 of 255
# registers, whatever -maxrregcount says; triton 3.8's PTX has none). That costs one L1 hit
# per thread; a spill under pressure costs far more, and is what this test is for.
OCCUPANCY_SPILL_BYTES = 8


def test_no_register_spills_at_default_configurations(compiled):
    _assert_no_forced_spills(compiled)


def _assert_no_forced_spills(compiled):
    spilling = [r for r in compiled if r["spill_stores"] or r["spill_loads"]]
    forced = [
        r
        for r in spilling
        if r["regs"] >= register_cap(r["warps"])
        or max(r["spill_stores"], r["spill_loads"]) > OCCUPANCY_SPILL_BYTES
    ]
    assert not forced, "register spills:\n" + "\n".join(map(str, forced))
    if spilling:
        print("\nptxas occupancy spills (registers to spare):\n" + "\n".join(map(str, spilling)))


# --------------------------------------------------------------------------- every flag combination
# Each code path of the kernels at the length where its registers peak (its largest D; a
# streamed path's registers do not depend on D), every combination of the flags a call can
# set, bf16 on sm_90 (the dtypes and sm_80 are covered above for the heaviest specs).
ALL_FLAGS_SCRIPT = r"""
import itertools, json, sys
from concurrent.futures import ProcessPoolExecutor
from resfuse.spec import AddNormSpec
from resfuse.triton_kernels import aot, launch

def specs():
    for norm, zc, bias, bs, rs, scale, res, store_h in itertools.product(
            ("rms", "layer"), *[(False, True)] * 7):
        yield AddNormSpec(norm=norm, zero_centered_weight=zc, has_bias=bias, has_branch_scale=bs,
                          has_rowscale=rs, residual_scale=0.5 if scale else 1.0,
                          has_residual=res, store_h=store_h)
    for norm, zc, bw, bb, w, b, out in itertools.product(
            ("rms", "layer"), *[(False, True)] * 6):
        if out or not (w or b):
            yield AddNormSpec(norm=norm, zero_centered_weight=zc, branch_norm=True,
                              has_branch_weight=bw, has_branch_bias=bb, has_weight=w and out,
                              has_bias=b and out, output_norm=out)

def peak_lengths(direction, spec):
    if direction == "fwd":
        limit = launch.MAX_FUSED_D_FWD_BRANCH_NORM if spec.branch_norm else launch.MAX_FUSED_D_FWD
        return (limit, 2 * limit)
    limit = launch.MAX_FUSED_D_BWD_READS_X if spec.reads_x_in_backward else launch.MAX_FUSED_D_BWD
    return (limit, max(2 * limit, launch.MAX_REGISTER_SUMS_D_BWD))

def one(job):
    direction, D, spec = job
    c = aot.compile_kernel(direction, D, "bf16", 90, spec)
    return dict(arch=90, dtype="bf16", D=D, direction=direction, flags=repr(spec),
                regs=c.registers, warps=c.num_warps, spill_stores=c.spill_stores,
                spill_loads=c.spill_loads)

jobs = [(d, D, s) for s in specs() for d in ("fwd", "bwd") for D in peak_lengths(d, s)]
with ProcessPoolExecutor(2) as pool:
    print(json.dumps(list(pool.map(one, jobs, chunksize=8))))
"""


@pytest.fixture(scope="module")
def every_flag_combination():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", ALL_FLAGS_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_register_spills_in_any_flag_combination(every_flag_combination):
    # 2 x 2^7 add + norm specs and the sandwich ones, each path at its peak
    assert len(every_flag_combination) > 500
    _assert_no_forced_spills(every_flag_combination)
