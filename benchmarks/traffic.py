"""The minimal number of bytes each benchmarked op must move: the denominator of every GB/s
figure in the reports. Written down once, here.

A fused residual add + norm is memory-bound, so it is measured against the bytes it cannot
avoid moving (../shared/DOMAIN.md, "bandwidth floor"), never against FLOPs. With ``e`` the
activation element size, ``e_r`` that of the residual stream, ``e_p`` that of the parameters,
``A = rows * hidden`` and ``D = hidden``:

======================== ========================================= ==========================
op / direction           reads                                     writes
======================== ========================================= ==========================
add_*_norm forward       x (A e), residual (A e_r), w (D e_p),     y (A e), h (A e_r)
                         b (D e_p, LayerNorm), gamma (D e_p, LS)
add_*_norm backward      dy (A e), dh (A e_r), h (A e_r),          dx (A e), dresidual (A e_r,
                         x (A e, LayerScale only), w, gamma        only when dx cannot serve
                                                                   for it), dw, db, dgamma
plain norm forward       x (A e), w, b                             y (A e)
plain norm backward      dy (A e), x (A e), w                      dx (A e), dw, db
fwd+bwd                  forward + backward
======================== ========================================= ==========================

* The add ops are pre-norm (``prenorm=True``): ``h`` is an output, and its gradient ``dh``
  an input of the backward.
* ``dx`` serves as ``dresidual`` when ``dh/dresidual = dh/dx`` elementwise and the dtypes
  agree (unit scales, no LayerScale, ``e_r == e``): 4 full tensors in the backward instead
  of 5 (DOMAIN.md's "4 x 2ND when one tensor can serve as both").
* Not counted: per-row statistics (4 bytes per row: under 0.07% of the traffic at D >= 768
  in bf16), the backward's per-program fp32 partial sums of dw/db (a few hundred rows of D,
  an implementation choice), and anything an implementation re-reads from L2.

So for bf16 add + RMSNorm at N rows of D: forward 4 x 2ND, backward 4 x 2ND, plus 2D and 4D
bytes of weight traffic.
"""

from __future__ import annotations

from typing import Optional

import torch

OPS = ("add_rms_norm", "add_layer_norm", "rms_norm", "layer_norm")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def has_residual(op: str) -> bool:
    return op.startswith("add_")


def has_bias(op: str) -> bool:
    return op.endswith("layer_norm")


def _check(op: str, direction: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def minimal_bytes(
    op: str, direction: str, rows: int, hidden: int, dtype: torch.dtype, *,
    residual_dtype: Optional[torch.dtype] = None, param_dtype: Optional[torch.dtype] = None,
    layer_scale: bool = False,
) -> int:
    """Bytes ``op`` must read and write in ``direction`` for ``rows`` rows of ``hidden``
    (the table in this module's docstring). ``layer_scale``: a per-channel branch-scale
    tensor (its backward needs ``x`` and produces ``dgamma``); add ops only."""
    _check(op, direction)
    if direction == "fwd+bwd":
        kw = dict(residual_dtype=residual_dtype, param_dtype=param_dtype, layer_scale=layer_scale)
        return (minimal_bytes(op, "fwd", rows, hidden, dtype, **kw)
                + minimal_bytes(op, "bwd", rows, hidden, dtype, **kw))
    residual = has_residual(op)
    if layer_scale and not residual:
        raise ValueError(f"layer_scale applies to the add ops, not {op!r}")
    e = dtype.itemsize
    e_r = (residual_dtype or dtype).itemsize if residual else e
    e_p = (param_dtype or dtype).itemsize
    A, D = rows * hidden, hidden
    vectors = 1 + has_bias(op) + layer_scale  # w, b, gamma: parameter vectors of D

    if direction == "fwd":
        reads = A * e + (A * e_r if residual else 0) + D * e_p * vectors
        writes = A * e + (A * e_r if residual else 0)
        return reads + writes

    # backward: the saved h (x itself for a plain norm), dy, and dh for the pre-norm output
    shares_dresidual = residual and not layer_scale and e_r == e
    reads = A * e + A * e_r + (A * e_r if residual else 0) + (A * e if layer_scale else 0)
    reads += D * e_p * (1 + layer_scale)  # w and gamma are read; b is not needed
    writes = A * e + (A * e_r if residual and not shares_dresidual else 0) + D * e_p * vectors
    return reads + writes


def full_tensors_moved(op: str, direction: str) -> int:
    """How many full (rows, hidden) tensors ``minimal_bytes`` counts at equal dtypes, without
    LayerScale: the number to quote next to a GB/s figure."""
    per_row = (minimal_bytes(op, direction, 1, 1, torch.float32)
               - minimal_bytes(op, direction, 0, 1, torch.float32))
    return per_row // 4
