"""The autograd layer shared by every backend, and its ``torch.library`` registration.

A call is described once (``spec.py``): the public functions validate their arguments and
build an :class:`~resfuse.spec.AddNormSpec` and the :class:`~resfuse.spec.Operands`; from
there the same two objects reach the backend, the autograd function and the fakes. Two ops
in the ``resfuse`` namespace take the spec in its flat form (``AddNormSpec.flat()``, the
booleans packed in one integer):

* ``resfuse::add_norm`` -> ``(y, h, mean, mean_x)``, with registered autograd and fakes;
* ``resfuse::add_norm_backward`` -> ``(dx, dresidual, dweight, dbias, dbranch_scale,
  dbranch_weight, dbranch_bias)``.

Absent tensors (``h`` when it is not stored, the means for RMSNorm, gradients that are not
computed) are returned as empty tensors, as custom ops cannot return None. ``mean`` and
``mean_x`` are the LayerNorm row means of h and x, which the backward uses as shifts (the
backends recompute the row statistics of what they read; see
triton_kernels/add_norm_kernels.py).

Eager calls skip the dispatcher (about 10 us per custom-op call, as much as the kernel for a
small input) and go through :class:`_AddNormFunction`, which uses the very same save and
backward functions; under ``torch.compile`` the registered ops keep the graph whole.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import auto_table as _auto_table
from . import backend_registry as _backends
from . import checks
from .spec import (AddNormSpec, BackwardInputs, Grads, Operands, absent_to_none,
                   backward_dtypes, backward_outputs, backward_present, forward_dtypes,
                   forward_outputs, forward_present, h_is_x, op_outputs)


def _rows(t: Optional[Tensor], D: int) -> Optional[Tensor]:
    """2-D (rows, D) view with a unit column stride: used in place when the leading dims
    collapse to one row stride, copied otherwise."""
    if t is None:
        return None
    t2 = t if t.dim() == 2 else t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 or D == 1 else t2.contiguous()


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.reshape(-1) if t is not None else None


# --------------------------------------------------------------------------- the registered ops
# The flat argument lists below are what torch.library needs (one typed signature per op);
# everything else takes the spec. AddNormSpec.flat() / from_flat convert, each in one place.


@torch.library.custom_op("resfuse::add_norm", mutates_args=())
def add_norm_op(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    branch_scale: Optional[Tensor], rowscale: Optional[Tensor], branch_weight: Optional[Tensor],
    branch_bias: Optional[Tensor], eps: float, residual_scale: float, branch_scale_value: float,
    flags: int, x_dtype: torch.dtype, residual_dtype: torch.dtype, h_dtype: torch.dtype,
    out_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = AddNormSpec.from_flat(eps, residual_scale, branch_scale_value, flags, x_dtype,
                                 residual_dtype, h_dtype, out_dtype)
    # the entry points pass 2-D tensors; direct callers of the op may pass any shape
    D = x.shape[-1]
    out = _backends.implementation(backend).forward(spec, Operands(
        _rows(x, D), _rows(residual, D), weight, bias, branch_scale, _flat(rowscale),
        branch_weight, branch_bias))
    lead = x.shape[:-1]
    return op_outputs(out, (x.shape, x.shape, lead, lead), forward_dtypes(spec), x)


@add_norm_op.register_fake
def _add_norm_fake(x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias,
                   eps, residual_scale, branch_scale_value, flags, x_dtype, residual_dtype,
                   h_dtype, out_dtype, backend):
    spec = AddNormSpec.from_flat(eps, residual_scale, branch_scale_value, flags, x_dtype,
                                 residual_dtype, h_dtype, out_dtype)
    return forward_outputs(spec, x, x.shape, x.shape[:-1])


@torch.library.custom_op("resfuse::add_norm_backward", mutates_args=())
def add_norm_backward_op(
    dy: Optional[Tensor], dh: Optional[Tensor], h: Optional[Tensor], x: Optional[Tensor],
    weight: Optional[Tensor], branch_scale: Optional[Tensor], rowscale: Optional[Tensor],
    branch_weight: Optional[Tensor], mean: Optional[Tensor], mean_x: Optional[Tensor],
    eps: float, residual_scale: float, branch_scale_value: float, flags: int,
    x_dtype: torch.dtype, residual_dtype: torch.dtype, h_dtype: torch.dtype,
    out_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = AddNormSpec.from_flat(eps, residual_scale, branch_scale_value, flags, x_dtype,
                                 residual_dtype, h_dtype, out_dtype)
    like = h if h is not None else dh
    D = like.shape[-1]
    grads = _backward(spec, BackwardInputs(
        dy, dh, _rows(h, D), _rows(x, D), weight, branch_scale, _flat(rowscale), branch_weight,
        _flat(mean), _flat(mean_x)), backend)
    return op_outputs(grads, (like.shape, like.shape) + ((D,),) * 5, backward_dtypes(spec), like)


@add_norm_backward_op.register_fake
def _add_norm_backward_fake(dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean,
                            mean_x, eps, residual_scale, branch_scale_value, flags, x_dtype,
                            residual_dtype, h_dtype, out_dtype, backend):
    spec = AddNormSpec.from_flat(eps, residual_scale, branch_scale_value, flags, x_dtype,
                                 residual_dtype, h_dtype, out_dtype)
    like = h if h is not None else dh
    return backward_outputs(spec, like, like.shape)


def _backward(spec: AddNormSpec, inputs: BackwardInputs, backend: str) -> Grads:
    """The backend's backward on 2-D tensors (upstream gradients arrive in any layout)."""
    D = (inputs.h if inputs.h is not None else inputs.dh).shape[-1]
    return _backends.implementation(backend).backward(
        spec, inputs._replace(dy=_rows(inputs.dy, D), dh=_rows(inputs.dh, D)))


