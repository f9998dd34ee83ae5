"""The autograd layer shared by every backend, and its ``torch.library`` registration.

One computation, two ops in the ``resfuse`` namespace:

* ``resfuse::add_norm``  -> ``(y, h, mean)``, with registered autograd and fake impls;
* ``resfuse::add_norm_backward`` -> ``(dx, dresidual, dweight, dbias, dbranch_scale)``.

Absent tensors (``h`` when it is not stored, ``mean`` for RMSNorm, gradients that are not
computed) are returned as empty tensors, as custom ops cannot return None. ``mean`` is the
LayerNorm row mean, which the backward uses as a shift (the backends recompute the row
statistics of the stored ``h``; see triton_kernels/add_norm_kernels.py).

Eager calls skip the dispatcher (about 10 us per custom-op call, as much as the kernel for a
small input) and go through :class:`_AddNormFunction`, which uses the very same setup and
backward functions; under ``torch.compile`` the registered ops keep the graph whole.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend_registry as _backends
from . import checks


def _rows(t: Tensor, D: int) -> Tensor:
    """2-D (rows, D) view with a unit column stride: used in place when the leading dims
    collapse to one row stride, copied otherwise."""
    t2 = t if t.dim() == 2 else t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 or D == 1 else t2.contiguous()


def _empty(like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


# --------------------------------------------------------------------------- forward


def _forward_impl(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    branch_scale: Optional[Tensor], rowscale: Optional[Tensor], eps: float,
    residual_scale: float, branch_scale_value: float, is_rms: bool, zero_centered_weight: bool,
    store_h: bool, residual_dtype: torch.dtype, out_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(y, h or None, mean or None) in x's shape."""
    D = x.shape[-1]
    y, h, mean = _backends.implementation(backend).forward(
        _rows(x, D), _rows(residual, D) if residual is not None else None, weight, bias,
        branch_scale, rowscale.reshape(-1) if rowscale is not None else None,
        eps=eps, residual_scale=residual_scale, branch_scale_value=branch_scale_value,
        is_rms=is_rms, zero_centered_weight=zero_centered_weight, store_h=store_h,
        residual_dtype=residual_dtype, out_dtype=out_dtype)
    if x.dim() == 2:
        return y, h, mean
    return (y.view(x.shape), h.view(x.shape) if h is not None else None,
            mean.view(x.shape[:-1]) if mean is not None else None)


@torch.library.custom_op("resfuse::add_norm", mutates_args=())
def add_norm_op(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    branch_scale: Optional[Tensor], rowscale: Optional[Tensor], eps: float,
    residual_scale: float, branch_scale_value: float, is_rms: bool, zero_centered_weight: bool,
    store_h: bool, residual_dtype: torch.dtype, out_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    y, h, mean = _forward_impl(x, residual, weight, bias, branch_scale, rowscale, eps,
                               residual_scale, branch_scale_value, is_rms, zero_centered_weight,
                               store_h, residual_dtype, out_dtype, backend)
    return (y, h if h is not None else _empty(x, residual_dtype),
            mean if mean is not None else _empty(x))


@add_norm_op.register_fake
def _add_norm_fake(x, residual, weight, bias, branch_scale, rowscale, eps, residual_scale,
                   branch_scale_value, is_rms, zero_centered_weight, store_h, residual_dtype,
                   out_dtype, backend):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.shape, dtype=residual_dtype) if store_h else _empty(x, residual_dtype),
            _empty(x) if is_rms else x.new_empty(lead, dtype=torch.float32))


# --------------------------------------------------------------------------- backward


