"""The PyTorch reference of the computations resfuse fuses.

Per row of the last dimension (size D), in ``compute_dtype`` (fp32 for the ``"torch"``
backend, float64 when the tests use it as the oracle)::

    h = residual_scale * residual + branch_scale * rowscale[row] * x
    y = normalize(h) * w' (+ bias)          w' = 1 + weight if zero_centered_weight else weight

and the sandwich layout (Gemma2/3, Peri-LN; OLMo2 without the second norm)::

    h = residual + normalize(x) * w_b' (+ b_b)
    y = normalize(h) * w' (+ b)

Every backend is checked against this function; it is deliberately plain torch code with no
tricks, so that it can be read as the specification.

``forward`` / ``backward`` at the end run it in fp32 behind the backend interface
(``spec.Backend``): that is the ``"torch"`` backend, on any device, and the CPU path of
``"auto"``. Like the kernels, its backward differentiates each norm at the tensor it reads
back (:func:`normalize_backward`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .spec import AddNormSpec, BackwardInputs, Forward, Grads, Operands


def residual_sum(
    x: Tensor,
    residual: Optional[Tensor],
    *,
    residual_scale: float = 1.0,
    branch_scale: Union[None, float, Tensor] = None,
    rowscale: Optional[Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``h = residual_scale * residual + branch_scale * rowscale * x`` in ``compute_dtype``."""
    f = x.to(compute_dtype)
    if branch_scale is not None:
        f = f * (
            branch_scale.to(compute_dtype) if isinstance(branch_scale, Tensor) else branch_scale
        )
    if rowscale is not None:
        f = f * rowscale.to(compute_dtype).unsqueeze(-1)
    if residual is not None:
        f = f + residual_scale * residual.to(compute_dtype)
    return f


def normalize(
    h: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    *,
    norm: str = "rms",
    zero_centered_weight: bool = False,
) -> Tensor:
    """RMSNorm or LayerNorm (biased variance) of ``h`` over its last dimension, then the affine."""
    if norm == "rms":
        xhat = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        centred = h - h.mean(-1, keepdim=True)
        xhat = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
    if weight is not None:
        w = weight.to(h.dtype)
        xhat = xhat * (1 + w if zero_centered_weight else w)
    if bias is not None:
        xhat = xhat + bias.to(h.dtype)
    return xhat


