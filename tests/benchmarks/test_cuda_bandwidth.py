"""benchmarks/cuda_bandwidth.py without a GPU: each layout's forward and backward calls are
well-formed for the backend interface (the timing itself needs CUDA events: stubbed)."""

import pytest
import torch

from benchmarks import cuda_bandwidth


@pytest.mark.parametrize("layout", cuda_bandwidth.LAYOUTS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_bench_shape_calls_the_backend_for_every_layout(layout, norm, monkeypatch):
    calls = []

    def once(fn):
        calls.append(fn())
        return 1.0  # ms

    monkeypatch.setattr(cuda_bandwidth, "timed", once)
    res = cuda_bandwidth.bench_shape("torch", 4, 64, torch.float32, norm, layout, device="cpu")
    fwd, bwd = calls
    y, h, _, _ = fwd
    assert (y is None) == (layout == "norm_add") and h.shape == (4, 64)
    dx, dr, dw, db, dbs, dbw, dbb = bwd
    assert dx.shape == (4, 64) and dbs is None
    assert (dr is not None) == (layout == "norm_add_norm")
    assert (dw is not None) == (layout != "norm_add")
    assert (dbw is not None) == (layout != "add_norm")
    assert (dbb is not None) == (layout != "add_norm" and norm == "layer")
    fwd_tensors, bwd_tensors = cuda_bandwidth.TENSORS_MOVED[layout]
    assert res["fwd_GBps"] == pytest.approx(fwd_tensors * 4 * 64 * 4 / 1e6)
    assert res["bwd_GBps"] == pytest.approx(bwd_tensors * 4 * 64 * 4 / 1e6)
