"""One description of a call, shared by every layer: what the fused op computes
(:class:`AddNormSpec`) and the tensors it computes it on (:class:`Operands`).

The public functions validate their arguments and build both once (``ops.py``); the
autograd layer, every backend (the reference, Triton, CUDA, and the CPU emulator of the
tests), the fake implementations and the op registrations take them as they are. The
computation itself, for every row::

    f = x                                   or, with branch_norm, f = norm(x) * w_b' (+ b_b)
    h = residual_scale * residual + branch_scale * bs * rowscale * f
    y = norm(h) * w' (+ b)                  (no y without output_norm)

with ``w' = 1 + w`` under ``zero_centered_weight``, is ``reference.py``'s.

The booleans travel packed in one integer, :meth:`AddNormSpec.flags` (bits :class:`Flag`):
that is the only form the registered ops (``resfuse::add_norm`` and its backward) and the
CUDA extension's schema see, so a new boolean of the computation is a field here, a bit in
``Flag`` (and csrc/add_norm_params.h's copy of it), and its use in the kernels: no
signature anywhere between changes.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor


class Flag(enum.IntFlag):
    """The bits of :meth:`AddNormSpec.flags`. csrc/add_norm_params.h has the same values
    (``kFlag*``) for the CUDA kernels, the Triton kernels decode them as constexprs
    (triton_kernels/add_norm_kernels.py); tests/test_spec.py checks both copies."""

    RMS = 1 << 0  # RMSNorm (else LayerNorm), both norms of the call
    ZERO_CENTERED = 1 << 1  # w' = 1 + w for both norms
    BRANCH_NORM = 1 << 2  # f = norm(x) * w_b' (+ b_b): the sandwich layouts
    OUTPUT_NORM = 1 << 3  # y = norm(h) * w' (+ b) exists (not for norm_add)
    STORE_H = 1 << 4  # the forward writes h
    RESIDUAL = 1 << 5  # the operands that may be absent
    WEIGHT = 1 << 6
    BIAS = 1 << 7
    BRANCH_SCALE = 1 << 8  # a per-channel tensor (a scalar one is AddNormSpec.branch_scale)
    ROWSCALE = 1 << 9
    BRANCH_WEIGHT = 1 << 10
    BRANCH_BIAS = 1 << 11
    STORE_DRESIDUAL = 1 << 12  # the backward writes dresidual (derived: AddNormSpec.dresidual)


# field of AddNormSpec -> its bit; STORE_DRESIDUAL is derived, never a field
_FLAG_FIELDS = (
    ("zero_centered_weight", Flag.ZERO_CENTERED),
    ("branch_norm", Flag.BRANCH_NORM),
    ("output_norm", Flag.OUTPUT_NORM),
    ("store_h", Flag.STORE_H),
    ("has_residual", Flag.RESIDUAL),
    ("has_weight", Flag.WEIGHT),
    ("has_bias", Flag.BIAS),
    ("has_branch_scale", Flag.BRANCH_SCALE),
    ("has_rowscale", Flag.ROWSCALE),
    ("has_branch_weight", Flag.BRANCH_WEIGHT),
    ("has_branch_bias", Flag.BRANCH_BIAS),
)
NORMS = ("rms", "layer")
FAMILIES = ("add_norm", "norm", "norm_add_norm", "norm_add")


def family(has_residual: bool, branch_norm: bool, output_norm: bool) -> str:
    """The op family of a call, as auto's measured tables name it: ``add_norm``, ``norm``
    (no residual), ``norm_add_norm`` (the sandwich) or ``norm_add`` (OLMo2)."""
    if branch_norm:
        return "norm_add_norm" if output_norm else "norm_add"
    return "add_norm" if has_residual else "norm"


class AddNormSpec(NamedTuple):
    """What one call computes: everything but the tensors. A tuple (cheap to build per
    call, hashable, immutable); ``flat()`` / ``from_flat`` are the registered ops' form."""

    norm: str = "rms"  # "rms" | "layer": both norms of the call
    eps: float = 1e-6
    residual_scale: float = 1.0
    branch_scale: float = 1.0  # a scalar multiplier of the branch (see has_branch_scale)
    zero_centered_weight: bool = False
    branch_norm: bool = False
    output_norm: bool = True
    store_h: bool = True
    has_residual: bool = True  # which optional operands the call has
    has_weight: bool = True
    has_bias: bool = False
    has_branch_scale: bool = False  # a per-channel tensor (LayerScale)
    has_rowscale: bool = False
    has_branch_weight: bool = False
    has_branch_bias: bool = False
    x_dtype: torch.dtype = torch.float32  # x's, and dx's
    residual_dtype: torch.dtype = torch.float32  # the residual input's, and dresidual's
    h_dtype: torch.dtype = torch.float32  # h's (the public residual_dtype= argument)
    out_dtype: torch.dtype = torch.float32  # y's

    # ----------------------------------------------------------------- derived facts

    @property
    def is_rms(self) -> bool:
        return self.norm == "rms"

    @property
    def family(self) -> str:
        return family(self.has_residual, self.branch_norm, self.output_norm)

    @property
    def h_is_x(self) -> bool:
        """h equals x exactly (a plain norm): the output norm's backward can read x."""
        return h_is_x(
            self.has_residual,
            self.has_branch_scale,
            self.branch_scale,
            self.has_rowscale,
            self.branch_norm,
            self.h_dtype,
            self.x_dtype,
        )

    @property
    def reads_x_in_backward(self) -> bool:
        """The backward needs x: LayerScale's gradient (sum of dh * x) or the branch norm."""
        return self.has_branch_scale or self.branch_norm

    @property
    def dresidual(self) -> Optional[str]:
        """Where the gradient of the residual comes from: ``"dx"`` when dh/dresidual =
        dh/dx elementwise and the dtypes agree (one store fewer: the backward moves 4
        tensors, not 5), ``"dh"`` when h = residual + norm(x) has no output norm (the
        gradient passes through, as for torch's own add), else ``"kernel"`` (a store of the
        backward); None without a residual."""
        if not self.has_residual:
            return None
        if (
            self.residual_scale == 1.0
            and not self.has_branch_scale
            and self.branch_scale == 1.0
            and not self.has_rowscale
            and not self.branch_norm
            and self.residual_dtype == self.x_dtype
        ):
            return "dx"
        if (
            not self.output_norm
            and self.residual_scale == 1.0
            and self.residual_dtype == self.h_dtype
        ):
            return "dh"
        return "kernel"

    @property
    def flags(self) -> int:
        """The booleans packed (:class:`Flag`), the norm kind and the derived
        STORE_DRESIDUAL included."""
        return _pack(self)

    # ----------------------------------------------------------------- the ops' flat form

    def flat(self) -> tuple:
        """``(eps, residual_scale, branch_scale, flags, x_dtype, residual_dtype, h_dtype,
        out_dtype)``: the spec as the registered ops and the CUDA schema take it."""
        return _flat(self, self.flags)

    @classmethod
    def from_flat(cls, *flat) -> "AddNormSpec":
        """The spec of ``flat()``'s tuple ``(eps, residual_scale, branch_scale, flags,
        x_dtype, residual_dtype, h_dtype, out_dtype)``."""
        spec = _UNPACKED.get(flat)
        if spec is None:  # a program makes few distinct calls: each is unpacked once
            eps, residual_scale, branch_scale, flags, *dtypes = flat
            spec = _UNPACKED[flat] = cls(
                "rms" if flags & _RMS else "layer",
                eps,
                residual_scale,
                branch_scale,
                *(bool(flags & bit) for _, bit in _INT_FLAG_FIELDS),
                *dtypes,
            )
        return spec


