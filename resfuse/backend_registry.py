"""Backend discovery and choice: ``"cuda"`` (csrc/), ``"triton"`` (triton_kernels/),
``"cpu"`` (csrc/cpu/), ``"torch"`` (the reference), and ``"auto"``."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from . import auto_table

BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "torch")
ENV_VAR = "RESFUSE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call here (and the message says why)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # what it runs on when available, what is missing when not

    def __str__(self) -> str:
        return f"{self.name:<7} {'yes' if self.available else 'no ':<4} {self.reason}"


class BackendReport(dict):
    """``{name: BackendStatus}`` that prints as a small table."""

    def __str__(self) -> str:
        return "\n".join(["backend available  details"] + [str(s) for s in self.values()])


_IMPORTED: dict[str, tuple[ModuleType | None, str]] = {}


def _import(module: str) -> tuple[ModuleType | None, str]:
    """Import once and remember the outcome (a plain dict: torch.compile traces through it)."""
    if module not in _IMPORTED:
        try:
            _IMPORTED[module] = importlib.import_module(module), ""
        except Exception as e:  # a broken install must not break `import resfuse`
            _IMPORTED[module] = None, f"{type(e).__name__}: {e}"
    return _IMPORTED[module]


def _triton_module():
    return _import("resfuse.triton_kernels.launch")


def _cuda_module():
    return _import("resfuse.cuda_ext")


def _cpu_module():
    return _import("resfuse.cpu_ext")


def _interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch" + (
            "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
        )
    return ""


def backends() -> BackendReport:
    """Which backends can run here, and why the others cannot."""
    report = BackendReport()
    no_gpu = _cuda_reason()

    cuda_mod, err = _cuda_module()
    if cuda_mod is None:
        report["cuda"] = BackendStatus("cuda", False, f"extension not importable ({err})")
    elif not cuda_mod.available():
        report["cuda"] = BackendStatus("cuda", False, cuda_mod.unavailable_reason())
    elif no_gpu:
        report["cuda"] = BackendStatus(
            "cuda", False, f"extension built ({_cuda_build(cuda_mod)}), but {no_gpu}"
        )
    else:
        report["cuda"] = BackendStatus(
            "cuda", True, f"compiled extension ({_cuda_build(cuda_mod)}), CUDA tensors"
        )

    triton_mod, err = _triton_module()
    if triton_mod is None:
        report["triton"] = BackendStatus("triton", False, f"triton not usable ({err})")
    elif no_gpu and not _interpreter_active():
        report["triton"] = BackendStatus(
            "triton", False, f"{no_gpu}; CPU tensors run only under TRITON_INTERPRET=1"
        )
    else:
        where = "CUDA tensors" if not no_gpu else "CPU tensors under TRITON_INTERPRET=1"
        report["triton"] = BackendStatus("triton", True, f"triton {_triton_version()}, {where}")

    cpu_mod, err = _cpu_module()
    if cpu_mod is None:
        report["cpu"] = BackendStatus("cpu", False, f"extension not importable ({err})")
    elif not cpu_mod.available():
        report["cpu"] = BackendStatus("cpu", False, cpu_mod.unavailable_reason())
    else:
        report["cpu"] = BackendStatus(
            "cpu", True, f"compiled CPU kernels ({cpu_mod.isa()}), CPU tensors"
        )

    report["torch"] = BackendStatus("torch", True, "PyTorch reference, any device")
    fallback = (
        "cuda" if report["cuda"].available else "triton" if report["triton"].available else "torch"
    )
    on_cpu = "cpu" if report["cpu"].available else "torch (the CPU extension is not built)"
    report["auto"] = BackendStatus(
        "auto", True, f"CUDA tensors: {auto_table.describe(fallback)}; CPU tensors: {on_cpu}"
    )
    return report


def _cuda_build(cuda_mod) -> str:
    """The installed build's architectures and runtime, for backends()."""
    return f"{cuda_mod.architectures()}; {cuda_mod.runtime()}"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover - reported as unavailable above
        return "?"


