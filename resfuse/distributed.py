"""DTensor support: the sharding rules of the two registered ops, and the checks a DTensor
call gets before any kernel runs.

A call whose ``x`` is a ``torch.distributed.tensor.DTensor`` goes through the registered op
(``resfuse::add_norm``, its registered autograd and ``resfuse::add_norm_backward``), whose
sharding rules below let DTensor run each rank's rows locally:

* the activations (x, residual, y, h, their gradients) sharded over any *leading* dimension
  (sequence parallel's ``Shard(1)`` of (batch, seq, hidden), data parallel's ``Shard(0)``),
  the per-row tensors (rowscale, the LayerNorm means) sharded the same way, the per-channel
  parameters replicated: every rank normalizes its own rows, nothing is gathered; the
  parameter gradients come out ``Partial()`` (each rank's sum over its own rows), which
  DTensor reduces when they are used;
* everything replicated: each rank computes the whole call.

The normalized (last) dimension is never split: a row's statistics would need an all-reduce
inside the kernel. A DTensor sharded over it, or a parameter that is not replicated, is
refused by :func:`check` with the placement named, rather than gathered behind the user's
back. Mixing DTensors and plain tensors in one call is refused as well.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .spec import AddNormSpec, backward_present, forward_present

try:  # torch.distributed is optional (some builds have none): then nothing is a DTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - a build without torch.distributed
    DTensor = None

# which operands are per-channel parameters (replicated) and which are per-row (sharded like
# x's leading dims); the rest are activations of x's shape
PARAMETERS = ("weight", "bias", "branch_scale", "branch_weight", "branch_bias")
PER_ROW = ("rowscale", "mean", "mean_x")
UNSUPPORTED: Optional[str] = None  # why DTensor calls cannot run (register_sharding_rules)


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _placements(t) -> str:
    return "(" + ", ".join(str(p) for p in t.placements) + ")"


def check(name: str, t: Tensor, x: Tensor) -> None:
    """One operand of a call whose x is ``x``: DTensor both or neither, one mesh, rows whole,
    parameters replicated. Raised before any kernel runs, naming the argument."""
    if is_dtensor(t) != is_dtensor(x):
        kind, other = (
            ("a DTensor", "a torch.Tensor") if is_dtensor(t) else ("a torch.Tensor", "a DTensor")
        )
        raise TypeError(
            f"{name} is {kind} but x is {other}: pass every tensor of the call as a DTensor "
            "on one device mesh, or none (resfuse does not mix them)"
        )
    if not is_dtensor(t):
        return
    if UNSUPPORTED is not None:
        raise TypeError(
            f"{name} is a DTensor, which this torch cannot run resfuse on: {UNSUPPORTED}"
        )
    if t.device_mesh != x.device_mesh:
        raise ValueError(f"{name} is a DTensor on another device mesh than x's")
    if name in PARAMETERS:
        if not all(p.is_replicate() for p in t.placements):
            raise ValueError(
                f"{name} is a DTensor placed as {_placements(t)}: resfuse needs the "
                "per-channel parameters replicated (Replicate()) on every mesh dimension "
                "(under FSDP, call the module inside its own forward, where its parameters "
                "are gathered)"
            )
        return
    last = t.ndim - 1
    for p in t.placements:
        if p.is_shard() and p.dim % t.ndim == last and name != "rowscale":
            raise ValueError(
                f"{name} is a DTensor sharded over its last dimension, the normalized one "
                f"{_placements(t)}: resfuse normalizes whole rows; shard over a leading "
                "dimension (sequence parallel: Shard(1) of (batch, seq, hidden)) or replicate"
            )


# --------------------------------------------------------------------------- sharding rules


def _place(kind: Optional[str], shard) -> object:
    """The placement of one operand of kind ``kind`` when the rows are sharded as ``shard``
    (None: everything replicated)."""
    if kind is None:
        return None
    if shard is None or kind == "param":
        return Replicate()
    if kind == "param_grad":  # each rank's sum over its own rows
        return Partial()
    return shard


def _strategies(ndim: int, outputs: tuple, inputs: tuple, n_scalars: int) -> list:
    """The acceptable placements of one call, for one mesh dimension (DTensor expands them
    to every dimension of the mesh): for each leading dim d, ``Shard(d)`` for the
    activations and the per-row tensors, the parameters replicated and their gradients
    ``Partial()``; and everything replicated. ``outputs`` / ``inputs``: per position, its
    kind (``"act"``, ``"row"``, ``"param"``, ``"param_grad"``) or None where absent."""
    rules = []
    for shard in [Shard(d) for d in range(ndim - 1)] + [None]:
        # absent outputs are the ops' empty placeholders: replicated
        out = [_place(k, shard) if k is not None else Replicate() for k in outputs]
        rules.append((out, [_place(k, shard) for k in inputs] + [None] * n_scalars))
    return rules


def _forward_rule(
    x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias, *flat
):
    spec = AddNormSpec.from_flat(*flat[:8])
    present = forward_present(spec)
    outputs = tuple(k if p else None for k, p in zip(("act", "act", "row", "row"), present))
    inputs = (
        "act",
        "act" if residual is not None else None,
        *("param" if t is not None else None for t in (weight, bias, branch_scale)),
        "row" if rowscale is not None else None,
        *("param" if t is not None else None for t in (branch_weight, branch_bias)),
    )
    return _strategies(x.ndim, outputs, inputs, len(flat))


def _backward_rule(
    dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x, *flat
):
    spec = AddNormSpec.from_flat(*flat[:8])
    present = backward_present(spec)
    kinds = ("act", "act") + ("param_grad",) * 5
    outputs = tuple(k if p else None for k, p in zip(kinds, present))
    like = h if h is not None else dh
    inputs = tuple(
        kind if t is not None else None
        for kind, t in zip(
            ("act", "act", "act", "act", "param", "param", "row", "param", "row", "row"),
            (dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x),
        )
    )
    return _strategies(like.ndim, outputs, inputs, len(flat))


def register_sharding_rules() -> Optional[str]:
    """Register the rules with DTensor; returns why not, or None (also kept in
    ``UNSUPPORTED`` for :func:`check`). Called once, by ops.py, after the ops exist."""
    global UNSUPPORTED
    UNSUPPORTED = _register()
    return UNSUPPORTED


def _register() -> Optional[str]:
    if DTensor is None:
        return "this torch build has no torch.distributed"
    try:
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError as e:  # pragma: no cover - torch < 2.5
        return f"torch.distributed.tensor.experimental.register_sharding is missing: {e}"
    try:  # an experimental API: a release that changes it must not break `import resfuse`
        register_sharding(torch.ops.resfuse.add_norm.default)(_forward_rule)
        register_sharding(torch.ops.resfuse.add_norm_backward.default)(_backward_rule)
    except Exception as e:  # pragma: no cover - depends on the torch release
        return f"registering the DTensor sharding rules failed: {type(e).__name__}: {e}"
    return None
