"""The autograd layer shared by every backend, and its ``torch.library`` registration.

A call is described once (``spec.py``): the public functions (``functional.py``) validate
their arguments and build an :class:`~resfuse.spec.AddNormSpec` and the
:class:`~resfuse.spec.Operands`, and :func:`run` takes them from there: the same two objects
reach the backend, the autograd function and the fakes. Two ops
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

from . import backend_registry as _backends
from . import distributed as _distributed
from .spec import (
    AddNormSpec,
    BackwardInputs,
    Grads,
    Operands,
    absent_to_none,
    backward_dtypes,
    backward_outputs,
    backward_present,
    forward_dtypes,
    forward_outputs,
    forward_present,
    op_outputs,
)

_new = tuple.__new__  # builds a NamedTuple from its fields in order, without binding arguments


def rows(t: Optional[Tensor], D: int) -> Optional[Tensor]:
    """2-D (rows, D) view with a unit column stride: used in place when the leading dims
    collapse to one row stride, copied otherwise."""
    if t is None:
        return None
    t2 = t if t.dim() == 2 else t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 or D == 1 else t2.contiguous()


def flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.reshape(-1) if t is not None else None


# --------------------------------------------------------------------------- the registered ops
# The flat argument lists below are what torch.library needs (one typed signature per op);
# everything else takes the spec. AddNormSpec.flat() / from_flat convert, each in one place.


@torch.library.custom_op("resfuse::add_norm", mutates_args=())
def add_norm_op(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    branch_scale: Optional[Tensor],
    rowscale: Optional[Tensor],
    branch_weight: Optional[Tensor],
    branch_bias: Optional[Tensor],
    eps: float,
    residual_scale: float,
    branch_scale_value: float,
    flags: int,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    h_dtype: torch.dtype,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = AddNormSpec.from_flat(
        eps, residual_scale, branch_scale_value, flags, x_dtype, residual_dtype, h_dtype, out_dtype
    )
    # the entry points pass 2-D tensors; direct callers of the op may pass any shape
    D = x.shape[-1]
    out = _backends.implementation(backend).forward(
        spec,
        Operands(
            rows(x, D),
            rows(residual, D),
            weight,
            bias,
            branch_scale,
            flat(rowscale),
            branch_weight,
            branch_bias,
        ),
    )
    lead = x.shape[:-1]
    return op_outputs(out, (x.shape, x.shape, lead, lead), forward_dtypes(spec), x)


@add_norm_op.register_fake
def _add_norm_fake(
    x,
    residual,
    weight,
    bias,
    branch_scale,
    rowscale,
    branch_weight,
    branch_bias,
    eps,
    residual_scale,
    branch_scale_value,
    flags,
    x_dtype,
    residual_dtype,
    h_dtype,
    out_dtype,
    backend,
):
    spec = AddNormSpec.from_flat(
        eps, residual_scale, branch_scale_value, flags, x_dtype, residual_dtype, h_dtype, out_dtype
    )
    return forward_outputs(spec, x, x.shape, x.shape[:-1])


@torch.library.custom_op("resfuse::add_norm_backward", mutates_args=())
def add_norm_backward_op(
    dy: Optional[Tensor],
    dh: Optional[Tensor],
    h: Optional[Tensor],
    x: Optional[Tensor],
    weight: Optional[Tensor],
    branch_scale: Optional[Tensor],
    rowscale: Optional[Tensor],
    branch_weight: Optional[Tensor],
    mean: Optional[Tensor],
    mean_x: Optional[Tensor],
    eps: float,
    residual_scale: float,
    branch_scale_value: float,
    flags: int,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    h_dtype: torch.dtype,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = AddNormSpec.from_flat(
        eps, residual_scale, branch_scale_value, flags, x_dtype, residual_dtype, h_dtype, out_dtype
    )
    like = h if h is not None else dh
    D = like.shape[-1]
    grads = _backward(
        spec,
        BackwardInputs(
            dy,
            dh,
            rows(h, D),
            rows(x, D),
            weight,
            branch_scale,
            flat(rowscale),
            branch_weight,
            flat(mean),
            flat(mean_x),
        ),
        backend,
    )
    return op_outputs(grads, (like.shape, like.shape) + ((D,),) * 5, backward_dtypes(spec), like)


@add_norm_backward_op.register_fake
def _add_norm_backward_fake(
    dy,
    dh,
    h,
    x,
    weight,
    branch_scale,
    rowscale,
    branch_weight,
    mean,
    mean_x,
    eps,
    residual_scale,
    branch_scale_value,
    flags,
    x_dtype,
    residual_dtype,
    h_dtype,
    out_dtype,
    backend,
):
    spec = AddNormSpec.from_flat(
        eps, residual_scale, branch_scale_value, flags, x_dtype, residual_dtype, h_dtype, out_dtype
    )
    like = h if h is not None else dh
    return backward_outputs(spec, like, like.shape)


def _backward(spec: AddNormSpec, inputs: BackwardInputs, backend: str) -> Grads:
    """The backend's backward on 2-D tensors (upstream gradients arrive in any layout)."""
    D = (inputs.h if inputs.h is not None else inputs.dh).shape[-1]
    return _backends.implementation(backend).backward(
        spec, inputs._replace(dy=rows(inputs.dy, D), dh=rows(inputs.dh, D))
    )


# --------------------------------------------------------------------------- autograd


