"""The functional API of API.md: fused residual add + RMSNorm / LayerNorm, and the plain norms."""

from __future__ import annotations

from . import ops as _ops
from .ops import add_norm
from .spec import NORMS


def add_rms_norm(x, residual, weight, eps=1e-6, *, residual_scale=1.0, branch_scale=None,
                 rowscale=None, zero_centered_weight=False, prenorm=True, residual_dtype=None,
                 out_dtype=None, backend="auto"):
    """``h = residual_scale * residual + branch_scale * rowscale * x``; ``y = RMSNorm(h) * w'``.

    Returns ``(y, h)`` when ``prenorm`` (the next sublayer takes ``y``, the next add ``h``),
    else ``y``. All math in fp32, each output rounded once.
    """
    return add_norm(x, residual, weight, None, eps, norm="rms", residual_scale=residual_scale,
                    branch_scale=branch_scale, rowscale=rowscale,
                    zero_centered_weight=zero_centered_weight, prenorm=prenorm,
                    residual_dtype=residual_dtype, out_dtype=out_dtype, backend=backend)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, *, residual_scale=1.0, branch_scale=None,
                   rowscale=None, zero_centered_weight=False, prenorm=True, residual_dtype=None,
                   out_dtype=None, backend="auto"):
    """``h = residual_scale * residual + branch_scale * rowscale * x``; ``y = LayerNorm(h) * w' + b``.

    Returns ``(y, h)`` when ``prenorm``, else ``y``. All math in fp32, each output rounded once.
    """
    return add_norm(x, residual, weight, bias, eps, norm="layer", residual_scale=residual_scale,
                    branch_scale=branch_scale, rowscale=rowscale,
                    zero_centered_weight=zero_centered_weight, prenorm=prenorm,
                    residual_dtype=residual_dtype, out_dtype=out_dtype, backend=backend)


def rms_norm(x, weight, eps=1e-6, *, zero_centered_weight=False, out_dtype=None, backend="auto"):
    """``RMSNorm(x) * w'`` over the last dimension, fp32 math."""
    return add_norm(x, None, weight, None, eps, norm="rms",
                    zero_centered_weight=zero_centered_weight, prenorm=False,
                    out_dtype=out_dtype, backend=backend)


def layer_norm(x, weight, bias, eps=1e-5, *, zero_centered_weight=False, out_dtype=None,
               backend="auto"):
    """``LayerNorm(x) * w' + b`` over the last dimension (biased variance), fp32 math."""
    return add_norm(x, None, weight, bias, eps, norm="layer",
                    zero_centered_weight=zero_centered_weight, prenorm=False,
                    out_dtype=out_dtype, backend=backend)


def _norm_kind(norm) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
    return norm


def _default_eps(eps, norm):
    return eps if eps is not None else (1e-6 if norm == "rms" else 1e-5)


def norm_add_norm(x, residual, branch_weight, weight, eps=None, *, norm="rms", branch_bias=None,
                  bias=None, zero_centered_weight=False, prenorm=True, out_dtype=None,
                  residual_dtype=None, backend="auto"):
    """Sandwich / Peri-LN / Gemma2-3 layout in one pass each way::

        h = residual + norm(x) * w_b' (+ b_b)
        y = norm(h) * w' (+ b)

    ``norm`` ("rms" or "layer"), ``eps`` (default 1e-6 / 1e-5) and ``zero_centered_weight``
    apply to both norms. Returns ``(y, h)`` when ``prenorm``, else ``y``.
    """
    return _ops.norm_add_norm(x, residual, branch_weight, weight, _default_eps(eps, norm),
                              norm=_norm_kind(norm), branch_bias=branch_bias, bias=bias,
                              zero_centered_weight=zero_centered_weight, prenorm=prenorm,
                              out_dtype=out_dtype, residual_dtype=residual_dtype, backend=backend)


def norm_add(x, residual, branch_weight, eps=None, *, norm="rms", branch_bias=None,
             zero_centered_weight=False, residual_dtype=None, backend="auto"):
    """OLMo2's reordered norm in one pass each way: ``h = residual + norm(x) * w_b' (+ b_b)``."""
    return _ops.norm_add_norm(x, residual, branch_weight, None, _default_eps(eps, norm),
                              norm=_norm_kind(norm), branch_bias=branch_bias,
                              zero_centered_weight=zero_centered_weight,
                              residual_dtype=residual_dtype, backend=backend, output_norm=False)
