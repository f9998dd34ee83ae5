"""Build resfuse: the Python package, its Triton kernels (installed as resfuse.triton_kernels)
and, when a CUDA build of torch and nvcc are present, the CUDA extension from csrc/."""

from setuptools import setup

setup(
    name="resfuse",
    version="0.1.0",
    description="Fused residual add + RMSNorm/LayerNorm GPU kernels (CUDA C++ and Triton), "
                "forward and backward",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # triton_kernels/ installs inside the package: a top-level `triton_kernels` module
    # would shadow the Triton project's package of that name.
    packages=["resfuse", "resfuse.triton_kernels", "resfuse.integrations", "resfuse.benchmarks"],
    package_dir={"resfuse": "resfuse", "resfuse.triton_kernels": "triton_kernels",
                 # benchmarks/ installs inside the package too (a top-level `benchmarks`
                 # would be a generic name to squat on); `python -m benchmarks` still works
                 # from a checkout
                 "resfuse.benchmarks": "benchmarks"},
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"],
                    "bench": ["matplotlib", "tqdm", "pytest-benchmark"]},
    entry_points={"console_scripts": ["resfuse-bench = resfuse.benchmarks.cli:main"]},
)
