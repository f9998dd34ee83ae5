"""The Triton launch rules (triton_kernels/launch.py): which path a call takes, and the
persistent grids sized from the compiled kernel's occupancy and from L2. No GPU needed: the
rules take a GPU description (launch.GPUS) and a kernel's registers and shared memory."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from resfuse.spec import AddNormSpec  # noqa: E402
from resfuse.triton_kernels import launch  # noqa: E402

H100 = launch.GPUS["H100"]


def test_occupancy_from_registers_warps_and_shared_memory():
    # 16 warps: 128 registers fill the register file once, 64 twice; 8 warps at 60 -> 4
    assert launch.programs_per_sm(H100, 16, 119, 0) == 1
    assert launch.programs_per_sm(H100, 16, 128, 0) == 1
    assert launch.programs_per_sm(H100, 16, 64, 0) == 2
    assert launch.programs_per_sm(H100, 8, 60, 0) == 4
    assert launch.programs_per_sm(H100, 1, 16, 0) == 32  # the block limit
    assert launch.programs_per_sm(H100, 4, 32, 100_000) == 2  # shared memory decides


def test_backward_grid_follows_the_compiled_occupancy():
    # D = 8192 at 119 registers: one program per SM fits, so the grid is one per SM (it was
    # sized for two, and ran in two rounds)
    cfg = launch.bwd_config(8192)
    assert cfg.single_pass and cfg.num_warps == 16
    assert launch.bwd_programs(1 << 14, cfg, H100, 119, 0, 8192, 4) == H100.sms
    assert launch.bwd_programs(1 << 14, cfg, H100, 64, 0, 8192, 4) == 2 * H100.sms
    assert launch.bwd_programs(5, cfg, H100, 64, 0, 8192, 4) == 5  # never more than tiles


def test_streamed_backward_grid_counts_the_partial_rows_it_rewrites():
    # rows past the register sums take the partial rows, one row per tile: with 64
    # registers two programs would fit an SM; at 32K with one gradient each holds
    # 32K x (4 B of h and dy + 4 B of its partial row) = 256 KiB open, and 264 of them
    # (66 MiB) are over 0.75 x 50 MiB: one per SM (33 MiB)
    cfg = launch.bwd_config(32768)
    assert not cfg.single_pass and cfg.register_chunks == 0 and cfg.block_m == 1
    assert launch.bwd_programs(1024, cfg, H100, 64, 0, 32768, 4, 1) == H100.sms
    assert launch.rereads_fit_l2(H100, H100.sms, cfg, 32768, 8)
    assert launch.bwd_programs(1024, cfg, H100, 64, 0, 16384, 4, 0) == 2 * H100.sms
    assert launch.bwd_programs(1024, cfg, H100, 64, 0, 16384, 4, 2) == H100.sms


def test_streamed_forward_grid_keeps_the_second_pass_in_l2():
    cfg = launch.fwd_config(65536)
    assert not cfg.single_pass and cfg.block_m == 1
    rows = (1 << 25) // 65536
    # bf16 x and r: 4 bytes per element re-read. At 64K two programs per SM would hold
    # 264 x 256 KiB = 66 MiB open, over 0.75 x 50 MiB: one per SM; at 32K two fit.
    assert launch.fwd_programs(rows, cfg, H100, 64, 0, 65536, 4) == H100.sms
    assert launch.rereads_fit_l2(H100, H100.sms, cfg, 65536, 4)
    assert not launch.rereads_fit_l2(H100, 2 * H100.sms, cfg, 65536, 4)
    rows = (1 << 25) // 32768
    assert launch.fwd_programs(rows, cfg, H100, 64, 0, 32768, 4) == 2 * H100.sms
    # never fewer than one per SM, even when the rows cannot all stay in L2 (fp32 at 64K)
    assert launch.fwd_programs(512, cfg, H100, 64, 0, 65536, 8) == H100.sms
    assert not launch.rereads_fit_l2(H100, H100.sms, cfg, 65536, 8)
    # a row per program for rows held in registers
    assert launch.fwd_programs(1000, launch.fwd_config(4096), H100, 32, 0, 4096, 4) == 1000


def test_register_sums_path_for_the_plain_add_norm_in_bf16():
    plain = AddNormSpec(norm="rms")
    assert launch.register_sums_fit(plain, torch.bfloat16)
    assert not launch.register_sums_fit(plain, torch.float32)
    assert not launch.register_sums_fit(plain, torch.float16)
    assert launch.register_sums_fit(AddNormSpec(norm="layer", has_bias=True), torch.bfloat16)
    assert launch.register_sums_fit(AddNormSpec(norm="rms", has_rowscale=True), torch.bfloat16)
    # the variants that read x back (LayerScale tensor, branch norm) take the partial rows
    assert not launch.register_sums_fit(AddNormSpec(has_branch_scale=True), torch.bfloat16)
    assert not launch.register_sums_fit(AddNormSpec(branch_norm=True), torch.bfloat16)
    cfg = launch.bwd_config(16384, register_sums=True)
    assert cfg.register_chunks * cfg.block_d == 16384 and cfg.num_warps == 16
    assert launch.bwd_config(16384).register_chunks == 0  # the partial rows
    assert launch.bwd_config(32768, register_sums=True).register_chunks == 0  # too long
    assert launch.bwd_config(8192, register_sums=True).single_pass


def test_sandwich_forward_leaves_registers_earlier():
    assert launch.fwd_config(16384).single_pass
    assert not launch.fwd_config(16384, branch_norm=True).single_pass


def test_weights_stay_in_registers_for_short_backward_rows():
    assert launch.bwd_config(256).weights_resident and launch.bwd_config(256).block_m > 1
    assert launch.bwd_config(2048).weights_resident
    assert not launch.bwd_config(4096).weights_resident  # 16 warps: occupancy would halve
    assert not launch.bwd_config(16384, register_sums=True).weights_resident


def test_grid_comes_from_the_binary_the_launch_runs(monkeypatch):
    # the launcher compiles ahead of the launch (kernel.warmup) and reads the binary's
    # registers and shared memory; once per specialisation
    calls = []

    class Compiled:
        n_regs = 119
        metadata = SimpleNamespace(shared=0)

        def _init_handles(self):
            pass

    class Kernel:
        fn = SimpleNamespace(__name__="fake_bwd")

        def warmup(self, *args, grid, **kwargs):
            calls.append(grid)
            return Compiled()

    monkeypatch.setattr(launch, "gpu_of", lambda index: H100)
    monkeypatch.setattr(launch, "_RESOURCES", {})
    cfg = launch.bwd_config(8192)
    args = (torch.empty(4, 8192), 1 << 14, 8192, 0.5)
    sizing = launch.device_sizing(torch.device("cuda", 0))
    for _ in range(3):
        n = launch._programs(launch.bwd_programs, Kernel(), sizing, 1 << 14, 8192, cfg, args, {}, 4)
        assert n == H100.sms  # 119 registers at 16 warps: one program per SM
    assert calls == [(1,)]
    # the interpreter runs a few programs, whatever the binary
    assert launch.device_sizing(torch.device("cpu")) is None
    n = launch._programs(launch.bwd_programs, Kernel(), None, 1 << 14, 8192, cfg, args, {}, 4)
    assert n == launch.INTERPRETER_PROGRAMS