def _save(ctx, spec: AddNormSpec, backend: str, ops: Operands, h, mean, mean_x) -> None:
    """What the backward keeps, and why:

    - h (or x itself when h == x and was not stored): the output norm is differentiated at
      it; not needed without an output norm (norm_add);
    - x when the backward reads it (``spec.reads_x_in_backward``): LayerScale's gradient
      (sum of dh * x) or the branch norm's own backward;
    - the LayerNorm row means of h and x, as shifts (rstd is recomputed, never kept).

    Parameters are not activations."""
    _, _, has_mean, has_mean_x = forward_present(spec)
    ctx.save_for_backward(
        (h if spec.store_h else ops.x) if spec.output_norm else None,
        ops.x if spec.reads_x_in_backward else None,
        ops.weight,
        ops.branch_scale,
        ops.rowscale,
        ops.branch_weight,
        mean if has_mean else None,
        mean_x if has_mean_x else None,
    )
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.backend = spec, backend
    _, _, weight, bias, branch_scale, _, branch_weight, branch_bias = ops
    ctx.param_dtypes = (
        weight.dtype if weight is not None else None,
        bias.dtype if bias is not None else None,
        branch_scale.dtype if branch_scale is not None else None,
        branch_weight.dtype if branch_weight is not None else None,
        branch_bias.dtype if branch_bias is not None else None,
    )


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
        grads = run_backward(
            spec,
            BackwardInputs(
                dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x
            ),
            ctx.backend,
        )
        needs = ctx.needs_input_grad[first:]
        dresidual = {"dx": grads.dx, "dh": dh, "kernel": grads.dresidual, None: None}[
            spec.dresidual
        ]
        params = (
            grads.dweight,
            grads.dbias,
            grads.dbranch_scale,
            grads.dbranch_weight,
            grads.dbranch_bias,
        )
        dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias = (
            g.to(dtype) if dtype is not None and needs[i] else None
            for i, g, dtype in zip(_PARAM_POSITIONS, params, ctx.param_dtypes)
        )
        return (
            (None,) * first
            + (
                grads.dx if needs[0] else None,
                dresidual if needs[1] else None,
                dweight,
                dbias,
                dbranch_scale,
                None,
                dbranch_weight,
                dbranch_bias,
            )
            + (None,) * trailing
        )

    return backward


class _AddNormFunction(torch.autograd.Function):
    """Eager path: the same save/backward as the registered op, without the dispatcher.
    Returns ``(y, h)`` only: the row means are saved as intermediates, not returned (each
    output of an autograd function is wrapped, and these would be marked
    non-differentiable, after the kernel has left the caches cold)."""

    # The classic forward(ctx, ...) form on purpose: with a separate setup_context, apply()
    # binds default arguments through inspect.signature on every call (~8 us).
    @staticmethod
    def forward(ctx, spec, backend, *operands):
        ops = _new(Operands, operands)
        y, h, mean, mean_x = _backends.implementation(backend).forward(spec, ops)
        _save(ctx, spec, backend, ops, h, mean, mean_x)
        return y, h

    backward = staticmethod(once_differentiable(_make_backward(_backward, first=2, trailing=0)))


def _setup_context(ctx, inputs, output):
    spec = AddNormSpec.from_flat(*inputs[8:16])
    _, h, mean, mean_x = output
    _save(ctx, spec, inputs[16], Operands(*inputs[:8]), h, mean, mean_x)
    ctx.mark_non_differentiable(mean, mean_x)  # the op's outputs (empty when absent)


def _op_backward(spec, inputs, backend):
    return Grads(
        *absent_to_none(
            torch.ops.resfuse.add_norm_backward(*inputs, *spec.flat(), backend),
            backward_present(spec),
        )
    )


torch.library.register_autograd(
    "resfuse::add_norm", _make_backward(_op_backward, 0, 9), setup_context=_setup_context
)


# --------------------------------------------------------------------------- running a call


def run(spec: AddNormSpec, ops: Operands, backend: str, needs_grad: bool, compiling: bool) -> tuple:
    """``(y, h)`` of a call (None where absent) on a concrete backend, by the path that fits:
    the registered op while torch.compile traces (``compiling``; the graph stays whole), the
    autograd function when a gradient is needed, the backend itself otherwise. The caller
    passes ``compiling``: it has asked already (one query per call)."""
    if compiling:
        y, h, _, _ = absent_to_none(
            torch.ops.resfuse.add_norm(*ops, *spec.flat(), backend), forward_present(spec)
        )
        return y, h
    if needs_grad:
        return _AddNormFunction.apply(spec, backend, *ops)
    y, h, _, _ = _backends.implementation(backend).forward(spec, ops)
    return y, h


def run_distributed(spec: AddNormSpec, ops: Operands, backend: str) -> tuple:
    """``(y, h, mean, mean_x)`` of a call on DTensors: always the registered op (the
    dispatcher is where DTensor applies the sharding rules of ``distributed.py``), on the
    operands as the caller shaped them (N-D: reshaping a sequence-sharded (batch, seq,
    hidden) DTensor to rows would gather it), with the registered autograd."""
    return absent_to_none(
        torch.ops.resfuse.add_norm(*ops, *spec.flat(), backend), forward_present(spec)
    )


# DTensor's sharding rules of the two ops (None, or why DTensor calls cannot run here)
DTENSOR_UNSUPPORTED = _distributed.register_sharding_rules()