def _flat(spec: AddNormSpec, flags: int) -> tuple:
    """``flat()``'s tuple with the packed booleans ``flags``."""
    return (
        spec.eps,
        spec.residual_scale,
        spec.branch_scale,
        flags,
        spec.x_dtype,
        spec.residual_dtype,
        spec.h_dtype,
        spec.out_dtype,
    )


def _pack(spec: AddNormSpec) -> int:
    # A kernel launch asks once per call, and a program makes few distinct calls: cached per
    # spec; not while torch.compile traces (a dict growing under its guards would recompile)
    # where the value becomes a constant of the graph anyway.
    if torch.compiler.is_compiling():
        return _compute_flags(spec)
    bits = _PACKED.get(spec)
    if bits is None:
        bits = _PACKED[spec] = _compute_flags(spec)
    return bits


def _compute_flags(spec: AddNormSpec) -> int:
    bits = _RMS if spec.norm == "rms" else 0
    for name, bit in _INT_FLAG_FIELDS:
        if getattr(spec, name):
            bits |= bit
    if spec.dresidual == "kernel":
        bits |= _STORE_DRESIDUAL
    return bits


_RMS, _STORE_DRESIDUAL = int(Flag.RMS), int(Flag.STORE_DRESIDUAL)
_PACKED: dict = {}
_UNPACKED: dict = {}
_LAUNCH: dict = {}


