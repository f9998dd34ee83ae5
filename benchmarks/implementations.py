"""Everything the benchmarks compare: the baselines as models write them, resfuse's backends,
and peer libraries found installed at run time (never required).

Every implementation of an op is a function ``fn(x, residual, weight, bias) -> tuple`` of its
outputs: ``(y, h)`` for the pre-norm add ops (``h = residual + x``, ``y = Norm(h)``), ``(y,)``
for the plain norms. The ops with a branch norm take its parameters after those four,
``fn(x, residual, weight, bias, branch_weight, branch_bias)``: ``(y, h)`` for the sandwich ops
(``h = residual + Norm_b(x)``, ``y = Norm(h)``), ``(h,)`` for ``rms_norm_add`` (OLMo2).
``traffic.Op.arguments`` / ``.outputs`` name them; an argument the op has no use for (the
residual of a plain norm, an RMSNorm's bias, ``rms_norm_add``'s weight) is None. Inputs are
2-D ``(rows, hidden)`` and contiguous.

Baselines:

* ``eager-hf``: Hugging Face's way, ``h = residual + x`` and then the norm computed in fp32
  by hand: Llama's ``LlamaRMSNorm`` (upcast, ``rsqrt(mean(h^2) + eps)``, round to the input
  dtype, multiply by the weight) and the same pattern for LayerNorm (upcast, centre,
  normalise, round, affine), as fp32-upcasting mixed-precision code writes it. Hugging Face's
  GPT-2 / BERT call ``nn.LayerNorm`` directly: that is the ``eager-torch`` row. The sandwich
  ops run as Gemma2's decoder layer does: the branch norm (``post_attention_layernorm``),
  ``residual + ...``, then the next norm (``pre_feedforward_layernorm``), with the same norm
  functions; OLMo2's layer stops after the add. Gemma's zero-centred weight (``1 + w``) is
  left out here and everywhere in the benchmarks: one weight convention for every
  implementation.
* ``eager-torch``: ``residual + x`` then torch's own ``F.rms_norm`` / ``F.layer_norm``
  (fused single kernels on CUDA in recent torch); for the sandwich ops one on the branch,
  the add, one on the sum.
* ``torch.compile``: ``torch.compile`` of the ``eager-hf`` code (Inductor fuses the add, the
  upcast and the norm itself). Compiled once per (op, dtype, hidden) with the row count
  dynamic, so a sweep over rows does not recompile.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import resfuse
from resfuse import reference

from .traffic import spec

EPS = {"rms": 1e-6, "layer": 1e-5}


def norm_kind(op: str) -> str:
    return spec(op).norm


class Unsupported(Exception):
    """This implementation does not offer this op (e.g. a peer without a LayerNorm backward)."""


# --------------------------------------------------------------------------- the norms as
# models write them (also used by the reference transformer)


def hf_rms_norm(h, weight, bias, eps):
    """``LlamaRMSNorm.forward``: fp32 statistics, the normalised value rounded to the input
    dtype before the weight multiplies it. Saves an fp32 copy of ``h`` and the rounded
    normalised value for backward (6 bytes per element in bf16)."""
    dtype = h.dtype
    hs = h.to(torch.float32)
    variance = hs.pow(2).mean(-1, keepdim=True)
    hs = hs * torch.rsqrt(variance + eps)
    return weight * hs.to(dtype)


def hf_layer_norm(h, weight, bias, eps):
    """The same pattern for LayerNorm: fp32 mean and biased variance, round, then affine."""
    dtype = h.dtype
    hs = h.to(torch.float32)
    centred = hs - hs.mean(-1, keepdim=True)
    variance = centred.pow(2).mean(-1, keepdim=True)
    hs = centred * torch.rsqrt(variance + eps)
    return weight * hs.to(dtype) + bias


def torch_rms_norm(h, weight, bias, eps):
    return F.rms_norm(h, (h.shape[-1],), weight, eps)


def torch_layer_norm(h, weight, bias, eps):
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


NORMS = {
    "eager-hf": {"rms": hf_rms_norm, "layer": hf_layer_norm},
    "eager-torch": {"rms": torch_rms_norm, "layer": torch_layer_norm},
}


def _add_then_norm(op: str, norm: Callable) -> Callable:
    """``h = residual + x; y = norm(h)`` (or the plain norm) from a norm function."""
    if spec(op).branch_norm:
        raise ValueError(f"{op} normalises the branch before the add: see _norm_then_add")
    eps = EPS[norm_kind(op)]
    if spec(op).residual:

        def add_norm(x, residual, weight, bias):
            h = residual + x
            return norm(h, weight, bias, eps), h

        return add_norm

    def plain_norm(x, residual, weight, bias):
        return (norm(x, weight, bias, eps),)

    return plain_norm


def _norm_then_add(op: str, norm: Callable) -> Callable:
    """Gemma2's decoder layer, ``h = residual + norm(x, w_b, b_b); y = norm(h, w, b)``, or
    OLMo2's (``h`` alone), from a norm function."""
    eps = EPS[norm_kind(op)]
    if spec(op).output_norm:

        def norm_add_norm(x, residual, weight, bias, branch_weight, branch_bias):
            h = residual + norm(x, branch_weight, branch_bias, eps)
            return norm(h, weight, bias, eps), h

        return norm_add_norm

    def norm_add(x, residual, weight, bias, branch_weight, branch_bias):
        return (residual + norm(x, branch_weight, branch_bias, eps),)

    return norm_add


