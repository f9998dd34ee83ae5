"""The functional API of API.md: fused residual add + RMSNorm / LayerNorm, the plain norms and
the sandwich layouts; and the two entries they all call (``add_norm``, ``norm_add_norm``,
also used by the modules and ``resfuse.patch``), which validate the arguments, name the
error's argument before any kernel runs, build the call's description (``spec.py``) and run
it (``ops.run``)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import auto_table as _auto_table
from . import backend_registry as _backends
from . import checks
from . import ops as _ops
from .distributed import is_dtensor
from .spec import NORMS, AddNormSpec, Operands, h_is_x

_new = tuple.__new__  # builds a NamedTuple from its fields in order, without binding arguments


def _requires_grad(tensors) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _call(
    operands: tuple,
    return_h: bool,
    backend: str,
    norm: str,
    eps: float,
    residual_scale: float,
    branch_scale: float,
    zero_centered_weight: bool,
    branch_norm: bool,
    output_norm: bool,
    h_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> tuple:
    """Build the spec and the 2-D operands, resolve the backend, run; returns (y, h).
    ``operands``: the ``Operands`` fields as the caller has them, any shape.

    The backends see 2-D (rows, D) tensors: the reshapes happen out here, where autograd
    tracks them, so y and h are ordinary views the caller may edit in place (a custom
    autograd function returning several views of its outputs forbids that)."""
    # built positionally: this runs on every call (the eager path's host overhead)
    x, residual, weight, bias, bs, rowscale, bw, bb = operands
    shape, D = x.shape, x.shape[-1]
    needs_grad = torch.is_grad_enabled() and _requires_grad((x, residual, weight, bias, bs, bw, bb))
    # h is written when returned, or when the output norm's backward needs it and it is not x
    store_h = return_h or (
        needs_grad
        and output_norm
        and not h_is_x(
            residual is not None,
            bs is not None,
            branch_scale,
            rowscale is not None,
            branch_norm,
            h_dtype,
            x.dtype,
        )
    )
    spec = _new(
        AddNormSpec,
        (  # AddNormSpec's fields in order; tuple.__new__: no arg binding
            norm,
            eps,
            residual_scale,
            branch_scale,
            zero_centered_weight,
            branch_norm,
            output_norm,
            store_h,
            residual is not None,
            weight is not None,
            bias is not None,
            bs is not None,
            rowscale is not None,
            bw is not None,
            bb is not None,
            x.dtype,
            residual.dtype if residual is not None else x.dtype,
            h_dtype,
            out_dtype,
        ),
    )
    compiling = torch.compiler.is_compiling()
    key = None
    if backend == "auto":  # auto's measured choice depends on the call (auto_table)
        key = (spec.family, norm, x.dtype, D, needs_grad)
        if compiling and not _auto_table.known_at_trace(D):
            key = None  # the choice is a constant of the graph: a symbolic D gets the rule
    if x.is_cpu and not compiling:
        backend = _backends.resolve_cpu(backend, key)  # no device object: the per-call path
    else:
        backend = _backends.resolve(backend, x.device, key)
    if type(x) is not Tensor and is_dtensor(x):  # the rows stay where they are (checks.py
        # refused a split row)
        y, h, _, _ = _ops.run_distributed(spec, _new(Operands, operands), backend)
        return y, h
    ops = _new(
        Operands,
        (_ops.rows(x, D), _ops.rows(residual, D), weight, bias, bs, _ops.flat(rowscale), bw, bb),
    )
    y, h = _ops.run(spec, ops, backend, needs_grad, compiling)
    if len(shape) != 2:
        y = y.view(shape) if y is not None else y
        h = h.view(shape) if h is not None else h
    return y, h


def _check_common(x, residual, eps, zero_centered_weight, residual_dtype):
    checks.activation(x)
    if residual is not None:
        checks.same_as_x("residual", residual, x)
    eps = checks.real("eps", eps, minimum=0.0)
    zero_centered_weight = checks.flag("zero_centered_weight", zero_centered_weight)
    residual_dtype = checks.dtype(
        "residual_dtype", residual_dtype, residual.dtype if residual is not None else x.dtype
    )
    return eps, zero_centered_weight, residual_dtype


def _check_params(x, names, params):
    for name, t in zip(names, params):
        if t is not None:
            checks.vector(name, t, x)


_PARAMS = ("weight", "bias")
_SANDWICH_PARAMS = ("branch_weight", "weight", "branch_bias", "bias")


def add_norm(
    x,
    residual,
    weight,
    bias,
    eps,
    *,
    norm: str,
    residual_scale=1.0,
    branch_scale=None,
    rowscale=None,
    zero_centered_weight=False,
    prenorm=True,
    residual_dtype=None,
    out_dtype=None,
    backend="auto",
):
    """The add + norm family (and the plain norms, without a residual): validate, run;
    returns ``(y, h)`` if ``prenorm`` else ``y``."""
    eps, zero_centered_weight, residual_dtype = _check_common(
        x, residual, eps, zero_centered_weight, residual_dtype
    )
    _check_params(x, _PARAMS, (weight, bias))
    residual_scale = checks.real("residual_scale", residual_scale)
    branch_scale_value = 1.0
    if isinstance(branch_scale, Tensor):
        checks.vector("branch_scale", branch_scale, x)
    elif branch_scale is not None:
        branch_scale_value = checks.real("branch_scale", branch_scale)
        branch_scale = None
    if rowscale is not None:
        rowscale = checks.rowscale(rowscale, x)
    prenorm = checks.flag("prenorm", prenorm)
    out_dtype = checks.dtype("out_dtype", out_dtype, x.dtype)
    y, h = _call(
        (x, residual, weight, bias, branch_scale, rowscale, None, None),
        prenorm,
        backend,
        norm,
        eps,
        residual_scale,
        branch_scale_value,
        zero_centered_weight,
        False,
        True,
        residual_dtype,
        out_dtype,
    )
    return (y, h) if prenorm else y


def _norm_add_norm(
    x,
    residual,
    branch_weight,
    weight,
    eps,
    *,
    norm: str,
    branch_bias=None,
    bias=None,
    zero_centered_weight=False,
    prenorm=True,
    out_dtype=None,
    residual_dtype=None,
    backend="auto",
    output_norm=True,
):
    """The sandwich family: ``h = residual + norm(x) * w_b' (+ b_b)``, ``y = norm(h) * w'
    (+ b)``. Returns ``(y, h)`` if ``prenorm`` else ``y``; with ``output_norm=False`` only
    ``h``."""
    eps, zero_centered_weight, residual_dtype = _check_common(
        x, residual, eps, zero_centered_weight, residual_dtype
    )
    _check_params(x, _SANDWICH_PARAMS, (branch_weight, weight, branch_bias, bias))
    prenorm = checks.flag("prenorm", prenorm)
    out_dtype = checks.dtype("out_dtype", out_dtype, x.dtype)
    y, h = _call(
        (x, residual, weight, bias, None, None, branch_weight, branch_bias),
        prenorm or not output_norm,
        backend,
        norm,
        eps,
        1.0,
        1.0,
        zero_centered_weight,
        True,
        output_norm,
        residual_dtype,
        out_dtype,
    )
    if not output_norm:
        return h
    return (y, h) if prenorm else y


def add_rms_norm(
    x,
    residual,
    weight,
    eps=1e-6,
    *,
    residual_scale=1.0,
    branch_scale=None,
    rowscale=None,
    zero_centered_weight=False,
    prenorm=True,
    residual_dtype=None,
    out_dtype=None,
    backend="auto",
):
    """``h = residual_scale * residual + branch_scale * rowscale * x``; ``y = RMSNorm(h) * w'``.

    Returns ``(y, h)`` when ``prenorm`` (the next sublayer takes ``y``, the next add ``h``),
    else ``y``. All math in fp32, each output rounded once.
    """
    return add_norm(
        x,
        residual,
        weight,
        None,
        eps,
        norm="rms",
        residual_scale=residual_scale,
        branch_scale=branch_scale,
        rowscale=rowscale,
        zero_centered_weight=zero_centered_weight,
        prenorm=prenorm,
        residual_dtype=residual_dtype,
        out_dtype=out_dtype,
        backend=backend,
    )


def add_layer_norm(
    x,
    residual,
    weight,
    bias,
    eps=1e-5,
    *,
    residual_scale=1.0,
    branch_scale=None,
    rowscale=None,
    zero_centered_weight=False,
    prenorm=True,
    residual_dtype=None,
    out_dtype=None,
    backend="auto",
):
    """``h = residual_scale * residual + branch_scale * rowscale * x``; ``y = LayerNorm(h) * w' + b``.

    Returns ``(y, h)`` when ``prenorm``, else ``y``. All math in fp32, each output rounded once.
    """
    return add_norm(
        x,
        residual,
        weight,
        bias,
        eps,
        norm="layer",
        residual_scale=residual_scale,
        branch_scale=branch_scale,
        rowscale=rowscale,
        zero_centered_weight=zero_centered_weight,
        prenorm=prenorm,
        residual_dtype=residual_dtype,
        out_dtype=out_dtype,
        backend=backend,
    )


def rms_norm(x, weight, eps=1e-6, *, zero_centered_weight=False, out_dtype=None, backend="auto"):
    """``RMSNorm(x) * w'`` over the last dimension, fp32 math."""
    return add_norm(
        x,
        None,
        weight,
        None,
        eps,
        norm="rms",
        zero_centered_weight=zero_centered_weight,
        prenorm=False,
        out_dtype=out_dtype,
        backend=backend,
    )


