"""The fused forwards that patched modules run: one for norms, one per layout family.

``resfuse.patch`` gives a module a generated subclass of its own class, ``Resfuse<Name>``,
whose MRO puts one of the overrides below in front of the original class. The module object,
its parameters (the very same ``Parameter`` objects), buffers, hooks and state_dict keys are
untouched; ``unpatch`` puts the original class back. Each override reads what it needs from
the table entry stored on the generated class (``_resfuse_spec``), so there is one forward per
family, not one per model:

* :class:`NormOverride` - any norm: RMS / LayerNorm through ``resfuse.functional.add_norm``, plus
  ``resfuse_add_norm(x, residual, ...)``, the fused add + norm the layers call, and
  ``resfuse_norm_add(x, residual, next_norm)``, the branch norm + add (+ next norm) of the
  sandwich layouts.
* :class:`ChainOverride` - pre-norm layers (``specs.Chain``): each add that is followed by a
  norm becomes one fused call; with ``fuse_residual="across_layers"`` the closing add is fused
  with the next layer's first norm (or the final norm) as well.
* :class:`PostNormOverride` - ``norm(branch + residual)`` (``specs.PostNorm``), BERT style.

Every fused step falls back to the original arithmetic when it cannot run fused: a norm with
hooks (they must see their call), a dtype resfuse does not take (float64), shapes that differ.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import checks
from ..functional import add_norm, norm_add, norm_add_norm
from . import engines, layout
from .specs import Chain, Norm, PostNorm, Sublayer

_FLOAT = checks.FLOAT_DTYPES

# Instance attributes set by patch() (removed by unpatch()), kept in the module's __dict__ so
# they are neither submodules nor state.
CARRY = "_resfuse_carry"  # on a norm: (h, h._version, y) handed over by a layer
CARRY_INTO = "_resfuse_carry_into"  # on a layer: the Link to the norm that consumes its output
CHECKPOINT_FLAG = "_resfuse_checkpoint_flag"  # on a layer: (stack, attribute) of checkpointing


def _has_hooks(module: nn.Module) -> bool:
    """Calling the fused method bypasses ``module.__call__``: only allowed without hooks."""
    return engines.hook_owner(module) is not None


class Binder:
    """Binds a layer's call to the parameter names of its original forward (fast, and simple
    enough for torch.compile to trace): ``(named arguments with defaults, extra **kwargs)``."""

    def __init__(self, fn, owner: str):
        params = list(inspect.signature(fn).parameters.values())[1:]  # without self
        kinds = inspect.Parameter
        if any(p.kind == kinds.VAR_POSITIONAL for p in params):
            raise ValueError(f"{owner}.forward takes *args: its arguments cannot be bound by name")
        self.owner = owner
        self.positional = tuple(
            p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        )
        self.names = frozenset(p.name for p in params if p.kind != kinds.VAR_KEYWORD)
        self.defaults = {
            p.name: p.default
            for p in params
            if p.kind != kinds.VAR_KEYWORD and p.default is not p.empty
        }
        self.required = tuple(
            p.name for p in params if p.kind != kinds.VAR_KEYWORD and p.default is p.empty
        )
        self.var_kwargs = any(p.kind == kinds.VAR_KEYWORD for p in params)

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict, dict]:
        if len(args) > len(self.positional):
            raise TypeError(
                f"{self.owner}.forward takes {len(self.positional)} positional "
                f"arguments but {len(args)} were given"
            )
        bound = dict(self.defaults)
        bound.update(zip(self.positional, args))
        extra = {}
        for name, value in kwargs.items():
            if name in self.names:
                if name in self.positional[: len(args)]:
                    raise TypeError(
                        f"{self.owner}.forward got multiple values for argument {name!r}"
                    )
                bound[name] = value
            elif self.var_kwargs:
                extra[name] = value
            else:
                raise TypeError(f"{self.owner}.forward got an unexpected keyword argument {name!r}")
        for name in self.required:
            if name not in bound:
                raise TypeError(f"{self.owner}.forward missing required argument {name!r}")
        return bound, extra


# --------------------------------------------------------------------------- norms


class NormOverride:
    """In front of a norm class: ``forward(x)`` runs resfuse's norm; ``resfuse_add_norm`` is
    the fused residual add + norm. Reads weight / bias / eps from the module itself."""

    _resfuse_original: type
    _resfuse_spec: Norm
    _resfuse_backend = "auto"  # probes.py runs the reference ("torch") on its copies

    def _resfuse_trailing(self) -> int:
        return len(self.normalized_shape) if self._resfuse_spec.normalized_shape else 1

    def _resfuse_weight(self) -> Optional[Tensor]:
        return getattr(self, "weight", None)  # (OLMo's LayerNorm has none)

    def resfuse_supports(self, x: Tensor) -> bool:
        """Whether resfuse can run this norm on ``x`` (else the original forward runs)."""
        if x.dtype not in _FLOAT or x.dim() == 0:
            return False
        if self._resfuse_spec.channels_first:
            if x.dim() < 2:
                return False
            x = x.movedim(1, -1)
        if self._resfuse_spec.autocast == "original" and torch.is_autocast_enabled(x.device.type):
            return False
        k = self._resfuse_trailing()
        if self._resfuse_spec.normalized_shape and (
            x.dim() < k or tuple(x.shape[-k:]) != tuple(self.normalized_shape)
        ):
            return False  # the original raises its own error
        D = x.shape[-k:].numel()
        for p in (self._resfuse_weight(), self._resfuse_bias()):
            if p is not None and (p.dtype not in _FLOAT or p.numel() != D or p.device != x.device):
                return False
        return True

    def _resfuse_bias(self) -> Optional[Tensor]:
        return getattr(self, "bias", None) if self._resfuse_spec.kind == "layer" else None

    def _resfuse_eps(self, dtype: torch.dtype) -> float:
        eps = self._resfuse_spec.eps
        if isinstance(eps, str):
            eps = getattr(self, eps)
        return torch.finfo(dtype).eps if eps is None else float(eps)

    def forward(
        self,
        hidden_states: Tensor,
        resfuse_residual: Optional[Tensor] = None,
        resfuse_layout: str = "add_norm",
    ):
        if resfuse_residual is not None:
            return self._resfuse_in_call(hidden_states, resfuse_residual, resfuse_layout)
        carried = take_carry(self, hidden_states)
        if carried is not None:
            return carried
        if not self.resfuse_supports(hidden_states):
            return self._resfuse_original.forward(self, hidden_states)
        if self._resfuse_spec.channels_first:  # rows are the channels of each position
            y = self.resfuse_add_norm(hidden_states.movedim(1, -1), None, prenorm=False)
            return y.movedim(-1, 1)
        return self.resfuse_add_norm(hidden_states, None, prenorm=False)

    def resfuse_add_norm(
        self,
        x: Tensor,
        residual: Optional[Tensor],
        *,
        branch_scale: Optional[Tensor] = None,
        rowscale: Optional[Tensor] = None,
        prenorm: bool = True,
    ):
        """``h = residual + branch_scale * rowscale * x``, ``y = self(h)`` in one call:
        ``(y, h)`` if ``prenorm`` else ``y``. ``h`` gets the dtype PyTorch's ``+`` would
        give it, ``y`` the dtype the original norm returns for ``h``."""
        spec = self._resfuse_spec
        weight, bias = self._resfuse_weight(), self._resfuse_bias()
        h_dtype = x.dtype
        if isinstance(branch_scale, Tensor):
            h_dtype = torch.promote_types(h_dtype, branch_scale.dtype)
        if residual is not None:
            h_dtype = torch.promote_types(h_dtype, residual.dtype)
        shape, k, device_type = x.shape, self._resfuse_trailing(), x.device.type
        if k > 1:  # rows span several trailing dims (torch.nn norms): one row of their product
            D = shape[-k:].numel()
            x = x.reshape(*shape[:-k], D)
            residual = residual.reshape(x.shape) if residual is not None else None
            weight = weight.reshape(D) if weight is not None else None
            bias = bias.reshape(D) if bias is not None else None
        # else the leading dims stay as they are: the functional API makes rows of them, and
        # a DTensor sharded over the sequence must not be reshaped (it would be gathered)
        out = add_norm(
            x,
            residual,
            weight,
            bias,
            self._resfuse_eps(h_dtype),
            norm=spec.kind,
            branch_scale=branch_scale,
            rowscale=rowscale,
            zero_centered_weight=spec.zero_centered_weight,
            prenorm=prenorm,
            residual_dtype=h_dtype if residual is not None else None,
            out_dtype=spec.output_dtype(h_dtype, self._resfuse_weight(), device_type),
            backend=self._resfuse_backend,
        )
        if k == 1:
            return out
        if prenorm:
            return tuple(t.view(shape) for t in out)
        return out.view(shape)

    def _resfuse_in_call(self, x: Tensor, residual: Tensor, layout: str):
        """A fused call of resfuse's own layers run inside this module's call, where engine
        hooks (ZeRO-3, FSDP2) have gathered its parameters (``_fuses_through_call``):
        ``"add_norm"`` -> (y, h) of ``self(residual + x)``; ``"post_norm"`` -> y;
        ``"norm_add"`` -> ``residual + self(x)``. The original arithmetic where resfuse
        cannot run it."""
        if layout == "norm_add":
            if self.resfuse_supports(x) and self._resfuse_trailing() == 1:
                return self.resfuse_norm_add(x, residual)
            return residual + self._resfuse_original.forward(self, x)
        prenorm = layout == "add_norm"
        if self.resfuse_supports(x):
            return self.resfuse_add_norm(x, residual, prenorm=prenorm)
        h = residual + x
        y = self._resfuse_original.forward(self, h)
        return (y, h) if prenorm else y

    def resfuse_norm_add(self, x: Tensor, residual: Tensor, next_norm=None):
        """``h = residual + self(x)`` and, with ``next_norm``, ``y = next_norm(h)`` in one call:
        ``(y, h)``, else ``h``. ``h`` gets the dtype ``residual + self(x)`` would have, ``y``
        the one ``next_norm`` returns for ``h``; the branch output is not rounded before the
        add (the original rounds it to its output dtype: expect one-ulp differences)."""
        spec, device_type = self._resfuse_spec, x.device.type
        f_dtype = spec.output_dtype(x.dtype, self._resfuse_weight(), device_type)
        h_dtype = torch.promote_types(f_dtype, residual.dtype)
        common = dict(
            norm=spec.kind,
            branch_bias=self._resfuse_bias(),
            zero_centered_weight=spec.zero_centered_weight,
            residual_dtype=h_dtype,
            backend=self._resfuse_backend,
        )
        eps = self._resfuse_eps(f_dtype)
        if next_norm is None:
            return norm_add(x, residual, self._resfuse_weight(), eps, **common)
        out_dtype = next_norm._resfuse_spec.output_dtype(
            h_dtype, next_norm._resfuse_weight(), device_type
        )
        return norm_add_norm(
            x,
            residual,
            self._resfuse_weight(),
            next_norm._resfuse_weight(),
            eps,
            bias=next_norm._resfuse_bias(),
            out_dtype=out_dtype,
            **common,
        )


# --------------------------------------------------------------------------- carrying


class Link:
    """A layer's closing add fused with the norm that follows it (``"across_layers"``): the
    next layer's first norm or the stack's final norm. Before each fused call it checks that
    the model is still built as it was patched (``steps``: each ``(parent, name, child)``
    down to the norm; a wrapper put in between, FSDP1 or a checkpoint wrapper, breaks it),
    that no engine keeps the norm's parameters for its own module's forward
    (``engines.foreign_owner``) and that no engine needs the layer's backward to start at
    its output (``engines.unit_bypassed``, ``callers``: the layer and its container). When either fails the closing add runs unfused; the first
    time, ``on_fallback(reason)`` updates the report and warns."""

    def __init__(
        self, callers: tuple, norm: nn.Module, steps: tuple, on_fallback: Callable[[str], None]
    ):
        self.callers = callers
        self.norm = norm
        self.steps = steps
        self.path = tuple(child for _, _, child in steps)
        self.on_fallback = on_fallback
        self.fallbacks: set[str] = set()

    def problem(self) -> Optional[str]:
        for parent, name, child in self.steps:
            if parent._modules.get(name) is not child:
                return f"`{name}` of {type(parent).__name__} was replaced after patching"
        return engines.unit_bypassed(self.callers) or engines.foreign_owner(self.path, self.norm)

    def usable(self) -> bool:
        problem = self.problem()
        if problem is None:
            return True
        if problem not in self.fallbacks:
            self.fallbacks.add(problem)
            self.on_fallback(problem)
        return False


def take_carry(norm: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The output a layer already computed for this norm in its fused closing add, if ``x`` is
    exactly the tensor that layer returned, unmodified (same object, same version counter)
    and the carried output has a gradient whenever one is due. Anything else - a hook that
    replaced or edited the layer output, a checkpoint recompute - computes the norm anew."""
    if torch.compiler.is_compiling():
        return None
    carry = norm.__dict__.get(CARRY)
    if carry is None:
        return None
    norm.__dict__[CARRY] = None
    if engines.autograd_reruns():
        # checkpointed: its recomputation will compute the norm, so the forward must as well
        return None
    h, version, y = carry
    if (
        h is x
        and not torch.is_inference_mode_enabled()
        and x._version == version
        and (y.requires_grad or not (torch.is_grad_enabled() and x.requires_grad))
    ):
        return y
    return None


