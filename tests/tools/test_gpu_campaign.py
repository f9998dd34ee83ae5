"""The GPU campaign's machinery without a GPU (tools/gpu_campaign.py, tools/campaign/): the plan
fits the GPU window and names only things that exist, the correctness phase's test selection
and sharding, children stopped at their deadline with their own children, a stuck phase
stopped while the next one runs, what $OUT receives (at most 8 files, the archive whole), the
import of a returned run, the summary table. `make gpu-campaign-rehearsal` runs the whole
campaign on CPU; these tests pin its parts."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_campaign  # noqa: E402
import sanitize_cases  # noqa: E402

from benchmarks import implementations, traffic  # noqa: E402
from campaign import check, common, importer, install, plan, pytest_plugin, summary  # noqa: E402

# --------------------------------------------------------------------------- the plan


def test_the_deadlines_fit_the_gpu_window():
    assert plan.deadlines_total() <= plan.TOTAL_BUDGET_S < plan.COMMAND_LIMIT_S <= 600
    assert [p.name for p in plan.PHASES] == list(gpu_campaign.PHASE_MODULES)
    assert all(p.budget_s > 0 and p.rehearsal_budget_s >= p.budget_s for p in plan.PHASES)
    assert len(plan.OUT_FILES) <= plan.OUT_FILE_LIMIT and plan.ARCHIVE_NAME in plan.OUT_FILES


def test_every_phase_module_has_run():
    for module in gpu_campaign.PHASE_MODULES.values():
        assert callable(importlib.import_module(module).run), module


def test_the_plan_names_only_what_exists():
    for op in plan.BANDWIDTH_OPS + plan.AUTO_TABLE_OPS:
        assert op in traffic.OPS, op
    for scale in (plan.GPU_BANDWIDTH, plan.REHEARSAL_BANDWIDTH):
        assert scale.qk_norm[0] in traffic.OPS and scale.latency[0] in traffic.OPS
        assert set(scale.compile_ops) <= set(plan.BANDWIDTH_OPS)
        for name in scale.extra_impls + scale.latency_skip:
            assert name in implementations.BY_NAME, name
    for _, names in plan.PASSES:
        for name in names:
            assert name in implementations.BY_NAME, name
    for name in plan.LATENCY_IMPLS:
        assert name in implementations.BY_NAME, name
    for tool, cases in plan.SANITIZE:
        assert tool in ("memcheck", "racecheck", "synccheck", "initcheck")
        assert set(cases) <= set(sanitize_cases.NAMES), set(cases) - set(sanitize_cases.NAMES)
    for rule in plan.CORRECTNESS_RULES:
        path, _, function = rule.path.partition("::")
        source = ROOT / path
        assert source.exists(), path
        if function:
            names = {
                n.name
                for n in ast.walk(ast.parse(source.read_text()))
                if isinstance(n, ast.FunctionDef)
            }
            assert function in names, rule.path
        assert rule.backend in (None, "cuda", "triton") and rule.every >= 1


def test_gpu_shapes_are_about_2_27_elements_in_rows_of_16():
    for dtype, hidden in plan.GPU_BANDWIDTH.shapes:
        rows = plan.rows_for(hidden)
        assert rows % 16 == 0 and abs(rows * hidden / plan.ELEMENTS - 1) < 0.01, (hidden, rows)
    hiddens = [h for d, h in plan.GPU_BANDWIDTH.shapes if d == "bfloat16"]
    assert sorted(hiddens) == [1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536]
    assert ("float16", 4096) in plan.GPU_BANDWIDTH.shapes
    assert plan.GPU_BANDWIDTH.qk_norm == ("rms_norm", "bfloat16", 27030 * 24, 128)
    assert plan.GPU_BANDWIDTH.latency[2:] == (1, 4096)


def test_rehearsal_budget_override_is_rehearsal_only(monkeypatch):
    monkeypatch.setenv("RESFUSE_CAMPAIGN_BUDGETS", "env:3")
    assert plan.budget("env", rehearsal=True) == 3
    assert plan.budget("env", rehearsal=False) == plan.phase("env").budget_s


# --------------------------------------------------------------------------- correctness


def _item(nodeid, backend=None):
    callspec = SimpleNamespace(params={"backend": backend}) if backend else None
    return SimpleNamespace(nodeid=nodeid, callspec=callspec)


def test_select_keeps_by_file_function_backend_and_every():
    items = [
        _item(f"tests/a.py::test_x[{i}-{b}]", b) for i in range(6) for b in ("cuda", "triton")
    ] + [_item("tests/a.py::test_y"), _item("tests/b.py::test_z[1]")]
    rules = (
        plan.TestRule("tests/a.py::test_x", "cuda"),
        plan.TestRule("tests/a.py::test_x", "triton", 3),
        plan.TestRule("tests/b.py"),
    )
    kept, per_rule = pytest_plugin.select(items, rules)
    ids = [it.nodeid for it in kept]
    assert ids == [it.nodeid for it in items if it.nodeid in set(ids)]  # collection order
    assert sum("cuda" in i for i in ids) == 6 and sum("triton" in i for i in ids) == 2
    assert "tests/b.py::test_z[1]" in ids and "tests/a.py::test_y" not in ids
    assert [r["collected"] for r in per_rule] == [12, 12, 1]
    assert [r["kept"] for r in per_rule] == [6, 2, 1]
    limited, _ = pytest_plugin.select(items, rules, limit=1)
    assert len(limited) == 3
    # a file rule does not match another file with the same prefix
    assert not pytest_plugin.rule_matches(plan.TestRule("tests/a.py"), _item("tests/a.pyx::t"))


def test_correctness_summary_counts_what_was_not_reached():
    shard = [
        {"shard": "0/2", "selected_all_shards": 5, "rules": []},
        {"nodeid": "t1", "outcome": "passed", "seconds": 0.1, "message": ""},
        {"nodeid": "t2", "outcome": "failed", "seconds": 0.2, "message": "E boom"},
    ]
    other = [
        {"shard": "1/2", "selected_all_shards": 5, "rules": []},
        {"nodeid": "t3", "outcome": "not reached", "seconds": 0, "message": ""},
    ]
    from campaign import correctness

    s = correctness.summarise([shard, other])
    assert s["selected"] == 5 and s["reported"] == 3 and s["unreported"] == 2
    assert s["outcomes"] == {"passed": 1, "failed": 1, "not reached": 1}
    assert s["failures"][0]["nodeid"] == "t2"


# --------------------------------------------------------------------------- children


def test_a_child_past_its_deadline_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(marker)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    start = time.time()
    result = common.run_child(
        [sys.executable, "-c", code], timeout=2, echo=False, log_path=tmp_path / "child.log"
    )
    assert result.timed_out and time.time() - start < 15
    assert "started" in result.tail and "exit timeout" in (tmp_path / "child.log").read_text()
    pid = int(marker.read_text())
    time.sleep(0.5)
    assert not _alive(pid), "the child's own child outlived the deadline"


def _alive(pid: int) -> bool:
    """Running (a killed process whose parent died may linger as a zombie until reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_child_that_cannot_start_is_a_result():
    result = common.run_child(["/nonexistent/program"], timeout=5, echo=False)
    assert result.returncode == 127 and not result.ok


def test_a_stuck_phase_is_stopped_and_the_next_one_runs(tmp_path):
    env = dict(os.environ, RESFUSE_CAMPAIGN_STALL="env", RESFUSE_CAMPAIGN_BUDGETS="env:4,report:60")
    env.pop("OUT", None)
    out, run_dir = tmp_path / "out", tmp_path / "run"
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu_campaign.py"),
            "--rehearsal",
            "--only",
            "env",
            "report",
            "--out",
            str(out),
            "--run-dir",
            str(run_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert time.time() - start < 200, proc.stdout[-2000:]
    campaign = json.loads((out / "campaign.json").read_text())
    by = {p["phase"]: p for p in campaign["phases"]}
    assert by["env"]["status"] == "partial" and "deadline" in by["env"]["summary"]
    assert by["env"]["exit"] is None
    assert by["report"]["status"] == "failed"  # nothing was measured: it says so
    assert (out / "report.md").exists() and (out / "auto_table.json").exists()
    assert "| env | partial |" in proc.stdout[-3000:]  # the summary table is printed last
    assert proc.returncode == 1


# --------------------------------------------------------------------------- outputs


def _fake_run(run_dir: Path, slug="nvidia-h200", mode="gpu", entries=()):
    (run_dir / "campaign" / "logs").mkdir(parents=True)
    common.write_json(
        run_dir / "campaign" / "campaign.json",
        {
            "mode": mode,
            "phases": [{"phase": "env", "status": "ok", "summary": "x", "seconds": 1}],
            "elapsed_s": 1,
            "budget_s": 480,
        },
    )
    common.write_json(
        run_dir / "campaign" / "env.json", {"slug": slug, "device": {"name": "NVIDIA H200"}}
    )
    common.write_json(run_dir / "auto_table.json", {"format": 1, "entries": list(entries)})
    (run_dir / "report.md").write_text("# report\n")
    (run_dir / "campaign" / "logs" / "bandwidth.log").write_bytes(
        b"x" * (plan.LOG_LIMIT_BYTES + 100)
    )
    summary.write(run_dir, common.read_json(run_dir / "campaign" / "campaign.json"))
    (run_dir / "campaign.log").write_text("log\n")


def test_out_gets_at_most_8_files_and_the_whole_folder(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    _fake_run(run_dir)
    gpu_campaign.Publisher(run_dir, out, tmp_path / "results").publish()
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= plan.OUT_FILE_LIMIT
    assert set(files) == set(plan.OUT_FILES)
    with tarfile.open(out / plan.ARCHIVE_NAME) as tar:
        names = tar.getnames()
        assert "run/campaign/env.json" in names and "run/report.md" in names
        log = tar.extractfile("run/campaign/logs/bandwidth.log").read()
    assert len(log) < plan.LOG_LIMIT_BYTES + 200 and log.startswith(b"[... earlier lines")


def test_without_out_the_folder_goes_to_results_gpu(tmp_path):
    run_dir = tmp_path / "run"
    _fake_run(run_dir, slug="nvidia-h100-80gb-hbm3")
    gpu_campaign.Publisher(run_dir, None, tmp_path / "results").publish()
    assert (tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "campaign" / "env.json").exists()


def test_import_puts_results_and_table_in_place(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    entry = {
        "family": "add_norm",
        "norm": "rms",
        "dtype": "bfloat16",
        "direction": "fwd",
        "hidden": 4096,
        "backend": "cuda",
    }
    _fake_run(run_dir, entries=[entry])
    gpu_campaign.Publisher(run_dir, out, tmp_path / "results").publish()
    got = importer.import_run(out, tmp_path / "results", tmp_path / "tables")
    assert got["results"] == tmp_path / "results" / "nvidia-h200"
    assert (got["results"] / "report.md").exists()
    assert json.loads((tmp_path / "tables" / "nvidia-h200.json").read_text())["entries"] == [entry]


def test_import_refuses_a_rehearsal_and_skips_an_empty_table(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    _fake_run(run_dir, mode="rehearsal")
    gpu_campaign.Publisher(run_dir, out, tmp_path / "results").publish()
    with pytest.raises(SystemExit, match="rehearsal"):
        importer.import_run(out, tmp_path / "results", tmp_path / "tables")
    got = importer.import_run(out, tmp_path / "results", tmp_path / "tables", allow_rehearsal=True)
    assert got["table"] is None and not (tmp_path / "tables").exists()


def test_check_lists_what_is_missing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("no table\n")
    found = check.problems(out, tmp_path / "no-carry")
    assert any("make gpu-carry" in f for f in found)
    assert any("campaign.tar.gz missing" in f for f in found)
    assert any("summary.md has no phase table" in f for f in found)


def test_summary_headline_shows_each_implementation_at_4096():
    recs = [
        {
            "op": "add_rms_norm",
            "direction": "fwd",
            "dtype": "bfloat16",
            "hidden": 4096,
            "impl": impl,
            "gbps": g,
            "frac_copy": g / 4000,
            "error": None,
        }
        for impl, g in (("resfuse-cuda", 3800.0), ("eager-hf", 1000.0))
    ]
    recs.append(
        {
            "op": "add_rms_norm",
            "direction": "fwd",
            "dtype": "bfloat16",
            "hidden": 4096,
            "impl": "liger",
            "gbps": None,
            "frac_copy": None,
            "error": "unavailable: x",
        }
    )
    lines = summary.headline({"kernels": recs})
    assert lines[0].startswith("| bfloat16 D=4096 | resfuse-cuda | liger | eager-hf |")
    assert "| add_rms_norm fwd | 3,800 (95%) | n/a | 1,000 (25%) |" in lines


# --------------------------------------------------------------------------- install


def test_unpack_wheel_puts_scripts_on_a_bin_path(tmp_path):
    wheel = tmp_path / "tool-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tool/__init__.py", "")
        z.writestr("tool-1.0.data/scripts/tool", "#!/bin/sh\necho hi\n")
        z.writestr("tool-1.0.data/headers/x.h", "")
        z.writestr("tool-1.0.dist-info/METADATA", "")
    install.unpack_wheel(wheel, tmp_path / "site", scripts=tmp_path / "bin")
    assert (tmp_path / "site" / "tool" / "__init__.py").exists()
    assert os.access(tmp_path / "bin" / "tool", os.X_OK)
    assert not (tmp_path / "site" / "tool-1.0.data").exists()


def test_sources_digest_follows_csrc(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("1")
    (tmp_path / "setup.py").write_text("")
    first = common.sources_digest(tmp_path)
    (tmp_path / "csrc" / "a.cu").write_text("2")
    assert common.sources_digest(tmp_path) != first


def test_sanitize_cases_reject_unknown_names():
    with pytest.raises(SystemExit):
        sanitize_cases.main(["--only", "no_such_case", "--device", "cpu", "--backend", "torch"])


def test_campaign_code_has_no_undefined_names():
    """The GPU-only paths cannot run here: pyflakes reads them for typos and undefined names."""
    pyflakes = pytest.importorskip("pyflakes.api")
    import io

    from pyflakes import reporter as pyflakes_reporter

    out = io.StringIO()
    files = [
        ROOT / "tools" / "gpu_campaign.py",
        ROOT / "tools" / "sanitize_cases.py",
        *sorted((ROOT / "tools" / "campaign").glob("*.py")),
    ]
    found = sum(pyflakes.checkPath(str(f), pyflakes_reporter.Reporter(out, out)) for f in files)
    assert found == 0, out.getvalue()


def test_check_finds_bandwidth_paths_the_run_skipped(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    _fake_run(run_dir)
    common.write_json(
        run_dir / "results.json",
        {"kernels": [{"op": "add_rms_norm", "impl": "eager-hf", "direction": "fwd"}]},
    )
    gpu_campaign.Publisher(run_dir, out, tmp_path / "results").publish()
    found = check._coverage(out / plan.ARCHIVE_NAME)
    assert any(f.startswith("bandwidth pass resfuse: no record") for f in found)
    assert any(f.startswith("bandwidth pass compile: no record") for f in found)
    assert "results.json: no latency records" in found
    assert "report.md: no section '## Small-batch latency'" in found
