"""GPU-only checks of both kernel backends (skipped without CUDA): streams, CUDA graphs, the
device guard, determinism with many programs. The numerical matrix (test_matrix.py), with
the sizes only a GPU affords, runs on the GPU with ``make test-gpu``."""

import pytest
import torch
from numerics import FULL, Case, run_case

import resfuse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [
    b for b in ("triton", "cuda") if torch.cuda.is_available() and resfuse.backends()[b].available
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_programs_are_deterministic(backend):
    case = Case(norm="layer", bias=True, dtype=torch.bfloat16, shape=(8192, 2048), **FULL)
    first = run_case(case, backend, "cuda", seed=1)
    second = run_case(case, backend, "cuda", seed=1)
    for name in first:
        assert torch.equal(first[name], second[name]), f"d{name} differs between runs"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backends_agree_on_gpu(backend):
    torch.manual_seed(0)
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(4096, device="cuda")
    y, h = resfuse.add_rms_norm(x, r, w, backend=backend)
    y_ref, h_ref = resfuse.add_rms_norm(x, r, w, backend="torch")
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream(backend):
    x = torch.randn(2048, 1024, device="cuda", requires_grad=True)
    r = torch.randn(2048, 1024, device="cuda")
    w = torch.randn(1024, device="cuda", requires_grad=True)
    y_ref, h_ref = resfuse.add_rms_norm(x, r, w, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y, h = resfuse.add_rms_norm(x, r, w, backend=backend)
        y.sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(2048, device="cuda")
    for _ in range(2):  # warm up: compile, allocate
        resfuse.add_rms_norm(x, r, w, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h = resfuse.add_rms_norm(x, r, w, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    y_ref, h_ref = resfuse.add_rms_norm(x, r, w, backend=backend)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_runs_on_the_inputs_device(backend):
    x = torch.randn(256, 1024, device="cuda:1")
    y, h = resfuse.add_rms_norm(x, x.clone(), torch.ones(1024, device="cuda:1"), backend=backend)
    assert y.device == x.device
    torch.testing.assert_close(h, 2 * x)


def test_auto_picks_a_kernel_backend():
    from resfuse.backend_registry import resolve

    assert resolve("auto", torch.device("cuda")) in ("cuda", "triton")