def _carry_allowed(layer: nn.Module) -> bool:
    # Not traced (a side channel dynamo would have to guard), not in inference mode (no
    # version counter to check), not under gradient checkpointing (the recompute would
    # hand over a second, unused output, and a non-reentrant checkpoint needs the forward
    # and its recomputation to save the same tensors).
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return False
    if layer.training:
        if getattr(layer, "gradient_checkpointing", False):
            return False
        flag = layer.__dict__.get(CHECKPOINT_FLAG)
        if flag is not None and getattr(flag[0], flag[1], False):
            return False
    return not engines.autograd_reruns()


# --------------------------------------------------------------------------- layers


def _can_fuse_inputs(f: Tensor, residual: Tensor, scales) -> bool:
    if f.dtype not in _FLOAT or residual.dtype not in _FLOAT or f.dim() < 2:
        return False
    if f.shape != residual.shape or f.device != residual.device:
        return False
    for module, role in scales:
        if role == "scale":
            if isinstance(module, Tensor):
                if module.dtype not in _FLOAT or module.shape != f.shape[-1:]:
                    return False
            elif isinstance(module, bool) or not isinstance(module, (int, float)):
                return False
        if role == "layer_scale" and not isinstance(module, nn.Identity):
            gamma = module.gamma
            if gamma.dtype not in _FLOAT or gamma.shape != f.shape[-1:]:
                return False
    return True


