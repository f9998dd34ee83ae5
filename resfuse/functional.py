"""The functional API of API.md: fused residual add + RMSNorm / LayerNorm, and the plain norms."""

from __future__ import annotations

from .ops import add_norm


def add_rms_norm(x, residual, weight, eps=1e-6, *, residual_scale=1.0, branch_scale=None,
                 rowscale=None, zero_centered_weight=False, prenorm=True, residual_dtype=None,
                 out_dtype=None, backend="auto"):
    """``h = residual_scale * residual + branch_scale * rowscale * x``; ``y = RMSNorm(h) * w'``.

    Returns ``(y, h)`` when ``prenorm`` (the next sublayer takes ``y``, the next add ``h``),
    else ``y``. All math in fp32, each output rounded once.
    """
    return add_norm(x, residual, weight, None, eps, is_rms=True, residual_scale=residual_scale,
                    branch_scale=branch_scale, rowscale=rowscale,
                    zero_centered_weight=zero_centered_weight, prenorm=prenorm,
                    residual_dtype=residual_dtype, out_dtype=out_dtype, backend=backend)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, *, residual_scale=1.0, branch_scale=None,
                   rowscale=None, zero_centered_weight=False, prenorm=True, residual_dtype=None,
                   out_dtype=None, backend="auto"):
    """``h = residual_scale * residual + branch_scale * rowscale * x``; ``y = LayerNorm(h) * w' + b``.

    Returns ``(y, h)`` when ``prenorm``, else ``y``. All math in fp32, each output rounded once.
    """
    return add_norm(x, residual, weight, bias, eps, is_rms=False, residual_scale=residual_scale,
                    branch_scale=branch_scale, rowscale=rowscale,
                    zero_centered_weight=zero_centered_weight, prenorm=prenorm,
                    residual_dtype=residual_dtype, out_dtype=out_dtype, backend=backend)


def rms_norm(x, weight, eps=1e-6, *, zero_centered_weight=False, out_dtype=None, backend="auto"):
    """``RMSNorm(x) * w'`` over the last dimension, fp32 math."""
    return add_norm(x, None, weight, None, eps, is_rms=True,
                    zero_centered_weight=zero_centered_weight, prenorm=False,
                    out_dtype=out_dtype, backend=backend)


def layer_norm(x, weight, bias, eps=1e-5, *, zero_centered_weight=False, out_dtype=None,
               backend="auto"):
    """``LayerNorm(x) * w' + b`` over the last dimension (biased variance), fp32 math."""
    return add_norm(x, None, weight, bias, eps, is_rms=False,
                    zero_centered_weight=zero_centered_weight, prenorm=False,
                    out_dtype=out_dtype, backend=backend)
