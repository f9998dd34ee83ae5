"""The declarative vocabulary of the architecture table (architectures.py).

An entry says *what* a module is; the two generic fused forwards (fused.py) say *how* it
runs. Adding an architecture means writing entries with these types, never a new forward:

* :class:`Norm` - a norm class: RMS or LayerNorm, where eps lives, the dtype it returns.
* :class:`Chain` - a pre-norm layer, a sequence of :class:`Sublayer`, each
  ``stream = stream + branch(module(norm(stream)))``: Llama-style decoders, GPT-2, GPT-NeoX,
  Gemma2's sandwich norms, timm's ``Block`` with LayerScale and drop-path.
* :class:`PostNorm` - ``out = norm(branch(input) + residual)``: BERT's ``*Output`` modules.
* :class:`Stack` - a module holding the layers and the final norm (for
  ``fuse_residual="across_layers"``).
* :class:`Unfused` - a known module whose adds resfuse leaves alone, and why.

Classes are named by ``"module:qualname"`` strings, so the table imports nothing: a model is
matched by the exact class of each of its modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

# How the branch output of a sublayer is turned into what is added to the stream:
# "module" is called as is (dropout, a norm on the branch, Identity), "layer_scale"
# becomes branch_scale (the module's ``gamma``), "scale" multiplies by an attribute of the
# layer that is a number (Granite's ``residual_multiplier``) or a per-channel parameter
# (CaiT's ``gamma_1``): branch_scale too; "drop_path" becomes rowscale (the per-sample keep
# mask / keep probability, drawn as timm draws it).
STEP_ROLES = ("module", "norm", "layer_scale", "scale", "drop_path")
_SCALING = ("layer_scale", "scale", "drop_path")


@dataclass(frozen=True)
class Condition:
    """An instance attribute the entry needs to hold ``value``, else ``reason`` is reported."""

    attr: str
    value: object
    reason: str


@dataclass(frozen=True)
class Norm:
    """A norm class and the semantics resfuse must reproduce for it.

    ``out_dtype``: the dtype the original returns for an input of dtype ``t``:
      "input" (``t``), "promote_weight" (``promote(t, weight)``, Llama's
      ``weight * x.to(t)``), "t5" (the weight's dtype when it is half, else
      ``promote(t, float32, weight)``).
    """

    kind: str  # "rms" | "layer"
    # the attribute holding eps (its value None: finfo(dtype).eps), or eps itself where the
    # class hard-codes it (OLMo's LayerNorm)
    eps: Union[str, float] = "eps"
    zero_centered_weight: bool = False  # y = normalize(h) * (1 + weight)
    out_dtype: str = "input"
    normalized_shape: bool = False  # rows span ``self.normalized_shape`` (torch.nn norms)
    channels_first: bool = False  # (N, C, ...) input normalized over C (timm's LayerNorm2d)
    # Under autocast: "same" (plain elementwise code, which autocast leaves alone or runs in
    # fp32 anyway: the transformers norms), "layer_norm" (F.layer_norm, which CUDA autocast
    # runs in float32, returning float32), "original" (not verified: the original runs).
    autocast: str = "same"
    conditions: tuple[Condition, ...] = ()  # instance attributes it needs

    def __post_init__(self):
        if self.kind not in ("rms", "layer"):
            raise ValueError(f"Norm.kind must be 'rms' or 'layer', got {self.kind!r}")
        if self.out_dtype not in ("input", "promote_weight", "t5"):
            raise ValueError(f"Norm.out_dtype: unknown rule {self.out_dtype!r}")
        if self.autocast not in ("same", "layer_norm", "original"):
            raise ValueError(f"Norm.autocast: unknown rule {self.autocast!r}")

    def output_dtype(
        self, t: torch.dtype, weight: Optional[torch.Tensor], device_type: str = "cpu"
    ) -> torch.dtype:
        if (
            self.autocast == "layer_norm"
            and device_type == "cuda"
            and torch.is_autocast_enabled("cuda")
        ):
            return torch.float32
        if self.out_dtype == "input" or weight is None:
            return t
        if self.out_dtype == "promote_weight":
            return torch.promote_types(t, weight.dtype)
        if weight.dtype in (torch.float16, torch.bfloat16):  # "t5"
            return weight.dtype
        return torch.promote_types(torch.promote_types(t, torch.float32), weight.dtype)

    def describe(self) -> str:
        s = "RMSNorm" if self.kind == "rms" else "LayerNorm"
        return s + (" (1 + weight)" if self.zero_centered_weight else "")


@dataclass(frozen=True)
class Sublayer:
    """``stream = stream + steps(module(norm(stream)))``: the module's output, or the first
    item of the tuple it returns (attention weights, router logits), as the layer's own code
    takes it (layout.py reads which, release by release).

    ``norm``: the attribute of the norm applied to the stream first (None: the module takes
    the stream itself, OLMo2). ``steps``: ``(attribute, role)`` applied in order to the module
    output; the scaling roles ("layer_scale", "drop_path") come last, as they fuse into the
    add. ``when``: the sublayer runs only when the layer argument of that name is not None
    (GPT-2's cross-attention); then ``module`` may be absent on an instance, and calling it
    with that argument raises as the original does.
    """

    module: str
    norm: Optional[str]
    steps: tuple[tuple[str, str], ...] = ()
    when: Optional[str] = None

    def __post_init__(self):
        roles = [role for _, role in self.steps]
        for role in roles:
            if role not in STEP_ROLES:
                raise ValueError(f"Sublayer {self.module}: unknown step role {role!r}")
        scaling = [r in _SCALING for r in roles]
        if scaling != sorted(scaling):
            raise ValueError(
                f"Sublayer {self.module}: layer_scale / scale / drop_path steps must come "
                "last (they are fused into the add)"
            )
        if sum(r in ("layer_scale", "scale") for r in roles) > 1:
            raise ValueError(f"Sublayer {self.module}: one branch scale at most")

    @property
    def module_steps(self) -> tuple[tuple[str, str], ...]:
        return tuple(s for s in self.steps if s[1] in ("module", "norm"))

    @property
    def branch_norm(self) -> Optional[str]:
        """A norm on the branch output right before the add (Gemma2/3's sandwich, OLMo2's
        reordered norm): when it is the last step and nothing scales the branch, it is fused
        into the add (``norm_add_norm`` / ``norm_add``) instead of running on its own."""
        steps = self.module_steps
        if steps and steps[-1][1] == "norm" and not self.scale_steps:
            return steps[-1][0]
        return None

    @property
    def eager_steps(self) -> tuple[tuple[str, str], ...]:
        """The module steps run before the add (all but a fused branch norm)."""
        steps = self.module_steps
        return steps[:-1] if self.branch_norm is not None else steps

    @property
    def scale_steps(self) -> tuple[tuple[str, str], ...]:
        return tuple(s for s in self.steps if s[1] in _SCALING)


@dataclass(frozen=True)
class Chain:
    """A pre-norm layer: ``input`` is the name of its stream argument; the layer returns the
    stream after the last sublayer's add (a tensor)."""

    input: str
    sublayers: tuple[Sublayer, ...]
    conditions: tuple[Condition, ...] = ()
    notes: tuple[str, ...] = ()  # adds the layer leaves unfused, for the report

    family = "pre-norm layer"

    def __post_init__(self):
        if not self.sublayers:
            raise ValueError("Chain needs at least one sublayer")


@dataclass(frozen=True)
class PostNorm:
    """``norm(steps(input) + residual)``: ``steps`` are attributes called in order on the
    ``input`` argument; ``residual`` names the residual argument."""

    input: str
    residual: str
    steps: tuple[str, ...]
    norm: str

    family = "post-norm output"


@dataclass(frozen=True)
class Stack:
    """A module whose forward runs ``layers`` in order and then ``final_norm`` on the last
    output. ``checkpointing``: the attribute of the stack that turns gradient checkpointing
    on (timm), besides the layers' own ``gradient_checkpointing`` (transformers)."""

    layers: str
    final_norm: Optional[str]
    checkpointing: Optional[str] = None


@dataclass(frozen=True)
class Unfused:
    """A known module with residual adds resfuse does not fuse; ``reason`` says why."""

    reason: str
