"""The benchmarked ops and the minimal number of bytes each must move: the denominator of
every GB/s figure in the reports. Written down once, here.

A fused residual add + norm is memory-bound, so it is measured against the bytes it cannot
avoid moving (../shared/DOMAIN.md, "bandwidth floor"), never against FLOPs. With ``e`` the
activation element size, ``e_r`` that of the residual stream, ``e_p`` that of the parameters,
``A = rows * hidden`` and ``D = hidden``; ``w_b`` / ``b_b`` are the branch norm's weight and
bias, ``gamma`` a LayerScale vector (``tensors_moved`` lists the same names):

======================== ========================================= ==========================
op / direction           reads                                     writes
======================== ========================================= ==========================
add_*_norm forward       x (A e), residual (A e_r), w (D e_p),     y (A e), h (A e_r)
                         b (D e_p, LayerNorm), gamma (D e_p, LS)
add_*_norm backward      dy (A e), dh (A e_r), h (A e_r),          dx (A e), dresidual (A e_r,
                         x (A e, LayerScale only), w, gamma        only when dx cannot serve
                                                                   for it), dw, db, dgamma
norm_add_*_norm forward  x (A e), residual (A e_r), w_b, w,        y (A e), h (A e_r)
                         b_b and b (LayerNorm; D e_p each)
norm_add_*_norm backward dy (A e), dh (A e_r), h (A e_r), x (A e), dx (A e), dresidual (A e_r),
                         w_b, w                                    dw_b, dw, db_b, db
rms_norm_add forward     x (A e), residual (A e_r), w_b            h (A e_r)
rms_norm_add backward    dh (A e_r), x (A e), w_b                  dx (A e), dw_b
plain norm forward       x (A e), w, b                             y (A e)
plain norm backward      dy (A e), x (A e), w                      dx (A e), dw, db
fwd+bwd                  forward + backward
======================== ========================================= ==========================

* The add ops are pre-norm (``prenorm=True``): ``h`` is an output, and its gradient ``dh``
  an input of the backward. So are the sandwich ops ``norm_add_*_norm`` (Gemma2/3, Peri-LN:
  ``h = residual + Norm_b(x)``, ``y = Norm(h)``); ``rms_norm_add`` (OLMo2) outputs ``h`` only.
* ``dx`` serves as ``dresidual`` when ``dh/dresidual = dh/dx`` elementwise and the dtypes
  agree (unit scales, no LayerScale, ``e_r == e``): 4 full tensors in the backward instead
  of 5 (DOMAIN.md's "4 x 2ND when one tensor can serve as both").
* The sandwich backward moves 6 full tensors, 2 more than add + norm: the branch norm's
  gradient (``dx``, ``dw_b``) needs the normalised branch, which only ``x`` gives (rebuilding
  it from ``h - residual`` would read as much and divide by ``w_b``); and ``dresidual`` (the
  total gradient reaching ``h``: ``dh`` plus the output norm's) differs from ``dx`` (that
  gradient through the branch norm), so both are written.
* ``rms_norm_add``'s ``dresidual`` *is* ``dh``: ``h = residual + ...`` passes the gradient
  through unchanged (as torch's own add does), so it is not written: 3 full tensors each way.
  (With ``h`` stored in another dtype than ``residual``, a cast would have to be written; the
  counts here keep the residual and ``h`` in one dtype, ``e_r``.)
* The biases are not needed by any backward (they shift outputs, not gradients).
* For the sandwich ops and ``rms_norm_add`` this floor is also exactly what resfuse's kernels
  move (``norm_add_norm`` / ``norm_add``), besides what is not counted below.
* Not counted: per-row statistics (4 bytes per row: under 0.07% of the traffic at D >= 768
  in bf16; the sandwich ops keep two per row), the backward's per-program fp32 partial sums
  of the parameter gradients (a few hundred rows of D, an implementation choice), and
  anything an implementation re-reads from L2.

So for bf16 add + RMSNorm at N rows of D: forward 4 x 2ND, backward 4 x 2ND, plus 2D and 4D
bytes of weight traffic; for the bf16 Gemma2 sandwich: forward 4 x 2ND + 4D, backward
6 x 2ND + 8D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Op:
    """What a benchmarked op computes: ``h = residual + [Norm_b](x)``, ``y = Norm(h)``."""

    name: str
    norm: str  # "rms" | "layer": both norms of an op are of one kind
    residual: bool  # a residual stream is added: h is an output
    branch_norm: bool  # x is normalised (w_b, b_b) before the add: the sandwich ops
    output_norm: bool  # the sum (or x) is normalised (w, b): y is an output
    computes: str  # for the report
    layout: str  # where models use it

    @property
    def outputs(self) -> tuple[str, ...]:
        return (("y",) if self.output_norm else ()) + (("h",) if self.residual else ())

    @property
    def arguments(self) -> tuple[str, ...]:
        """The benchmark functions' positional arguments (implementations.py): the first
        four for every op, the branch norm's parameters after them."""
        base = ("x", "residual", "weight", "bias")
        return base + (("branch_weight", "branch_bias") if self.branch_norm else ())

    @property
    def parameters(self) -> tuple[str, ...]:
        """The arguments that are not None, besides x and residual."""
        layer = self.norm == "layer"
        out = ("weight",) + (("bias",) if layer else ()) if self.output_norm else ()
        return out + (
            ("branch_weight",) + (("branch_bias",) if layer else ()) if self.branch_norm else ()
        )