# --------------------------------------------------------------------------- autograd


def _save(ctx, spec: AddNormSpec, backend: str, ops: Operands, out) -> None:
    """What the backward keeps, and why:

    - h (or x itself when h == x and was not stored): the output norm is differentiated at
      it; not needed without an output norm (norm_add);
    - x when the backward reads it (``spec.reads_x_in_backward``): LayerScale's gradient
      (sum of dh * x) or the branch norm's own backward;
    - the LayerNorm row means of h and x, as shifts (rstd is recomputed, never kept).

    Parameters are not activations."""
    _, h, mean, mean_x = out
    layer = spec.norm == "layer"
    ctx.save_for_backward((h if spec.store_h else ops.x) if spec.output_norm else None,
                          ops.x if spec.reads_x_in_backward else None,
                          ops.weight, ops.branch_scale, ops.rowscale, ops.branch_weight,
                          mean if layer and spec.output_norm else None,
                          mean_x if layer and spec.branch_norm else None)
    ctx.mark_non_differentiable(*(t for t in (mean, mean_x) if t is not None))
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.backend = spec, backend
    ctx.param_dtypes = tuple(t.dtype if t is not None else None
                             for t in (ops.weight, ops.bias, ops.branch_scale, ops.branch_weight,
                                       ops.branch_bias))


# the positions of the operands' gradients among the inputs: x, residual, weight, bias,
# branch_scale, (rowscale: none), branch_weight, branch_bias
_PARAM_POSITIONS = (2, 3, 4, 6, 7)


def _make_backward(run_backward, first: int, trailing: int):
    """The backward of an autograd node whose inputs are ``first`` non-tensors, the eight
    ``Operands`` and ``trailing`` non-tensors."""
    def backward(ctx, dy, dh, _dmean=None, _dmean_x=None):
        spec = ctx.spec
        h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x = ctx.saved_tensors
        if dy is None and spec.output_norm:
            dy = torch.zeros_like(h)
        if not spec.store_h:
            dh = None
        grads = run_backward(spec, BackwardInputs(dy, dh, h, x, weight, branch_scale, rowscale,
                                                  branch_weight, mean, mean_x), ctx.backend)
        needs = ctx.needs_input_grad[first:]
        dresidual = {"dx": grads.dx, "dh": dh, "kernel": grads.dresidual, None: None}[spec.dresidual]
        params = (grads.dweight, grads.dbias, grads.dbranch_scale, grads.dbranch_weight,
                  grads.dbranch_bias)
        dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias = (
            g.to(dtype) if dtype is not None and needs[i] else None
            for i, g, dtype in zip(_PARAM_POSITIONS, params, ctx.param_dtypes))
        return ((None,) * first
                + (grads.dx if needs[0] else None, dresidual if needs[1] else None,
                   dweight, dbias, dbranch_scale, None, dbranch_weight, dbranch_bias)
                + (None,) * trailing)

    return backward


class _AddNormFunction(torch.autograd.Function):
    """Eager path: the same save/backward as the registered op, without the dispatcher."""

    # The classic forward(ctx, ...) form on purpose: with a separate setup_context, apply()
    # binds default arguments through inspect.signature on every call (~8 us).
    @staticmethod
    def forward(ctx, spec, backend, *operands):
        ops = _new(Operands, operands)
        out = _backends.implementation(backend).forward(spec, ops)
        _save(ctx, spec, backend, ops, out)
        return out

    backward = staticmethod(once_differentiable(_make_backward(_backward, first=2, trailing=0)))


def _setup_context(ctx, inputs, output):
    spec = AddNormSpec.from_flat(*inputs[8:16])
    _save(ctx, spec, inputs[16], Operands(*inputs[:8]), output)


def _op_backward(spec, inputs, backend):
    return Grads(*absent_to_none(torch.ops.resfuse.add_norm_backward(*inputs, *spec.flat(), backend),
                                 backward_present(spec)))


torch.library.register_autograd("resfuse::add_norm", _make_backward(_op_backward, 0, 9),
                                setup_context=_setup_context)


# --------------------------------------------------------------------------- entry points


_new = tuple.__new__  # builds a NamedTuple from its fields in order, without binding arguments


