"""The host-overhead micro-benchmark runs, and the eager path stays cheaper than the
dispatcher path it exists to avoid."""

from benchmarks import host_overhead


def test_host_overhead_report():
    results = host_overhead.measure(iters=100)
    assert len(results) == 5 and all(0 < us < 10_000 for us in results.values())
    # the dispatcher-free eager path is the reason the eager path exists: keep it cheaper
    assert (
        results["eager call + autograd.Function"] < results["custom op via dispatcher + autograd"]
    )
    assert results["eager call, no grad"] < results["custom op via dispatcher, no grad"]
    text = host_overhead.report(results)
    assert all(name in text for name in results)