def unfused(op: str, norm: Callable) -> Callable:
    """``op`` as models write it, one torch op after another, from a norm function."""
    return (_norm_then_add if spec(op).branch_norm else _add_then_norm)(op, norm)


def eager(variant: str) -> Callable[[str], Callable]:
    def make(op: str) -> Callable:
        return unfused(op, NORMS[variant][norm_kind(op)])

    return make


def compiled(op: str) -> Callable:
    fn = torch.compile(unfused(op, NORMS["eager-hf"][norm_kind(op)]))

    def run(x, residual, *params):
        # the row count is dynamic: one compile serves every row count of a hidden size
        torch._dynamo.mark_dynamic(x, 0)
        if residual is not None:
            torch._dynamo.mark_dynamic(residual, 0)
        return fn(x, residual, *params)

    return run


def resfuse_backend(backend: str) -> Callable[[str], Callable]:
    def make(op: str) -> Callable:
        eps, kind = EPS[norm_kind(op)], norm_kind(op)
        if spec(op).branch_norm and spec(op).output_norm:
            return lambda x, r, w, b, wb, bb: resfuse.norm_add_norm(
                x, r, wb, w, eps, norm=kind, branch_bias=bb, bias=b, backend=backend
            )
        if spec(op).branch_norm:
            return lambda x, r, w, b, wb, bb: (
                resfuse.norm_add(x, r, wb, eps, norm=kind, branch_bias=bb, backend=backend),
            )
        if op == "add_rms_norm":
            return lambda x, r, w, b: resfuse.add_rms_norm(x, r, w, eps, backend=backend)
        if op == "add_layer_norm":
            return lambda x, r, w, b: resfuse.add_layer_norm(x, r, w, b, eps, backend=backend)
        if op == "rms_norm":
            return lambda x, r, w, b: (resfuse.rms_norm(x, w, eps, backend=backend),)
        return lambda x, r, w, b: (resfuse.layer_norm(x, w, b, eps, backend=backend),)

    return make


# --------------------------------------------------------------------------- peers


def _fused_branch_norm(op: str, peer: str, what_it_fuses: str) -> None:
    """None of the peers normalises the branch inside its fused add (read in their sources):
    running its norms one after another would be the eager baselines' pattern, not a fused
    op, so the sandwich ops are not theirs to measure."""
    if spec(op).branch_norm:
        raise Unsupported(
            f"{peer} has no fused norm of the branch before the add ({what_it_fuses})"
        )


def _liger(op: str) -> Callable:
    _fused_branch_norm(op, "Liger", "its fused add + RMSNorm normalises the sum only")
    eps = EPS[norm_kind(op)]
    # in_place=False: Liger's default writes dx into dy, which would change the gradient
    # buffer between the repeated backward calls of a measurement
    if op == "add_rms_norm":
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction as AddRMS

        return lambda x, r, w, b: tuple(AddRMS.apply(x, r, w, eps, 0.0, "llama", False))
    if op == "rms_norm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction as RMS

        return lambda x, r, w, b: (RMS.apply(x, w, eps, 0.0, "llama", False),)
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction as LN

    # Liger has no fused add + LayerNorm: add, then its LayerNorm
    return _add_then_norm(op, lambda h, w, b, eps_: LN.apply(h, w, b, eps_))