def layer_norm(
    x, weight, bias, eps=1e-5, *, zero_centered_weight=False, out_dtype=None, backend="auto"
):
    """``LayerNorm(x) * w' + b`` over the last dimension (biased variance), fp32 math."""
    return add_norm(
        x,
        None,
        weight,
        bias,
        eps,
        norm="layer",
        zero_centered_weight=zero_centered_weight,
        prenorm=False,
        out_dtype=out_dtype,
        backend=backend,
    )


def _norm_kind(norm) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
    return norm


def _default_eps(eps, norm):
    return eps if eps is not None else (1e-6 if norm == "rms" else 1e-5)


def norm_add_norm(
    x,
    residual,
    branch_weight,
    weight,
    eps=None,
    *,
    norm="rms",
    branch_bias=None,
    bias=None,
    zero_centered_weight=False,
    prenorm=True,
    out_dtype=None,
    residual_dtype=None,
    backend="auto",
):
    """Sandwich / Peri-LN / Gemma2-3 layout in one pass each way::

        h = residual + norm(x) * w_b' (+ b_b)
        y = norm(h) * w' (+ b)

    ``norm`` ("rms" or "layer"), ``eps`` (default 1e-6 / 1e-5) and ``zero_centered_weight``
    apply to both norms. Returns ``(y, h)`` when ``prenorm``, else ``y``.
    """
    return _norm_add_norm(
        x,
        residual,
        branch_weight,
        weight,
        _default_eps(eps, norm),
        norm=_norm_kind(norm),
        branch_bias=branch_bias,
        bias=bias,
        zero_centered_weight=zero_centered_weight,
        prenorm=prenorm,
        out_dtype=out_dtype,
        residual_dtype=residual_dtype,
        backend=backend,
    )


def norm_add(
    x,
    residual,
    branch_weight,
    eps=None,
    *,
    norm="rms",
    branch_bias=None,
    zero_centered_weight=False,
    residual_dtype=None,
    backend="auto",
):
    """OLMo2's reordered norm in one pass each way: ``h = residual + norm(x) * w_b' (+ b_b)``."""
    return _norm_add_norm(
        x,
        residual,
        branch_weight,
        None,
        _default_eps(eps, norm),
        norm=_norm_kind(norm),
        branch_bias=branch_bias,
        zero_centered_weight=zero_centered_weight,
        residual_dtype=residual_dtype,
        backend=backend,
        output_norm=False,
    )