def _requires_grad(tensors) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _run(operands: tuple, return_h: bool, backend: str, norm: str, eps: float,
         residual_scale: float, branch_scale: float, zero_centered_weight: bool,
         branch_norm: bool, output_norm: bool, h_dtype: torch.dtype,
         out_dtype: torch.dtype) -> tuple:
    """Build the spec and the 2-D operands, pick the path (compiled op / eager autograd /
    no-grad) and run; returns (y, h). ``operands``: the ``Operands`` fields as the caller
    has them, any shape.

    The backends see 2-D (rows, D) tensors: the reshapes happen out here, where autograd
    tracks them, so y and h are ordinary views the caller may edit in place (a custom
    autograd function returning several views of its outputs forbids that)."""
    # built positionally: this runs on every call (the eager path's host overhead)
    x, residual, weight, bias, bs, rowscale, bw, bb = operands
    shape, D = x.shape, x.shape[-1]
    needs_grad = torch.is_grad_enabled() and _requires_grad((x, residual, weight, bias, bs, bw, bb))
    # h is written when returned, or when the output norm's backward needs it and it is not x
    store_h = return_h or (needs_grad and output_norm and not h_is_x(
        residual is not None, bs is not None, branch_scale, rowscale is not None, branch_norm,
        h_dtype, x.dtype))
    spec = _new(AddNormSpec, (  # AddNormSpec's fields in order; tuple.__new__: no arg binding
        norm, eps, residual_scale, branch_scale, zero_centered_weight, branch_norm, output_norm,
        store_h, residual is not None, weight is not None, bias is not None, bs is not None,
        rowscale is not None, bw is not None, bb is not None, x.dtype,
        residual.dtype if residual is not None else x.dtype, h_dtype, out_dtype))
    if backend == "auto":  # auto's measured choice depends on the call (auto_table)
        key = (spec.family, norm, x.dtype, D, needs_grad)
        if torch.compiler.is_compiling() and not _auto_table.known_at_trace(D):
            key = None  # the choice is a constant of the graph: a symbolic D gets the rule
        backend = _backends.resolve(backend, x.device, key)
    else:
        backend = _backends.resolve(backend, x.device)
    ops = _new(Operands, (_rows(x, D), _rows(residual, D), weight, bias, bs, _flat(rowscale), bw, bb))
    if torch.compiler.is_compiling():
        y, h, _, _ = absent_to_none(torch.ops.resfuse.add_norm(*ops, *spec.flat(), backend),
                                    forward_present(spec))
    elif needs_grad:
        y, h, _, _ = _AddNormFunction.apply(spec, backend, *ops)
    else:
        y, h, _, _ = _backends.implementation(backend).forward(spec, ops)
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
    residual_dtype = checks.dtype("residual_dtype", residual_dtype,
                                  residual.dtype if residual is not None else x.dtype)
    return eps, zero_centered_weight, residual_dtype


def _check_params(x, **params):
    for name, t in params.items():
        if t is not None:
            checks.vector(name, t, x)


def add_norm(
    x, residual, weight, bias, eps, *, norm: str, residual_scale=1.0, branch_scale=None,
    rowscale=None, zero_centered_weight=False, prenorm=True, residual_dtype=None,
    out_dtype=None, backend="auto",
):
    """Validate, pick the backend, run; returns ``(y, h)`` if ``prenorm`` else ``y``."""
    eps, zero_centered_weight, residual_dtype = _check_common(
        x, residual, eps, zero_centered_weight, residual_dtype)
    _check_params(x, weight=weight, bias=bias)
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
    y, h = _run((x, residual, weight, bias, branch_scale, rowscale, None, None), prenorm, backend,
                norm, eps, residual_scale, branch_scale_value, zero_centered_weight, False, True,
                residual_dtype, out_dtype)
    return (y, h) if prenorm else y


def norm_add_norm(
    x, residual, branch_weight, weight, eps, *, norm: str, branch_bias=None, bias=None,
    zero_centered_weight=False, prenorm=True, out_dtype=None, residual_dtype=None,
    backend="auto", output_norm=True,
):
    """Sandwich layout: ``h = residual + norm(x) * w_b' (+ b_b)``, ``y = norm(h) * w' (+ b)``.
    Returns ``(y, h)`` if ``prenorm`` else ``y``; with ``output_norm=False`` only ``h``."""
    eps, zero_centered_weight, residual_dtype = _check_common(
        x, residual, eps, zero_centered_weight, residual_dtype)
    _check_params(x, branch_weight=branch_weight, weight=weight, branch_bias=branch_bias,
                  bias=bias)
    prenorm = checks.flag("prenorm", prenorm)
    out_dtype = checks.dtype("out_dtype", out_dtype, x.dtype)
    y, h = _run((x, residual, weight, bias, None, None, branch_weight, branch_bias),
                prenorm or not output_norm, backend, norm, eps, 1.0, 1.0, zero_centered_weight,
                True, output_norm, residual_dtype, out_dtype)
    if not output_norm:
        return h
    return (y, h) if prenorm else y
