"""backend="auto" by the measured table (resfuse/auto_table.py): the lookup, its fallbacks,
the report, and that calls really run the backend the table names.

No GPU here: tables are written to a temporary folder for a made-up device name, and the
cuda and triton backends are stand-ins that record their calls and compute with the
reference, installed where the registry imports them (``backend_registry._IMPORTED``)."""

import json
import subprocess
import sys
import types

import pytest
import torch
from conftest import cpu_auto

import resfuse
from resfuse import auto_table, backend_registry, reference

DEVICE_NAME = "Test GPU 80GB"
SLUG = "test-gpu-80gb"
CUDA = torch.device("cuda")  # resolve() only reads the type: no CUDA tensor is made


def entry(hidden, backend, family="add_norm", norm="rms", dtype="float32", direction="fwd"):
    return {
        "family": family,
        "norm": norm,
        "dtype": dtype,
        "direction": direction,
        "hidden": hidden,
        "backend": backend,
        "cuda_ms": 1.0,
        "triton_ms": 1.0,
        "rows": [4096],
    }


def key(hidden, family="add_norm", norm="rms", dtype=torch.float32, needs_grad=False):
    return (family, norm, dtype, hidden, needs_grad)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """write(entries) installs a table for this 'device'; a fresh lookup state around it."""
    monkeypatch.setattr(auto_table, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(auto_table, "_device_name", lambda: DEVICE_NAME)
    auto_table.reset()

    def write(entries, text=None):
        path = tmp_path / f"{SLUG}.json"
        path.write_text(
            text
            if text is not None
            else json.dumps(
                {
                    "format": auto_table.FORMAT,
                    "device": DEVICE_NAME,
                    "slug": SLUG,
                    "entries": entries,
                }
            )
        )
        auto_table.reset()
        return path

    yield write
    auto_table.reset()


@pytest.fixture
def fake_backends(monkeypatch):
    """Both backends 'load'; each records (backend, forward|backward) and runs the reference.
    Returns (calls, set_loads) where set_loads(cuda=..., triton=...) makes one unavailable."""
    calls = []

    def fake(name):
        def recording(fn, what):
            def run(*args, **kwargs):
                calls.append((name, what))
                return fn(*args, **kwargs)

            return run

        return types.SimpleNamespace(
            forward=recording(reference.forward, "forward"),
            backward=recording(reference.backward, "backward"),
            available=lambda: True,
            unavailable_reason=lambda: "",
            # what backends() says of an installed CUDA build
            architectures=lambda: "sm_90",
            runtime=lambda: "CUDA runtime linked in",
        )

    def set_loads(cuda=True, triton=True):
        cuda_mod = fake("cuda")
        if not cuda:
            cuda_mod.available = lambda: False
        monkeypatch.setitem(backend_registry._IMPORTED, "resfuse.cuda_ext", (cuda_mod, ""))
        monkeypatch.setitem(
            backend_registry._IMPORTED,
            "resfuse.triton_kernels.launch",
            (fake("triton"), "") if triton else (None, "ImportError: test"),
        )

    set_loads()
    return calls, set_loads


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """auto treats these CPU tensors as CUDA ones: everything else, from the public call to
    the kernel module, is the real path."""
    real = backend_registry._auto
    monkeypatch.setattr(backend_registry, "_auto", lambda device_type, key=None: real("cuda", key))


# --------------------------------------------------------------------------- the lookup


def test_nearest_measured_hidden_on_a_log_scale(tables):
    tables([entry(1024, "cuda"), entry(4096, "triton"), entry(16384, "cuda")])
    table, reason = auto_table.current()
    assert reason == "" and len(table) == 3 and table.slug == SLUG
    expect = {
        1024: "cuda",
        4096: "triton",
        16384: "cuda",  # measured
        100: "cuda",
        10**6: "cuda",  # beyond either end: the end
        3000: "triton",
        2048: "cuda",  # halfway on a log scale: the tie goes to the smaller size
        9000: "cuda",  # nearer 16384 on a log scale (nearer 4096 on a linear one)
    }
    for hidden, backend in expect.items():
        assert table.choose(*key(hidden)) == backend, hidden
        assert auto_table.measured_backend(key(hidden)) == backend, hidden


def test_other_family_norm_dtype_or_direction_has_no_entry(tables):
    tables([entry(1024, "triton")])
    assert auto_table.measured_backend(key(1024)) == "triton"
    for other in (
        key(1024, family="norm_add_norm"),
        key(1024, norm="layer"),
        key(1024, dtype=torch.bfloat16),
        key(1024, needs_grad=True),
    ):
        assert auto_table.measured_backend(other) is None, other


def test_lookups_are_cached_per_key(tables, monkeypatch):
    tables([entry(1024, "triton")])
    seen = []
    choose = auto_table.Table.choose
    monkeypatch.setattr(
        auto_table.Table, "choose", lambda self, *k: seen.append(k) or choose(self, *k)
    )
    for _ in range(3):
        assert auto_table.measured_backend(key(1000)) == "triton"
        assert auto_table.measured_backend(key(1000, dtype=torch.float16)) is None
    assert len(seen) == 2 and auto_table._choices[key(1000)] == "triton"


def test_unknown_device_has_no_table(tables):
    table, reason = auto_table.current()
    assert table is None and reason == f"no measured table for {SLUG}"
    assert auto_table.measured_backend(key(1024)) is None


@pytest.mark.parametrize(
    "text,why",
    [
        ("{not json", "JSONDecodeError"),
        (json.dumps({"format": 99, "entries": []}), "format"),
        (json.dumps({"format": 1, "entries": [entry(1024, "torch")]}), "bad entry"),
        (json.dumps({"format": 1, "entries": [{"hidden": 1024}]}), "KeyError"),
    ],
)
def test_an_unusable_table_is_no_table_and_says_why(tables, fake_backends, text, why):
    tables(None, text=text)
    table, reason = auto_table.current()
    assert table is None and f"{SLUG}.json is unusable" in reason and why in reason
    assert backend_registry.resolve("auto", CUDA, key(1024)) == "cuda"  # the fallback
    assert reason in resfuse.backends()["auto"].reason


def test_no_cuda_device_means_no_table(monkeypatch):
    monkeypatch.setattr(auto_table, "_device_name", lambda: None)
    auto_table.reset()
    try:
        assert auto_table.current() == (None, "no CUDA device visible, so no measured table")
    finally:
        auto_table.reset()


def test_import_loads_no_table():
    code = (
        "import resfuse; from resfuse import auto_table; "
        "x = resfuse.rms_norm(__import__('torch').ones(2, 8), None); "
        "assert not auto_table._loaded and not auto_table._choices, auto_table._loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- resolve / _auto


def test_auto_follows_the_table_where_it_has_an_entry(tables, fake_backends):
    tables([entry(1024, "triton"), entry(8192, "cuda"), entry(1024, "cuda", direction="fwd+bwd")])
    assert backend_registry.resolve("auto", CUDA, key(1024)) == "triton"
    assert backend_registry.resolve("auto", CUDA, key(1024, needs_grad=True)) == "cuda"
    assert backend_registry.resolve("auto", CUDA, key(8192)) == "cuda"
    # no entry, no key: the rule (cuda when it loads); CPU tensors: never the table
    assert backend_registry.resolve("auto", CUDA, key(1024, norm="layer")) == "cuda"
    assert backend_registry.resolve("auto", CUDA) == "cuda"
    assert backend_registry.resolve("auto", torch.device("cpu"), key(1024)) == cpu_auto()


def test_an_unavailable_choice_falls_back_by_the_rule(tables, fake_backends):
    _, set_loads = fake_backends
    tables([entry(1024, "triton"), entry(8192, "cuda")])
    set_loads(triton=False)
    assert backend_registry._auto("cuda", key(1024)) == "cuda"
    set_loads(cuda=False)
    assert backend_registry._auto("cuda", key(8192)) == "triton"
    assert backend_registry._auto("cuda", key(1024)) == "triton"
    set_loads(cuda=False, triton=False)
    assert backend_registry._auto("cuda", key(1024)) == "torch"


def test_the_environment_still_overrides_auto(tables, fake_backends, monkeypatch):
    tables([entry(1024, "triton")])
    monkeypatch.setenv("RESFUSE_BACKEND", "torch")
    assert backend_registry.resolve("auto", CUDA, key(1024)) == "torch"


def test_backends_report_says_which_table(tables):
    tables([entry(1024, "triton"), entry(2048, "cuda")])
    line = resfuse.backends()["auto"].reason
    assert f"per the measured table for {SLUG} (2 entries)" in line
    assert line.endswith(f"CPU tensors: {cpu_auto()}")
    (auto_table.TABLE_DIR / f"{SLUG}.json").unlink()
    auto_table.reset()
    line = resfuse.backends()["auto"].reason
    assert f"no measured table for {SLUG}: cuda when the extension loads, else triton" in line


# --------------------------------------------------------------------------- end to end


def _inputs(D, requires_grad=False):
    g = torch.Generator().manual_seed(D)
    x, r = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    w, b = 1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, r, w, b)]


