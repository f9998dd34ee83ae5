"""Argument validation for the public API: every error names the argument and what was
expected, and is raised before any kernel runs (see API.md, "Errors")."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .distributed import check as _distribution

# plain tensors skip the DTensor checks (a type test instead of two isinstance calls: this
# runs for every operand of every call)
_PLAIN = (Tensor, torch.nn.Parameter)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16 or bfloat16"


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def tensor(name: str, t, *, allow_bool: bool = False) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES and not (allow_bool and t.dtype == torch.bool):
        raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {t.dtype}")
    return t


def activation(x) -> Tensor:
    tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized one), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(
            f"x's last dimension (the normalized one) must be non-empty, got shape {_shape(x)}"
        )
    if type(x) not in _PLAIN:
        _distribution("x", x, x)
    return x


def same_as_x(name: str, t, x: Tensor) -> Tensor:
    tensor(name, t)
    if t.shape != x.shape:
        raise ValueError(
            f"{name} must have the same shape as x {_shape(x)}, got {_shape(t)} "
            "(resfuse does not broadcast)"
        )
    _device(name, t, x)
    if type(t) not in _PLAIN or type(x) not in _PLAIN:
        _distribution(name, t, x)
    return t


def vector(name: str, t, x: Tensor) -> Tensor:
    """A per-channel parameter: shape (D,) on x's device."""
    tensor(name, t)
    D = x.shape[-1]
    if t.shape != (D,):
        raise ValueError(f"{name} must have shape ({D},) (x's last dimension), got {_shape(t)}")
    _device(name, t, x)
    if type(t) not in _PLAIN or type(x) not in _PLAIN:
        _distribution(name, t, x)
    return t


def rowscale(t, x: Tensor) -> Tensor:
    """A per-row factor broadcastable to x.shape[:-1]; returned as fp32 of exactly that shape."""
    tensor("rowscale", t, allow_bool=True)
    lead = x.shape[:-1]
    try:
        ok = t.dim() <= len(lead) and torch.broadcast_shapes(t.shape, lead) == lead
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"rowscale must be broadcastable to x.shape[:-1] = {tuple(lead)}, got {_shape(t)}"
        )
    _device("rowscale", t, x)
    if type(t) not in _PLAIN or type(x) not in _PLAIN:
        _distribution("rowscale", t, x)
    return t.to(torch.float32).expand(lead).contiguous()


def _device(name: str, t: Tensor, x: Tensor) -> None:
    if t.is_cpu and x.is_cpu:  # no device objects in the common CPU case (a few us cold)
        return
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def real(name: str, v, *, minimum: Optional[float] = None) -> float:
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def dtype(name: str, v, default: torch.dtype) -> torch.dtype:
    if v is None:
        return default
    if not isinstance(v, torch.dtype) or v not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be None or one of torch.{_DTYPE_NAMES.replace(', ', ', torch.').replace(' or ', ' or torch.')}, got {v!r}"
        )
    return v
