"""The byte counts behind every GB/s figure, checked against DOMAIN.md's bandwidth floor
written out by hand."""

import pytest
import torch

from benchmarks.traffic import DIRECTIONS, OPS, full_tensors_moved, minimal_bytes

N, D = 4096, 1024
BF16 = torch.bfloat16


def test_prenorm_add_rms_norm_bf16_matches_the_domain_floor():
    # forward reads f and r, writes y and r: 4 x 2ND, plus the weight read
    assert minimal_bytes("add_rms_norm", "fwd", N, D, BF16) == 4 * 2 * N * D + 2 * D
    # backward reads dy, dr, r and writes df, which serves as dr' too: 4 x 2ND, plus the
    # weight read and the weight gradient written
    assert minimal_bytes("add_rms_norm", "bwd", N, D, BF16) == 4 * 2 * N * D + 2 * D + 2 * D
    assert minimal_bytes("add_rms_norm", "fwd+bwd", N, D, BF16) == 8 * 2 * N * D + 6 * D


def test_layer_norm_adds_the_bias_vector():
    rms = minimal_bytes("add_rms_norm", "fwd", N, D, BF16)
    assert minimal_bytes("add_layer_norm", "fwd", N, D, BF16) == rms + 2 * D  # bias read
    rms_bwd = minimal_bytes("add_rms_norm", "bwd", N, D, BF16)
    assert minimal_bytes("add_layer_norm", "bwd", N, D, BF16) == rms_bwd + 2 * D  # dbias


def test_plain_norms():
    assert minimal_bytes("rms_norm", "fwd", N, D, BF16) == 2 * 2 * N * D + 2 * D
    # backward reads dy and x, writes dx; weight read, dweight written
    assert minimal_bytes("rms_norm", "bwd", N, D, BF16) == 3 * 2 * N * D + 4 * D
    assert minimal_bytes("layer_norm", "bwd", N, D, torch.float32) == 3 * 4 * N * D + 3 * 4 * D


def test_fp32_residual_stream_needs_its_own_dresidual():
    # bf16 branch, fp32 residual: dx cannot serve as dresidual, 5 tensors in the backward
    got = minimal_bytes("add_rms_norm", "bwd", N, D, BF16, residual_dtype=torch.float32)
    dy, dh, h, dx, dr = 2, 4, 4, 2, 4
    assert got == (dy + dh + h + dx + dr) * N * D + 2 * D + 2 * D
    got = minimal_bytes("add_rms_norm", "fwd", N, D, BF16, residual_dtype=torch.float32)
    assert got == (2 + 4 + 2 + 4) * N * D + 2 * D


def test_layer_scale_reads_x_and_writes_both_gradients():
    got = minimal_bytes("add_layer_norm", "bwd", N, D, BF16, layer_scale=True)
    # dy, dh, h and x read; dx and dresidual written (no longer the same tensor)
    vectors = 2 * D * 2 + 2 * D * 3  # w and gamma read; dw, db, dgamma written
    assert got == 6 * 2 * N * D + vectors
    with pytest.raises(ValueError, match="layer_scale"):
        minimal_bytes("rms_norm", "bwd", N, D, BF16, layer_scale=True)


def test_parameter_dtype_counts_separately():
    got = minimal_bytes("rms_norm", "fwd", N, D, BF16, param_dtype=torch.float32)
    assert got == 2 * 2 * N * D + 4 * D


def test_full_tensors_moved():
    assert [full_tensors_moved("add_rms_norm", d) for d in DIRECTIONS] == [4, 4, 8]
    assert [full_tensors_moved("layer_norm", d) for d in DIRECTIONS] == [2, 3, 5]


@pytest.mark.parametrize("op", OPS)
def test_counts_scale_linearly_with_rows(op):
    for direction in DIRECTIONS:
        one = minimal_bytes(op, direction, 1000, D, BF16)
        two = minimal_bytes(op, direction, 2000, D, BF16)
        zero = minimal_bytes(op, direction, 0, D, BF16)
        assert two - one == one - zero > 0


def test_rejects_unknown_names():
    with pytest.raises(ValueError, match="op must be one of"):
        minimal_bytes("add_norm", "fwd", N, D, BF16)
    with pytest.raises(ValueError, match="direction must be one of"):
        minimal_bytes("rms_norm", "forward", N, D, BF16)