def _flash_attn(op: str) -> Callable:
    _fused_branch_norm(
        op,
        "flash-attn",
        "layer_norm_fn normalises the residual sum; its x1 / "
        "weight1 are a parallel second branch, not a branch norm",
    )
    from flash_attn.ops.triton.layer_norm import layer_norm_fn, rms_norm_fn

    eps = EPS[norm_kind(op)]
    if op == "add_rms_norm":
        return lambda x, r, w, b: tuple(rms_norm_fn(x, w, None, residual=r, eps=eps, prenorm=True))
    if op == "add_layer_norm":
        return lambda x, r, w, b: tuple(layer_norm_fn(x, w, b, residual=r, eps=eps, prenorm=True))
    if op == "rms_norm":
        return lambda x, r, w, b: (rms_norm_fn(x, w, None, eps=eps),)
    return lambda x, r, w, b: (layer_norm_fn(x, w, b, eps=eps),)


def _quack(op: str) -> Callable:
    _fused_branch_norm(op, "quack", "its rmsnorm with a residual normalises the sum only")
    if norm_kind(op) == "layer":
        raise Unsupported("quack's LayerNorm has no backward")
    from quack.rmsnorm import rmsnorm

    eps = EPS["rms"]
    if op == "add_rms_norm":
        return lambda x, r, w, b: tuple(rmsnorm(x, w, residual=r, eps=eps, prenorm=True))
    return lambda x, r, w, b: (rmsnorm(x, w, eps=eps),)


def _apex(op: str) -> Callable:
    _fused_branch_norm(op, "Apex", "it has no fused residual add")
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

    # Apex has no fused residual add: add, then its norm
    if norm_kind(op) == "rms":
        return _add_then_norm(
            op, lambda h, w, b, eps: fused_rms_norm_affine(h, w, h.shape[-1:], eps)
        )
    return _add_then_norm(
        op, lambda h, w, b, eps: fused_layer_norm_affine(h, w, b, h.shape[-1:], eps)
    )


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Implementation:
    name: str
    family: str  # "baseline" | "resfuse" | "peer"
    description: str
    make: Callable[[str], Callable]  # op -> fn; raises Unsupported
    unavailable: Callable[[torch.device], Optional[str]]  # None when it can run here


def _always(device: torch.device) -> Optional[str]:
    return None


