"""What the distributed engines do to a model, as far as ``resfuse.patch`` must know.

Engines that shard or offload parameters (FSDP2's ``fully_shard``, DeepSpeed ZeRO-3,
accelerate's ``device_map`` offload) make a module's parameters real only inside that
module's own call: its hooks gather them before its forward and free them after. A patched
layer may therefore read its *own* norms (they live inside its call), never another
module's: ``fuse_residual="across_layers"`` fuses a layer's closing add with the next
layer's first norm only while no engine manages that norm's parameters apart from the
layer that runs the fused call (:func:`foreign_owner`, asked when patching and on every
call); otherwise the closing add runs unfused, as with ``fuse_residual=True``.

Engines that wrap a module's class (FSDP2 and ``replicate`` make ``FSDP<Name>`` /
``DDP<Name>`` subclasses on the fly) are seen through (:func:`model_class`), so a model can
be patched before or after ``fully_shard``, and unpatched in either order (:func:`rebase`).

The carry across layers also stays off while autograd runs a forward for a purpose of its
own (:func:`autograd_reruns`): under activation checkpointing the forward and its
recomputation must save the same tensors, and a recomputation hands nothing to a next layer.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from ..distributed import DTensor


def _engine_mixins() -> tuple[type, ...]:
    mixins = []
    try:
        from torch.distributed.fsdp import FSDPModule

        mixins.append(FSDPModule)
    except ImportError:  # pragma: no cover - a build without torch.distributed
        pass
    try:
        from torch.distributed._composable.replicate import DDP

        mixins.append(DDP)
    except ImportError:  # pragma: no cover - moved or absent in this release
        pass
    return tuple(mixins)


ENGINE_MIXINS = _engine_mixins()
FSDP_MODULE = ENGINE_MIXINS[0] if ENGINE_MIXINS else None


def model_class(cls: type) -> type:
    """The model's own class under the classes engines wrap it in (``FSDP<Name>(FSDPModule,
    Name)``) and resfuse's generated ``Resfuse<Name>``: the one the architecture table and
    the source pins know."""
    while True:
        if len(cls.__bases__) == 2 and cls.__bases__[0] in ENGINE_MIXINS:
            cls = cls.__bases__[1]
        elif "_resfuse_original" in vars(cls):  # resfuse's own generated class
            cls = cls._resfuse_original
        else:
            return cls


_REBASED: dict[tuple, type] = {}


def rebase(cls: type, old: type, new: type) -> type:
    """``cls`` with its base ``old`` replaced by ``new`` (``cls`` itself if it is ``old``):
    an engine's wrapper class of a patched class, unpatched (``FSDPResfuseX`` ->
    ``FSDPX``). Cached, so a model's modules share one class."""
    if cls is old:
        return new
    key = (cls, old, new)
    rebased = _REBASED.get(key)
    if rebased is None:
        attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        bases = tuple(new if b is old else rebase(b, old, new) for b in cls.__bases__)
        name = cls.__name__.replace(old.__name__, new.__name__)
        rebased = _REBASED[key] = type(name, bases, attrs)
    return rebased


# --------------------------------------------------------------------------- parameters


def _parameter_problem(p) -> Optional[str]:
    if hasattr(p, "ds_id"):
        return "DeepSpeed ZeRO-3 partitions its parameters"
    if DTensor is not None and isinstance(p, DTensor):
        if not all(pl.is_replicate() for pl in p.placements):
            return f"its parameters are DTensors placed as {tuple(p.placements)}"
        return None
    if p.is_meta:
        return "its parameters are on the meta device"
    if not isinstance(p, nn.Parameter):
        return "its parameters are tensors a wrapper manages (not nn.Parameter)"
    return None


def _fsdp_unit(modules: Iterable[nn.Module]) -> Optional[nn.Module]:
    if FSDP_MODULE is None:
        return None
    return next((m for m in modules if isinstance(m, FSDP_MODULE)), None)


def foreign_owner(path: Iterable[nn.Module], norm: nn.Module) -> Optional[str]:
    """Why ``norm``'s parameters may not be read by a module outside ``path`` (the modules
    from below the caller's and the norm's common ancestor down to ``norm`` itself), or
    None when they can: an engine gathers them in hooks of a module on ``path``, or they
    are sharded, partitioned or not materialized. Cheap enough for every call."""
    unit = _fsdp_unit(path)
    if unit is not None:
        return (
            f"FSDP2 shards its {model_class(type(unit)).__name__} on its own (fully_shard): "
            "the parameters are gathered only in that module's forward"
        )
    for module in path:
        if getattr(module, "_hf_hook", None) is not None:
            return "accelerate hooks (device_map / offload) move its parameters in its own forward"
    for p in norm.parameters(recurse=False):
        problem = _parameter_problem(p)
        if problem:
            return problem
    return None


def unit_bypassed(callers: Iterable[nn.Module]) -> Optional[str]:
    """Why the fused call's second output may not leave ``callers`` (the modules from below
    the common ancestor down to the layer that makes the call) other than through their
    own outputs: FSDP2 starts a unit's backward (gathers its parameters) from hooks on the
    unit's outputs, and the gradient of a carried norm output enters the layer past them
    (for the final norm, the layer's own output gets no gradient at all)."""
    unit = _fsdp_unit(callers)
    if unit is not None:
        return (
            f"FSDP2 shards its {model_class(type(unit)).__name__} on its own (fully_shard): "
            "its backward must start from its own output"
        )
    return None


# --------------------------------------------------------------------------- hooks

# Modules whose hooks only gather / release parameters and track the module's inputs and
# outputs for backward, whatever those are: DeepSpeed ZeRO-3 and FSDP2. A norm with only such
# hooks can run the fused add + norm through its own call (its parameters gathered there).
# Any other hook (a user's, SequenceParallel's input conversion) must see the original call.
_ENGINE_HOOK_MODULES = ("deepspeed.", "torch.distributed.fsdp.")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _hook_module(fn) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    return getattr(fn, "__module__", None) or ""


def hook_owner(module: nn.Module) -> Optional[str]:
    """None when ``module`` has no hooks (nor are global hooks set), ``"engine"`` when all
    its hooks are an engine's (``_ENGINE_HOOK_MODULES``), else ``"user"``."""
    if any(getattr(_nn_module, name, None) for name in _GLOBAL_HOOKS):
        return "user"
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )
    if not any(hooks):
        return None
    for registry in hooks:
        for fn in registry.values():
            if not _hook_module(fn).startswith(_ENGINE_HOOK_MODULES):
                return "user"
    return "engine"


# --------------------------------------------------------------------------- autograd


def _saved_tensors_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def autograd_reruns() -> bool:
    """Whether this forward runs under saved-tensor hooks (non-reentrant activation
    checkpointing, its recomputation, activation offloading) or inside backward (any
    checkpoint's recomputation)."""
    return _saved_tensors_hooks_active() or _in_backward()