SPECS = {
    op.name: op
    for op in (
        Op(
            "add_rms_norm",
            "rms",
            True,
            False,
            True,
            "h = residual + x; y = RMSNorm(h)",
            "pre-norm (Llama, Mistral, Qwen)",
        ),
        Op(
            "add_layer_norm",
            "layer",
            True,
            False,
            True,
            "h = residual + x; y = LayerNorm(h)",
            "pre-norm (GPT-2, ViT)",
        ),
        Op(
            "norm_add_rms_norm",
            "rms",
            True,
            True,
            True,
            "h = residual + RMSNorm_b(x); y = RMSNorm(h)",
            "sandwich (Gemma2/3)",
        ),
        Op(
            "norm_add_layer_norm",
            "layer",
            True,
            True,
            True,
            "h = residual + LayerNorm_b(x); y = LayerNorm(h)",
            "sandwich (Peri-LN)",
        ),
        Op(
            "rms_norm_add",
            "rms",
            True,
            True,
            False,
            "h = residual + RMSNorm_b(x)",
            "reordered norm (OLMo2)",
        ),
        Op("rms_norm", "rms", False, False, True, "y = RMSNorm(x)", "a norm alone"),
        Op("layer_norm", "layer", False, False, True, "y = LayerNorm(x)", "a norm alone"),
    )
}
OPS = tuple(SPECS)
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def spec(op: str) -> Op:
    if op not in SPECS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return SPECS[op]


def _check(op: str, direction: str) -> None:
    spec(op)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def tensors_moved(
    op: str, direction: str, *, layer_scale: bool = False, dx_serves_as_dresidual: bool = True
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(reads, writes)``: the names of the tensors ``op`` must read and write in
    ``direction`` ("fwd" or "bwd"), the table of this module's docstring.
    ``dx_serves_as_dresidual``: the dtypes allow it (``e_r == e``); it also needs unit scales,
    no LayerScale and no branch norm, which this function checks itself."""
    _check(op, direction)
    if direction == "fwd+bwd":
        raise ValueError("tensors_moved takes 'fwd' or 'bwd'; fwd+bwd moves both")
    s = spec(op)
    if layer_scale and (s.branch_norm or not s.residual):
        raise ValueError(
            f"layer_scale applies to the add ops (add_rms_norm, add_layer_norm), not {op!r}"
        )
    layer = s.norm == "layer"
    branch = ("w_b",) + (("b_b",) if layer else ()) if s.branch_norm else ()
    output = ("w",) + (("b",) if layer else ()) if s.output_norm else ()
    gamma = ("gamma",) if layer_scale else ()
    residual = ("residual",) if s.residual else ()
    if direction == "fwd":
        return ("x",) + residual + branch + output + gamma, s.outputs

    # backward: the upstream gradient of each output; the stored h for the output norm's
    # gradient (x itself for a plain norm); x for the branch norm's or LayerScale's gradient
    reads = tuple("d" + o for o in s.outputs)
    reads += ("h",) if s.residual and s.output_norm else ()
    reads += ("x",) if not s.residual or s.branch_norm or layer_scale else ()
    # weights scale the gradients; biases do not enter them
    reads += tuple(p for p in ("w_b", "w", "gamma") if p in branch + output + gamma)
    shares = dx_serves_as_dresidual and not s.branch_norm and not layer_scale
    # no output norm: dresidual is dh itself, passed through
    writes = ("dx",) + (("dresidual",) if s.residual and s.output_norm and not shares else ())
    writes += tuple("d" + p for p in branch + output + gamma)
    return reads, writes


_ACTIVATIONS = {"x", "y", "dx", "dy"}
_STREAM = {"residual", "h", "dresidual", "dh"}


def minimal_bytes(
    op: str,
    direction: str,
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    residual_dtype: Optional[torch.dtype] = None,
    param_dtype: Optional[torch.dtype] = None,
    layer_scale: bool = False,
) -> int:
    """Bytes ``op`` must read and write in ``direction`` for ``rows`` rows of ``hidden``
    (the table in this module's docstring). ``layer_scale``: a per-channel branch-scale
    tensor (its backward needs ``x`` and produces ``dgamma``); add ops only."""
    _check(op, direction)
    if direction == "fwd+bwd":
        kw = dict(residual_dtype=residual_dtype, param_dtype=param_dtype, layer_scale=layer_scale)
        return minimal_bytes(op, "fwd", rows, hidden, dtype, **kw) + minimal_bytes(
            op, "bwd", rows, hidden, dtype, **kw
        )
    e = dtype.itemsize
    e_r = (residual_dtype or dtype).itemsize
    e_p = (param_dtype or dtype).itemsize
    A, D = rows * hidden, hidden
    reads, writes = tensors_moved(
        op, direction, layer_scale=layer_scale, dx_serves_as_dresidual=e_r == e
    )

    def size(name: str) -> int:
        if name in _ACTIVATIONS:
            return A * e
        if name in _STREAM:
            return A * e_r
        return D * e_p  # a parameter vector or its gradient

    return sum(size(t) for t in reads + writes)


def full_tensors_moved(op: str, direction: str) -> int:
    """How many full (rows, hidden) tensors ``minimal_bytes`` counts at equal dtypes, without
    LayerScale: the number to quote next to a GB/s figure."""
    per_row = minimal_bytes(op, direction, 1, 1, torch.float32) - minimal_bytes(
        op, direction, 0, 1, torch.float32
    )
    return per_row // 4
