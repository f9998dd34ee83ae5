"""Build resfuse: the Python package, its Triton kernels (installed as resfuse.triton_kernels),
the CPU extension from csrc/cpu/ (resfuse._C_cpu) whenever a C++ compiler and torch >= 2.10
are there, and, when a CUDA build of torch and nvcc are present, the CUDA extension from
csrc/ (resfuse._C).

Environment:
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (default "8.0;8.6;8.9;9.0")
  MAX_JOBS                  parallel compile jobs (ninja)
  RESFUSE_SKIP_CUDA_BUILD=1   install without the CUDA extension
  RESFUSE_FORCE_CUDA_BUILD=1  a missing toolchain or a failed build is an error, not a warning
  RESFUSE_SKIP_CPU_BUILD=1    install without the CPU extension
  RESFUSE_FORCE_CPU_BUILD=1   a failed CPU build is an error, not a warning
  RESFUSE_PTXAS_LOG=path    also write ptxas's resource report (-Xptxas -v) of the build there
  RESFUSE_LINEINFO=1        keep source line info in the kernels (compute-sanitizer, profilers;
                            triples the size of the device code)
"""

import json
import os
import sys
import tempfile
import warnings

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0"
# The extension uses PyTorch's stable ABI as of this release: one build serves every
# torch >= 2.10 with the same CUDA major version (csrc/ops.cpp).
STABLE_ABI_TARGET = (2, 10)
CPU_SOURCES = [
    "csrc/cpu/ops_cpu.cpp",
    "csrc/cpu/add_norm_cpu.cpp",
    # the row loops, one file per instruction set (picked at run time)
    "csrc/cpu/add_norm_cpu_generic.cpp",
    "csrc/cpu/add_norm_cpu_avx2.cpp",
    "csrc/cpu/add_norm_cpu_avx512.cpp",
]
SOURCES = [
    "csrc/ops.cpp",
    "csrc/add_norm_fwd.cu",
    "csrc/add_norm_bwd.cu",
    "csrc/add_norm_bwd_branch_norm.cu",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


FORCE = _flag("RESFUSE_FORCE_CUDA_BUILD")
FORCE_CPU = _flag("RESFUSE_FORCE_CPU_BUILD")
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def _stable_abi_define() -> str:
    return "-DTORCH_TARGET_VERSION=0x%02x%02x000000000000" % STABLE_ABI_TARGET


def cpu_extension():
    """The CPU kernels' CppExtension, or None (with a warning saying why)."""
    if _flag("RESFUSE_SKIP_CPU_BUILD"):
        print("resfuse: RESFUSE_SKIP_CPU_BUILD=1, installing without the CPU extension")
        return None

    def skip(reason):
        if FORCE_CPU:
            sys.exit(f"RESFUSE_FORCE_CPU_BUILD=1 but the CPU extension cannot be built: {reason}")
        warnings.warn(f"resfuse: building without the CPU extension ({reason})")
        return None

    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001
        return skip(f"torch is not importable: {e}")
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < STABLE_ABI_TARGET:
        return skip(f"torch {torch.__version__} predates the stable ABI (torch >= 2.10)")
    return cpp_extension.CppExtension(
        "resfuse._C_cpu",
        CPU_SOURCES,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", _stable_abi_define()]},
        py_limited_api=True,
    )


def _skip(reason: str):
    if FORCE:
        sys.exit(f"RESFUSE_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
    warnings.warn(
        f"resfuse: building without the CUDA extension ({reason}); the 'cuda' backend "
        "will be unavailable"
    )
    return None


def cuda_extension():
    """The CUDAExtension, or None (with a warning saying why) when it cannot be built here."""
    if _flag("RESFUSE_SKIP_CUDA_BUILD"):
        print("resfuse: RESFUSE_SKIP_CUDA_BUILD=1, installing without the CUDA extension")
        return None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any broken torch means no extension
        return _skip(f"torch is not importable: {e}")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < STABLE_ABI_TARGET:
        return _skip(
            f"torch {torch.__version__} predates the stable ABI the extension uses "
            f"(torch >= {'.'.join(map(str, STABLE_ABI_TARGET))})"
        )
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return _skip("nvcc not found (set CUDA_HOME to a CUDA toolkit)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    common = ["-O3", _stable_abi_define(), "-DUSE_CUDA"]
    nvcc = common + ["-std=c++17"]
    if _flag("RESFUSE_LINEINFO"):
        nvcc.append("-lineinfo")
    if os.environ.get("RESFUSE_PTXAS_LOG"):
        nvcc.append("-Xptxas=-v")
    ext = cpp_extension.CUDAExtension(
        "resfuse._C",
        SOURCES,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": common, "nvcc": nvcc},
        py_limited_api=True,
    )
    if _release_toolkit(home) is not None:
        _link_runtime_statically(ext, home)
    return ext


def _release_toolkit(home: str):
    """The release toolkit's description (tools/cuda_toolkit.py) when CUDA_HOME is one."""
    path = os.path.join(home, "resfuse-toolkit.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _link_runtime_statically(ext, home: str) -> None:
    """The release build (tools/cuda_toolkit.py): the CUDA runtime linked in, its symbols kept
    private, and only the libraries the code uses recorded: the library then needs no
    libcudart of any version (it loads beside CUDA 12 and CUDA 13 builds of torch), only
    torch's stable C shim (libtorch_cpu, libtorch_cuda) and the driver."""
    # torch's libraries named explicitly (the linker keeps every -l it is given unless the
    # toolchain defaults to --as-needed, as Ubuntu's does and manylinux's does not): the C
    # shim is in libtorch_cpu, its CUDA stream query in libtorch_cuda
    ext.libraries = ["c10", "torch_cpu", "torch_cuda", "dl", "rt", "pthread"]
    ext.extra_objects = [os.path.join(home, "lib64", "libcudart_static.a")]
    # the runtime's symbols stay private: they neither clash with nor bind to torch's libcudart
    ext.extra_link_args = ["-Wl,--exclude-libs,ALL"]


def _build_info(torch) -> str:
    """resfuse/_cuda_build.json: what the extension is built against, shipped next to it
    (resfuse.cuda_ext.build_info() reads it for its messages)."""
    from torch.utils import cpp_extension

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
        "stable_abi_target": ".".join(map(str, STABLE_ABI_TARGET)),
    }
    toolkit = _release_toolkit(cpp_extension.CUDA_HOME or "")
    if toolkit is not None:  # a release build: no libcudart needed, whatever torch's CUDA is
        info["cuda"] = None
        info["cuda_runtime"] = "static"
        info["toolkit"] = toolkit
    else:
        info["cuda_runtime"] = f"libcudart.so.{str(torch.version.cuda).split('.')[0]}"
    return json.dumps(info, indent=1) + "\n"


def _write_build_info(package_dir: str):
    import torch

    with open(os.path.join(package_dir, "_cuda_build.json"), "w") as f:
        f.write(_build_info(torch))


def build_py_class():
    from setuptools.command.build_py import build_py

    class BuildPyWithBuildInfo(build_py):
        def run(self):
            super().run()
            _write_build_info(os.path.join(self.build_lib, "resfuse"))

    return BuildPyWithBuildInfo


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class BuildResfuseExtension(BuildExtension):
        """Builds each extension on its own: one that fails leaves the package without it
        (a warning; an error when forced), and keeps ptxas's report when asked."""

        def build_extensions(self):
            self._build_with_ptxas_log()

        def build_extension(self, ext):
            cuda = ext.name == "resfuse._C"
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                if FORCE if cuda else FORCE_CPU:
                    raise
                which, flag = ("CUDA", "FORCE_CUDA") if cuda else ("CPU", "FORCE_CPU")
                warnings.warn(
                    f"resfuse: the {which} extension failed to build ({e}); installing "
                    f"without it (RESFUSE_{flag}_BUILD=1 makes this an error)"
                )

        def _build_with_ptxas_log(self):
            log_path = os.environ.get("RESFUSE_PTXAS_LOG")
            if not log_path:
                return super().build_extensions()
            # torch runs ninja with its output on fd 1: capture it, then echo it. An
            # up-to-date build prints nothing from ptxas and keeps the previous log.
            sys.stdout.flush()
            saved = os.dup(1)
            with tempfile.TemporaryFile(mode="w+") as capture:
                os.dup2(capture.fileno(), 1)
                try:
                    super().build_extensions()
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    os.close(saved)
                    capture.seek(0)
                    text = capture.read()
                    sys.stdout.write(text)
                    if "ptxas info" in text:
                        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
                        with open(log_path, "w") as f:
                            f.write(text)

    return BuildResfuseExtension


extensions = [e for e in (cpu_extension(), cuda_extension()) if e is not None]
extension = next((e for e in extensions if e.name == "resfuse._C"), None)
extra = {}
if extensions:
    cmdclass = {"build_ext": build_ext_class()}
    if extension is not None:
        # editable installs and `setup.py build_ext --inplace` (the GPU campaign's fallback
        # build)
        if "editable_wheel" in sys.argv or "develop" in sys.argv or "--inplace" in sys.argv:
            _write_build_info(os.path.join(os.path.dirname(os.path.abspath(__file__)), "resfuse"))
        else:  # a wheel: next to the extension in the build tree, not into the sources
            cmdclass["build_py"] = build_py_class()
    extra = dict(
        ext_modules=extensions,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )

setup(
    name="resfuse",
    version="0.1.0",
    description="Fused residual add + RMSNorm/LayerNorm GPU kernels (CUDA C++ and Triton), "
    "forward and backward",
    long_description=open("README.md", encoding="utf-8").read()
    if os.path.exists("README.md")
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # triton_kernels/ installs inside the package: a top-level `triton_kernels` module
    # would shadow the Triton project's package of that name.
    packages=["resfuse", "resfuse.triton_kernels", "resfuse.integrations", "resfuse.benchmarks"],
    package_dir={
        "resfuse": "resfuse",
        "resfuse.triton_kernels": "triton_kernels",
        # benchmarks/ installs inside the package too (a top-level `benchmarks`
        # would be a generic name to squat on); `python -m benchmarks` still works
        # from a checkout
        "resfuse.benchmarks": "benchmarks",
    },
    # backend="auto"'s measured tables, one per GPU model (resfuse/auto_table.py)
    package_data={"resfuse": ["auto_tables/*.json"]},
    # the compiled extension's stable-ABI floor; the pure-Python package runs on older torch
    install_requires=["torch>=2.10" if extensions else "torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"], "bench": ["matplotlib", "tqdm", "pytest-benchmark"]},
    entry_points={"console_scripts": ["resfuse-bench = resfuse.benchmarks.cli:main"]},
    **extra,
)
