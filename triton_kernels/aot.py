"""Compile the add+norm kernels for a GPU target without a GPU, and read ptxas's resource use.

Used by the tests (compile errors for sm_80/sm_90, register spills at the default launch
configurations) and handy when tuning: ``python -m resfuse.triton_kernels.aot 8192 bf16``.
Must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels' JIT objects).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from resfuse.spec import AddNormSpec

from . import launch
from .add_norm_kernels import add_norm_bwd_kernel, add_norm_fwd_kernel

_TYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Pointer arguments and their element types; "act" is the activation dtype under test.
_FWD_POINTERS = {
    "X": "act",
    "R": "act",
    "W": "fp32",
    "B": "fp32",
    "BS": "fp32",
    "RS": "fp32",
    "WB": "fp32",
    "BB": "fp32",
    "Y": "act",
    "H": "act",
    "MEAN": "fp32",
    "MEAN_X": "fp32",
}
_BWD_POINTERS = {
    "DY": "act",
    "DH": "act",
    "H": "act",
    "X": "act",
    "W": "fp32",
    "BS": "fp32",
    "RS": "fp32",
    "WB": "fp32",
    "MEAN": "fp32",
    "MEAN_X": "fp32",
    "DX": "act",
    "DR": "act",
    "DW_PART": "fp32",
    "DB_PART": "fp32",
    "DBS_PART": "fp32",
    "DWB_PART": "fp32",
    "DBB_PART": "fp32",
}
_FLOATS = {"eps", "residual_scale", "branch_scale"}

# The calls whose kernels the tests and the table below compile, as resfuse describes them
# (resfuse.spec.AddNormSpec): every add + norm feature on (the largest register footprint
# of that family), the plain pre-norm add + RMSNorm users run most, the sandwich layout with
# every feature it allows, and OLMo2's norm_add.
SPECS = {
    "all": AddNormSpec(
        norm="layer",
        residual_scale=0.5,
        zero_centered_weight=True,
        has_bias=True,
        has_branch_scale=True,
        has_rowscale=True,
    ),
    "rms": AddNormSpec(norm="rms"),
    "norm_add_norm": AddNormSpec(
        norm="layer",
        zero_centered_weight=True,
        branch_norm=True,
        has_bias=True,
        has_branch_weight=True,
        has_branch_bias=True,
    ),
    "norm_add": AddNormSpec(
        norm="layer",
        branch_norm=True,
        output_norm=False,
        has_weight=False,
        has_branch_weight=True,
        has_branch_bias=True,
    ),
}


@dataclass
class Compiled:
    name: str
    arch: int
    ptx: str
    registers: int
    spill_stores: int
    spill_loads: int
    num_warps: int
    cubin: bytes = b""  # the binary Triton would load
    shared: int = 0  # dynamic shared memory per program (what the launcher sizes grids with)


def ptxas_path(arch: int = 90) -> str:
    """The ptxas Triton itself runs for ``arch`` (a newer one for sm_100+: ptxas-blackwell)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - another Triton layout: its bundled ptxas
        name = "ptxas-blackwell" if arch >= 100 else "ptxas"
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_kernel(
    direction: str, D: int, dtype: str = "bf16", arch: int = 90, spec: AddNormSpec | str = "all"
) -> Compiled:
    """Compile the forward or backward kernel of a call (a spec, or a name in SPECS) at its
    default launch configuration for D, as the launcher would (h's upstream gradient
    present in the backward)."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    if direction == "fwd":
        fn, pointers, cfg = (
            add_norm_fwd_kernel,
            _FWD_POINTERS,
            launch.fwd_config(D, spec.branch_norm),
        )
        constexprs = {"FLAGS": spec.flags}
    elif direction == "bwd":
        fn, pointers, cfg = (
            add_norm_bwd_kernel,
            _BWD_POINTERS,
            launch.bwd_config(
                D,
                reads_x=spec.reads_x_in_backward,
                register_sums=launch.register_sums_fit(spec, _TORCH_DTYPE[dtype]),
            ),
        )
        constexprs = {
            "FLAGS": spec.flags,
            "HAS_DH": True,
            "REGISTER_CHUNKS": cfg.register_chunks,
            "WEIGHTS_RESIDENT": cfg.weights_resident,
        }
    else:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    constexprs.update(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, SINGLE_PASS=cfg.single_pass)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            kind = pointers[name]
            signature[name] = "*" + _TYPE[dtype if kind == "act" else kind]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name == "D" or name.startswith("stride"):
                if D % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps}
    )
    ptx = compiled.asm["ptx"]
    regs, stores, loads = run_ptxas(ptx, arch)
    return Compiled(
        f"{fn.__name__}[D={D},{dtype}]",
        arch,
        ptx,
        regs,
        stores,
        loads,
        cfg.num_warps,
        compiled.asm.get("cubin", b""),
        int(compiled.metadata.shared),
    )


def run_ptxas(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) as ``ptxas -v`` reports them."""
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas_path(arch), f"-arch={sm}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = out.stderr + out.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spill.group(1)), int(spill.group(2))