def _can_fuse(norm, f: Tensor, residual: Tensor, scales, *, check_hooks: bool = True) -> bool:
    """Whether ``norm.resfuse_add_norm(f, residual, ...)`` may run, here, outside the norm's
    call."""
    if not isinstance(norm, NormOverride) or (check_hooks and _has_hooks(norm)):
        return False
    if norm._resfuse_spec.channels_first:  # normalizes dim 1, an add's rows are dim -1
        return False
    return _can_fuse_inputs(f, residual, scales) and norm.resfuse_supports(f)


def _fuses_through_call(norm, f: Tensor, residual: Tensor, scales=()) -> bool:
    """Whether ``norm(f, residual, layout)`` may run the fused call inside the norm's own
    call: its hooks are all an engine's, which gathers its parameters there (ZeRO-3
    partitions every module's), and no LayerScale or drop-path scales the branch
    (LayerScale's gamma belongs to another module, gathered in that module's call)."""
    if not isinstance(norm, NormOverride) or engines.hook_owner(norm) != "engine":
        return False
    if norm._resfuse_spec.channels_first:
        return False
    if any(not isinstance(m, nn.Identity) for m, _ in scales):
        return False  # (a scalar, too: the norm's call takes no scale)
    return _can_fuse_inputs(f, residual, scales)


