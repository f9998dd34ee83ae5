"""The description of a call (resfuse/spec.py): its flat form round-trips, the derived facts
(where dresidual comes from, whether h is x, the op family, which outputs exist) follow the
fields, and the flag bits agree with their copies in the CUDA and Triton kernels."""

import re
from pathlib import Path

import pytest
import torch

from resfuse.spec import (
    AddNormSpec,
    Flag,
    Operands,
    backward_outputs,
    backward_present,
    family,
    forward_outputs,
    forward_present,
    launch_form,
)

ROOT = Path(__file__).resolve().parent.parent
BOOLEANS = [f for f in AddNormSpec._fields if isinstance(AddNormSpec._field_defaults[f], bool)]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.lower().split("_"))


def test_flag_bits_match_the_cuda_kernels():
    """csrc/add_norm_params.h's kFlag* are the same bits (the CUDA side decodes them)."""
    header = (ROOT / "csrc" / "add_norm_params.h").read_text()
    cpp = {
        m.group(1): 1 << int(m.group(2)) for m in re.finditer(r"kFlag(\w+) = 1u << (\d+)", header)
    }
    assert cpp == {_camel(f.name): int(f) for f in Flag}


def test_flag_bits_match_the_triton_kernels():
    from resfuse.triton_kernels import add_norm_kernels as k

    for f in Flag:
        assert getattr(k, f"_{f.name}").value == int(f), f.name


@pytest.mark.parametrize("bits", range(0, 1 << 6))
def test_flat_form_round_trips(bits):
    """Every boolean survives flat() / from_flat(), with the scalars and dtypes."""
    values = {
        name: bool(bits >> (i % 6) & 1) ^ (i >= 6 and i % 2 == 1) for i, name in enumerate(BOOLEANS)
    }
    spec = AddNormSpec(
        norm="layer" if bits & 1 else "rms",
        eps=1e-3,
        residual_scale=0.5,
        branch_scale=2.0,
        x_dtype=torch.bfloat16,
        residual_dtype=torch.float32,
        h_dtype=torch.float16,
        out_dtype=torch.float32,
        **values,
    )
    assert AddNormSpec.from_flat(*spec.flat()) == spec
    assert all(isinstance(v, (float, int, torch.dtype)) for v in spec.flat())
    # the compiled backends' cached launch form is the same flat form and output metas
    assert launch_form(spec) == (spec.flat(), forward_present(spec), backward_present(spec))


def test_every_boolean_has_a_bit():
    spec = AddNormSpec(norm="layer", **{name: False for name in BOOLEANS})
    assert spec.flags == 0
    seen = 0
    for name in BOOLEANS:
        bits = spec._replace(**{name: True}).flags
        assert bits and not bits & seen, name  # its own bit
        seen |= bits
    assert AddNormSpec(norm="rms", **{n: False for n in BOOLEANS}).flags == int(Flag.RMS)


def test_dresidual_source():
    f32, bf16 = torch.float32, torch.bfloat16
    base = AddNormSpec(x_dtype=bf16, residual_dtype=bf16, h_dtype=bf16, out_dtype=bf16)
    assert base.dresidual == "dx"  # unit scales, one dtype: dx serves
    assert base._replace(residual_scale=2.0).dresidual == "kernel"
    assert base._replace(branch_scale=0.5).dresidual == "kernel"
    assert base._replace(has_branch_scale=True).dresidual == "kernel"
    assert base._replace(has_rowscale=True).dresidual == "kernel"
    assert base._replace(residual_dtype=f32, h_dtype=f32).dresidual == "kernel"
    assert base._replace(has_residual=False).dresidual is None
    sandwich = base._replace(branch_norm=True, has_branch_weight=True)
    assert sandwich.dresidual == "kernel"  # dx is the gradient through the norm
    assert sandwich._replace(output_norm=False).dresidual == "dh"  # h = r + norm(x): passes dh
    assert sandwich._replace(output_norm=False, h_dtype=f32).dresidual == "kernel"
    assert base.flags & Flag.STORE_DRESIDUAL == 0
    assert base._replace(residual_scale=2.0).flags & Flag.STORE_DRESIDUAL


def test_h_is_x_and_what_the_backward_reads():
    plain = AddNormSpec(has_residual=False)
    assert plain.h_is_x and not plain.reads_x_in_backward
    for change in (
        dict(has_residual=True),
        dict(branch_scale=2.0),
        dict(has_rowscale=True),
        dict(h_dtype=torch.float16),
    ):
        assert not plain._replace(**change).h_is_x, change
    assert AddNormSpec(has_branch_scale=True).reads_x_in_backward
    assert AddNormSpec(branch_norm=True).reads_x_in_backward


def test_family():
    assert family(True, False, True) == "add_norm" and family(False, False, True) == "norm"
    assert family(True, True, True) == "norm_add_norm" and family(True, True, False) == "norm_add"
    assert AddNormSpec(branch_norm=True, output_norm=False).family == "norm_add"


def test_output_metas():
    spec = AddNormSpec(
        norm="layer",
        has_bias=True,
        has_branch_scale=True,
        store_h=False,
        x_dtype=torch.bfloat16,
        residual_dtype=torch.float32,
        h_dtype=torch.float32,
        out_dtype=torch.float16,
    )
    x = torch.empty(2, 3, 8)
    y, h, mean, mean_x = forward_outputs(spec, x, x.shape, x.shape[:-1])
    assert (y.shape, y.dtype, h.shape, mean.shape, mean_x.shape) == (
        (2, 3, 8),
        torch.float16,
        (0,),
        (2, 3),
        (0,),
    )
    assert forward_present(spec) == (True, False, True, False)
    grads = backward_outputs(spec, x, x.shape)
    assert [(tuple(g.shape), g.dtype) for g in grads] == [
        ((2, 3, 8), torch.bfloat16),
        ((2, 3, 8), torch.float32),
        ((8,), torch.float32),
        ((8,), torch.float32),
        ((8,), torch.float32),
        ((0,), torch.float32),
        ((0,), torch.float32),
    ]
    assert backward_present(spec) == (True, True, True, True, True, False, False)


def test_operands_default_to_absent():
    x = torch.empty(2, 4)
    ops = Operands(x)
    assert ops.x is x and all(t is None for t in ops[1:])


def test_triton_kernels_are_imported_only_as_resfuse_triton_kernels():
    """The top-level triton_kernels/ folder installs as resfuse.triton_kernels; importing it
    by its folder name (possible from a checkout) would load the kernels twice."""
    import sys

    assert "triton_kernels" not in sys.modules
    assert "resfuse.triton_kernels.add_norm_kernels" in sys.modules