def test_calls_run_the_backend_the_table_names(tables, fake_backends, cpu_as_cuda):
    calls, _ = fake_backends
    tables(
        [
            entry(64, "triton"),
            entry(64, "cuda", direction="fwd+bwd"),
            entry(64, "cuda", family="norm_add_norm"),
            entry(64, "triton", family="norm"),
        ]
    )
    x, r, w, b = _inputs(64)
    y, h = resfuse.add_rms_norm(x, r, w, 1e-6)
    assert calls == [("triton", "forward")]
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (64,), w, 1e-6))

    calls.clear()  # a training call: the fwd+bwd entry, backward on the same backend
    x, r, w, b = _inputs(64, requires_grad=True)
    y, h = resfuse.add_rms_norm(x, r, w, 1e-6)
    (y.sum() + h.sum()).backward()
    assert calls == [("cuda", "forward"), ("cuda", "backward")]

    calls.clear()
    with torch.no_grad():
        resfuse.norm_add_norm(x, r, w, w, 1e-6, norm="rms")  # sandwich: its own entry
        resfuse.rms_norm(x, w)  # no residual: the norm family
        resfuse.add_layer_norm(x, r, w, b, 1e-5)  # no LayerNorm entry: the rule
        resfuse.add_rms_norm(x.half(), r.half(), w.half())  # no float16 entry either
    assert calls == [
        ("cuda", "forward"),
        ("triton", "forward"),
        ("cuda", "forward"),
        ("cuda", "forward"),
    ]