def _can_fuse_branch(
    branch, norm, f: Tensor, residual: Tensor, *, check_hooks: bool = True
) -> bool:
    """Whether ``residual + branch(f)`` (then ``norm``, if any) can run as one call: both
    resfuse norms over one dimension, of the same kind, weight convention and eps, no hooks
    on the branch norm (it would not see its call)."""
    if not isinstance(branch, NormOverride) or _has_hooks(branch):
        return False
    if (
        branch._resfuse_spec.channels_first
        or getattr(norm, "_resfuse_spec", None) is not None
        and norm._resfuse_spec.channels_first
    ):
        return False
    if f.dtype not in _FLOAT or residual.dtype not in _FLOAT:
        return False
    if f.shape != residual.shape or f.device != residual.device or f.dim() < 1:
        return False
    if branch._resfuse_trailing() != 1 or not branch.resfuse_supports(f):
        return False
    if norm is None:
        return True
    b, n = branch._resfuse_spec, getattr(norm, "_resfuse_spec", None)
    if not isinstance(norm, NormOverride) or (check_hooks and _has_hooks(norm)):
        return False
    h_dtype = torch.promote_types(
        b.output_dtype(f.dtype, branch._resfuse_weight(), f.device.type), residual.dtype
    )
    return (
        n.kind == b.kind
        and n.zero_centered_weight == b.zero_centered_weight
        and norm._resfuse_trailing() == 1
        and norm._resfuse_eps(h_dtype) == branch._resfuse_eps(h_dtype)
        and norm.resfuse_supports(residual)
    )