def launch_form(spec: AddNormSpec) -> tuple:
    """``(spec.flat(), forward_present(spec), backward_present(spec))``, computed once per
    spec: what a compiled backend's launch needs besides the tensors. For the launches only,
    which never run while torch.compile traces (they run eagerly or inside a registered op's
    body), so no ``is_compiling`` query: on CPU, with the caches cold after a large tensor,
    each query costs about 3 us, each rebuilt tuple a few more."""
    form = _LAUNCH.get(spec)
    if form is None:
        form = _LAUNCH[spec] = (
            _flat(spec, _compute_flags(spec)),
            forward_present(spec),
            backward_present(spec),
        )
    return form


_INT_FLAG_FIELDS = tuple((name, int(bit)) for name, bit in _FLAG_FIELDS)


def h_is_x(
    has_residual: bool,
    has_branch_scale: bool,
    branch_scale: float,
    has_rowscale: bool,
    branch_norm: bool,
    h_dtype: torch.dtype,
    x_dtype: torch.dtype,
) -> bool:
    """``AddNormSpec.h_is_x`` from its fields (the entry points ask before the spec exists,
    to decide whether h is stored)."""
    return (
        not has_residual
        and not has_branch_scale
        and branch_scale == 1.0
        and not has_rowscale
        and not branch_norm
        and h_dtype == x_dtype
    )


# --------------------------------------------------------------------------- tensors


class Operands(NamedTuple):
    """The forward's tensors: 2-D ``(rows, D)`` activations with a unit column stride (any
    row stride), per-channel vectors of D, rowscale a contiguous fp32 vector of rows; None
    where the call has none (``AddNormSpec.has_*`` says the same)."""

    x: Tensor
    residual: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    branch_scale: Optional[Tensor] = None
    rowscale: Optional[Tensor] = None
    branch_weight: Optional[Tensor] = None
    branch_bias: Optional[Tensor] = None


class Forward(NamedTuple):
    """The forward's outputs, None where absent: y (no output norm: none), h (not stored:
    none), and the LayerNorm row means of h and of x (with the branch norm), which the
    backward uses as shifts (it recomputes the statistics of what it reads)."""

    y: Optional[Tensor]
    h: Optional[Tensor]
    mean: Optional[Tensor]
    mean_x: Optional[Tensor]


class BackwardInputs(NamedTuple):
    """What the backward reads: the upstream gradients of y and h, what the forward saved
    (h, or x for a plain norm; x when the backward needs it) and the parameters that scale
    the gradients; None where absent."""

    dy: Optional[Tensor]
    dh: Optional[Tensor]
    h: Optional[Tensor]
    x: Optional[Tensor]
    weight: Optional[Tensor] = None
    branch_scale: Optional[Tensor] = None
    rowscale: Optional[Tensor] = None
    branch_weight: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    mean_x: Optional[Tensor] = None