def test_explicit_backends_ignore_the_table(tables, fake_backends, monkeypatch):
    calls, _ = fake_backends
    tables([entry(64, "triton")])
    real = backend_registry.resolve
    monkeypatch.setattr(
        backend_registry,
        "resolve",  # as if these were CUDA tensors
        lambda backend, device, key=None: real(backend, CUDA, key),
    )
    x, r, w, _ = _inputs(64)
    resfuse.add_rms_norm(x, r, w, backend="cuda")
    resfuse.add_rms_norm(x, r, w, backend="torch")
    assert calls == [("cuda", "forward")]


def test_torch_compile_bakes_in_the_table_choice(tables, fake_backends, cpu_as_cuda):
    """The lookup runs at trace time (the first call is a compiled one: nothing cached) and
    its answer is a constant of a full graph; a hidden size the graph keeps symbolic gets
    the rule."""
    calls, _ = fake_backends
    tables([entry(64, "triton", direction="fwd+bwd")])
    torch._dynamo.reset()

    def block(x, r, w):
        return resfuse.add_rms_norm(x, r, w, 1e-6)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, r, w, _ = _inputs(64, requires_grad=True)
    y, h = compiled(x, r, w)
    (y.sum() + h.sum()).backward()
    assert calls == [("triton", "forward"), ("triton", "backward")]
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (64,), w, 1e-6))

    calls.clear()
    x, r, w, _ = _inputs(64, requires_grad=True)
    for t in (x, r):
        torch._dynamo.mark_dynamic(t, 1)
    torch._dynamo.mark_dynamic(w, 0)
    compiled(x, r, w)[0].sum().backward()
    assert calls == [("cuda", "forward"), ("cuda", "backward")]
    torch._dynamo.reset()
