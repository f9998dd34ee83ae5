"""The CPU timer measures what it is given, and not its untimed setup."""

import time

import torch

from benchmarks import timing

SETTINGS = timing.TimerSettings(cpu_budget_s=0.05, cpu_min_calls=3, cpu_max_calls=10)


def test_cpu_timer_measures_the_call():
    t = timing.time_cpu(lambda: time.sleep(0.004), SETTINGS)
    assert 0.004 <= t.median_s < 0.05
    assert t.q20_s <= t.median_s <= t.q80_s
    assert 3 <= t.calls <= 10


def test_setup_is_not_timed_and_feeds_the_call():
    seen = []

    def setup():
        time.sleep(0.03)
        return "from setup"

    t = timing.time_fn(lambda arg: seen.append(arg), torch.device("cpu"), SETTINGS, setup=setup)
    assert t.median_s < 0.01
    assert seen and set(seen) == {"from setup"}


def test_copy_bandwidth_counts_read_and_write():
    result = timing.copy_bandwidth(torch.device("cpu"), nbytes=8 << 20, settings=SETTINGS)
    assert result["buffer_bytes"] == 8 << 20
    # 2 x 8 MiB moved in the median time
    assert abs(result["bytes_per_s"] * result["median_ms"] / 1e3 - 2 * (8 << 20)) < 1e3
    assert result["bytes_per_s"] > 1e8


def test_interleaved_timer_rotates_and_isolates_a_failing_call():
    order = []

    def call(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)

        return fn

    def broken():
        order.append("broken")
        raise RuntimeError("no kernel")

    calls = {
        "slow": (call("slow", 0.004), None),
        "fast": (call("fast", 0.001), None),
        "broken": (broken, None),
    }
    out = timing.time_cpu_interleaved(calls, SETTINGS)
    assert isinstance(out["broken"], RuntimeError) and order.count("broken") == 1
    assert 0.004 <= out["slow"].median_s < 0.05 and 0.001 <= out["fast"].median_s < 0.004
    assert out["slow"].calls == out["fast"].calls and 3 <= out["slow"].calls <= 10
    # warm-ups first, then rounds whose order rotates: no call always follows the same one
    rounds = order[3:]
    pairs = [tuple(rounds[i : i + 2]) for i in range(0, len(rounds), 2)]
    assert ("slow", "fast") in pairs and ("fast", "slow") in pairs


def test_interleaved_timer_times_the_call_not_its_setup():
    seen = []

    def setup():
        time.sleep(0.02)
        return 7

    out = timing.time_cpu_interleaved({"a": (seen.append, setup)}, SETTINGS)
    assert out["a"].median_s < 0.01 and set(seen) == {7}