def _needs_cuda(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "GPU kernels: needs a CUDA device"


def _resfuse_unavailable(backend: str) -> Callable[[torch.device], Optional[str]]:
    def unavailable(device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return (
                "GPU kernels: needs a CUDA device (on CPU tensors resfuse runs its CPU "
                "kernels: the resfuse-cpu row)"
            )
        status = resfuse.backends()[backend]
        return None if status.available else status.reason

    return unavailable


def _resfuse_cpu_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "CPU kernels: timed on CPU runs"
    status = resfuse.backends()["cpu"]
    return None if status.available else status.reason


def _resfuse_torch_unavailable(device: torch.device) -> Optional[str]:
    # on a GPU the reference backend is a correctness tool, not a contender
    return None if device.type != "cuda" else "the PyTorch reference; timed on CPU only"


def _peer(module: str) -> Callable[[torch.device], Optional[str]]:
    def unavailable(device: torch.device) -> Optional[str]:
        if importlib.util.find_spec(module) is None:
            return f"not installed (python package {module!r})"
        return _needs_cuda(device)

    return unavailable


IMPLEMENTATIONS = (
    Implementation(
        "eager-hf",
        "baseline",
        "residual + x, then the norm in fp32 as Hugging Face "
        "writes it (LlamaRMSNorm; the same pattern for LayerNorm); the sandwich ops "
        "as Gemma2's layer: that norm on the branch, the add, the norm of the sum",
        eager("eager-hf"),
        _always,
    ),
    Implementation(
        "eager-torch",
        "baseline",
        "residual + x, then torch's F.rms_norm / "
        "F.layer_norm (sandwich ops: one on the branch, the add, one on the sum)",
        eager("eager-torch"),
        _always,
    ),
    Implementation(
        "torch.compile", "baseline", "torch.compile of the eager-hf code", compiled, _always
    ),
    Implementation(
        "resfuse-triton",
        "resfuse",
        "resfuse, backend='triton'",
        resfuse_backend("triton"),
        _resfuse_unavailable("triton"),
    ),
    Implementation(
        "resfuse-cuda",
        "resfuse",
        "resfuse, backend='cuda' (compiled extension)",
        resfuse_backend("cuda"),
        _resfuse_unavailable("cuda"),
    ),
    Implementation(
        "resfuse-cpu",
        "resfuse",
        "resfuse, backend='cpu' (its compiled CPU kernels: what auto runs on CPU tensors)",
        resfuse_backend("cpu"),
        _resfuse_cpu_unavailable,
    ),
    Implementation(
        "resfuse-torch",
        "resfuse",
        "resfuse, backend='torch' (its PyTorch reference, the oracle; auto's CPU path "
        "only where the CPU extension is not built)",
        resfuse_backend("torch"),
        _resfuse_torch_unavailable,
    ),
    Implementation(
        "liger",
        "peer",
        "Liger-Kernel (fused add + RMSNorm; LayerNorm after a separate add)",
        _liger,
        _peer("liger_kernel"),
    ),
    Implementation(
        "flash-attn",
        "peer",
        "flash-attn's Triton layer_norm_fn / rms_norm_fn (fused residual)",
        _flash_attn,
        _peer("flash_attn"),
    ),
    Implementation(
        "quack", "peer", "quack's rmsnorm (fused residual; RMSNorm only)", _quack, _peer("quack")
    ),
    Implementation(
        "apex",
        "peer",
        "Apex fused_rms_norm_affine / fused_layer_norm_affine after a separate add",
        _apex,
        _peer("apex"),
    ),
)

BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}


def select(names: Optional[list[str]] = None) -> list[Implementation]:
    if names is None:
        return list(IMPLEMENTATIONS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {list(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def availability(impls: list[Implementation], device: torch.device) -> dict[str, Optional[str]]:
    """``{name: None if it runs here, else why not}``."""
    return {impl.name: impl.unavailable(device) for impl in impls}


# --------------------------------------------------------------------------- correctness


def _named(op: str, args) -> dict:
    names = spec(op).arguments
    if len(args) != len(names):
        raise ValueError(f"{op} takes {len(names)} arguments {names}, got {len(args)}")
    return dict(zip(names, args))


def reference_outputs(op: str, args, grads):
    """Outputs and gradients (of every argument that is not None, in order) of ``op`` in
    float64 from ``resfuse.reference``, the specification every implementation is checked
    against. ``args`` in the functions' convention; ``grads``: upstream gradients of the
    outputs, in order."""
    s = spec(op)
    leaves = {
        n: t.detach().double().requires_grad_(True) if t is not None else None
        for n, t in _named(op, args).items()
    }
    eps = EPS[s.norm]
    if s.branch_norm:
        y, h = reference.norm_add_norm(
            leaves["x"],
            leaves["residual"],
            leaves["branch_weight"],
            leaves["weight"],
            eps,
            norm=s.norm,
            branch_bias=leaves["branch_bias"],
            bias=leaves["bias"],
            compute_dtype=torch.float64,
        )
    else:
        y, h = reference.add_norm(
            leaves["x"],
            leaves["residual"],
            leaves["weight"],
            leaves["bias"],
            eps,
            norm=s.norm,
            compute_dtype=torch.float64,
        )
    outs = tuple({"y": y, "h": h}[o] for o in s.outputs)
    used = [t for t in leaves.values() if t is not None]
    return outs, torch.autograd.grad(outs, used, [g.double() for g in grads[: len(outs)]])


def check(op: str, fn: Callable, args, grads) -> Optional[str]:
    """None when ``fn(*args)`` computes ``op`` (outputs and every gradient within a few ulps
    of the dtype, relative to each tensor's largest magnitude); else what is wrong. ``grads``:
    the upstream gradients of the op's outputs, in order (``kernels.CaseInputs.grads``). Run
    before an implementation is timed, so a misconfigured peer cannot post a number."""
    named = _named(op, args)
    leaves = [t for t in named.values() if t is not None]
    outs = fn(*args)
    expected_outs, expected_grads = reference_outputs(op, args, grads)
    if len(outs) != len(expected_outs):
        return f"returned {len(outs)} outputs, expected {len(expected_outs)}"
    got_grads = torch.autograd.grad(outs, leaves, grads[: len(outs)], allow_unused=True)
    # 4 ulps at the tensor's scale: HF-style code rounds twice, weight grads sum many rows
    tolerance = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}[
        named["x"].dtype
    ]
    names = list(spec(op).outputs) + ["d" + n for n, t in named.items() if t is not None]
    for name, got, want in zip(
        names, list(outs) + list(got_grads), list(expected_outs) + list(expected_grads)
    ):
        if got is None:
            return f"{name}: no gradient (the input is not used)"
        if got.shape != want.shape:
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        scale = want.abs().max().item() or 1.0
        err = (got.double() - want).abs().max().item() / scale
        if not err <= tolerance:  # also catches NaN
            return f"{name}: max error {err:.2e} of its largest value (tolerance {tolerance:.1e})"
    return None
