"""The release toolkit's pieces that run without building: the ptxas wrapper's relabelling of
CUDA 13's PTX for CUDA 12.9's ptxas, and what backends() says of a build's architectures.
(`make wheel-check` builds with the whole toolkit and checks the result.)"""

import os
import stat
import subprocess

import pytest

from resfuse import cuda_ext
from tools import cuda_toolkit


def _fake_packages(root):
    """The package files assemble() reads, with a ptxas that records the PTX it is given."""
    cu13 = root / "nvidia" / "cu13"
    for path in ("bin/nvcc", "bin/fatbinary", "include/crt/host_runtime.h", "nvvm/bin/cicc"):
        (cu13 / path).parent.mkdir(parents=True, exist_ok=True)
        (cu13 / path).write_text("")
    ptxas = root / "nvidia" / "cuda_nvcc" / "bin" / "ptxas"
    ptxas.parent.mkdir(parents=True)
    ptxas.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *.ptx) cat "$a";; esac; done\n')
    ptxas.chmod(ptxas.stat().st_mode | stat.S_IXUSR)
    for pkg in ("cuda_runtime", "cuda_nvcc", "cuda_cccl"):
        (root / "nvidia" / pkg / "include").mkdir(parents=True, exist_ok=True)
    (root / "nvidia" / "cuda_runtime" / "include" / "cuda_runtime.h").write_text("// 12.9\n")
    (root / "nvidia" / "cuda_runtime" / "lib").mkdir()
    for lib in ("libcudart_static.a", "libculibos.a"):
        (root / "nvidia" / "cuda_runtime" / "lib" / lib).write_text("")


def test_ptxas_wrapper_relabels_the_ptx_isa_in_place(tmp_path):
    _fake_packages(tmp_path / "pkgs")
    out = cuda_toolkit.assemble(str(tmp_path / "pkgs"), str(tmp_path / "toolkit"))
    ptx = tmp_path / "k.ptx"
    ptx.write_text(".version 9.0\n.target sm_120\n.address_size 64\n// .version 9.0 in a comment\n")
    run = subprocess.run(
        [os.path.join(out, "bin", "ptxas"), "-arch=sm_120", str(ptx), "-o", "k.cubin"],
        capture_output=True,
        text=True,
        check=True,
    )
    # 12.9's ptxas sees ISA 8.8; the file itself is rewritten (fatbinary embeds it next)
    assert run.stdout.splitlines()[0] == f".version {cuda_toolkit.ASSEMBLER_PTX_ISA}"
    assert ptx.read_text().splitlines()[0] == ".version 8.8"
    assert "// .version 9.0 in a comment" in ptx.read_text()  # only the directive changes


def test_toolkit_uses_the_129_headers_but_cuda_13s_host_stub_macros(tmp_path):
    _fake_packages(tmp_path / "pkgs")
    out = tmp_path / "toolkit"
    cuda_toolkit.assemble(str(tmp_path / "pkgs"), str(out))
    include = out / "include"
    assert os.path.realpath(include / "cuda_runtime.h").endswith(
        "cuda_runtime/include/cuda_runtime.h"
    )
    assert "/cu13/" in os.path.realpath(include / "crt" / "host_runtime.h")
    assert sorted(os.listdir(out / "lib64")) == ["libcudart_static.a", "libculibos.a"]
    assert cuda_toolkit.is_release_toolkit(str(out))
    profile = (out / "bin" / "nvcc.profile").read_text()
    assert f"TOP              = {out}" in profile and "cu13/nvvm/bin" in profile


def test_architectures_and_what_a_gpu_outside_them_gets(monkeypatch):
    monkeypatch.setattr(
        cuda_ext,
        "build_info",
        lambda: {
            "arch_list": "8.0;8.6;8.9;9.0;10.0;12.0+PTX",
            "cuda_runtime": "static",
            "toolkit": {"driver_floor": {"machine_code": "525.60.13"}},
        },
    )
    assert cuda_ext.architectures() == (
        "sm_80, sm_86, sm_89, sm_90, sm_100, sm_120 + PTX (compute_120)"
    )
    assert "driver >= 525.60.13" in cuda_ext.runtime()
    text = cuda_ext.outside_architectures(7, 5)
    assert "sm_75" in text and "Triton" in text and 'TORCH_CUDA_ARCH_LIST="7.5"' in text


@pytest.mark.parametrize("info", [{}, {"arch_list": ""}])
def test_architectures_unknown(monkeypatch, info):
    monkeypatch.setattr(cuda_ext, "build_info", lambda: info)
    assert cuda_ext.architectures() == "?"
