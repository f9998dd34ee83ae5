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
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


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
        f = f * (branch_scale.to(compute_dtype) if isinstance(branch_scale, Tensor) else branch_scale)
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
    f = normalize(x.to(compute_dtype), branch_weight, branch_bias, eps, norm=norm,
                  zero_centered_weight=zero_centered_weight)
    return add_norm(f, residual, weight, bias, eps, norm=norm,
                    zero_centered_weight=zero_centered_weight, compute_dtype=compute_dtype)
