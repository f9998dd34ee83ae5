"""The autograd layer shared by every backend, and its ``torch.library`` registration.

One computation (``reference.py``; the sandwich layout is the same op with a norm on the
branch, ``branch_norm``, and OLMo2's ``norm_add`` the same without the output norm), two
ops in the ``resfuse`` namespace:

* ``resfuse::add_norm`` -> ``(y, h, mean, mean_x)``, with registered autograd and fakes;
* ``resfuse::add_norm_backward`` -> ``(dx, dresidual, dweight, dbias, dbranch_scale,
  dbranch_weight, dbranch_bias)``.

Absent tensors (``h`` when it is not stored, the means for RMSNorm, gradients that are not
computed) are returned as empty tensors, as custom ops cannot return None. ``mean`` and
``mean_x`` are the LayerNorm row means of h and x, which the backward uses as shifts (the
backends recompute the row statistics of what they read; see
triton_kernels/add_norm_kernels.py).

Eager calls skip the dispatcher (about 10 us per custom-op call, as much as the kernel for a
small input) and go through :class:`_AddNormFunction`, which uses the very same setup and
backward functions; under ``torch.compile`` the registered ops keep the graph whole.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import auto_table
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
    branch_scale: Optional[Tensor], rowscale: Optional[Tensor], branch_weight: Optional[Tensor],
    branch_bias: Optional[Tensor], eps: float, residual_scale: float, branch_scale_value: float,
    is_rms: bool, zero_centered_weight: bool, branch_norm: bool, output_norm: bool,
    store_h: bool, residual_dtype: torch.dtype, out_dtype: torch.dtype, backend: str,
) -> tuple[Optional[Tensor], ...]:
    """(y, h, mean, mean_x) for 2-D (rows, D) inputs (unit column stride) and a rowscale
    vector, None where absent."""
    return _backends.implementation(backend).forward(
        x, residual, weight, bias, branch_scale, rowscale,
        eps=eps, residual_scale=residual_scale, branch_scale_value=branch_scale_value,
        is_rms=is_rms, zero_centered_weight=zero_centered_weight, store_h=store_h,
        residual_dtype=residual_dtype, out_dtype=out_dtype, branch_norm=branch_norm,
        branch_weight=branch_weight, branch_bias=branch_bias, output_norm=output_norm)


@torch.library.custom_op("resfuse::add_norm", mutates_args=())
def add_norm_op(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    branch_scale: Optional[Tensor], rowscale: Optional[Tensor], branch_weight: Optional[Tensor],
    branch_bias: Optional[Tensor], eps: float, residual_scale: float, branch_scale_value: float,
    is_rms: bool, zero_centered_weight: bool, branch_norm: bool, output_norm: bool,
    store_h: bool, residual_dtype: torch.dtype, out_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The entry points pass 2-D tensors; direct callers of the op may pass any shape.
    D = x.shape[-1]
    y, h, mean, mean_x = _forward_impl(
        _rows(x, D), _rows(residual, D) if residual is not None else None, weight, bias,
        branch_scale, rowscale.reshape(-1) if rowscale is not None else None, branch_weight,
        branch_bias, eps, residual_scale, branch_scale_value, is_rms, zero_centered_weight,
        branch_norm, output_norm, store_h, residual_dtype, out_dtype, backend)
    rows = x.shape[:-1]
    return (y.view(x.shape) if y is not None else _empty(x, out_dtype),
            h.view(x.shape) if h is not None else _empty(x, residual_dtype),
            mean.view(rows) if mean is not None else _empty(x),
            mean_x.view(rows) if mean_x is not None else _empty(x))


@add_norm_op.register_fake
def _add_norm_fake(x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias,
                   eps, residual_scale, branch_scale_value, is_rms, zero_centered_weight,
                   branch_norm, output_norm, store_h, residual_dtype, out_dtype, backend):
    def like(present, shape, dtype=torch.float32):
        return x.new_empty(shape if present else (0,), dtype=dtype)

    rows = x.shape[:-1]
    return (like(output_norm, x.shape, out_dtype), like(store_h, x.shape, residual_dtype),
            like(not is_rms and output_norm, rows), like(not is_rms and branch_norm, rows))


# --------------------------------------------------------------------------- backward


def _backward_impl(
    dy: Optional[Tensor], dh: Optional[Tensor], h: Optional[Tensor], x: Optional[Tensor],
    weight: Optional[Tensor], branch_scale: Optional[Tensor], rowscale: Optional[Tensor],
    branch_weight: Optional[Tensor], mean: Optional[Tensor], mean_x: Optional[Tensor],
    eps: float, residual_scale: float, branch_scale_value: float, is_rms: bool,
    zero_centered_weight: bool, has_bias: bool, has_branch_bias: bool, branch_norm: bool,
    output_norm: bool, store_dresidual: bool, x_dtype: torch.dtype, residual_dtype: torch.dtype,
    backend: str,
) -> tuple[Optional[Tensor], ...]:
    """(dx, dresidual, dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias) for 2-D
    tensors, the parameter gradients as fp32 row sums, None where absent."""
    D = (h if h is not None else dh).shape[-1]

    def rows(t):  # upstream gradients arrive in any layout
        return _rows(t, D) if t is not None else None

    return _backends.implementation(backend).backward(
        rows(dy), rows(dh), h, x, weight, branch_scale, rowscale, mean,
        eps=eps, residual_scale=residual_scale, branch_scale_value=branch_scale_value,
        is_rms=is_rms, zero_centered_weight=zero_centered_weight, has_bias=has_bias,
        store_dresidual=store_dresidual, x_dtype=x_dtype, residual_dtype=residual_dtype,
        branch_norm=branch_norm, branch_weight=branch_weight, has_branch_bias=has_branch_bias,
        mean_x=mean_x, output_norm=output_norm)


@torch.library.custom_op("resfuse::add_norm_backward", mutates_args=())
def add_norm_backward_op(
    dy: Optional[Tensor], dh: Optional[Tensor], h: Optional[Tensor], x: Optional[Tensor],
    weight: Optional[Tensor], branch_scale: Optional[Tensor], rowscale: Optional[Tensor],
    branch_weight: Optional[Tensor], mean: Optional[Tensor], mean_x: Optional[Tensor],
    eps: float, residual_scale: float, branch_scale_value: float, is_rms: bool,
    zero_centered_weight: bool, has_bias: bool, has_branch_bias: bool, branch_norm: bool,
    output_norm: bool, store_dresidual: bool, x_dtype: torch.dtype, residual_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = h if h is not None else dh
    D = like.shape[-1]

    def rows(t):
        return _rows(t, D) if t is not None else None

    def flat(t):
        return t.reshape(-1) if t is not None else None

    dx, dr, *params = _backward_impl(
        dy, dh, rows(h), rows(x), weight, branch_scale, flat(rowscale), branch_weight, flat(mean),
        flat(mean_x), eps, residual_scale, branch_scale_value, is_rms, zero_centered_weight,
        has_bias, has_branch_bias, branch_norm, output_norm, store_dresidual, x_dtype,
        residual_dtype, backend)
    return (dx.view(like.shape), dr.view(like.shape) if dr is not None else _empty(like, residual_dtype),
            *(g if g is not None else _empty(like) for g in params))


@add_norm_backward_op.register_fake
def _add_norm_backward_fake(dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean,
                            mean_x, eps, residual_scale, branch_scale_value, is_rms,
                            zero_centered_weight, has_bias, has_branch_bias, branch_norm,
                            output_norm, store_dresidual, x_dtype, residual_dtype, backend):
    like = h if h is not None else dh
    D = like.shape[-1]

    def vec(present):
        return like.new_empty((D,) if present else (0,), dtype=torch.float32)

    return (like.new_empty(like.shape, dtype=x_dtype),
            like.new_empty(like.shape if store_dresidual else (0,), dtype=residual_dtype),
            vec(weight is not None and output_norm), vec(has_bias), vec(branch_scale is not None),
            vec(branch_weight is not None), vec(has_branch_bias))


# --------------------------------------------------------------------------- autograd

_N_INPUTS = 19  # of resfuse::add_norm


def _setup_context(ctx, inputs, output):
    (x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias, eps,
     residual_scale, branch_scale_value, is_rms, zero_centered_weight, branch_norm, output_norm,
     store_h, residual_dtype, out_dtype, backend) = inputs
    _, h, mean, mean_x = output
    # Saved for backward, and why:
    # - h (or x itself when h == x and was not stored): the output norm is differentiated
    #   at it; not needed without an output norm (norm_add);
    # - x when the branch needs it: LayerScale's gradient (sum of dh * x) or the branch
    #   norm's own backward;
    # - the LayerNorm row means of h and x, as shifts (rstd is recomputed, never kept).
    # Parameters are not activations.
    saved_h = (h if store_h else x) if output_norm else None
    saved_x = x if branch_scale is not None or branch_norm else None
    ctx.save_for_backward(saved_h, saved_x, weight, branch_scale, rowscale, branch_weight,
                          mean if not is_rms and output_norm else None,
                          mean_x if not is_rms and branch_norm else None)
    ctx.mark_non_differentiable(*(t for t in (mean, mean_x) if t is not None))
    ctx.set_materialize_grads(False)
    # Where dresidual comes from: dx itself when dh/dresidual = dh/dx elementwise and the
    # dtypes agree (one store fewer: the backward moves 4 instead of 5 tensors), h's own
    # upstream gradient when h = residual + norm(x) has no output norm (norm_add: as for
    # torch's own add, the gradient passes through), else a store of the kernel.
    if residual is None:
        source = None
    elif (residual_scale == 1.0 and branch_scale is None and branch_scale_value == 1.0
          and rowscale is None and not branch_norm and residual.dtype == x.dtype):
        source = "dx"
    elif not output_norm and residual_scale == 1.0 and residual.dtype == residual_dtype:
        source = "dh"
    else:
        source = "kernel"
    ctx.config = (eps, residual_scale, branch_scale_value, is_rms, zero_centered_weight,
                  bias is not None, branch_bias is not None, branch_norm, output_norm,
                  source == "kernel", x.dtype,
                  residual.dtype if residual is not None else x.dtype, backend)
    ctx.dresidual_source = source
    ctx.param_dtypes = tuple(t.dtype if t is not None else None
                             for t in (weight, bias, branch_scale, branch_weight, branch_bias))
    ctx.store_h = store_h


def _make_backward(run_backward):
    def backward(ctx, dy, dh, _dmean=None, _dmean_x=None):
        h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x = ctx.saved_tensors
        output_norm = ctx.config[8]
        if dy is None and output_norm:
            dy = torch.zeros_like(h)
        if not ctx.store_h:
            dh = None
        dx, dr, *params = run_backward(dy, dh, h, x, weight, branch_scale, rowscale,
                                       branch_weight, mean, mean_x, *ctx.config)
        needs = ctx.needs_input_grad
        dresidual = {"dx": dx, "dh": dh, "kernel": dr, None: None}[ctx.dresidual_source]
        param_grads = tuple(
            g.to(dtype) if dtype is not None and needs[i] else None
            for i, g, dtype in zip((2, 3, 4, 6, 7), params, ctx.param_dtypes))
        dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias = param_grads
        return (
            dx if needs[0] else None,
            dresidual if needs[1] else None,
            dweight, dbias, dbranch_scale, None, dbranch_weight, dbranch_bias,
        ) + (None,) * (_N_INPUTS - 8)

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


# --------------------------------------------------------------------------- entry points


def _run(x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias, eps,
         residual_scale, branch_scale_value, is_rms, zero_centered_weight, branch_norm,
         output_norm, return_h, residual_dtype, out_dtype, backend):
    """Pick the path (compiled op / eager autograd / no-grad) and run; returns (y, h).

    The ops see 2-D (rows, D) tensors: the reshapes happen out here, where autograd tracks
    them, so y and h are ordinary views the caller may edit in place (a custom autograd
    function returning several views of its outputs forbids that)."""
    shape, D = x.shape, x.shape[-1]
    tensors = (x, residual, weight, bias, branch_scale, branch_weight, branch_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if backend == "auto":  # auto's measured choice depends on the call (auto_table)
        key = (auto_table.family(residual is not None, branch_norm, output_norm), is_rms,
               x.dtype, D, needs_grad)
        if torch.compiler.is_compiling() and not auto_table.known_at_trace(D):
            key = None  # the choice is a constant of the graph: a symbolic D gets the rule
        backend = _backends.resolve(backend, x.device, key)
    else:
        backend = _backends.resolve(backend, x.device)
    x = _rows(x, D)
    residual = _rows(residual, D) if residual is not None else None
    rowscale = rowscale.reshape(-1) if rowscale is not None else None
    h_is_x = (residual is None and branch_scale is None and branch_scale_value == 1.0
              and rowscale is None and not branch_norm and residual_dtype == x.dtype)
    # h is written when returned, or when the output norm's backward needs it and it is not x
    store_h = return_h or (needs_grad and output_norm and not h_is_x)
    args = (x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias, eps,
            residual_scale, branch_scale_value, is_rms, zero_centered_weight, branch_norm,
            output_norm, store_h, residual_dtype, out_dtype, backend)
    if torch.compiler.is_compiling():
        y, h, _, _ = torch.ops.resfuse.add_norm(*args)
    elif needs_grad:
        y, h, _, _ = _AddNormFunction.apply(*args)
    else:
        y, h, _, _ = _forward_impl(*args)
    if len(shape) != 2:
        y = y.view(shape) if output_norm else y
        h = h.view(shape) if store_h else h
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
    x, residual, weight, bias, eps, *, is_rms: bool, residual_scale=1.0, branch_scale=None,
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
    y, h = _run(x, residual, weight, bias, branch_scale, rowscale, None, None, eps,
                residual_scale, branch_scale_value, is_rms, zero_centered_weight, False, True,
                prenorm, residual_dtype, out_dtype, backend)
    return (y, h) if prenorm else y


def norm_add_norm(
    x, residual, branch_weight, weight, eps, *, is_rms: bool, branch_bias=None, bias=None,
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
    y, h = _run(x, residual, weight, bias, None, None, branch_weight, branch_bias, eps, 1.0, 1.0,
                is_rms, zero_centered_weight, True, output_norm, prenorm or not output_norm,
                residual_dtype, out_dtype, backend)
    if not output_norm:
        return h
    return (y, h) if prenorm else y
