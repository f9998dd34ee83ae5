"""``resfuse.patch(model, fuse_residual=True)`` and ``resfuse.unpatch(model)``.

patch() walks the model once, matches each module's exact class against the architecture
table, validates everything (source pins, attributes, instance conditions) and only then
applies: each matched module gets a generated subclass of its own class (fused.py), nothing
else changes. Any failure while applying restores every module already changed, so a model
is either fully patched as reported or left as it was.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn

from . import architectures as table
from . import layout, probes
from .engines import model_class, rebase
from .fused import (
    CARRY,
    CARRY_INTO,
    CHECKPOINT_FLAG,
    Binder,
    ChainOverride,
    Link,
    NormOverride,
    PostNormOverride,
    _fused_scales,
)
from .sources import class_key
from .specs import Chain, PostNorm, Unfused

_INSTANCE_ATTRS = (CARRY, CARRY_INTO, CHECKPOINT_FLAG)

# Only for the report: classes that look like norms / residual layers but are not in the table.
_NORM_NAME = re.compile(r"(RMSNorm|LayerNorm)$", re.IGNORECASE)
_LAYER_NAME = re.compile(r"(DecoderLayer|EncoderLayer|Block)$")


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ModuleNote:
    """One module of the report: its path in the model, its class, and what / why."""

    path: str
    cls: str
    what: str


def _grouped(notes: list[ModuleNote], sep: str = ": ") -> list[str]:
    counts = Counter((n.cls, n.what) for n in notes)
    return [f"{count} x {cls}{sep}{what}" for (cls, what), count in counts.items()]


@dataclass
class PatchReport:
    """What ``resfuse.patch`` did to a model.

    * ``norms``: norm modules now computed by resfuse (``what`` says which normalization);
    * ``fused``: residual adds now fused with the norm that follows them, one per add site;
    * ``unfused``: adds in patched or known modules that stay separate, and why;
    * ``skipped``: modules left untouched, and why (unknown or changed classes).
    """

    model: str
    fuse_residual: Union[bool, str]
    norms: list[ModuleNote] = field(default_factory=list)
    fused: list[ModuleNote] = field(default_factory=list)
    unfused: list[ModuleNote] = field(default_factory=list)
    skipped: list[ModuleNote] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"resfuse.patch({self.model}, fuse_residual={self.fuse_residual!r}): "
            f"{len(self.norms)} norms replaced, {len(self.fused)} adds fused, "
            f"{len(self.skipped)} modules skipped"
        ]
        for title, notes, sep in (
            ("norms", self.norms, " -> resfuse "),
            ("fused", self.fused, ": "),
            ("unfused", self.unfused, ": "),
            ("skipped", self.skipped, ": "),
        ):
            lines += [f"  {title:<8}{line}" for line in _grouped(notes, sep)]
        return "\n".join(lines)


# --------------------------------------------------------------------------- generated classes

_GENERATED: dict[tuple, type] = {}


def _generated_class(original: type, override: type, spec, verified=None) -> type:
    """``Resfuse<Name>(override, original)``, one per (class, entry, verified forward), so
    torch.compile sees a stable type. transformers' GradientCheckpointingLayer wraps the new
    forward in its checkpointing logic when the class is created, as for any subclass."""
    key = (original, override, spec, verified)
    cls = _GENERATED.get(key)
    if cls is None:
        name = "Resfuse" + original.__name__
        attrs = {
            "__module__": __name__,
            "__qualname__": name,
            "_resfuse_original": original,
            "_resfuse_spec": spec,
        }
        if override is not NormOverride:
            forward = _original_forward(original)
            attrs["_resfuse_binder"] = Binder(forward, original.__name__)
            attrs["_resfuse_verified"] = verified
            attrs["_resfuse_bindings"] = dict(verified.bindings)
            attrs["_resfuse_globals"] = forward.__globals__
        cls = type(name, (override, original), attrs)
        _GENERATED[key] = cls
    return cls


def _original_forward(cls: type):
    # the function under the decorators (transformers wraps forward in checkpointing and
    # kwarg-renaming wrappers, all functools.wraps): its signature is the real one
    return inspect.unwrap(cls.forward)


def is_patched(module: nn.Module) -> bool:
    """Patched by resfuse, also when an engine has since wrapped the class (FSDP2)."""
    return getattr(type(module), "_resfuse_original", None) is not None


def _unpatched_class(cls: type) -> type:
    """The class a patched module had: the generated class's original, also under an
    engine's wrapper class made after patching (``FSDPResfuseX`` -> ``FSDPX``)."""
    if "_resfuse_original" in vars(cls):
        return cls._resfuse_original
    generated = next(c for c in cls.__mro__ if "_resfuse_original" in vars(c))
    return rebase(cls, generated, generated._resfuse_original)


