"""A compiled library of resfuse ops, behind the backend interface (``forward`` /
``backward``): ``resfuse._C`` (the CUDA kernels of csrc/, resfuse/cuda_ext.py) and
``resfuse._C_cpu`` (the CPU kernels of csrc/cpu/, resfuse/cpu_ext.py) register
``torch.ops.resfuse.<device>_add_norm_fwd`` / ``<device>_add_norm_bwd`` with the same
signatures (csrc/op_args.h). An :class:`Extension` loads its library once, registers the fake
implementations of its ops (so they trace under torch.compile and FakeTensor) and says why it
is unusable when it is. Loading never raises.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from .spec import (
    AddNormSpec,
    BackwardInputs,
    Forward,
    Grads,
    Operands,
    absent_to_none,
    backward_outputs,
    forward_outputs,
    launch_form,
)

_new = tuple.__new__  # a NamedTuple from its fields in order (the per-call path)


def _direct(overload):
    """The C++ callable behind an ``OpOverload``, which its ``__call__`` forwards to unless
    the op has a Python dispatcher (then the overload itself). The Python frame of
    ``OpOverload.__call__`` costs about 25 us per call when a large tensor has just streamed
    through the core's caches (measured on CPU, torch 2.14: 61 us against 38 us for a
    4 x 768 LayerNorm), as much as the op's own dispatch."""
    op = getattr(overload, "_op", None)
    if op is None or getattr(overload, "_pyobj_dispatcher", None) is not None:
        return overload
    return op


class Extension:
    """The library ``library`` of the ``device`` ops ("cuda" / "cpu").

    ``not_built``: the reason given when the library file is absent; ``check()``: a reason
    it cannot work here although built (else ""); ``load_error(e, path)``: the reason when
    loading it fails; ``extra_ops``: ``{key: op name}`` of further ops kept in ``state``;
    ``extra_fakes()``: registers the fakes of those."""

    def __init__(
        self,
        device: str,
        library: str,
        not_built: str,
        check: Callable[[], str] = lambda: "",
        load_error: Callable[[Exception, str], str] = lambda e, path: "",
        extra_ops: dict | None = None,
        extra_fakes: Callable[[], None] = lambda: None,
    ):
        self.device, self.library, self.not_built = device, library, not_built
        self.check, self.load_error = check, load_error
        self.extra_ops, self.extra_fakes = dict(extra_ops or {}), extra_fakes
        self.state: dict = {}

    def origin(self) -> str:
        """The library's file, or "" when it is not installed."""
        try:
            spec = importlib.util.find_spec(self.library)
        except Exception:  # noqa: BLE001 - a broken package must not break import
            return ""
        return spec.origin if spec is not None and spec.origin else ""

    def load(self) -> str:
        """Load the library once; returns "" or why it is unusable."""
        if "reason" in self.state:
            return self.state["reason"]
        reason = ""
        path = ""
        try:
            spec = importlib.util.find_spec(self.library)
            path = spec.origin if spec is not None and spec.origin else ""
        except Exception as e:  # noqa: BLE001
            reason = f"cannot look for the extension: {e}"
        if not reason and not path:
            reason = self.not_built
        if not reason:
            reason = self.check()
        if not reason:
            try:
                torch.ops.load_library(path)
                ops = torch.ops.resfuse
                self.state["fwd"] = _direct(getattr(ops, f"{self.device}_add_norm_fwd").default)
                self.state["bwd"] = _direct(getattr(ops, f"{self.device}_add_norm_bwd").default)
                for key, name in self.extra_ops.items():
                    self.state[key] = getattr(ops, name).default
                self._register_fakes()
            except Exception as e:  # noqa: BLE001 - e.g. built for another torch or CUDA
                reason = self.load_error(e, path) or (
                    f"the {self.device} extension {os.path.basename(path)} failed to load: {e}"
                )
        self.state["reason"] = reason
        return reason

    def _register_fakes(self) -> None:
        # the schema takes the spec's flat form (csrc/op_args.h): the fakes read it back
        @torch.library.register_fake(f"resfuse::{self.device}_add_norm_fwd")
        def _fwd_fake(
            x, residual, weight, bias, branch_scale, rowscale, branch_weight, branch_bias, *flat
        ):
            return forward_outputs(AddNormSpec.from_flat(*flat), x, x.shape, x.shape[:1])

        @torch.library.register_fake(f"resfuse::{self.device}_add_norm_bwd")
        def _bwd_fake(
            dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x, *flat
        ):
            spec = AddNormSpec.from_flat(*flat)
            like = h if spec.output_norm else dh
            return backward_outputs(spec, like, like.shape)

        self.extra_fakes()

    def ops(self) -> dict:
        if self.state.get("reason") == "":  # loaded (the per-call path: no load() call)
            return self.state
        reason = self.load()
        if reason:
            raise RuntimeError(f"resfuse's {self.device} backend is unavailable: {reason}")
        return self.state

    def forward(self, spec: AddNormSpec, ops: Operands) -> Forward:
        """(y, h, mean, mean_x), None where absent, for 2-D (rows, D) operands with unit column
        stride; the LayerNorm row means of h and (with the branch norm) of x."""
        flat, present, _ = launch_form(spec)
        y, h, mean, mean_x = self.ops()["fwd"](*ops, *flat)
        return _new(
            Forward,
            (
                y if present[0] else None,
                h if present[1] else None,
                mean if present[2] else None,
                mean_x if present[3] else None,
            ),
        )

    def backward(self, spec: AddNormSpec, inputs: BackwardInputs) -> Grads:
        """(dx, dresidual, dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias): the
        parameter gradients as fp32 sums over rows, None where absent."""
        flat, _, present = launch_form(spec)
        outs = self.ops()["bwd"](*inputs, *flat)
        return _new(Grads, absent_to_none(outs, present))
