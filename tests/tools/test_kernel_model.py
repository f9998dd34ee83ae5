"""The static kernel model (tools/kernel_model.py, python -m tools.kernel_model).

First its parts on hand-written input, where every expected number follows from the input:
the SASS reader (tools/sass.py), the PTX reader and the one-thread trace that attributes each
global access to its tensor by the address it computes (tools/ptx.py), the grid and DRAM
definitions, the checks, and the comparison with a GPU run's measurements (a synthetic
record). Then the table itself, computed once in a subprocess (the test session runs Triton
under its interpreter, which the compiles must not): every bf16 add + RMSNorm and
add + LayerNorm kernel of both backends at D = 1K..64K on H100, each checked against the
design (kernel_model.DESIGN): no local memory, row data in 128-bit accesses, one DRAM read
per input where the design promises it, >= 16 KiB in flight per SM, no idle SMs.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import kernel_model as km
from tools import ptx, sass

ROOT = Path(__file__).resolve().parents[2]
# `make test` sets it where nvcc exists: the model's tools are then installed and it must run
REQUIRED = os.environ.get("RESFUSE_REQUIRE_CUDA_EXT") == "1"

# --------------------------------------------------------------------------- SASS

LISTING = """
//--------------------- .text.my_kernel --------------------------
        .section        .text.my_kernel,"ax",@progbits
my_kernel:
.text.my_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/               @!P0 LDG.E.U16 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   STG.E.EF.128 desc[UR4][R6.64], R4 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR4][R2.64] ;
        /*0050*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R0 ;
        /*0060*/                   LDS.128 R12, [R3] ;
        /*0070*/                   STL [R1], R5 ;
        /*0080*/                   LDL R5, [R1] ;
        /*0090*/                   SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;
        /*00a0*/                   LDG.E R7, desc[UR4][R2.64] ;
        /*00b0*/                   BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