def _backward_impl(
    dy: Tensor, dh: Optional[Tensor], h: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
    branch_scale: Optional[Tensor], rowscale: Optional[Tensor], mean: Optional[Tensor],
    eps: float, residual_scale: float, branch_scale_value: float, is_rms: bool,
    zero_centered_weight: bool, has_bias: bool, store_dresidual: bool, x_dtype: torch.dtype,
    residual_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    D = h.shape[-1]
    dx, dr, dw, db, dbs = _backends.implementation(backend).backward(
        _rows(dy, D), _rows(dh, D) if dh is not None else None, _rows(h, D),
        _rows(x, D) if x is not None else None, weight, branch_scale,
        rowscale.reshape(-1) if rowscale is not None else None,
        mean.reshape(-1) if mean is not None else None,
        eps=eps, residual_scale=residual_scale, branch_scale_value=branch_scale_value,
        is_rms=is_rms, zero_centered_weight=zero_centered_weight, has_bias=has_bias,
        store_dresidual=store_dresidual, x_dtype=x_dtype, residual_dtype=residual_dtype)
    return (dx.view(h.shape),
            dr.view(h.shape) if dr is not None else _empty(h, residual_dtype),
            dw if dw is not None else _empty(h),
            db if db is not None else _empty(h),
            dbs if dbs is not None else _empty(h))


@torch.library.custom_op("resfuse::add_norm_backward", mutates_args=())
def add_norm_backward_op(
    dy: Tensor, dh: Optional[Tensor], h: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
    branch_scale: Optional[Tensor], rowscale: Optional[Tensor], mean: Optional[Tensor],
    eps: float, residual_scale: float, branch_scale_value: float, is_rms: bool,
    zero_centered_weight: bool, has_bias: bool, store_dresidual: bool, x_dtype: torch.dtype,
    residual_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(dy, dh, h, x, weight, branch_scale, rowscale, mean, eps,
                          residual_scale, branch_scale_value, is_rms, zero_centered_weight,
                          has_bias, store_dresidual, x_dtype, residual_dtype, backend)


@add_norm_backward_op.register_fake
def _add_norm_backward_fake(dy, dh, h, x, weight, branch_scale, rowscale, mean, eps,
                            residual_scale, branch_scale_value, is_rms, zero_centered_weight,
                            has_bias, store_dresidual, x_dtype, residual_dtype, backend):
    D = h.shape[-1]

    def vec(present):
        return h.new_empty((D,) if present else (0,), dtype=torch.float32)

    return (h.new_empty(h.shape, dtype=x_dtype),
            h.new_empty(h.shape if store_dresidual else (0,), dtype=residual_dtype),
            vec(weight is not None), vec(has_bias), vec(branch_scale is not None))


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    (x, residual, weight, bias, branch_scale, rowscale, eps, residual_scale, branch_scale_value,
     is_rms, zero_centered_weight, store_h, residual_dtype, out_dtype, backend) = inputs
    _, h, mean = output
    # Saved: h (or x itself when h == x and was not stored), the LayerNorm row mean, x only
    # when the per-channel branch scale needs it for its gradient; parameters are not
    # activations. rstd is recomputed from h in the backward, so it is not kept.
    ctx.save_for_backward(h if store_h else x, x if branch_scale is not None else None, weight,
                          branch_scale, rowscale, None if is_rms else mean)
    if mean is not None:
        ctx.mark_non_differentiable(mean)
    ctx.set_materialize_grads(False)
    # dx can serve as dresidual when dh/dresidual = dh/dx elementwise and the dtypes agree:
    # one store fewer (the backward moves 4 instead of 5 tensors).
    share = (residual is not None and residual_scale == 1.0 and branch_scale is None
             and branch_scale_value == 1.0 and rowscale is None and residual.dtype == x.dtype)
    ctx.config = (eps, residual_scale, branch_scale_value, is_rms, zero_centered_weight,
                  bias is not None, residual is not None and not share, x.dtype,
                  residual.dtype if residual is not None else x.dtype, backend)
    ctx.share_dresidual = share
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.store_h = store_h


def _make_backward(run_backward):
    def backward(ctx, dy, dh, _dmean=None):
        h, x, weight, branch_scale, rowscale, mean = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        if not ctx.store_h:
            dh = None
        dx, dr, dw, db, dbs = run_backward(dy, dh, h, x, weight, branch_scale, rowscale, mean,
                                           *ctx.config)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            (dx if ctx.share_dresidual else dr) if ctx.has_residual and needs[1] else None,
            dw.to(weight.dtype) if weight is not None and needs[2] else None,
            db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs[3] else None,
            dbs.to(branch_scale.dtype) if branch_scale is not None and needs[4] else None,
            None, None, None, None, None, None, None, None, None, None,
        )

    return backward


class _AddNormFunction(torch.autograd.Function):
    """Eager path: the same setup/backward as the registered op, without the dispatcher."""

    # The classic forward(ctx, ...) form on purpose: with a separate setup_context, apply()
    # binds default arguments through inspect.signature on every call (~8 us).
    @staticmethod
    def forward(ctx, *args):
        output = _forward_impl(*args)
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(once_differentiable(_make_backward(_backward_impl)))


torch.library.register_autograd(
    "resfuse::add_norm",
    _make_backward(lambda *args: torch.ops.resfuse.add_norm_backward(*args)),
    setup_context=_setup_context,
)


# --------------------------------------------------------------------------- entry point


def add_norm(
    x, residual, weight, bias, eps, *, is_rms: bool, residual_scale=1.0, branch_scale=None,
    rowscale=None, zero_centered_weight=False, prenorm=True, residual_dtype=None,
    out_dtype=None, backend="auto",
):
    """Validate, pick the backend, run; returns ``(y, h)`` if ``prenorm`` else ``y``."""
    checks.activation(x)
    if residual is not None:
        checks.same_as_x("residual", residual, x)
    if weight is not None:
        checks.vector("weight", weight, x)
    if bias is not None:
        checks.vector("bias", bias, x)
    eps = checks.real("eps", eps, minimum=0.0)
    residual_scale = checks.real("residual_scale", residual_scale)
    branch_scale_value = 1.0
    if isinstance(branch_scale, Tensor):
        checks.vector("branch_scale", branch_scale, x)
    elif branch_scale is not None:
        branch_scale_value = checks.real("branch_scale", branch_scale)
        branch_scale = None
    if rowscale is not None:
        rowscale = checks.rowscale(rowscale, x)
    zero_centered_weight = checks.flag("zero_centered_weight", zero_centered_weight)
    prenorm = checks.flag("prenorm", prenorm)
    residual_dtype = checks.dtype("residual_dtype", residual_dtype,
                                  residual.dtype if residual is not None else x.dtype)
    out_dtype = checks.dtype("out_dtype", out_dtype, x.dtype)
    backend = _backends.resolve(backend, x.device)

    tensors = (x, residual, weight, bias, branch_scale)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    h_is_x = (residual is None and branch_scale is None and branch_scale_value == 1.0
              and rowscale is None and residual_dtype == x.dtype)
    # h is written when returned, or when the backward needs it and it is not x itself.
    store_h = prenorm or (needs_grad and not h_is_x)
    args = (x, residual, weight, bias, branch_scale, rowscale, eps, residual_scale,
            branch_scale_value, is_rms, zero_centered_weight, store_h, residual_dtype,
            out_dtype, backend)
    if torch.compiler.is_compiling():
        y, h, _ = torch.ops.resfuse.add_norm(*args)
    elif needs_grad:
        y, h, _ = _AddNormFunction.apply(*args)
    else:
        y, h, _ = _forward_impl(*args)
    return (y, h) if prenorm else y