# --------------------------------------------------------------------------- validation


def _check_step(layer: nn.Module, attr: str, role: str) -> Optional[str]:
    if role == "scale":
        return None  # an attribute read per call (fused._can_fuse_inputs checks it)
    module = getattr(layer, attr, None)
    if not isinstance(module, nn.Module):
        return f"has no module `{attr}`"
    if role in table.STEP_CLASSES:
        cls = model_class(type(module))
        if class_key(cls) not in table.STEP_CLASSES[role]:
            return f"`{attr}` is a {cls.__name__}, not one of the {role} classes it knows"
        return probes.step_problem(module, role, _fused_scales)
    return None


# Verified forwards per (class, entry): [(Verified, the static tests it decided)]; a new
# instance reuses one whose decided tests come out the same for it.
_VERIFIED: dict[tuple, list] = {}


def _verify_layer(module: nn.Module, cls: type, spec):
    """``(Verified, None)``, or ``(None, why)``: the layer's forward matched against its
    entry (layout.py), cached per class and the instance attributes its code branches on."""
    candidates = _VERIFIED.setdefault((cls, spec), [])
    forward = _original_forward(cls)
    for verified in candidates:
        try:
            if all(
                layout.static_test(code, forward.__globals__, module, src) == value
                for src, code, value in verified.static
            ):
                return verified, None
        except layout.Refused:
            continue
    try:
        if isinstance(spec, PostNorm):
            verified = layout.verify_post_norm(cls, module, spec)
        else:
            verified = layout.verify_chain(cls, module, spec)
    except layout.Refused as e:
        return None, f"its forward does not compute the {spec.family} it is listed as: {e}"
    candidates.append(verified)
    return verified, None


def _check_layer(module: nn.Module, cls: type, spec) -> Optional[str]:
    """Why the generic forward must not run this instance (besides its code), or None."""
    try:
        Binder(_original_forward(cls), cls.__name__)
    except (TypeError, ValueError) as e:
        return f"its forward's arguments cannot be bound: {e}"
    if isinstance(spec, PostNorm):
        for attr in spec.steps + (spec.norm,):
            if not isinstance(getattr(module, attr, None), nn.Module):
                return f"has no module `{attr}`"
        return None
    for sub in spec.sublayers:
        if sub.when is not None and getattr(module, sub.module, None) is None:
            continue  # optional sublayer absent on this instance (GPT-2 without cross-attention)
        attrs = [sub.module] + ([sub.norm] if sub.norm else [])
        for attr in attrs:
            if not isinstance(getattr(module, attr, None), nn.Module):
                return f"has no module `{attr}`"
        for attr, role in sub.steps:
            problem = _check_step(module, attr, role)
            if problem:
                return problem
    return None


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    report: PatchReport
    norms: dict[int, tuple[nn.Module, type]] = field(default_factory=dict)  # id -> (module, cls)
    layers: dict[int, tuple[nn.Module, type]] = field(default_factory=dict)
    links: list[tuple[nn.Module, str, object]] = field(default_factory=list)

    def add_layer(self, module: nn.Module, spec, verified) -> None:
        override = PostNormOverride if isinstance(spec, PostNorm) else ChainOverride
        generated = _generated_class(type(module), override, spec, verified)
        self.layers[id(module)] = (module, generated)

    def swaps(self):
        yield from self.norms.values()
        yield from self.layers.values()


def _norm_problem(module: nn.Module, cls: type, spec) -> Optional[str]:
    """Why ``module`` cannot run as the table's ``spec``, or None."""
    if not isinstance(getattr(module, "weight", None), (nn.Parameter, type(None))):
        return "its weight is not a Parameter (or None)"
    if isinstance(spec.eps, str) and not hasattr(module, spec.eps):
        return f"has no `{spec.eps}` attribute"
    for c in spec.conditions:
        if getattr(module, c.attr, object()) != c.value:
            return c.reason
    # its forward computes what resfuse's norm computes for this spec (probes.py)
    return probes.norm_problem(module, spec, lambda: _generated_class(cls, NormOverride, spec))


