"""The CUDA extension, without a GPU: compiled for sm_80 and sm_90 with no register spills in
its forward and backward kernels, its ops registered with the dispatcher (CUDA kernels and
fake implementations), and clear errors or fallbacks wherever it cannot run.

RESFUSE_REQUIRE_CUDA_EXT=1 (set by `make test`, whose install builds the extension) turns a
missing extension into a failure instead of skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_auto

import resfuse
from resfuse import backend_registry, cuda_ext
from resfuse.spec import AddNormSpec, Operands

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import ptxas_report  # noqa: E402

REQUIRED = os.environ.get("RESFUSE_REQUIRE_CUDA_EXT", "0") == "1"
LOAD_ERROR = cuda_ext._load()
needs_extension = pytest.mark.skipif(
    bool(LOAD_ERROR) and not REQUIRED, reason=f"CUDA extension not loaded: {LOAD_ERROR}"
)
ARCHS = ("sm_80", "sm_90")
# 6 dtype sets x {RMSNorm, LayerNorm}; the backward also x {plain, branch norm}
KERNELS = {"fwd": 12, "bwd": 24}


def test_extension_loads_when_required():
    if not REQUIRED:
        pytest.skip("RESFUSE_REQUIRE_CUDA_EXT is not set")
    assert LOAD_ERROR == "", LOAD_ERROR


@needs_extension
def test_ops_are_registered_with_cuda_kernels():
    for name in ("cuda_add_norm_fwd", "cuda_add_norm_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse::{name}", "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse::{name}", "CPU"), name
    # the core's Python custom ops share the namespace and are still there
    assert torch.ops.resfuse.add_norm.default and torch.ops.resfuse.add_norm_backward.default
    # the launch-layout query (tests/test_cuda_gpu.py, benchmark reports)
    schema = str(torch.ops.resfuse.cuda_row_layout.default._schema)
    assert schema == (
        "resfuse::cuda_row_layout(int device, int D, bool backward, bool branch_norm) -> int[]"
    ), schema


@needs_extension
def test_build_info_records_the_toolchain():
    info = cuda_ext.build_info()
    assert info["stable_abi_target"] == "2.10"
    # built with any torch >= 2.10 (it may differ from the running one: stable ABI), and
    # loadable only with the same CUDA major version (it links libcudart.so.<major>)
    assert tuple(int(v) for v in info["torch"].split("+")[0].split(".")[:2]) >= (2, 10)
    if info.get("cuda_runtime") == "static":  # the release toolkit's build: any CUDA major
        assert info["toolkit"]["driver_floor"]["machine_code"]
    else:
        assert info["cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["cuda_runtime"] == f"libcudart.so.{info['cuda'].split('.')[0]}"
    assert {"8.0", "9.0"} <= {a.replace("+PTX", "") for a in info["arch_list"].split(";")}


@needs_extension
def test_extension_is_limited_api_and_links_no_libtorch_python():
    """One library for every CPython >= 3.10 and every torch >= 2.10: no PyInit (it is loaded
    with torch.ops.load_library), no libtorch_python, only the stable C shim of libtorch."""
    import importlib.util

    origin = importlib.util.find_spec("resfuse._C").origin
    assert origin.endswith(".abi3.so"), origin
    try:
        needed = subprocess.run(["objdump", "-p", origin], capture_output=True, text=True).stdout
        symbols = subprocess.run(
            ["nm", "-D", "--undefined-only", origin], capture_output=True, text=True
        ).stdout
    except OSError:
        pytest.skip("binutils (objdump, nm) not available")
    assert "NEEDED" in needed and "libtorch_python" not in needed
    torch_symbols = [s.split()[-1] for s in symbols.splitlines() if "torch" in s or "c10" in s]
    # only C functions of the shim (aoti_torch_*, torch_*): no mangled C++ symbols of libtorch
    assert torch_symbols and all(s.startswith(("aoti_torch_", "torch_")) for s in torch_symbols), [
        s for s in torch_symbols if not s.startswith(("aoti_torch_", "torch_"))
    ]


@needs_extension
def test_fake_implementations_give_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd, bwd = torch.ops.resfuse.cuda_add_norm_fwd, torch.ops.resfuse.cuda_add_norm_bwd
    bf16, f32 = torch.bfloat16, torch.float32
    with FakeTensorMode():
        x = torch.empty(6, 40, device="cuda", dtype=bf16)
        w = torch.empty(40, device="cuda")
        # LayerNorm with a bias and a LayerScale tensor, an fp32 h and an fp16 y
        spec = AddNormSpec(
            norm="layer",
            eps=1e-5,
            has_bias=True,
            has_branch_scale=True,
            x_dtype=bf16,
            residual_dtype=bf16,
            h_dtype=f32,
            out_dtype=torch.float16,
        )
        y, h, mean, mean_x = fwd(x, x, w, w, w, None, None, None, *spec.flat())
        assert (y.shape, y.dtype, y.device.type) == ((6, 40), torch.float16, "cuda")
        assert (h.shape, h.dtype) == ((6, 40), f32)
        assert (mean.shape, mean.dtype) == ((6,), f32)
        assert mean_x.shape == (0,)
        grads = bwd(y, None, h, x, w, w, None, None, mean, None, *spec.flat())
        shapes = [(tuple(g.shape), g.dtype) for g in grads]
        assert shapes == [
            ((6, 40), bf16),
            ((6, 40), bf16),
            ((40,), f32),
            ((40,), f32),
            ((40,), f32),
            ((0,), f32),
            ((0,), f32),
        ]
        # norm_add (LayerNorm, branch bias): no y, no mean of h; h, mean_x; dx, dbranch_*
        spec = AddNormSpec(
            norm="layer",
            eps=1e-5,
            branch_norm=True,
            output_norm=False,
            has_weight=False,
            has_branch_weight=True,
            has_branch_bias=True,
            x_dtype=bf16,
            residual_dtype=bf16,
            h_dtype=bf16,
            out_dtype=bf16,
        )
        y, h, mean, mean_x = fwd(x, x, None, None, None, None, w, w, *spec.flat())
        assert [tuple(t.shape) for t in (y, h, mean, mean_x)] == [(0,), (6, 40), (0,), (6,)]
        grads = bwd(None, h, None, x, None, None, None, w, None, mean_x, *spec.flat())
        assert [tuple(g.shape) for g in grads] == [(6, 40), (0,), (0,), (0,), (0,), (40,), (40,)]


@needs_extension
def test_the_op_rejects_cpu_tensors():
    spec = AddNormSpec(has_residual=False, has_weight=False, store_h=False)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.resfuse.cuda_add_norm_fwd(
            torch.randn(2, 8), None, None, None, None, None, None, None, *spec.flat()
        )


def test_backend_cuda_on_cpu_tensors_is_a_clear_error():
    x, w = torch.randn(2, 3, 64), torch.ones(64)
    with pytest.raises(resfuse.BackendUnavailableError) as info:
        resfuse.add_rms_norm(x, torch.randn_like(x), w, backend="cuda")
    message = str(info.value)
    assert "cuda" in message
    if not LOAD_ERROR:
        assert "CUDA tensors only" in message


def _without_extension(monkeypatch, reason):
    monkeypatch.setitem(cuda_ext._state, "reason", reason)


def test_backend_cuda_without_the_extension_says_why(monkeypatch):
    _without_extension(monkeypatch, "the CUDA extension was not built (test)")
    with pytest.raises(resfuse.BackendUnavailableError, match="not built"):
        resfuse.rms_norm(torch.randn(2, 64), torch.ones(64), backend="cuda")
    report = resfuse.backends()
    assert not report["cuda"].available and "not built" in report["cuda"].reason
    with pytest.raises(RuntimeError, match="not built"):
        cuda_ext.forward(
            AddNormSpec(has_residual=False, has_weight=False, store_h=False),
            Operands(torch.randn(2, 8)),
        )


def test_auto_falls_back_without_the_extension(monkeypatch):
    _without_extension(monkeypatch, "the CUDA extension was not built (test)")
    assert backend_registry.resolve("auto", torch.device("cpu")) == cpu_auto()
    assert backend_registry.resolve("auto", torch.device("cuda")) == "triton"
    x = torch.randn(2, 3, 64)
    y = resfuse.rms_norm(x, torch.ones(64))  # auto on CPU: the CPU extension or the reference
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (64,), torch.ones(64), 1e-6))


def test_auto_picks_cuda_for_cuda_tensors_when_available(monkeypatch):
    monkeypatch.setitem(cuda_ext._state, "reason", "")
    monkeypatch.setattr(cuda_ext, "available", lambda: True)
    assert backend_registry.resolve("auto", torch.device("cuda")) == "cuda"
    assert backend_registry.resolve("auto", torch.device("cpu")) == cpu_auto()


def test_import_never_fails_without_the_extension():
    """A subprocess where the library file cannot be found: import works, backends() says why."""
    code = (
        "import importlib.util\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'resfuse._C' else find(name, *a)\n"
        "import resfuse\n"
        "status = resfuse.backends()['cuda']\n"
        "assert not status.available and 'not built' in status.reason, status\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- register spills


def _sources_mtime() -> float:
    return max(p.stat().st_mtime for p in (ROOT / "csrc").iterdir())


@pytest.fixture(scope="module")
def ptxas_kernels():
    """ptxas's report of the extension build (RESFUSE_PTXAS_LOG, written by `make install`)
    when it is current and covers both architectures; else the kernels compiled here."""
    log = Path(os.environ.get("RESFUSE_PTXAS_LOG", ROOT / "build" / "ptxas.log"))
    if log.exists() and log.stat().st_mtime >= _sources_mtime():
        kernels = ptxas_report.parse(log.read_text())
        if {k.arch for k in kernels} >= set(ARCHS):
            return "extension build log", kernels
    if not Path(ptxas_report.nvcc()).exists() and not REQUIRED:
        pytest.skip("no nvcc to compile the kernels")
    return "compiled by the test", ptxas_report.report((80, 90))


def _direction(k):
    name = k.short_name
    return (
        "fwd" if "add_norm_fwd_kernel" in name else "bwd" if "add_norm_bwd_kernel" in name else None
    )


def test_kernels_compile_for_sm80_and_sm90(ptxas_kernels):
    source, kernels = ptxas_kernels
    for arch in ARCHS:
        for direction in ("fwd", "bwd"):
            found = {k.name for k in kernels if k.arch == arch and _direction(k) == direction}
            assert len(found) == KERNELS[direction], (source, arch, direction, sorted(found))


def test_no_register_spills_in_forward_and_backward_kernels(ptxas_kernels):
    source, kernels = ptxas_kernels
    spilling = [k for k in kernels if _direction(k) and (k.spills or k.stack_bytes)]
    assert not spilling, f"register spills ({source}):\n" + "\n".join(
        f"{k.arch} {k.short_name}: {k.registers} registers, stack {k.stack_bytes} B, spill "
        f"stores {k.spill_store_bytes} B, loads {k.spill_load_bytes} B"
        for k in spilling
    )
    summary = {}
    for k in kernels:
        if _direction(k):
            key = (k.arch, _direction(k))
            summary[key] = max(summary.get(key, 0), k.registers)
    print(
        f"\nptxas ({source}), max registers: "
        + json.dumps({f"{a} {d}": r for (a, d), r in sorted(summary.items())})
    )


@needs_extension
def test_launch_limits_are_the_kernels_and_the_emulators():
    """cuda_ext.launch_limits() (no GPU needed) has every number csrc/add_norm_params.h lists,
    the same as the emulator's copy compiled from the same headers."""
    raw = torch.ops.resfuse.cuda_launch_limits()
    assert len(raw) == len(cuda_ext.LIMIT_NAMES)
    limits = cuda_ext.launch_limits()
    assert limits["fwd_block_row"] % (limits["fwd_max_threads"] * limits["chunk"]) == 0
    assert limits["bwd_block_row"] % (limits["bwd_max_threads"] * limits["chunk"]) == 0
    from conftest import emulator_unavailable

    if not emulator_unavailable():
        from conftest import BUILD_DIR
        from simt import sim_backend

        assert sim_backend.SimBackend(sim_backend.build(BUILD_DIR)).limits == limits