def _fused_scales(scales, f: Tensor):
    """branch_scale (the LayerScale gamma, or a layer attribute the branch is multiplied by:
    Granite's ``residual_multiplier``, CaiT's ``gamma_1``) and rowscale (the drop-path keep mask / keep), the mask drawn
    exactly as timm's drop_path draws it, so the RNG stream is the same."""
    branch_scale = rowscale = None
    mask_dtype = f.dtype
    for module, role in scales:
        if role == "scale":  # a number or a per-channel parameter of the layer
            if isinstance(module, Tensor):
                branch_scale = module
                mask_dtype = torch.promote_types(mask_dtype, module.dtype)
            else:
                branch_scale = float(module)
            continue
        if isinstance(module, nn.Identity):
            continue
        if role == "layer_scale":
            branch_scale = module.gamma
            mask_dtype = torch.promote_types(mask_dtype, branch_scale.dtype)
        elif module.training and module.drop_prob > 0.0:  # drop_path
            keep = 1.0 - module.drop_prob
            mask = f.new_empty((f.shape[0],) + (1,) * (f.dim() - 1), dtype=mask_dtype)
            mask.bernoulli_(keep)
            if keep > 0.0 and module.scale_by_keep:
                mask.div_(keep)
            rowscale = mask.reshape((f.shape[0],) + (1,) * (f.dim() - 2))
    return branch_scale, rowscale


def _scaled_branch(scales, f: Tensor) -> Tensor:
    for module, role in scales:  # unfused: the original operations, in order
        f = f * module if role == "scale" else module(f)
    return f


def _add(layer: nn.Module, pending, residual: Tensor, norm) -> tuple[Tensor, Tensor]:
    """The add of a finished sublayer, then ``norm`` (if any): ``(h, norm(h))``, one fused
    call where possible (with the sublayer's branch norm, when it has one)."""
    sub, f = pending
    if sub.branch_norm is not None:
        branch = getattr(layer, sub.branch_norm)
        if _can_fuse_branch(branch, norm, f, residual):
            if norm is None:
                h = branch.resfuse_norm_add(f, residual)
                return h, h
            y, h = branch.resfuse_norm_add(f, residual, norm)
            return h, y
        if norm is None and _fuses_through_call(branch, f, residual):
            h = branch(f, residual, "norm_add")
            return h, h
        f = branch(f)  # unfused: the branch norm on its own, then the add (+ norm) below
    scales = [(getattr(layer, attr), role) for attr, role in sub.scale_steps]
    if norm is not None and _can_fuse(norm, f, residual, scales):
        branch_scale, rowscale = _fused_scales(scales, f)
        y, h = norm.resfuse_add_norm(f, residual, branch_scale=branch_scale, rowscale=rowscale)
        return h, y
    if norm is not None and _fuses_through_call(norm, f, residual, scales):
        y, h = norm(f, residual, "add_norm")
        return h, y
    h = residual + _scaled_branch(scales, f)
    return h, (norm(h) if norm is not None else h)