def _plan_norms(plan: _Plan, modules) -> None:
    for path, module in modules:
        cls = model_class(type(module))
        candidates = table.NORMS.get(class_key(cls))
        if candidates is None:
            if _NORM_NAME.search(cls.__name__):
                plan.report.skipped.append(
                    ModuleNote(path, cls.__name__, "unknown norm class: left as it is")
                )
            continue
        # a class whose semantics changed between releases lists one spec per semantics:
        # the first its installed code verifies as is the one it runs
        if not isinstance(candidates, tuple):
            candidates = (candidates,)
        problems = [_norm_problem(module, cls, spec) for spec in candidates]
        chosen = next((spec for spec, p in zip(candidates, problems) if p is None), None)
        if chosen is None:
            plan.report.skipped.append(ModuleNote(path, cls.__name__, problems[0]))
            continue
        plan.norms[id(module)] = (module, _generated_class(type(module), NormOverride, chosen))
        plan.report.norms.append(ModuleNote(path, cls.__name__, chosen.describe()))


def _norm_name(layer: nn.Module, attr: Optional[str], plan: _Plan) -> Optional[str]:
    """``attr`` if it names a norm of ``layer`` that will run resfuse."""
    if attr is None:
        return None
    norm = getattr(layer, attr, None)
    return attr if norm is not None and id(norm) in plan.norms else None


def _add_description(layer: nn.Module, sub, next_norm: Optional[str], plan: _Plan) -> Optional[str]:
    """How the add after ``sub`` fuses, if it does: with its branch norm (norm_add, or
    norm_add_norm when a norm follows) or with the norm after it (add_norm)."""
    branch = _norm_name(layer, sub.branch_norm, plan)
    norm = _norm_name(layer, next_norm, plan)
    if branch and (norm or next_norm is None):
        return f"{branch} + {sub.module} add" + (f" + {norm}" if norm else "")
    if norm and sub.branch_norm is None:
        return f"{sub.module} add + {norm}"
    return None


def _fused_adds(layer: nn.Module, spec: Chain, plan: _Plan) -> list[str]:
    """The adds inside ``layer`` that fuse with the norm after them. A conditional sublayer
    (GPT-2's cross-attention) changes which norm follows an add: both cases are listed."""
    optional = [
        s
        for s in spec.sublayers
        if s.when is not None and getattr(layer, s.module, None) is not None
    ]
    cases = [(set(), "")]
    if optional:
        when = ", ".join(s.when for s in optional)
        cases = [({s.module for s in optional}, f" (with {when})"), (set(), f" (without {when})")]
    found: dict[str, list[str]] = {}
    for enabled, label in cases:
        present = [s for s in spec.sublayers if s.when is None or s.module in enabled]
        for prev, sub in zip(present, present[1:]):
            what = _add_description(layer, prev, sub.norm, plan)
            if what:
                found.setdefault(what, []).append(label)
    return [
        what + (labels[0] if len(labels) < len(cases) else "") for what, labels in found.items()
    ]


def _choose_layer_spec(module: nn.Module, cls: type, candidates):
    """``(spec, verified, None)`` for the first of the table's candidates (one entry, or a
    tuple of them: a class whose layout depends on its configuration or release) that this
    instance's code computes; ``(None, None, why)`` for an Unfused entry or unmet
    conditions (a known variant whose adds do not fuse: GPT-NeoX's parallel residual);
    else ``(first candidate, None, why)``."""
    if not isinstance(candidates, tuple):
        candidates = (candidates,)
    problems = []
    for spec in candidates:
        if isinstance(spec, Unfused):
            return None, None, spec.reason
        unmet = [
            c.reason
            for c in getattr(spec, "conditions", ())
            if getattr(module, c.attr, object()) != c.value
        ]
        if unmet:
            problems.append((None, unmet[0]))
            continue
        verified, problem = None, _check_layer(module, cls, spec)
        if problem is None:
            verified, problem = _verify_layer(module, cls, spec)
        if problem is None:
            return spec, verified, None
        problems.append((spec, problem))
    spec, problem = next((p for p in problems if p[0] is not None), problems[0])
    return spec, None, problem


