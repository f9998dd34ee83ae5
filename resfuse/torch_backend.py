"""The ``"torch"`` backend: the reference run in fp32 behind the same interface as the kernels.

Works on any device and is the CPU path of ``"auto"``. Like the kernels, the backward
differentiates each norm at the tensor it reads back (``reference.normalize_backward``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference


def forward(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    branch_scale: Optional[Tensor],
    rowscale: Optional[Tensor],
    *,
    eps: float,
    residual_scale: float,
    branch_scale_value: float,
    is_rms: bool,
    zero_centered_weight: bool,
    store_h: bool,
    residual_dtype: torch.dtype,
    out_dtype: torch.dtype,
    branch_norm: bool = False,
    branch_weight: Optional[Tensor] = None,
    branch_bias: Optional[Tensor] = None,
    output_norm: bool = True,
):
    norm = "rms" if is_rms else "layer"
    f = x.float()
    if branch_norm:
        f = reference.normalize(f, branch_weight, branch_bias, eps, norm=norm,
                                zero_centered_weight=zero_centered_weight)
    h = reference.residual_sum(
        f, residual, residual_scale=residual_scale,
        branch_scale=branch_scale if branch_scale is not None else branch_scale_value,
        rowscale=rowscale)
    y = None
    if output_norm:
        y = reference.normalize(h, weight, bias, eps, norm=norm,
                                zero_centered_weight=zero_centered_weight).to(out_dtype)
    # the row means are the kernels' shifts for the backward; unused here
    mean = h.mean(-1) if not is_rms and output_norm else None
    mean_x = x.float().mean(-1) if not is_rms and branch_norm else None
    return y, (h.to(residual_dtype) if store_h else None), mean, mean_x


def backward(
    dy: Optional[Tensor],
    dh: Optional[Tensor],
    h: Optional[Tensor],
    x: Optional[Tensor],
    weight: Optional[Tensor],
    branch_scale: Optional[Tensor],
    rowscale: Optional[Tensor],
    mean: Optional[Tensor],
    *,
    eps: float,
    residual_scale: float,
    branch_scale_value: float,
    is_rms: bool,
    zero_centered_weight: bool,
    has_bias: bool,
    store_dresidual: bool,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    branch_norm: bool = False,
    branch_weight: Optional[Tensor] = None,
    has_branch_bias: bool = False,
    mean_x: Optional[Tensor] = None,
    output_norm: bool = True,
):
    norm = "rms" if is_rms else "layer"
    dweight = dbias = None
    if output_norm:
        dh_total, dweight, dbias = reference.normalize_backward(
            h.float(), dy, weight, eps, norm=norm, zero_centered_weight=zero_centered_weight)
        if dh is not None:
            dh_total = dh_total + dh.float()
        dbias = dbias if has_bias else None
    else:
        dh_total = dh.float()

    df = dh_total * branch_scale_value
    if rowscale is not None:
        df = df * rowscale.float().unsqueeze(-1)
    dbranch = dbranch_weight = dbranch_bias = None
    if branch_scale is not None:
        dbranch = (df * x.float()).sum(0)
        df = df * branch_scale.float()
    if branch_norm:
        df, dbranch_weight, dbranch_bias = reference.normalize_backward(
            x.float(), df, branch_weight, eps, norm=norm, zero_centered_weight=zero_centered_weight)
        dbranch_bias = dbranch_bias if has_branch_bias else None
    dresidual = (dh_total * residual_scale).to(residual_dtype) if store_dresidual else None
    return df.to(x_dtype), dresidual, dweight, dbias, dbranch, dbranch_weight, dbranch_bias