class Grads(NamedTuple):
    """The backward's outputs: dx, dresidual when the kernel stores it (``spec.dresidual``
    == "kernel"), the parameter gradients as fp32 sums over rows; None where absent."""

    dx: Tensor
    dresidual: Optional[Tensor]
    dweight: Optional[Tensor]
    dbias: Optional[Tensor]
    dbranch_scale: Optional[Tensor]
    dbranch_weight: Optional[Tensor]
    dbranch_bias: Optional[Tensor]


class Backend(Protocol):
    """What a backend is: the reference (``resfuse.reference``), Triton
    (``resfuse.triton_kernels.launch``), CUDA (``resfuse.cuda_ext``) and the CPU emulator of
    the CUDA kernels (tests/simt/sim_backend.py). Outputs are new tensors; inputs are never
    written."""

    def forward(self, spec: AddNormSpec, ops: Operands) -> Forward: ...

    def backward(self, spec: AddNormSpec, inputs: BackwardInputs) -> Grads: ...


# --------------------------------------------------------------------------- output metas


def forward_present(spec: AddNormSpec) -> tuple[bool, bool, bool, bool]:
    """Which of (y, h, mean, mean_x) the forward returns."""
    layer = spec.norm == "layer"
    return (spec.output_norm, spec.store_h, layer and spec.output_norm, layer and spec.branch_norm)


def backward_present(spec: AddNormSpec) -> tuple[bool, ...]:
    """Which of the seven ``Grads`` the backward returns."""
    return (
        True,
        spec.dresidual == "kernel",
        spec.output_norm and spec.has_weight,
        spec.output_norm and spec.has_bias,
        spec.has_branch_scale,
        spec.branch_norm and spec.has_branch_weight,
        spec.branch_norm and spec.has_branch_bias,
    )


def forward_dtypes(spec: AddNormSpec) -> tuple:
    return (spec.out_dtype, spec.h_dtype, torch.float32, torch.float32)


def backward_dtypes(spec: AddNormSpec) -> tuple:
    return (spec.x_dtype, spec.residual_dtype) + (torch.float32,) * 5


def forward_outputs(spec: AddNormSpec, like: Tensor, shape, rows) -> tuple[Tensor, ...]:
    """Empty (y, h, mean, mean_x) of the forward's shapes and dtypes, on ``like``'s device,
    ``(0,)`` for the absent ones (custom ops return no None): every fake implementation."""
    return tuple(
        like.new_empty(s if present else (0,), dtype=d)
        for present, s, d in zip(
            forward_present(spec), (shape, shape, rows, rows), forward_dtypes(spec)
        )
    )


def backward_outputs(spec: AddNormSpec, like: Tensor, shape) -> tuple[Tensor, ...]:
    """Empty ``Grads`` of the backward's shapes and dtypes (``(0,)`` when absent)."""
    D = shape[-1]
    return tuple(
        like.new_empty(s if present else (0,), dtype=d)
        for present, s, d in zip(
            backward_present(spec), (shape, shape) + ((D,),) * 5, backward_dtypes(spec)
        )
    )


def op_outputs(tensors, shapes, dtypes, like: Tensor) -> tuple[Tensor, ...]:
    """A backend's outputs as a registered op returns them: viewed to ``shapes``, an empty
    ``(0,)`` placeholder for each None."""
    return tuple(
        t.view(s) if t is not None else like.new_empty((0,), dtype=d)
        for t, s, d in zip(tensors, shapes, dtypes)
    )


def absent_to_none(tensors, present) -> tuple:
    """The ops' empty placeholders back to None."""
    return tuple(t if p else None for t, p in zip(tensors, present))