def _plan_layers(plan: _Plan, modules) -> dict[int, tuple[str, nn.Module, Chain]]:
    """Plan the layers whose adds fuse inside them; return every valid Chain layer (fused or
    not) for the across-layer links."""
    chains = {}
    known: list[str] = []  # paths of the known layers: what is inside them is theirs
    for path, module in modules:
        cls = model_class(type(module))
        key = class_key(cls)
        spec = table.LAYERS.get(key)
        if spec is None:
            if (
                _LAYER_NAME.search(cls.__name__)
                and key not in table.STACKS
                and key not in table.CONTAINERS
                and not any(path.startswith(k) for k in known)
            ):
                plan.report.skipped.append(
                    ModuleNote(
                        path,
                        cls.__name__,
                        "unknown layer class: its residual adds are left as they are",
                    )
                )
            continue
        known.append(path + ".")
        spec, verified, problem = _choose_layer_spec(module, cls, spec)
        if spec is None:  # a known variant whose adds do not fuse, and why
            plan.report.unfused.append(ModuleNote(path, cls.__name__, problem))
            continue
        if problem:
            plan.report.skipped.append(ModuleNote(path, cls.__name__, problem))
            continue
        if isinstance(spec, PostNorm):
            if _norm_name(module, spec.norm, plan):
                plan.add_layer(module, spec, verified)
                plan.report.fused.append(
                    ModuleNote(
                        path,
                        cls.__name__,
                        f"{' + '.join(spec.steps)} + {spec.residual} -> {spec.norm} (post-norm)",
                    )
                )
            else:
                plan.report.unfused.append(
                    ModuleNote(path, cls.__name__, f"{spec.norm} is not a resfuse norm")
                )
            continue
        chains[id(module)] = (path, module, spec, verified)
        for what in _fused_adds(module, spec, plan):
            plan.add_layer(module, spec, verified)
            plan.report.fused.append(ModuleNote(path, cls.__name__, what))
        for note in spec.notes:
            plan.report.unfused.append(ModuleNote(path, cls.__name__, note))
    return chains


def _plan_links(plan: _Plan, modules, chains, across_layers: bool) -> None:
    """The closing add of each layer in a known stack: carried into the next layer's first
    norm / the final norm (across_layers), or reported as left unfused."""
    for path, stack_module in modules:
        stack = table.STACKS.get(class_key(model_class(type(stack_module))))
        container = getattr(stack_module, stack.layers, None) if stack else None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        keys = list(container._modules)
        layers = [container._modules[k] for k in keys]
        for i, layer in enumerate(layers):
            if id(layer) not in chains:
                continue
            lpath, _, spec, verified = chains[id(layer)]
            name = model_class(type(layer)).__name__
            last = spec.sublayers[-1].module
            if i + 1 < len(layers):
                nxt = chains.get(id(layers[i + 1]))
                owner = layers[i + 1]
                attr = nxt[2].sublayers[0].norm if nxt else None
                where = "next layer's"
                steps = ((container, keys[i + 1], owner),)
            else:
                owner, attr = stack_module, stack.final_norm
                where = f"{model_class(type(stack_module)).__name__}'s final"
                steps = ()
            target = _norm_name(owner, attr, plan)
            own = _add_description(layer, spec.sublayers[-1], None, plan)  # a branch norm
            if target is None or not across_layers:
                if own:
                    plan.add_layer(layer, spec, verified)
                    plan.report.fused.append(ModuleNote(lpath, name, f"closing add: {own}"))
                elif target is None:
                    plan.report.unfused.append(
                        ModuleNote(
                            lpath, name, f"closing add after {last}: no resfuse norm follows it"
                        )
                    )
                else:
                    plan.report.unfused.append(
                        ModuleNote(
                            lpath,
                            name,
                            f"closing add after {last}: fuse_residual='across_layers' fuses "
                            f"it with {where} {target}",
                        )
                    )
                continue
            norm = getattr(owner, target)
            steps += ((owner, target, norm),)
            notes = _LinkNotes(plan.report, lpath, name, own, f"{where} {target}", last)
            plan.add_layer(layer, spec, verified)
            link = Link((container, layer), norm, steps, notes.fell_back)
            problem = link.problem()
            if problem:  # an engine already manages the next norm: per layer, said so
                notes.add_unlinked(problem)
                continue
            plan.links.append((layer, CARRY_INTO, link))
            if stack.checkpointing:
                plan.links.append((layer, CHECKPOINT_FLAG, (stack_module, stack.checkpointing)))
            notes.add_linked()