# --------------------------------------------------------------------------- launches as made

# The static kernel model (tools/kernel_model.py) analyses each kernel at the launch the
# launcher itself makes: its arguments, constexprs and grid, not a restatement of them.
# plan_launch runs launch.forward / launch.backward on meta tensors with the kernel objects
# replaced by a recorder and the grid rule fed the resources of the binary compiled here for
# the target GPU (what launch._programs asks the loaded binary on a real device).


@dataclass
class LaunchPlan:
    """One launch of a Triton kernel as the launcher makes it on ``gpu``."""

    direction: str
    grid: int  # programs
    arguments: dict  # every argument by name: tensors (meta), ints, floats, constexprs
    num_warps: int
    config: "launch.LaunchConfig"
    compiled: Compiled  # the binary this launch runs
    ptx_arguments: list  # the argument names of the PTX's parameters, in order
    reread_bytes_per_element: int  # what the launcher told its grid rule
    sizing_registers: int  # the registers of the binary the grid was sized from


_COMPILED: dict = {}


def compile_call(kernel, args: tuple, kwargs: dict, arch: int) -> tuple[Compiled, list]:
    """Compile ``kernel`` for these arguments exactly as its JIT would on an ``arch`` GPU (the
    JIT's own binder: the integers' 16-divisibility and ==1 specialisation, the pointers'
    dtypes and alignment), without a GPU. Returns the binary and the names of its PTX
    parameters in order. Cached per specialisation."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jit = kernel
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(
        backend, kwargs, bound, specialization, options
    )
    key = (
        jit.fn.__name__,
        arch,
        tuple(signature.items()),
        tuple(sorted((str(k), repr(v)) for k, v in constexprs.items())),
        tuple(sorted((str(k), repr(v)) for k, v in attrs.items())),
        repr(sorted(options.__dict__.items())),
    )
    if key not in _COMPILED:
        src = ASTSource(jit, signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        regs, stores, loads = run_ptxas(ptx, arch)
        _COMPILED[key] = (
            Compiled(
                jit.fn.__name__,
                arch,
                ptx,
                regs,
                stores,
                loads,
                compiled.metadata.num_warps,
                compiled.asm.get("cubin", b""),
                int(compiled.metadata.shared),
            ),
            [name for name, kind in signature.items() if kind != "constexpr"],
        )
    return _COMPILED[key]


def plan_launch(
    direction: str, spec: AddNormSpec, tensors, gpu: "launch.Gpu", arch: int
) -> LaunchPlan:
    """The launch ``launch.forward(spec, tensors)`` (direction "fwd", tensors: Operands) or
    ``launch.backward(spec, tensors)`` ("bwd", BackwardInputs) makes on ``gpu`` (a
    ``launch.Gpu``), compiled for sm_``arch``: the launcher's own plan (plan_forward /
    plan_backward) with the binary's resources from this compile. The tensors may be meta
    tensors: only their shapes, strides and dtypes matter."""
    sized: dict = {}

    def sizing(kernel, args: tuple, kwargs: dict):
        compiled, _ = compile_call(kernel, args, kwargs, arch)
        sized["registers"] = compiled.registers
        return gpu, compiled.registers, compiled.shared

    if direction == "fwd":
        plan, _ = launch.plan_forward(spec, tensors, sizing)
    elif direction == "bwd":
        plan, _ = launch.plan_backward(spec, tensors, sizing)
    else:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    if plan is None:
        raise ValueError("no rows: nothing is launched")
    compiled, ptx_arguments = compile_call(plan.kernel, plan.args, plan.kwargs, arch)
    arguments = dict(zip(plan.kernel.arg_names, plan.args))
    arguments.update({k: v for k, v in plan.kwargs.items() if k in plan.kernel.arg_names})
    return LaunchPlan(
        direction,
        int(plan.programs),
        arguments,
        int(plan.kwargs.get("num_warps", compiled.num_warps)),
        plan.cfg,
        compiled,
        ptx_arguments,
        int(plan.reread_bytes_per_element),
        int(sized.get("registers", compiled.registers)),
    )


def main(argv: list[str]) -> None:
    Ds = [int(a) for a in argv if a.isdigit()] or [1024, 4096, 8192, 16384]
    dtypes = [a for a in argv if a in _TYPE] or ["bf16"]
    for arch in (80, 90):
        for dtype in dtypes:
            for D in Ds:
                for direction in ("fwd", "bwd"):
                    for name in ("all", "norm_add_norm"):
                        c = compile_kernel(direction, D, dtype, arch, name)
                        print(
                            f"sm_{arch} {direction} {name:<13} D={D:>6} {dtype}: "
                            f"{c.registers:>3} regs, {c.num_warps:>2} warps, "
                            f"spills {c.spill_stores}/{c.spill_loads} bytes"
                        )


if __name__ == "__main__":
    main(sys.argv[1:])