def _close(layer: nn.Module, pending, residual: Tensor) -> Tensor:
    """The layer's closing add; carried into the next norm's kernel when linked."""
    link = layer.__dict__.get(CARRY_INTO) if _carry_allowed(layer) else None
    if link is not None and link.usable():
        target = link.norm
        sub, f = pending
        scales = [(getattr(layer, attr), role) for attr, role in sub.scale_steps]
        fused = None
        # the target's hooks still run: it is called as usual, and returns the carried y
        if sub.branch_norm is not None:
            branch = getattr(layer, sub.branch_norm)
            if _can_fuse_branch(branch, target, f, residual, check_hooks=False):
                fused = branch.resfuse_norm_add(f, residual, target)
        elif _can_fuse(target, f, residual, scales, check_hooks=False):
            branch_scale, rowscale = _fused_scales(scales, f)
            fused = target.resfuse_add_norm(
                f, residual, branch_scale=branch_scale, rowscale=rowscale
            )
        if fused is not None:
            y, h = fused
            target.__dict__[CARRY] = (h, h._version, y)
            return h
    return _add(layer, pending, residual, None)[0]


def _call(module: nn.Module, x: Tensor, binding, bound: dict, extra: dict):
    """The sublayer call as the layer's own code makes it (``layout.Binding``, read from
    the forward by layout.py): the stream positionally or by keyword, the layer arguments
    it passes under the names it passes them, its ``**kwargs`` if it forwards them."""
    args = [] if binding.input is not None else [x]
    args += [bound[v] if kind == "arg" else v for kind, v in binding.args]
    kwargs = {k: (bound[v] if kind == "arg" else v) for k, (kind, v) in binding.kwargs}
    if binding.input is not None:
        kwargs[binding.input] = x
    if binding.var_kwargs:
        kwargs.update(extra)
    return module(*args, **kwargs)


class ChainOverride:
    """The one forward of every pre-norm layer (``specs.Chain``), replaying the calls the
    verified forward makes (``_resfuse_bindings``) and returning what it returns
    (``_resfuse_verified.returns``: the stream, or a tuple template)."""

    _resfuse_original: type
    _resfuse_spec: Chain
    _resfuse_binder: Binder
    _resfuse_verified: layout.Verified
    _resfuse_bindings: dict
    _resfuse_globals: dict

    def forward(self, *args, **kwargs):
        spec = self._resfuse_spec
        bound, extra = self._resfuse_binder.bind(args, kwargs)
        template = self._resfuse_verified.returns
        outputs = {} if template is not None else None
        stream = bound[self._resfuse_verified.stream]
        pending: Optional[tuple[Sublayer, Tensor]] = None  # branch output not yet added
        for sub in spec.sublayers:
            if sub.when is not None and bound.get(sub.when) is None:
                continue
            module = getattr(self, sub.module, None)
            if module is None:
                raise ValueError(
                    f"`{sub.when}` was passed, but this {type(self).__name__} has "
                    f"no `{sub.module}` (its config did not ask for one)"
                )
            norm = getattr(self, sub.norm) if sub.norm is not None else None
            if pending is None:
                normed = norm(stream) if norm is not None else stream
            else:
                stream, normed = _add(self, pending, stream, norm)
            out = _call(module, normed, self._resfuse_bindings[sub.module], bound, extra)
            if outputs is not None:
                outputs[sub.module] = out
            binding = self._resfuse_bindings[sub.module]
            if binding.first is True or (binding.first and isinstance(out, tuple)):
                out = out[0]
            if binding.reshape:
                out = out.view(stream.shape)
            for attr, _ in sub.eager_steps:
                out = getattr(self, attr)(out)
            pending = (sub, out)
        stream = _close(self, pending, stream)
        if template is None:
            return stream
        tests = dict(self._resfuse_verified.tests)
        return layout.evaluate(template, stream, outputs, bound, self, tests)


class PostNormOverride:
    """The one forward of post-norm outputs (``specs.PostNorm``): ``norm(branch + residual)``."""

    _resfuse_original: type
    _resfuse_spec: PostNorm
    _resfuse_binder: Binder

    def forward(self, *args, **kwargs):
        spec = self._resfuse_spec
        bound, _ = self._resfuse_binder.bind(args, kwargs)
        f = bound[spec.input]
        for attr in spec.steps:
            f = getattr(self, attr)(f)
        residual = bound[spec.residual]
        norm = getattr(self, spec.norm)
        if _can_fuse(norm, f, residual, ()):
            return norm.resfuse_add_norm(f, residual, prenorm=False)
        if _fuses_through_call(norm, f, residual):
            return norm(f, residual, "post_norm")
        return norm(f + residual)
