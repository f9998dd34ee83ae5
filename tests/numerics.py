"""One numerical case of the fused op, run on a backend and checked against the float64
reference: y, h and every gradient, with upstream gradients on both y and h. Shared by the
CPU tests (Triton under the interpreter, the torch backend) and the GPU tests."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
from conftest import assert_close, float64_oracle

import resfuse
from resfuse.spec import forward_present

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    norm: str = "rms"  # "rms" | "layer"
    dtype: torch.dtype = torch.float32
    shape: tuple = (2, 3, 40)
    residual: str = "same"  # "none" | "same" | "fp32" (fp32 stream, x in dtype)
    weight: bool = True
    bias: bool = False
    branch: str = "none"  # "none" | "scalar" | "tensor"
    rowscale: bool = False
    zero_centered: bool = False
    prenorm: bool = True
    # "contiguous" | "row_strided" | "transposed" | "col_strided" | "misaligned"
    layout: str = "contiguous"
    residual_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    # the sandwich layout: norm_add_norm (branch_norm) and norm_add (output_norm=False)
    branch_norm: bool = False
    branch_weight: bool = True
    branch_bias: bool = False
    output_norm: bool = True

    def replace(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)

    def __str__(self) -> str:
        fields = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return ",".join(fields).replace("torch.", "") or "default"


def _row_major(lead: tuple, row_stride: int) -> tuple:
    """Strides of leading dims ``lead`` over rows ``row_stride`` elements apart."""
    strides, step = [], row_stride
    for n in reversed(lead):
        strides.insert(0, step)
        step *= n
    return tuple(strides)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t, in a non-contiguous layout."""
    if layout == "contiguous":
        return t
    if layout == "row_strided":  # rows padded: usable in place through the row stride
        base = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype, device=t.device)
        base[..., : t.shape[-1]] = t
        return base[..., : t.shape[-1]]
    if layout == "transposed":  # leading dims that do not collapse to one row stride
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "misaligned":  # rows at odd element offsets: no row starts vector-aligned
        D = t.shape[-1]
        base = torch.zeros(t.numel() // D * (D + 1) + 1, dtype=t.dtype, device=t.device)
        view = base[1:].as_strided((*t.shape[:-1], D), (*_row_major(t.shape[:-1], D + 1), 1))
        view.copy_(t)
        return view
    if layout == "col_strided":  # last dim not contiguous
        base = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        base[..., ::2] = t
        return base[..., ::2]
    raise ValueError(layout)


def make_inputs(case: Case, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    D = case.shape[-1]

    def randn(*shape, dtype=case.dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = _layout(randn(*case.shape), case.layout).requires_grad_()
    residual = None
    if case.residual != "none":
        rdtype = torch.float32 if case.residual == "fp32" else case.dtype
        residual = _layout(
            randn(*case.shape, dtype=rdtype, scale=2.0), case.layout
        ).requires_grad_()
    weight = randn(D, dtype=torch.float32).requires_grad_() if case.weight else None
    bias = randn(D, dtype=torch.float32).requires_grad_() if case.bias else None
    branch_scale = {
        "none": None,
        "scalar": 0.625,
        "tensor": randn(D, dtype=torch.float32).requires_grad_(),
    }[case.branch]
    rowscale = None
    if case.rowscale:  # drop-path style: per sample of the first dim, 0 or 1/keep
        n = case.shape[0] if len(case.shape) > 1 else 1
        keep = (torch.arange(n) % 3 != 1).float() / 0.75
        rowscale = keep.reshape((n,) + (1,) * (len(case.shape) - 2)).to(device)
        if len(case.shape) == 1:
            rowscale = rowscale.reshape(())
    branch_weight = branch_bias = None
    if case.branch_norm:
        branch_weight = (
            randn(D, dtype=torch.float32).requires_grad_() if case.branch_weight else None
        )
        branch_bias = randn(D, dtype=torch.float32).requires_grad_() if case.branch_bias else None
    return dict(
        x=x,
        residual=residual,
        weight=weight,
        bias=bias,
        branch_scale=branch_scale,
        rowscale=rowscale,
        branch_weight=branch_weight,
        branch_bias=branch_bias,
    )


def _loosest(*dtypes):
    order = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    return max((d for d in dtypes if d is not None), key=order.__getitem__)


def run_case(case: Case, backend: str, device, seed: int = 0):
    """Run forward and backward on `backend`, compare everything with float64; returns the
    gradients (for the determinism and cross-backend tests)."""
    inp = make_inputs(case, device, seed)
    snapshot = {k: v.detach().clone() for k, v in inp.items() if isinstance(v, torch.Tensor)}
    kwargs = dict(
        residual_scale=0.75 if case.residual != "none" else 1.0,
        branch_scale=inp["branch_scale"],
        rowscale=inp["rowscale"],
        zero_centered_weight=case.zero_centered,
        prenorm=case.prenorm,
        residual_dtype=case.residual_dtype,
        out_dtype=case.out_dtype,
        backend=backend,
    )
    eps = 1e-5
    if case.branch_norm:
        assert case.branch == "none" and not case.rowscale, "not part of the sandwich layout"
        common = dict(
            norm=case.norm,
            branch_bias=inp["branch_bias"],
            zero_centered_weight=case.zero_centered,
            residual_dtype=case.residual_dtype,
            backend=backend,
        )
        kwargs["residual_scale"] = 1.0
        if case.output_norm:
            out = resfuse.norm_add_norm(
                inp["x"],
                inp["residual"],
                inp["branch_weight"],
                inp["weight"],
                eps,
                bias=inp["bias"],
                prenorm=case.prenorm,
                out_dtype=case.out_dtype,
                **common,
            )
            y, h = out if case.prenorm else (out, None)
        else:
            y, h = (
                None,
                resfuse.norm_add(inp["x"], inp["residual"], inp["branch_weight"], eps, **common),
            )
    else:
        if case.norm == "rms":
            assert not case.bias
            out = resfuse.add_rms_norm(inp["x"], inp["residual"], inp["weight"], eps, **kwargs)
        else:
            out = resfuse.add_layer_norm(
                inp["x"], inp["residual"], inp["weight"], inp["bias"], eps, **kwargs
            )
        y, h = out if case.prenorm else (out, None)

    y64, h64, leaves = float64_oracle(
        inp["x"],
        inp["residual"],
        inp["weight"],
        inp["bias"],
        eps,
        norm=case.norm,
        residual_scale=kwargs["residual_scale"],
        branch_scale=inp["branch_scale"],
        rowscale=inp["rowscale"],
        zero_centered_weight=case.zero_centered,
        branch_weight=inp["branch_weight"],
        branch_bias=inp["branch_bias"],
        branch_norm=case.branch_norm,
    )

    h_dtype = case.residual_dtype or (
        inp["residual"].dtype if inp["residual"] is not None else case.dtype
    )
    out_dtype = case.out_dtype or case.dtype
    if case.output_norm:
        assert y.dtype == out_dtype and y.shape == inp["x"].shape
        assert_close(y, y64, out_dtype, "y")
    if case.prenorm or not case.output_norm:
        assert h.dtype == h_dtype and h.shape == inp["x"].shape
        assert_close(h, h64, h_dtype, "h")

    g = torch.Generator().manual_seed(seed + 1)
    dy = _layout(torch.randn(*case.shape, generator=g).to(out_dtype).to(device), case.layout)
    outputs, grads, outputs64, grads64 = [], [], [], []
    if case.output_norm:
        outputs, grads, outputs64, grads64 = [y], [dy], [y64], [dy.double()]
    if case.prenorm or not case.output_norm:
        dh = torch.randn(*case.shape, generator=g).to(h_dtype).to(device)
        outputs.append(h)
        grads.append(dh)
        outputs64.append(h64)
        grads64.append(dh.double())
    torch.autograd.backward(outputs, grads)
    torch.autograd.backward(outputs64, grads64)

    grad_dtype = _loosest(
        case.dtype,
        h_dtype,
        out_dtype,
        inp["residual"].dtype if inp["residual"] is not None else None,
    )
    result = {}
    for name in ("x", "residual", "weight", "bias", "branch_scale", "branch_weight", "branch_bias"):
        t = inp[name]
        if not isinstance(t, torch.Tensor):
            continue
        assert t.grad is not None, f"no gradient reached {name}"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        kind = "grad" if name in ("x", "residual") else "param"
        assert_close(t.grad, leaves[name].grad, grad_dtype, f"d{name}", kind)
        result[name] = t.grad.detach().clone()

    for k, v in snapshot.items():  # inputs are never written
        assert torch.equal(inp[k].detach(), v), f"{k} was modified"
    return result


# --------------------------------------------------------------------------- case families
# The cases of the numerical matrix (test_matrix.py), shared by the tests that need a few of
# them (the emulator's and the GPU's own tests).


def add_norm_flag_cases():
    """Every flag combination of the pre-norm add + norm family."""
    for norm, residual, weight, branch, rowscale, prenorm in itertools.product(
        ("rms", "layer"),
        ("none", "same", "fp32"),
        (True, False),
        ("none", "scalar", "tensor"),
        (False, True),
        (True, False),
    ):
        for bias in (False, True) if norm == "layer" else (False,):
            for zc in (False, True) if weight else (False,):
                yield Case(
                    norm=norm,
                    residual=residual,
                    weight=weight,
                    bias=bias,
                    branch=branch,
                    rowscale=rowscale,
                    zero_centered=zc,
                    prenorm=prenorm,
                )


def sandwich_flag_cases():
    """Every flag combination of the sandwich layouts: norm_add_norm, then norm_add."""
    for norm, residual, bw, weight, zc, prenorm in itertools.product(
        ("rms", "layer"),
        ("none", "same", "fp32"),
        (True, False),
        (True, False),
        (False, True),
        (True, False),
    ):
        for bb, bias in (
            itertools.product((False, True), repeat=2) if norm == "layer" else [(False, False)]
        ):
            yield Case(
                norm=norm,
                residual=residual,
                branch_norm=True,
                branch_weight=bw,
                branch_bias=bb,
                weight=weight,
                bias=bias,
                zero_centered=zc,
                prenorm=prenorm,
            )
    for norm, residual, bw, zc in itertools.product(
        ("rms", "layer"), ("none", "same", "fp32"), (True, False), (False, True)
    ):
        for bb in (False, True) if norm == "layer" else (False,):
            yield Case(
                norm=norm,
                residual=residual,
                branch_norm=True,
                branch_weight=bw,
                branch_bias=bb,
                weight=False,
                output_norm=False,
                zero_centered=zc,
            )


def _with_dtypes(cases):
    # residual="fp32" with fp32 activations is the same case as residual="same"
    cases = list(cases)
    return [
        c.replace(dtype=d)
        for d in DTYPES
        for c in cases
        if not (c.residual == "fp32" and d == torch.float32)
    ]


FLAG_CASES = list(add_norm_flag_cases())
FLAG_DTYPE_CASES = _with_dtypes(FLAG_CASES)
SANDWICH_CASES = _with_dtypes(sandwich_flag_cases())

# the representative cases of each op, for the shape, layout and dtype families
FULL = dict(residual="same", weight=True, branch="tensor", rowscale=True, zero_centered=True)
SHAPE_CASES = [Case(norm="layer", bias=True, **FULL), Case(norm="rms")]
GEMMA = Case(norm="rms", branch_norm=True, zero_centered=True)
PERI_LN = Case(norm="layer", branch_norm=True, branch_bias=True, bias=True)
OLMO2 = Case(norm="rms", branch_norm=True, weight=False, output_norm=False)
LAYOUTS = [GEMMA, PERI_LN, OLMO2]
LAYOUT_IDS = ["gemma", "peri_ln", "olmo2"]

MIXED = [
    dict(dtype=torch.bfloat16, residual="fp32"),  # fp32 residual stream
    dict(dtype=torch.float16, residual="fp32", out_dtype=torch.float32),
    dict(dtype=torch.bfloat16, residual="same", residual_dtype=torch.float32),
    dict(dtype=torch.float32, residual="same", out_dtype=torch.bfloat16),
    dict(dtype=torch.bfloat16, residual="none", residual_dtype=torch.float32),
    dict(
        dtype=torch.float16,
        residual="same",
        residual_dtype=torch.bfloat16,
        out_dtype=torch.bfloat16,
    ),
]
SANDWICH_MIXED = [
    dict(dtype=torch.bfloat16, residual="fp32"),
    dict(dtype=torch.bfloat16, residual="same", residual_dtype=torch.float32),
    dict(dtype=torch.float16, residual="same", out_dtype=torch.float32),
]


def mixed_case(base: Case, mixed: dict) -> Case:
    """``base`` with a dtype mix (norm_add has no y, so no out_dtype)."""
    if not base.output_norm and "out_dtype" in mixed:
        mixed = {k: v for k, v in mixed.items() if k != "out_dtype"}
    return base.replace(shape=(4, 3, 96), **mixed)


def dtype_id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def cluster_blocks(D: int, block_row: int, max_cluster: int) -> int:
    """The blocks of a thread-block cluster the CUDA kernels spread a row of D over: the
    fewest powers of two of blocks of ``block_row`` elements that hold it, up to
    ``max_cluster``; past that (or without clusters) 1: the row streams in tiles of one
    block. (The rule of csrc/add_norm_launch.h's row_layout, for the tests' expectations.)"""
    blocks = 1
    while blocks * block_row < D and blocks < max_cluster:
        blocks *= 2
    return blocks if blocks * block_row >= D else 1


def full_feature_call(
    device="cpu",
    dtype=torch.bfloat16,
    rows=6,
    D=24,
    norm="layer",
    branch_norm=False,
    output_norm=True,
):
    """(spec, operands) of a direct call of a compiled backend's ops with every feature its
    layout allows (residual and branch scales, rowscale, zero-centred weights, an fp32 h and a
    bf16 y): the opcheck tests of the CPU and CUDA extensions."""
    from resfuse.spec import AddNormSpec, Operands

    x = torch.randn(rows, D, device=device, dtype=dtype)
    plain, layer = not branch_norm, norm == "layer"

    def vec():
        return torch.randn(D, device=device)

    ops = Operands(
        x,
        torch.randn_like(x),
        vec() if output_norm else None,
        vec() if layer and output_norm else None,
        vec() if plain else None,
        torch.rand(rows, device=device) if plain else None,
        vec() if branch_norm else None,
        vec() if branch_norm and layer else None,
    )
    spec = AddNormSpec(
        norm=norm,
        eps=1e-5,
        residual_scale=0.5 if plain else 1.0,
        branch_scale=1.5 if plain else 1.0,
        zero_centered_weight=True,
        branch_norm=branch_norm,
        output_norm=output_norm,
        has_weight=output_norm,
        has_bias=layer and output_norm,
        has_branch_scale=plain,
        has_rowscale=plain,
        has_branch_weight=branch_norm,
        has_branch_bias=branch_norm and layer,
        x_dtype=dtype,
        residual_dtype=dtype,
        h_dtype=torch.float32,
        out_dtype=torch.bfloat16,
    )
    return spec, ops


def backward_op_args(spec, ops, dy, dh, h, mean, mean_x) -> tuple:
    """The arguments of a compiled backend's backward op (``<device>_add_norm_bwd``) after a
    forward op call of ``full_feature_call``'s (spec, ops): dy and h only with the output norm,
    the LayerNorm row means only where the layout has them (None leaves them out)."""
    _, _, has_mean, has_mean_x = forward_present(spec)
    return (
        dy if spec.output_norm else None,
        dh,
        h if spec.output_norm else None,
        ops.x,
        ops.weight,
        ops.branch_scale,
        ops.rowscale,
        ops.branch_weight,
        mean if has_mean else None,
        mean_x if has_mean_x else None,
        *spec.flat(),
    )