"""


def test_sass_line_parsing():
    ins = sass.parse_line(
        "        /*0020*/               @!P0 LDG.E.U16 R8, desc[UR4][R2.64+0x10] ;"
    )
    assert (ins.address, ins.predicate, ins.opcode) == (0x20, "@!P0", "LDG.E.U16")
    assert ins.operands == "R8, desc[UR4][R2.64+0x10]" and ins.base == "LDG"
    assert sass.parse_line("        .section        .text.my_kernel") is None
    assert sass.parse_line(".L_x_1:") is None


def test_sass_listing_functions_and_labels():
    functions = sass.parse_listing(LISTING)
    assert list(functions) == ["my_kernel"]
    code = functions["my_kernel"]
    assert len(code) == 13 and code[0].opcode == "LDC" and code[-1].opcode == "EXIT"
    assert code[2].labels == (".L_x_1",) and code[1].labels == ()


@pytest.mark.parametrize(
    "opcode, size",
    [
        ("LDG.E.128", 16),
        ("STG.E.EF.128", 16),
        ("LDG.E.64", 8),
        ("LDG.E.U16", 2),
        ("STG.E.U8", 1),
        ("LDG.E", 4),
        ("LDG.E.EL.128", 16),
    ],
)
def test_sass_access_width(opcode, size):
    assert sass.access_bytes(opcode) == size


def test_sass_global_accesses_by_width_and_local_memory():
    code = sass.parse_listing(LISTING)["my_kernel"]
    assert sass.global_access_widths(code) == Counter(
        {("load", 128): 2, ("load", 16): 1, ("load", 32): 1, ("store", 128): 1, ("atomic", 32): 1}
    )  # LDS (shared) and LDL / STL (local) are not global
    assert sass.local_accesses(code) == 2
    assert sass.format_widths(Counter({("load", 128): 2, ("store", 32): 1})) == (
        "ld 128b x2, st 32b x1"
    )


def test_cuobjdump_resource_usage_parsing(monkeypatch, tmp_path):
    text = (
        "\nResource usage:\n Common:\n  GLOBAL:11 CONSTANT[4]:8\n Function my_kernel:\n"
        "  REG:64 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:680 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    monkeypatch.setattr(sass, "cuda_tool", lambda name: tmp_path / name)
    monkeypatch.setattr(
        sass.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=text, returncode=0)
    )
    assert sass.resource_usage(b"cubin") == {
        "my_kernel": {"registers": 64, "stack": 16, "shared": 1024, "local": 8}
    }


def test_cuda_tools_are_found_by_their_packages():
    path = sass.cuda_tool("nvdisasm")
    if path is None:
        pytest.skip("nvdisasm is not installed (requirements-dev.txt: nvidia-cuda-nvdisasm)")
    assert path.name == "nvdisasm" and os.access(path, os.X_OK)


# --------------------------------------------------------------------------- PTX

# A Triton-like kernel: pointers as their own parameters, a loop whose trip count is a
# parameter, a branch on a parameter, a predicated load whose predicate is false, vector loads
# with cache hints, shared memory and a shuffle, .loc lines without semicolons, scope braces.
TRITON_LIKE = """
.version 8.8
.target sm_90a
.address_size 64
.extern .shared .align 16 .b8 global_smem[];
.visible .entry k(
        .param .u64 .ptr .global .align 1 k_param_0,
        .param .u64 .ptr .global .align 1 k_param_1,
        .param .u32 k_param_2,
        .param .f32 k_param_3
)
.reqntid 128
{
        .reg .pred      %p<8>;
        .reg .b32       %r<40>;
        .reg .b64       %rd<20>;
        .loc    1 10 0                          // k.py:10:0
$L__func_begin0:
        ld.param.b64    %rd1, [k_param_0];
        ld.param.b64    %rd2, [k_param_1];
        ld.param.b32    %r1, [k_param_2];
        mov.u32         %r2, %tid.x;
        mul.wide.u32    %rd3, %r2, 16;
        add.s64         %rd4, %rd1, %rd3;
        mov.b32         %r3, 0;
        setp.gt.s32     %p1, %r1, 100;
        @%p1 bra        $L__BB0_9;
$L__BB0_1:
        .loc    1 12 5
        // begin inline asm
        {
        mov.u64 %rd5, 0x0;
        createpolicy.fractional.L2::evict_last.b64 %rd5, 1.0;
        }
        // end inline asm
        setp.lt.s32     %p2, %r2, 1000;
        @%p2 ld.global.L1::evict_last.L2::cache_hint.v4.b32 { %r10, %r11, %r12, %r13 }, [ %rd4 + 0 ], %rd5;
        setp.lt.s32     %p3, %r2, 0;
        @%p3 ld.global.v4.b32 { %r14, %r15, %r16, %r17 }, [ %rd4 + 16 ];
        shfl.sync.bfly.b32      %r18, %r10, 16, 31, -1;
        mov.b32         %r19, global_smem;
        st.shared.b32   [%r19], %r18;
        ld.shared::cluster.b32  %r20, [%r19];
        add.s64         %rd4, %rd4, 2048;
        add.s32         %r3, %r3, 1;
        setp.lt.s32     %p4, %r3, %r1;
        @%p4 bra        $L__BB0_1;
        mul.wide.u32    %rd6, %r2, 4;
        add.s64         %rd7, %rd2, %rd6;
        st.global.b32   [ %rd7 + 0 ], %r20;
        ret;
$L__BB0_9:
        ld.global.b32   %r30, [%rd2];
        ret;
}
"""

# An nvcc-like kernel: one struct parameter by value, its fields read through a register
# holding the parameter's address, a flag selecting the path, a signed offset, a pointer
# kept in local memory and read back, a branch on loaded data after the access.
NVCC_LIKE = """
.version 8.8
.target sm_90
.address_size 64
.visible .entry s(
        .param .align 8 .b8 s_param_0[24]
)
{
        .local .align 8 .b8     __local_depot1[16];
        .reg .b64       %SP;
        .reg .b64       %SPL;
        .reg .pred      %p<4>;
        .reg .b16       %rs<4>;
        .reg .b32       %r<4>;
        .reg .f32       %f<4>;
        .reg .b64       %rd<12>;
        mov.u64         %SPL, __local_depot1;
        mov.b64         %rd1, s_param_0;
        add.s64         %rd2, %rd1, 16;
        ld.param.u64    %rd3, [s_param_0];
        ld.param.u32    %r1, [%rd2+-8];
        ld.param.u8     %rs1, [%rd2];
        setp.eq.s16     %p1, %rs1, 0;
        @%p1 bra        $L__BB1_2;
        cvta.to.global.u64      %rd4, %rd3;
        mul.wide.s32    %rd5, %r1, 2;
        add.s64         %rd6, %rd4, %rd5;
        ld.global.nc.u16        %rs2, [%rd6];
        st.local.u64    [%SPL+8], %rd4;
        ld.local.u64    %rd7, [%SPL+8];
        ld.global.f32   %f1, [%rd7+4];
        prefetch.global.L2      [%rd7+64];
$L__BB1_2:
        ret;
}
"""

DATA_BRANCH = """
.visible .entry d(
        .param .u64 d_param_0
)
{
        .reg .pred      %p<2>;
        .reg .b32       %r<4>;
        .reg .b64       %rd<4>;
        ld.param.u64    %rd1, [d_param_0];
        ld.global.u32   %r1, [%rd1];
        setp.eq.s32     %p1, %r1, 0;
        @%p1 bra        $L__BB2_1;
$L__BB2_1:
        ret;
}
"""


def test_ptx_module_parsing():
    kernels = ptx.parse_module(TRITON_LIKE)
    k = kernels["k"]
    assert [(p.name, p.type, p.size) for p in k.params] == [
        ("k_param_0", "u64", 8),
        ("k_param_1", "u64", 8),
        ("k_param_2", "u32", 4),
        ("k_param_3", "f32", 4),
    ]
    assert k.shared == {"global_smem": 0}  # the module-level extern array
    assert set(k.labels) == {"$L__func_begin0", "$L__BB0_1", "$L__BB0_9"}
    ops = [i.opcode for i in k.instructions]
    # `.loc` lines end without a semicolon and are dropped, not glued to the next statement;
    # ld.shared::cluster is an instruction, not a label
    assert ops[0] == "ld.param.b64" and "ld.shared::cluster.b32" in ops
    load = next(i for i in k.instructions if i.opcode.startswith("ld.global.L1"))
    assert load.guard == "%p2" and not load.negated
    vec, mem, policy = load.operands
    assert vec.kind == "vec" and len(vec.parts) == 4 and policy.name == "%rd5"
    assert mem.kind == "mem" and mem.parts[0].name == "%rd4" and mem.value == 0
    s = ptx.parse_module(NVCC_LIKE)["s"]
    assert [(p.name, p.size, p.align) for p in s.params] == [("s_param_0", 24, 8)]
    field = next(i for i in s.instructions if i.opcode == "ld.param.u32")
    assert field.operands[1].value == -8  # [%rd2+-8]
    assert s.local == {"__local_depot1": 16}


@pytest.mark.parametrize(
    "text, value",
    [("-20", -20), ("0x1f", 31), ("0f3F800000", 0x3F800000), ("7U", 7), ("%r1", None)],
)
def test_ptx_immediates(text, value):
    assert ptx.parse_immediate(text) == value


def test_ptx_access_width():
    assert ptx.access_bytes("ld.global.L1::evict_last.L2::cache_hint.v4.b32") == 16
    assert ptx.access_bytes("st.global.v2.f32") == 8
    assert ptx.access_bytes("ld.global.nc.u16") == 2
    assert ptx.access_bytes("ld.global.f32") == 4


def _triton_like_trace(trips: int, thread: int = 5):
    k = ptx.parse_module(TRITON_LIKE)["k"]
    values = [ptx.tensor_base(0), ptx.tensor_base(1), trips, 1.0]
    launch = ptx.Launch(
        ptx.param_values(k, values), grid=(4, 1, 1), block=(128, 1, 1), thread=(thread, 0, 0)
    )
    return ptx.trace(k, launch)


def test_ptx_trace_follows_the_launch_and_attributes_each_access():
    t = _triton_like_trace(3)
    accesses = [
        (e.kind, e.bytes, ptx.tensor_slot(e.address), e.address)
        for e in t.events
        if e.kind != "shuffle"
    ]
    x, y = ptx.tensor_base(0), ptx.tensor_base(1)
    # three trips of the loop: the true-predicated 128-bit load of X only (the second load's
    # predicate is false, shared memory is not global), then the store to Y
    assert accesses == [
        ("load", 16, 0, x + 5 * 16),
        ("load", 16, 0, x + 5 * 16 + 2048),
        ("load", 16, 0, x + 5 * 16 + 4096),
        ("store", 4, 1, y + 5 * 4),
    ]
    assert [e.kind for e in t.events].count("shuffle") == 3
    assert [e.kind for e in t.events][:2] == ["load", "shuffle"]  # a load, then the reduction


def test_ptx_trace_takes_the_branch_the_parameters_decide():
    t = _triton_like_trace(101)  # n > 100: the other path, one load of Y
    assert [(e.kind, e.bytes, ptx.tensor_slot(e.address)) for e in t.events] == [("load", 4, 1)]


def test_ptx_trace_of_a_struct_parameter_and_local_memory():
    s = ptx.parse_module(NVCC_LIKE)["s"]

    def run(flag: int):
        blob = ptx.tensor_base(2).to_bytes(8, "little")  # the pointer field at 0
        blob += (-4 & 0xFFFFFFFF).to_bytes(4, "little") + bytes(4)  # an int field at 8: -4
        blob += bytes([flag]) + bytes(7)  # a bool at 16
        launch = ptx.Launch({"s_param_0": blob}, grid=(1, 1, 1), block=(32, 1, 1))
        return ptx.trace(s, launch).events

    base = ptx.tensor_base(2)
    # the signed offset (-4 elements of 2 bytes); the pointer stored to local memory and read
    # back addresses the next load; the prefetch is recorded, not counted as a load
    assert [(e.kind, e.bytes, e.address) for e in run(1)] == [
        ("load", 2, base - 8),
        ("load", 4, base + 4),
        ("prefetch", 0, base + 64),
    ]
    assert run(0) == []  # the flag is clear: that path does not run


def test_ptx_trace_refuses_a_branch_on_data():
    d = ptx.parse_module(DATA_BRANCH)["d"]
    launch = ptx.Launch(
        {"d_param_0": ptx.tensor_base(0).to_bytes(8, "little")}, (1, 1, 1), (1, 1, 1)
    )
    with pytest.raises(ptx.PtxError, match="depends on a value"):
        ptx.trace(d, launch)


def test_ptx_static_accesses_are_what_the_sass_should_hold():
    k = ptx.parse_module(TRITON_LIKE)["k"]
    assert Counter(ptx.global_accesses(k)) == Counter(
        {("load", 16): 2, ("store", 4): 1, ("load", 4): 1}
    )


def test_ptx_parameter_values_are_checked():
    k = ptx.parse_module(TRITON_LIKE)["k"]
    params = ptx.param_values(k, [1, 2, 3, 0.5])
    assert params["k_param_2"] == (3).to_bytes(4, "little")
    assert params["k_param_3"] == bytes.fromhex("0000003f")
    with pytest.raises(ptx.PtxError):
        ptx.param_values(k, [1, 2])


# --------------------------------------------------------------------------- definitions


@pytest.mark.parametrize(
    "grid, sms, per_sm, share, waves, utilisation, idle",
    [
        (264, 132, 2, 1.0, 1.0, 1.0, 0),  # one full wave
        (128, 132, 1, 1.0, 128 / 132, 128 / 132, 4),  # fewer blocks than SMs
        (200, 132, 2, 1.0, 200 / 264, 200 / 264, 0),  # 68 SMs hold two blocks, 64 one
        (290, 132, 2, 1.0, 290 / 264, 290 / 528, 0),  # a second wave 10% full
        (33000, 132, 16, 1.0, 33000 / 2112, 33000 / (16 * 2112), 0),  # many waves
        (264, 132, 2, 1.0 / 0.97, 1.0, 0.97, 0),  # the rows dealt unevenly
    ],
)
def test_grid_use_definition(grid, sms, per_sm, share, waves, utilisation, idle):
    w, u, i = km.grid_use(grid, sms, per_sm, share)
    assert w == pytest.approx(waves) and u == pytest.approx(utilisation) and i == idle


def _row(**kw) -> km.ModelRow:
    base = dict(
        backend="triton",
        direction="fwd",
        spec="add_rms_norm",
        D=4096,
        dtype="bf16",
        gpu="H100",
        rows=8192,
        grid_blocks=8192,
        sms=132,
        blocks_per_sm=4,
        utilisation=0.97,
        bytes_in_flight_per_sm=64 * 1024,
    )
    base.update(kw)
    row = km.ModelRow(**base)
    row.tensors = kw.get("tensors", [_tensor("x", 1.0, 1.0), _tensor("residual", 1.0, 1.0)])
    return row


def _tensor(name, loads, dram_reads, rows=8192, D=4096):
    t = km.TensorTraffic(name, km.role_of(name), rows * D, 2, loads, 0.0, "load", {"load 128": 1})
    t.dram_bytes = dram_reads * rows * D * 2
    return t


def test_problems_of_a_row_that_keeps_the_design():
    assert km.problems(_row()) == {}


def test_problems_name_each_broken_promise():
    assert set(km.problems(_row(local_bytes=16))) == {"local memory"}  # a stack array
    bad = _row(
        spill_store_bytes=8,
        spill_load_bytes=8,
        narrow_accesses=["x load 64-bit"],
        bytes_in_flight_per_sm=8 * 1024,
        grid_blocks=128,
        idle_sms=4,
        tensors=[_tensor("x", 2.0, 2.0), _tensor("residual", 2.0, 1.0)],
    )
    found = km.problems(bad)
    assert set(found) == {
        "local memory",
        "narrow access",
        "extra DRAM pass",
        "bytes in flight",
        "idle SMs",
    }
    assert "x x2" in found["extra DRAM pass"] and "residual x" not in found["extra DRAM pass"]
    assert "8.0 KiB" in found["bytes in flight"] and "4 SMs without a block" in found["idle SMs"]


def test_extra_dram_passes_count_only_where_the_design_promises_one():
    D = km.DESIGN[("triton", "bwd")].one_dram_read_up_to * 2
    row = _row(direction="bwd", D=D, tensors=[_tensor("h", 2.0, 2.0, D=D)])
    assert "extra DRAM pass" not in km.problems(row)
    row = _row(direction="bwd", D=D // 2, tensors=[_tensor("h", 2.0, 2.0, D=D // 2)])
    assert "extra DRAM pass" in km.problems(row)


def test_a_reread_costs_dram_only_when_the_launchers_l2_rule_says_it_misses():
    """The model's DRAM bytes use launch.rereads_fit_l2: a second read of x and r is free
    while the tiles the resident programs hold open fit, a DRAM read when they do not."""
    from resfuse.triton_kernels import launch

    D, rows = 65536, 512
    cfg = launch.LaunchConfig(1, 8192, 16, False)
    gpu = launch.GPUS["H100"]

    def dram(blocks_per_sm):
        row = _row(D=D, rows=rows, grid_blocks=132 * blocks_per_sm, blocks_per_sm=blocks_per_sm)
        row.tensors = [
            km.TensorTraffic("x", "row", rows * D, 2, 2.0, 0.0, "load", {}),
            km.TensorTraffic("residual", "row", rows * D, 2, 2.0, 0.0, "load", {}),
            km.TensorTraffic("y", "row", rows * D, 2, 0.0, 1.0, "store", {}),
        ]
        k = SimpleNamespace(block_m=1, launch_config=cfg)
        km._dram(row, k, gpu)
        return row

    for per_sm in (1, 2, 3, 4):
        row = dram(per_sm)
        fits = launch.rereads_fit_l2(gpu, 132 * per_sm, cfg, D, 4)
        assert row.rereads_fit_l2 == fits
        assert row.dram_bytes_per_element == pytest.approx(6.0 if fits else 10.0)
        # a miss says why: what the resident programs hold open against L2
        assert [n.startswith("re-reads miss L2: ") for n in row.notes] == ([] if fits else [True])


def test_traffic_ops_of_the_specs():
    assert km.traffic_op(km.MODEL_SPECS["add_rms_norm"]) == "add_rms_norm"
    assert km.traffic_op(km.MODEL_SPECS["add_layer_norm"]) == "add_layer_norm"
    from resfuse.triton_kernels import aot

    assert km.traffic_op(aot.SPECS["norm_add_norm"]) == "norm_add_layer_norm"
    assert km.traffic_op(aot.SPECS["norm_add"]) is None  # no LayerNorm OLMo2 op in traffic.py


# --------------------------------------------------------------------------- measurements


def _gpu_results(records, paths=None):
    meta = {"label": "GPU", "device": "NVIDIA H100 80GB HBM3"}
    if paths is not None:
        meta["cuda_row_paths"] = paths
    return {"meta": meta, "copy": {"bytes_per_s": 3.0e12}, "kernels": records}


def _record(impl, op, direction, rows, hidden, ms, error=None):
    return dict(
        impl=impl,
        op=op,
        direction=direction,
        dtype="bfloat16",
        rows=rows,
        hidden=hidden,
        median_ms=ms,
        gbps=1.0,
        error=error,
    )


def test_compare_sets_measurements_against_the_predicted_dram_time(monkeypatch):
    def fake_model(backend, direction, spec, D, dtype="bf16", gpu="H100", rows=None):
        assert (dtype, gpu) == ("bf16", "H100")
        return km.ModelRow(
            backend,
            direction,
            spec,
            D,
            dtype,
            gpu,
            rows,
            path="cluster x2" if backend == "cuda" else "single pass",
            dram_bytes_per_element=8.0,
        )

    monkeypatch.setattr(km, "model_row", fake_model)
    rows, D = 4096, 32768
    predicted_ms = 8.0 * rows * D / 3.0e12 * 1e3  # the run's copy bandwidth
    results = _gpu_results(
        [
            _record("resfuse-cuda", "add_rms_norm", "fwd", rows, D, predicted_ms * 1.2),
            _record("resfuse-triton", "add_layer_norm", "bwd", rows, D, predicted_ms * 3),
            _record("resfuse-triton", "add_rms_norm", "fwd", rows, D, predicted_ms / 2),
            _record("resfuse-cuda", "add_rms_norm", "bwd", rows, D, None, error="oom"),
            _record("liger", "add_rms_norm", "fwd", rows, D, 1.0),  # not resfuse: ignored
            _record("resfuse-cuda", "rms_norm", "fwd", rows, D, 1.0),  # not modelled
        ],
        paths={str(D): {"fwd": "cluster x4", "bwd": "cluster x4"}},
    )
    comparisons, skipped = km.compare(results)
    assert [(c.impl, c.op, c.direction) for c in comparisons] == [
        ("resfuse-cuda", "add_rms_norm", "fwd"),
        ("resfuse-triton", "add_layer_norm", "bwd"),
        ("resfuse-triton", "add_rms_norm", "fwd"),
    ]
    ok, slow, fast = comparisons
    assert ok.predicted_ms == pytest.approx(predicted_ms) and ok.ratio == pytest.approx(1.2)
    assert ok.verdict.startswith("agrees") and "cluster x4" in ok.verdict  # the GPU's path
    assert slow.verdict.startswith("slower than the model by x3.00")
    assert fast.verdict.startswith("faster than the model by x2.00")
    assert len(skipped) == 2
    assert "not modelled" in " ".join(skipped) and "not measured" in " ".join(skipped)
    text = km.comparison_markdown(comparisons, skipped)
    assert "| resfuse-cuda | add_rms_norm | fwd | 4096x32768 |" in text


def test_compare_says_why_it_has_nothing_to_compare():
    cpu = {"meta": {"label": "CPU", "device": "CPU: x"}, "kernels": []}
    assert km.compare(cpu)[1][0].startswith("not a GPU run")
    other = _gpu_results([])
    other["meta"]["device"] = "NVIDIA A100-SXM4-80GB"
    assert "no model of the GPU" in km.compare(other)[1][0]
    assert km.gpu_of_device("NVIDIA H200") == "H200" and km.gpu_of_device("NVIDIA B200") == "B200"


# --------------------------------------------------------------------------- the table

DS = km.DEFAULT_DS
CASES = list(itertools.product(km.BACKENDS, km.DIRECTIONS, km.PLAIN_SPECS, DS))
PROMISED = [c for c in CASES if c[3] <= km.DESIGN[(c[0], c[1])].one_dram_read_up_to]


def _id(case) -> str:
    return "-".join(map(str, case))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The model's JSON for bf16 on H100, both plain specs, D = 1K..64K, with a synthetic GPU
    run to compare: computed once, in a subprocess without TRITON_INTERPRET."""
    reason = km.unavailable_reason()
    if not reason:
        sys.path.insert(0, str(ROOT / "tests"))
        from simt import sim_backend

        reason = sim_backend.unavailable_reason()
    if reason:
        (pytest.fail if REQUIRED else pytest.skip)(f"the kernel model cannot run here: {reason}")
    results = _gpu_results(
        [
            _record("resfuse-cuda", "add_rms_norm", "fwd", 2**25 // 4096, 4096, 1e3),
            _record("resfuse-triton", "add_layer_norm", "bwd", 2**25 // 8192, 8192, 1e-6),
        ],
        paths={"4096": {"fwd": "block", "bwd": "block"}},
    )
    path = tmp_path_factory.mktemp("model") / "results.json"
    path.write_text(json.dumps(results))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    # what `make bench` runs for its report (benchmarks/cli.py's kernel_model): the defaults
    # (bf16, both plain specs, D = 1K..64K) on the run's GPU, compared with the run
    cmd = [sys.executable, "-m", "tools.kernel_model", "--json", "--results", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout)
    out["by_case"] = {(r["backend"], r["direction"], r["spec"], r["D"]): r for r in out["rows"]}
    return out


def test_the_table_is_labelled_a_model_and_every_row_is_modelled(table):
    assert "MODEL" in table["model"] and "not measured" in table["model"]
    assert table["markdown"].startswith(f"**{km.MODEL_BANNER}**")
    assert sorted(table["by_case"]) == sorted(CASES)
    errors = {k: r["error"] for k, r in table["by_case"].items() if r["error"]}
    assert not errors


def _check(table, case, check):
    row = table["by_case"][case]
    assert check not in row["problems"], row["problems"][check]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_no_local_memory(table, case):
    _check(table, case, "local memory")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_row_data_moves_in_128_bit_accesses(table, case):
    _check(table, case, "narrow access")
    row = table["by_case"][case]
    assert row["path_widths"] and all(k.endswith(" 128") for k in row["path_widths"])


@pytest.mark.parametrize("case", PROMISED, ids=_id)
def test_one_dram_read_per_input_where_the_design_promises_it(table, case):
    _check(table, case, "extra DRAM pass")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_enough_bytes_in_flight_per_sm(table, case):
    _check(table, case, "bytes in flight")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_the_grid_leaves_no_sm_idle(table, case):
    _check(table, case, "idle SMs")


def test_the_traced_accesses_are_the_binarys(table):
    """ptxas keeps every global access of the PTX at its width (it may duplicate code): the
    kinds and widths of the whole binary's global accesses are the PTX's, so the trace's
    widths are the SASS's."""
    differ = [k for k, r in table["by_case"].items() if not r["sass_matches_ptx"]]
    assert not differ


def test_every_input_is_read_and_every_output_written(table):
    for (backend, direction, spec, D), r in table["by_case"].items():
        names = {t["name"] for t in r["tensors"]}
        expected = {"x", "residual", "y", "h"} if direction == "fwd" else {"h", "dy", "dh", "dx"}
        assert expected <= names, (backend, direction, spec, D)
        assert r["minimal_bytes_per_element"] == pytest.approx(8.0, abs=0.02)
        assert r["dram_bytes_per_element"] >= r["minimal_bytes_per_element"] - 1e-9


def test_cuda_kernels_are_the_binaries_the_extension_build_made(table):
    """The instantiations compiled for the model have the registers the extension build's
    ptxas reported for the same kernels (build/ptxas.log, written by `make install`)."""
    log = ROOT / "build" / "ptxas.log"
    if not log.exists():
        pytest.skip("no build/ptxas.log (the extension was not built here)")
    sys.path.insert(0, str(ROOT / "tools"))
    import ptxas_report

    built = {(k.name, k.arch): k.registers for k in ptxas_report.parse(log.read_text())}
    checked = 0
    for r in table["rows"]:
        if r["backend"] == "cuda" and (r["symbol"], "sm_90") in built:
            assert r["registers"] == built[(r["symbol"], "sm_90")], r["kernel"]
            checked += 1
    assert checked


def test_the_comparison_with_measurements_runs_end_to_end(table):
    (result,) = table["comparisons"]
    slow, fast = result["rows"]
    assert (slow["impl"], slow["hidden"]) == ("resfuse-cuda", 4096)
    assert slow["verdict"].startswith("slower") and slow["path_measured"] == "block"
    assert slow["path_predicted"] == "block"  # the model's layout is the GPU's
    assert fast["verdict"].startswith("faster")


# --------------------------------------------------------------------------- the report


def test_the_benchmark_report_has_the_model_section(table):
    from benchmarks import report

    section = "\n".join(
        report._kernel_model_section(
            {
                "kernel_model": {
                    "markdown": table["markdown"],
                    "comparison_markdown": table["comparison_markdown"],
                }
            }
        )
    )
    assert section.startswith("## Static kernel model (a prediction, not a measurement)")
    assert km.MODEL_BANNER in section and "| triton | fwd | add_rms_norm | 1024 |" in section
    assert "Model against measurement" in section


def test_the_report_says_why_it_has_no_model_section():
    from benchmarks import report

    assert "Not computed for this run" in "\n".join(report._kernel_model_section({}))
    skipped = report._kernel_model_section({"kernel_model": {"skipped": "nvdisasm not found"}})
    assert "Not computed: nvdisasm not found" in "\n".join(skipped)


def test_the_benchmark_cli_reads_the_models_output(monkeypatch, tmp_path):
    from benchmarks import cli

    def fake_run(cmd, **kw):
        assert cmd[1:5] == ["-m", "tools.kernel_model", "--json", "--results"]
        assert "TRITON_INTERPRET" not in kw["env"] and kw["cwd"] == ROOT
        out = {
            "markdown": "**MODEL**",
            "comparison_markdown": "",
            "rows": [{"gpu": "H100", "problems": {}}, {"gpu": "H100", "problems": {"x": "y"}}],
        }
        return SimpleNamespace(returncode=0, stdout=json.dumps(out), stderr="")

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    got = cli.kernel_model(tmp_path / "results.json")
    assert got == {"gpu": "H100", "markdown": "**MODEL**", "comparison_markdown": "", "problems": 1}

    def failing(cmd, **kw):
        return SimpleNamespace(returncode=2, stdout="", stderr="kernel model unavailable: no nvcc")

    monkeypatch.setattr(cli.subprocess, "run", failing)
    assert cli.kernel_model(tmp_path / "results.json") == {
        "skipped": "kernel model unavailable: no nvcc"
    }