class _LinkNotes:
    """The report's lines about one across-layer link, at patch time and when an engine
    found at run time makes the link fall back (the report then says so, and one warning
    per reason is raised)."""

    def __init__(self, report: PatchReport, path: str, cls: str, own, target: str, last: str):
        self.report, self.path, self.cls = report, path, cls
        self.own, self.target, self.last = own, target, last
        self.linked: Optional[ModuleNote] = None

    def add_linked(self) -> None:
        what = f"{self.own} + " if self.own else f"closing add after {self.last} + "
        self.linked = ModuleNote(self.path, self.cls, f"{what}{self.target}")
        self.report.fused.append(self.linked)

    def add_unlinked(self, problem: str) -> None:
        if self.own:
            self.report.fused.append(ModuleNote(self.path, self.cls, f"closing add: {self.own}"))
        self.report.unfused.append(
            ModuleNote(
                self.path,
                self.cls,
                f"closing add after {self.last} not fused with {self.target}: {problem}",
            )
        )

    def fell_back(self, problem: str) -> None:
        if self.linked in self.report.fused:
            self.report.fused.remove(self.linked)
        self.add_unlinked(problem)
        key = (id(self.report), problem)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"resfuse.patch(fuse_residual='across_layers'): {self.cls}'s closing add "
                f"runs unfused, not with {self.target}: {problem} (across layers resfuse "
                "fuses only where no engine keeps a module's parameters or backward to that "
                "module; the report lists the layers)",
                stacklevel=4,
            )


_WARNED: set = set()


# --------------------------------------------------------------------------- public API


def patch(model: nn.Module, *, fuse_residual: Union[bool, str] = True) -> PatchReport:
    """Swap the norms of a transformers / timm model for resfuse's (weights, parameters,
    hooks and state_dict keys kept) and, with ``fuse_residual``, route the residual adds
    that precede a norm through one fused add + norm call.

    ``fuse_residual``: False (norms only), True (the adds inside each layer: every layer
    still returns its own output, so hooks, ``output_hidden_states`` and gradient
    checkpointing behave as before), or ``"across_layers"`` (also each layer's closing add
    with the next layer's first norm and with the final norm; the layer still returns the
    true hidden state, and the fused norm output is handed to the next norm only when that
    exact, unmodified tensor arrives there). A module's parameters are read only inside
    that module's own call (FSDP2, DeepSpeed ZeRO-3 and offloading rely on it): where an
    engine owns the next norm, the closing add runs unfused and the report says why.
    The model may be patched before or after FSDP2's ``fully_shard``.

    Returns a :class:`PatchReport`; ``resfuse.unpatch(model)`` restores the original classes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fuse_residual, (bool, str)) or fuse_residual not in (
        True,
        False,
        "across_layers",
    ):
        raise ValueError(
            f"fuse_residual must be True, False or 'across_layers', got {fuse_residual!r}"
        )
    modules = list(model.named_modules())
    patched = [p or "(model)" for p, m in modules if is_patched(m)]
    if patched:
        raise RuntimeError(
            f"model is already patched ({', '.join(patched[:3])}"
            f"{', ...' if len(patched) > 3 else ''}): call resfuse.unpatch(model) "
            "first"
        )

    plan = _Plan(PatchReport(type(model).__name__, fuse_residual))
    _plan_norms(plan, modules)
    if fuse_residual:
        chains = _plan_layers(plan, modules)
        _plan_links(plan, modules, chains, fuse_residual == "across_layers")

    applied: list[tuple[nn.Module, type]] = []
    try:
        for module, cls in plan.swaps():
            original = type(module)
            module.__class__ = cls
            applied.append((module, original))
        for module, attr, value in plan.links:
            module.__dict__[attr] = value
    except BaseException:
        for module, original in reversed(applied):
            module.__class__ = original
        for module, attr, _ in plan.links:
            module.__dict__.pop(attr, None)
        raise
    return plan.report


def unpatch(model: nn.Module) -> None:
    """Restore the original class of every module ``patch`` changed (the module objects,
    parameters and hooks were never replaced) and drop resfuse's instance attributes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if is_patched(module):
            module.__class__ = _unpatched_class(type(module))
        for attr in _INSTANCE_ATTRS:
            module.__dict__.pop(attr, None)
