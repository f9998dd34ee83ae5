"""Drop-in ``nn.Module`` versions: ``RMSNorm`` and ``LayerNorm`` (state_dict compatible with
``torch.nn`` and Hugging Face norms) and ``AddNorm`` (LayerScale and stochastic depth built in)."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as _functional
from .distributed import is_dtensor
from .functional import add_norm

_Shape = Union[int, Sequence[int]]


def _normalized_shape(normalized_shape: _Shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    shape = tuple(int(s) for s in normalized_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty tuple of "
            f"positive ints, got {normalized_shape!r}"
        )
    return shape


class _Norm(nn.Module):
    """Shared body of RMSNorm and LayerNorm: normalize over the trailing ``normalized_shape``
    dims (flattened into one row of D = prod(normalized_shape)), optional fused residual add."""

    _norm: str  # "rms" | "layer"

    def __init__(
        self,
        normalized_shape: _Shape,
        eps: Optional[float],
        elementwise_affine: bool,
        bias: bool,
        zero_centered_weight: bool,
        device,
        dtype,
    ):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.zero_centered_weight = zero_centered_weight
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            # w' = 1 + weight when zero-centred: both start as the identity
            nn.init.zeros_(self.weight) if self.zero_centered_weight else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _eps(self, x: Tensor) -> float:
        # eps=None follows torch.nn.RMSNorm: the machine epsilon of the input dtype
        return torch.finfo(x.dtype).eps if self.eps is None else self.eps

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(
                f"x's trailing dims must be normalized_shape {self.normalized_shape}, "
                f"got x of shape {tuple(x.shape)}"
            )
        weight, bias = self.weight, self.bias
        shape = x.shape
        if k > 1:  # normalize over several trailing dims: one row of their product
            if residual is not None and residual.shape != shape:
                raise ValueError(
                    f"residual must have the same shape as x {tuple(shape)}, "
                    f"got {tuple(residual.shape)} (resfuse does not broadcast)"
                )
            D = math.prod(self.normalized_shape)
            x = x.reshape(*shape[:-k], D)
            residual = residual.reshape(x.shape) if residual is not None else None
            weight = weight.reshape(D) if weight is not None else None
            bias = bias.reshape(D) if bias is not None else None
        out = add_norm(
            x,
            residual,
            weight,
            bias,
            self._eps(x),
            norm=self._norm,
            zero_centered_weight=self.zero_centered_weight,
            prenorm=residual is not None,
        )
        if k > 1:
            out = (
                tuple(t.reshape(shape) for t in out) if residual is not None else out.reshape(shape)
            )
        return out

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        return s + (", zero_centered_weight=True" if self.zero_centered_weight else "")


class RMSNorm(_Norm):
    """``torch.nn.RMSNorm`` with fp32 math and an optional fused residual add.

    ``forward(x)`` -> y; ``forward(x, residual)`` -> ``(y, h)`` with ``h = residual + x``.
    Also answers to ``variance_epsilon`` (the Hugging Face attribute name).
    """

    _norm = "rms"

    def __init__(
        self,
        normalized_shape: _Shape,
        eps: Optional[float] = 1e-6,
        elementwise_affine: bool = True,
        *,
        zero_centered_weight: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            normalized_shape, eps, elementwise_affine, False, zero_centered_weight, device, dtype
        )

    @property
    def variance_epsilon(self) -> Optional[float]:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = value


class LayerNorm(_Norm):
    """``torch.nn.LayerNorm`` with fp32 math and an optional fused residual add.

    ``forward(x)`` -> y; ``forward(x, residual)`` -> ``(y, h)`` with ``h = residual + x``.
    """

    _norm = "layer"

    def __init__(
        self,
        normalized_shape: _Shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        zero_centered_weight: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            normalized_shape, eps, elementwise_affine, bias, zero_centered_weight, device, dtype
        )


class AddNorm(nn.Module):
    """Residual add + norm for one sublayer, with the residual layouts of ../shared/DOMAIN.md:

    ``h = residual_scale * residual + gamma * drop_path_mask * x``, ``y = Norm(h)``.

    * ``layer_scale_init``: creates the learnable per-channel LayerScale ``layer_scale``
      (``gamma``), initialised to this value (CaiT / DeiT-III / timm ``init_values``).
    * ``drop_path``: stochastic-depth probability; in training each sample's branch is kept
      with probability ``1 - drop_path`` and scaled by ``1 / (1 - drop_path)``.
    * ``prenorm``: return ``(y, h)`` (pre-norm chaining) or only ``y`` (post-norm).
    """

    def __init__(
        self,
        dim: int,
        norm: str = "rms",
        eps: Optional[float] = None,
        *,
        residual_scale: float = 1.0,
        layer_scale_init: Optional[float] = None,
        drop_path: float = 0.0,
        prenorm: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.dim, self.norm, self.prenorm = int(dim), norm, prenorm
        self.eps = eps if eps is not None else (1e-6 if norm == "rms" else 1e-5)
        self.residual_scale = residual_scale
        self.drop_path = drop_path
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(self.dim, **factory))
        if norm == "layer":
            self.bias = nn.Parameter(torch.zeros(self.dim, **factory))
        else:
            self.register_parameter("bias", None)
        if layer_scale_init is not None:
            self.layer_scale = nn.Parameter(
                torch.full((self.dim,), float(layer_scale_init), **factory)
            )
        else:
            self.register_parameter("layer_scale", None)

    def _drop_path_rowscale(self, x: Tensor) -> Optional[Tensor]:
        if not self.training or self.drop_path == 0.0:
            return None
        keep = 1.0 - self.drop_path
        shape = (x.shape[0],) + (1,) * (x.dim() - 2)  # one draw per sample, broadcast over tokens
        mask = torch.empty(shape, device=x.device, dtype=torch.float32).bernoulli_(keep) / keep
        if is_dtensor(x):  # one draw for every rank: rank 0's, replicated over the mesh
            from torch.distributed.tensor import Replicate, distribute_tensor

            mesh = x.device_mesh
            mask = distribute_tensor(mask, mesh, [Replicate()] * mesh.ndim)
        return mask

    def forward(self, x: Tensor, residual: Tensor):
        return add_norm(
            x,
            residual,
            self.weight,
            self.bias,
            self.eps,
            norm=self.norm,
            residual_scale=self.residual_scale,
            branch_scale=self.layer_scale,
            rowscale=self._drop_path_rowscale(x) if x.dim() >= 2 else None,
            prenorm=self.prenorm,
        )

    def extra_repr(self) -> str:
        s = f"{self.dim}, norm={self.norm!r}, eps={self.eps}, prenorm={self.prenorm}"
        if self.residual_scale != 1.0:
            s += f", residual_scale={self.residual_scale}"
        if self.layer_scale is not None:
            s += ", layer_scale=True"
        if self.drop_path:
            s += f", drop_path={self.drop_path}"
        return s


class NormAddNorm(nn.Module):
    """The sandwich layout (Gemma2/3 ``post_*_layernorm`` + next norm, Peri-LN) as one module:

    ``h = residual + branch_norm(x)``, ``y = norm(h)``, fused into one kernel each way.

    ``branch_norm`` and ``norm`` are ordinary :class:`RMSNorm` / :class:`LayerNorm` children
    (their parameters keep those modules' names); :meth:`from_norms` wraps existing ones.
    ``output_norm=False`` drops the second norm: OLMo2's ``h = residual + norm(x)``.
    """

    def __init__(
        self,
        dim: int,
        norm: str = "rms",
        eps: Optional[float] = None,
        *,
        elementwise_affine: bool = True,
        bias: bool = True,
        zero_centered_weight: bool = False,
        prenorm: bool = True,
        output_norm: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
        eps = eps if eps is not None else (1e-6 if norm == "rms" else 1e-5)

        def make():
            kw = dict(
                elementwise_affine=elementwise_affine,
                zero_centered_weight=zero_centered_weight,
                device=device,
                dtype=dtype,
            )
            return (
                RMSNorm(dim, eps, **kw) if norm == "rms" else LayerNorm(dim, eps, bias=bias, **kw)
            )

        self.branch_norm = make()
        self.norm = make() if output_norm else None
        self.prenorm = prenorm

    @classmethod
    def from_norms(
        cls, branch_norm: _Norm, norm: Optional[_Norm] = None, *, prenorm: bool = True
    ) -> "NormAddNorm":
        """Fuse two existing resfuse norms of the same kind, eps and weight convention."""
        for name, m in (("branch_norm", branch_norm), ("norm", norm)):
            if m is not None and (not isinstance(m, _Norm) or len(m.normalized_shape) != 1):
                raise TypeError(
                    f"{name} must be a resfuse RMSNorm or LayerNorm over one dimension, got {m!r}"
                )
        if norm is not None and (
            type(norm) is not type(branch_norm)
            or norm.normalized_shape != branch_norm.normalized_shape
            or norm.eps != branch_norm.eps
            or norm.zero_centered_weight != branch_norm.zero_centered_weight
        ):
            raise ValueError(
                "branch_norm and norm must agree on kind, shape, eps and "
                f"zero_centered_weight: {branch_norm!r} vs {norm!r}"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.branch_norm, module.norm, module.prenorm = branch_norm, norm, prenorm
        return module

    def forward(self, x: Tensor, residual: Optional[Tensor]):
        b, n = self.branch_norm, self.norm
        common = dict(norm=b._norm, branch_bias=b.bias, zero_centered_weight=b.zero_centered_weight)
        if n is None:
            return _functional.norm_add(x, residual, b.weight, b._eps(x), **common)
        return _functional.norm_add_norm(
            x, residual, b.weight, n.weight, b._eps(x), bias=n.bias, prenorm=self.prenorm, **common
        )
