"""The ``"torch"`` backend: the reference run in fp32 behind the same interface as the kernels.

Works on any device and is the CPU path of ``"auto"``. Like the kernels, the backward
differentiates the norm at the stored ``h`` (``reference.normalize_backward``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference


def _branch(branch_scale: Optional[Tensor], branch_scale_value: float):
    return branch_scale if branch_scale is not None else branch_scale_value


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
):
    norm = "rms" if is_rms else "layer"
    h = reference.residual_sum(x, residual, residual_scale=residual_scale,
                               branch_scale=_branch(branch_scale, branch_scale_value),
                               rowscale=rowscale)
    y = reference.normalize(h, weight, bias, eps, norm=norm,
                            zero_centered_weight=zero_centered_weight)
    mean = None if is_rms else h.mean(-1)  # the kernels' shift for the backward; unused here
    return y.to(out_dtype), (h.to(residual_dtype) if store_h else None), mean


def backward(
    dy: Tensor,
    dh: Optional[Tensor],
    h: Tensor,
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
):
    dh_total, dweight, dbias = reference.normalize_backward(
        h.float(), dy, weight, eps, norm="rms" if is_rms else "layer",
        zero_centered_weight=zero_centered_weight)
    if dh is not None:
        dh_total = dh_total + dh.float()
    dbias = dbias if has_bias else None

    d_branch = dh_total * branch_scale_value
    if rowscale is not None:
        d_branch = d_branch * rowscale.float().unsqueeze(-1)
    dbranch = None
    if branch_scale is not None:
        dbranch = (d_branch * x.float()).sum(0)
        d_branch = d_branch * branch_scale.float()
    dresidual = (dh_total * residual_scale).to(residual_dtype) if store_dresidual else None
    return d_branch.to(x_dtype), dresidual, dweight, dbias, dbranch