def normalize_backward(
    h: Tensor,
    dy: Tensor,
    weight: Optional[Tensor],
    eps: float,
    *,
    norm: str = "rms",
    zero_centered_weight: bool = False,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Gradients ``(dh, dweight, dbias)`` of ``normalize`` at ``h`` for the upstream ``dy``,
    in ``h``'s dtype, the closed form the kernels implement::

        g = dy * w',  dh = rstd * (g - mean(g * xhat) * xhat - mean(g))   (no mean(g) for RMS)

    (Written out because autograd cannot run inside a custom op's implementation; the tests
    check it against autograd through :func:`normalize` in float64.)
    """
    if norm == "rms":
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        xhat = h * rstd
    else:
        centred = h - h.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
        xhat = centred * rstd
    dy = dy.to(h.dtype)
    g = dy
    if weight is not None:
        w = weight.to(h.dtype)
        g = dy * (1 + w if zero_centered_weight else w)
    dh = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if norm == "layer":
        dh = dh - g.mean(-1, keepdim=True)
    rows = tuple(range(h.dim() - 1))
    dweight = (dy * xhat).sum(rows) if weight is not None else None
    return dh * rstd, dweight, dy.sum(rows)


def add_norm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    *,
    norm: str = "rms",
    residual_scale: float = 1.0,
    branch_scale: Union[None, float, Tensor] = None,
    rowscale: Optional[Tensor] = None,
    zero_centered_weight: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``(y, h)`` in ``compute_dtype``, differentiable with plain autograd; ``rowscale`` has
    the shape ``x.shape[:-1]`` (already broadcast)."""
    h = residual_sum(
        x,
        residual,
        residual_scale=residual_scale,
        branch_scale=branch_scale,
        rowscale=rowscale,
        compute_dtype=compute_dtype,
    )
    y = normalize(h, weight, bias, eps, norm=norm, zero_centered_weight=zero_centered_weight)
    return y, h


def norm_add_norm(
    x: Tensor,
    residual: Optional[Tensor],
    branch_weight: Optional[Tensor],
    weight: Optional[Tensor],
    eps: float,
    *,
    norm: str = "rms",
    branch_bias: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    zero_centered_weight: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``(y, h)`` of the sandwich layout in ``compute_dtype``; ``h`` alone is ``norm_add``."""
    f = normalize(
        x.to(compute_dtype),
        branch_weight,
        branch_bias,
        eps,
        norm=norm,
        zero_centered_weight=zero_centered_weight,
    )
    return add_norm(
        f,
        residual,
        weight,
        bias,
        eps,
        norm=norm,
        zero_centered_weight=zero_centered_weight,
        compute_dtype=compute_dtype,
    )


# --------------------------------------------------------------------------- the "torch" backend


def forward(spec: AddNormSpec, ops: Operands) -> Forward:
    """The reference in fp32 behind the backend interface (2-D operands, ``spec.Operands``)."""
    f = ops.x.float()
    if spec.branch_norm:
        f = normalize(
            f,
            ops.branch_weight,
            ops.branch_bias,
            spec.eps,
            norm=spec.norm,
            zero_centered_weight=spec.zero_centered_weight,
        )
    h = residual_sum(
        f,
        ops.residual,
        residual_scale=spec.residual_scale,
        branch_scale=ops.branch_scale if ops.branch_scale is not None else spec.branch_scale,
        rowscale=ops.rowscale,
    )
    y = None
    if spec.output_norm:
        y = normalize(
            h,
            ops.weight,
            ops.bias,
            spec.eps,
            norm=spec.norm,
            zero_centered_weight=spec.zero_centered_weight,
        ).to(spec.out_dtype)
    # the row means are the kernels' shifts for the backward; unused here
    layer = spec.norm == "layer"
    return Forward(
        y,
        h.to(spec.h_dtype) if spec.store_h else None,
        h.mean(-1) if layer and spec.output_norm else None,
        ops.x.float().mean(-1) if layer and spec.branch_norm else None,
    )


def backward(spec: AddNormSpec, inputs: BackwardInputs) -> Grads:
    dweight = dbias = None
    if spec.output_norm:
        dh_total, dweight, dbias = normalize_backward(
            inputs.h.float(),
            inputs.dy,
            inputs.weight,
            spec.eps,
            norm=spec.norm,
            zero_centered_weight=spec.zero_centered_weight,
        )
        if inputs.dh is not None:
            dh_total = dh_total + inputs.dh.float()
        dbias = dbias if spec.has_bias else None
    else:
        dh_total = inputs.dh.float()

    df = dh_total * spec.branch_scale
    if inputs.rowscale is not None:
        df = df * inputs.rowscale.float().unsqueeze(-1)
    dbranch = dbranch_weight = dbranch_bias = None
    if inputs.branch_scale is not None:
        dbranch = (df * inputs.x.float()).sum(0)
        df = df * inputs.branch_scale.float()
    if spec.branch_norm:
        df, dbranch_weight, dbranch_bias = normalize_backward(
            inputs.x.float(),
            df,
            inputs.branch_weight,
            spec.eps,
            norm=spec.norm,
            zero_centered_weight=spec.zero_centered_weight,
        )
        dbranch_bias = dbranch_bias if spec.has_branch_bias else None
    dresidual = (
        (dh_total * spec.residual_scale).to(spec.residual_dtype)
        if spec.dresidual == "kernel"
        else None
    )
    return Grads(
        df.to(spec.x_dtype), dresidual, dweight, dbias, dbranch, dbranch_weight, dbranch_bias
    )
