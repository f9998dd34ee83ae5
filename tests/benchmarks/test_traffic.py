"""The byte counts behind every GB/s figure, checked against DOMAIN.md's bandwidth floor
written out by hand."""

import pytest
import torch

from benchmarks.traffic import (
    DIRECTIONS,
    OPS,
    SPECS,
    full_tensors_moved,
    minimal_bytes,
    tensors_moved,
)

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


def test_sandwich_rms_norm_bf16():
    # Gemma2/3: forward reads x and r, writes y and h; w_b and w read
    assert minimal_bytes("norm_add_rms_norm", "fwd", N, D, BF16) == 4 * 2 * N * D + 2 * 2 * D
    # backward reads dy, dh, h and x (the branch norm's gradient needs x), writes dx and
    # dresidual (the gradient reaching h: not dx's); w_b and w read, dw_b and dw written
    assert minimal_bytes("norm_add_rms_norm", "bwd", N, D, BF16) == (
        6 * 2 * N * D + 2 * 2 * D + 2 * 2 * D
    )
    assert minimal_bytes("norm_add_rms_norm", "fwd+bwd", N, D, BF16) == 10 * 2 * N * D + 12 * D


def test_sandwich_layer_norm_adds_both_biases():
    # both biases read in the forward, both gradients written in the backward; the backward
    # reads no bias
    fp32 = torch.float32
    assert minimal_bytes("norm_add_layer_norm", "fwd", N, D, fp32) == (4 * 4 * N * D + 4 * 4 * D)
    assert minimal_bytes("norm_add_layer_norm", "bwd", N, D, fp32) == (
        6 * 4 * N * D + 2 * 4 * D + 4 * 4 * D
    )


def test_olmo2_norm_add_passes_dh_through_as_dresidual():
    # forward reads x and r, writes h; backward reads dh and x, writes dx: dresidual is dh
    assert minimal_bytes("rms_norm_add", "fwd", N, D, BF16) == 3 * 2 * N * D + 2 * D
    assert minimal_bytes("rms_norm_add", "bwd", N, D, BF16) == 3 * 2 * N * D + 2 * D + 2 * D
    assert tensors_moved("rms_norm_add", "bwd") == (("dh", "x", "w_b"), ("dx", "dw_b"))


def test_sandwich_with_an_fp32_residual_stream():
    got = minimal_bytes("norm_add_rms_norm", "bwd", N, D, BF16, residual_dtype=torch.float32)
    dy, dh, h, x, dx, dr = 2, 4, 4, 2, 2, 4
    assert got == (dy + dh + h + x + dx + dr) * N * D + 4 * 2 * D
    got = minimal_bytes("rms_norm_add", "fwd", N, D, BF16, residual_dtype=torch.float32)
    assert got == (2 + 4 + 4) * N * D + 2 * D  # x, residual, h
    got = minimal_bytes("rms_norm_add", "bwd", N, D, BF16, residual_dtype=torch.float32)
    assert got == (4 + 2 + 2) * N * D + 2 * 2 * D  # dh, x, dx


def test_sandwich_tensors_by_name():
    assert tensors_moved("norm_add_layer_norm", "fwd") == (
        ("x", "residual", "w_b", "b_b", "w", "b"),
        ("y", "h"),
    )
    assert tensors_moved("norm_add_layer_norm", "bwd") == (
        ("dy", "dh", "h", "x", "w_b", "w"),
        ("dx", "dresidual", "dw_b", "db_b", "dw", "db"),
    )
    # equal dtypes or not, the sandwich never shares dx as dresidual
    assert tensors_moved("norm_add_rms_norm", "bwd", dx_serves_as_dresidual=True)[1] == (
        "dx",
        "dresidual",
        "dw_b",
        "dw",
    )
    with pytest.raises(ValueError, match="fwd"):
        tensors_moved("rms_norm_add", "fwd+bwd")


@pytest.mark.parametrize("op", ["norm_add_rms_norm", "rms_norm_add", "layer_norm"])
def test_layer_scale_is_for_the_add_ops_only(op):
    with pytest.raises(ValueError, match="layer_scale applies to the add ops"):
        minimal_bytes(op, "fwd", N, D, BF16, layer_scale=True)


def test_specs_name_outputs_and_arguments():
    assert SPECS["norm_add_rms_norm"].outputs == ("y", "h")
    assert SPECS["rms_norm_add"].outputs == ("h",)
    assert SPECS["rms_norm"].outputs == ("y",)
    assert SPECS["add_layer_norm"].arguments == ("x", "residual", "weight", "bias")
    assert SPECS["rms_norm_add"].arguments[4:] == ("branch_weight", "branch_bias")
    assert SPECS["rms_norm_add"].parameters == ("branch_weight",)
    assert SPECS["norm_add_layer_norm"].parameters == (
        "weight",
        "bias",
        "branch_weight",
        "branch_bias",
    )


def test_full_tensors_moved():
    assert [full_tensors_moved("add_rms_norm", d) for d in DIRECTIONS] == [4, 4, 8]
    assert [full_tensors_moved("layer_norm", d) for d in DIRECTIONS] == [2, 3, 5]
    assert [full_tensors_moved("norm_add_layer_norm", d) for d in DIRECTIONS] == [4, 6, 10]
    assert [full_tensors_moved("rms_norm_add", d) for d in DIRECTIONS] == [3, 3, 6]


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
