"""Triton kernels of resfuse (installed as ``resfuse.triton_kernels``)."""