def requested_backend(backend: str) -> str:
    """Validate a ``backend=`` argument; ``"auto"`` defers to ``$RESFUSE_BACKEND``."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR)
        if env:
            if env not in BACKEND_NAMES:
                raise ValueError(f"${ENV_VAR} must be one of {BACKEND_NAMES}, got {env!r}")
            return env
    return backend


def resolve(backend: str, device: torch.device, key: Optional[tuple] = None) -> str:
    """The concrete backend that runs a call on ``device``; raises if it cannot. ``key``,
    ``(family, norm, dtype, hidden, needs_grad)`` of the call (``auto_table``), lets
    ``"auto"`` choose per the measured table; without it auto takes its fallback rule."""
    backend = requested_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return _auto(device.type, key)
    if backend == "cpu":
        mod, err = _cpu_module()
        if mod is None or not mod.available():
            raise BackendUnavailableError(
                "backend='cpu' needs the compiled CPU extension, which is not available: "
                + (err or mod.unavailable_reason())
                + " (see resfuse.backends())"
            )
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend='cpu' runs on CPU tensors only, got {device}")
        return "cpu"
    if backend == "cuda":
        mod, err = _cuda_module()
        if mod is None or not mod.available():
            raise BackendUnavailableError(
                "backend='cuda' needs the compiled extension, which is not available: "
                + (err or mod.unavailable_reason())
                + " (see resfuse.backends())"
            )
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend='cuda' runs on CUDA tensors only, got {device}")
        return "cuda"
    # triton
    mod, err = _triton_module()
    if mod is None:
        raise BackendUnavailableError(f"backend='triton' needs a working triton install: {err}")
    if device.type != "cuda" and not _interpreter_active():
        raise BackendUnavailableError(
            f"backend='triton' runs on CUDA tensors (got {device}); CPU tensors only under "
            "TRITON_INTERPRET=1"
        )
    return "triton"


_CPU = torch.device("cpu")


def resolve_cpu(backend: str, key: Optional[tuple] = None) -> str:
    """``resolve(backend, torch.device("cpu"), key)`` by its shortest path for the common
    answers (the per-call path: without a device object and the checks that only concern
    other devices, about 8 us less per call on CPU with cold caches)."""
    requested = requested_backend(backend)
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return _auto("cpu", key)
    if requested == "cpu":
        mod = _IMPORTED.get("resfuse.cpu_ext", (None, ""))[0]
        if mod is not None and mod.available():
            return "cpu"
    return resolve(requested, _CPU)


def _cuda_loads() -> bool:
    mod, _ = _cuda_module()
    return mod is not None and mod.available()


def _triton_loads() -> bool:
    return _triton_module()[0] is not None


def _cpu_loads() -> bool:
    mod, _ = _cpu_module()
    return mod is not None and mod.available()


_LOADS = {"cuda": _cuda_loads, "triton": _triton_loads}


def _auto(device_type: str, key: Optional[tuple] = None) -> str:
    """The measured table's choice for ``key`` when it has one and that backend loads; else
    cuda when the extension loads, else triton (CUDA tensors). CPU tensors: the CPU kernels
    when their extension loads, else the reference."""
    if device_type != "cuda":
        return "cpu" if device_type == "cpu" and _cpu_loads() else "torch"
    measured = auto_table.measured_backend(key) if key is not None else None
    if measured is not None and _LOADS[measured]():
        return measured
    if _cuda_loads():
        return "cuda"
    return "triton" if _triton_loads() else "torch"


def implementation(name: str) -> ModuleType:
    """The module with ``forward`` / ``backward`` for a concrete backend name."""
    if name == "torch":  # the reference itself, behind the backend interface
        from . import reference

        return reference
    mod, err = {"triton": _triton_module, "cpu": _cpu_module}.get(name, _cuda_module)()
    if mod is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {err}")
    return mod
