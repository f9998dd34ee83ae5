"""Verify the computation, not the text: norms and branch steps checked by running them.

A norm's forward is arithmetic (casts, a mean, a root, eps, the weight's convention), which
is better checked by running it than by reading it: :func:`norm_problem` builds a small
copy of the module (its class, its plain attributes, fresh random parameters of the real
shapes, a large eps so eps's place shows, no hooks) and runs the original forward and the
patched forward resfuse will run on inputs with a non-zero mean, in float32 and bfloat16
with float32 and bfloat16 weights: the output dtypes must be equal and the values agree to
float32 reassociation (float32) or two bf16 roundings (bfloat16). Any other normalization,
eps placement, weight convention or output dtype is refused, with the largest difference
named. The branch steps resfuse folds into the fused call are probed likewise: LayerScale
(``x * gamma``) and DropPath (the same mask from the same random draws).

The copies run on the CPU whatever the model's device, and never touch the module's own
parameters, which may be sharded, partitioned or on the meta device. Results are cached per
class, entry and plain attributes, so a model's hundred norms cost one probe.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn

from .engines import model_class
from .specs import Norm

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_PLAIN = (bool, int, float, str, type(None))
_PROBED: dict = {}

# (x dtype, weight dtype) -> (atol, rtol): float32 reassociation; bf16: the original may
# round twice (Llama rounds the normalized value before the weight), resfuse once
_CASES = (
    (torch.float32, torch.float32, 2e-5, 2e-5),
    (torch.bfloat16, torch.float32, 3.2e-2, 1.6e-2),
    (torch.bfloat16, torch.bfloat16, 3.2e-2, 1.6e-2),
)
_PROBE_EPS = 1e-2


def _shape(p) -> tuple:
    ds_shape = getattr(p, "ds_shape", None)  # ZeRO-3 keeps the real shape there
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


def _plain_attrs(module: nn.Module) -> tuple:
    out = []
    for k, v in sorted(vars(module).items()):
        if k.startswith("_") and k != "_fast_norm":
            continue
        if isinstance(v, _PLAIN) or (
            isinstance(v, tuple) and all(isinstance(i, _PLAIN) for i in v)
        ):
            out.append((k, v))
    return tuple(out)


def _copy(module: nn.Module, cls: type, shapes: dict, gen: torch.Generator, dtype) -> nn.Module:
    clone = copy.copy(module)
    clone.__class__ = cls
    for name in _HOOK_DICTS:
        if name in vars(clone):
            setattr(clone, name, OrderedDict())
    # registered-but-absent parameters (a LayerNorm without bias) stay None
    clone._parameters = OrderedDict((k, None) for k, v in module._parameters.items() if v is None)
    clone._buffers = OrderedDict(
        (k, v) for k, v in module._buffers.items() if v is None or not v.is_meta
    )
    clone._modules = OrderedDict()
    for name, shape in shapes.items():
        base = 0.0 if name == "bias" else 0.7
        value = base + 0.5 * torch.randn(shape, generator=gen)
        clone._parameters[name] = nn.Parameter(value.to(dtype), requires_grad=False)
    return clone


def _mismatch(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float
) -> Optional[str]:
    if actual.dtype != expected.dtype:
        return f"returns {expected.dtype} where resfuse returns {actual.dtype}"
    if actual.shape != expected.shape:
        return f"returns shape {tuple(expected.shape)} where resfuse returns {tuple(actual.shape)}"
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool((err <= bound).all()):
        return f"computes something else (max difference {err.max().item():.3g})"
    return None


def norm_problem(module: nn.Module, spec: Norm, patched: Callable[[], type]) -> Optional[str]:
    """Why ``module`` (a norm of the table's ``spec``) does not compute what resfuse's norm
    computes for it, or None. ``patched()``: the class resfuse would give it."""
    cls = model_class(type(module))
    shapes = {name: _shape(p) for name, p in module.named_parameters(recurse=False)}
    key = (cls, spec, tuple(sorted(shapes.items())), _plain_attrs(module))
    if key not in _PROBED:
        try:
            _PROBED[key] = _probe_norm(module, cls, spec, shapes, patched())
        except Exception as e:  # noqa: BLE001 - a forward that fails on the probe is refused
            _PROBED[key] = f"its forward failed on resfuse's probe: {type(e).__name__}: {e}"
    problem = _PROBED[key]
    return None if problem is None else f"{cls.__name__} {problem}: left as it is"


def _probe_input(module: nn.Module, spec: Norm, shapes: dict, gen) -> torch.Tensor:
    if spec.channels_first:  # (N, C, H, W)
        return 0.8 + 1.5 * torch.randn((2,) + tuple(shapes["weight"]) + (3, 2), generator=gen)
    if spec.normalized_shape:
        trailing = tuple(module.normalized_shape)
    elif "weight" in shapes:
        trailing = shapes["weight"]
    elif hasattr(module, "normalized_shape"):
        trailing = tuple(module.normalized_shape)[-1:]
    else:
        raise ValueError("no weight and no normalized_shape tell its width")
    return 0.8 + 1.5 * torch.randn((2, 3) + tuple(trailing), generator=gen)


def _probe_norm(module, cls, spec: Norm, shapes: dict, patched_cls: type) -> Optional[str]:
    gen = torch.Generator().manual_seed(1234)
    x = _probe_input(module, spec, shapes, gen)
    for x_dtype, w_dtype, atol, rtol in _CASES:
        clone = _copy(module, cls, shapes, torch.Generator().manual_seed(99), w_dtype)
        if isinstance(spec.eps, str) and isinstance(getattr(clone, spec.eps, None), float):
            setattr(clone, spec.eps, _PROBE_EPS)
        xi = x.to(x_dtype)
        with torch.no_grad():
            expected = cls.forward(clone, xi)
            clone.__class__ = patched_cls
            clone._resfuse_backend = "torch"  # the reference: the semantics every backend has
            actual = clone.forward(xi)
        problem = _mismatch(actual, expected, atol, rtol)
        if problem:
            return f"{problem} for {str(x_dtype)[6:]} input with {str(w_dtype)[6:]} weights"
    return None


# --------------------------------------------------------------------------- branch steps


def step_problem(module: nn.Module, role: str, fused_scales: Callable) -> Optional[str]:
    """Why the branch step ``module`` (role "layer_scale" or "drop_path") is not what resfuse
    folds into the fused call, or None. ``fused_scales(scales, f)``: resfuse's own."""
    if isinstance(module, nn.Identity):
        return None
    cls = model_class(type(module))
    key = (cls, role, _plain_attrs(module))
    if key not in _PROBED:
        try:
            _PROBED[key] = _probe_step(module, cls, role, fused_scales)
        except Exception as e:  # noqa: BLE001
            _PROBED[key] = f"its forward failed on resfuse's probe: {type(e).__name__}: {e}"
    problem = _PROBED[key]
    return None if problem is None else f"its {role} step {cls.__name__} {problem}"


def _probe_step(module, cls, role: str, fused_scales: Callable) -> Optional[str]:
    gen = torch.Generator().manual_seed(7)
    if role == "layer_scale":
        shapes = {name: _shape(p) for name, p in module.named_parameters(recurse=False)}
        clone = _copy(module, cls, shapes, gen, torch.float32)
        x = torch.randn((2, 3) + shapes.get("gamma", (4,)), generator=gen)
        with torch.no_grad():
            expected = cls.forward(clone, x.clone())
            branch_scale, _ = fused_scales([(clone, role)], x)
            if branch_scale is None:
                return "has no gamma"
            return _mismatch(x * branch_scale, expected, 1e-6, 1e-6)
    if role == "drop_path":
        clone = _copy(module, cls, {}, gen, torch.float32)
        clone.drop_prob = 0.4
        clone.train()
        x = torch.ones(64, 3, 4)
        state = torch.random.get_rng_state()
        try:
            with torch.no_grad():
                torch.manual_seed(5)
                expected = cls.forward(clone, x)
                torch.manual_seed(5)
                _, rowscale = fused_scales([(clone, role)], x)
        finally:
            torch.random.set_rng_state(state)
        if rowscale is None:
            return "drops nothing in training"
        return _mismatch(x * rowscale.reshape(64, 1, 1), expected, 1e-6, 1e-6)
    return f"has the unknown role {role!r}"
