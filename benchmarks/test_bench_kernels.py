"""pytest-benchmark suite of the kernels, for tracking between commits
(``pytest benchmarks --benchmark-only --benchmark-autosave``, then ``--benchmark-compare``).

Each test times one (op, direction, dtype, shape, implementation) with pytest-benchmark's
wall clock around the call plus a ``torch.cuda.synchronize()`` (a few microseconds of launch
and sync overhead on top of the kernel); ``extra_info`` carries the minimal bytes and the
GB/s. The report (``python -m benchmarks``) is the reference for absolute numbers: CUDA
events, L2 flushed, the copy bandwidth measured alongside. Shapes: the target range (hidden
1K-16K, at least 2^25 elements).
"""

import pytest
import torch

from benchmarks import implementations, kernels
from benchmarks.traffic import DIRECTIONS, OPS, minimal_bytes

SHAPES = [(32768, 1024), (8192, 4096), (4096, 8192), (4096, 16384)]
DTYPES = ["bfloat16", "float16"]
IMPLS = [i.name for i in implementations.IMPLEMENTATIONS]


def _prepare(op, dtype, rows, hidden, impl_name):
    device = torch.device("cuda")
    impl = implementations.BY_NAME[impl_name]
    reason = impl.unavailable(device)
    if reason:
        pytest.skip(f"{impl_name}: {reason}")
    try:
        fn = impl.make(op)
    except implementations.Unsupported as e:
        pytest.skip(f"{impl_name}: {e}")
    torch_dtype = kernels.DTYPES[dtype]
    small = kernels.make_inputs(op, torch_dtype, kernels.CHECK_ROWS, hidden, device, seed=1)
    wrong = implementations.check(op, fn, small.args, small.grads())
    assert wrong is None, f"{impl_name} computes {op} wrongly: {wrong}"
    return fn, kernels.make_inputs(op, torch_dtype, rows, hidden, device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{h}" for r, h in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("op", OPS)
def test_kernel(benchmark, op, direction, dtype, shape, impl):
    rows, hidden = shape
    benchmark.group = f"{op} {direction} {dtype} {rows}x{hidden}"
    fn, inputs = _prepare(op, dtype, rows, hidden, impl)
    call, setup = kernels.timed_call(fn, inputs, direction)

    def target(*args):
        call(*args)
        torch.cuda.synchronize()

    if setup is None:
        benchmark.pedantic(target, rounds=50, warmup_rounds=5)
    else:

        def untimed_forward():
            outs = setup()
            torch.cuda.synchronize()  # the forward's kernels must not land in the timed call
            return (outs,), {}

        benchmark.pedantic(target, setup=untimed_forward, rounds=30, warmup_rounds=3)
    nbytes = minimal_bytes(op, direction, rows, hidden, kernels.DTYPES[dtype])
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats["median"] / 1e9
