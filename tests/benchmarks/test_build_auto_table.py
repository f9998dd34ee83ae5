"""benchmarks/build_auto_table.py: auto's table from a run's results (synthetic GPU results: no
GPU here, and no measured numbers exist yet), the report's section on it, and the CLI
writing auto_table.json next to results.json."""

import json

import pytest
import torch

from benchmarks import build_auto_table as generator
from benchmarks import cli, report
from resfuse import auto_table


def rec(op, hidden, rows, impl, ms, direction="fwd", dtype="bfloat16", error=None):
    return {
        "op": op,
        "dtype": dtype,
        "rows": rows,
        "hidden": hidden,
        "direction": direction,
        "impl": impl,
        "bytes": 1,
        "median_ms": None if error else ms,
        "q20_ms": None,
        "q80_ms": None,
        "gbps": None if error else 1.0,
        "frac_copy": None if error else 0.5,
        "error": error,
    }


def pair(op, hidden, rows, cuda_ms, triton_ms, **kw):
    return [
        rec(op, hidden, rows, "resfuse-cuda", cuda_ms, **kw),
        rec(op, hidden, rows, "resfuse-triton", triton_ms, **kw),
    ]


def results(kernels):
    meta = {
        "label": "GPU",
        "device": "NVIDIA Test GPU",
        "slug": "nvidia-test-gpu",
        "device_detail": "1 SM",
        "date": "2026-01-01 00:00",
        "torch": "2.14",
        "triton": "3.8",
        "resfuse": "0.1.0",
        "python": "3.11",
        "command": "python -m benchmarks",
        "backends_summary": "",
    }
    impls = {
        name: {"family": "resfuse", "description": name, "unavailable": None}
        for name in ("resfuse-triton", "resfuse-cuda")
    }
    return {
        "meta": meta,
        "copy": {"bytes_per_s": 3e12, "buffer_bytes": 1 << 30, "median_ms": 0.7},
        "implementations": impls,
        "kernels": kernels,
        "transformer": [],
        "plots": [],
    }


def synthetic():
    return results(
        # cuda wins the two small row counts by 0.1 ms, triton the large one by 1 ms: the
        # sums (5.4 vs 4.6 ms) pick triton, as the time at stake says
        pair("add_rms_norm", 4096, 1024, 0.1, 0.2)
        + pair("add_rms_norm", 4096, 4096, 0.3, 0.4)
        + pair("add_rms_norm", 4096, 65536, 5.0, 4.0)
        # training: cuda; the backward alone is never an entry
        + pair("add_rms_norm", 4096, 4096, 1.0, 2.0, direction="fwd+bwd")
        + pair("add_rms_norm", 4096, 4096, 2.0, 1.0, direction="bwd")
        # a failed cuda record drops its row count from the comparison (triton's 0.1 there
        # is not counted)...
        + pair("norm_add_rms_norm", 8192, 4096, 2.0, 3.0)
        + [
            rec("norm_add_rms_norm", 8192, 16384, "resfuse-cuda", None, error="out of memory"),
            rec("norm_add_rms_norm", 8192, 16384, "resfuse-triton", 0.1),
        ]
        # ...and a shape with no error-free pair at all has no entry
        + [
            rec("rms_norm_add", 1024, 4096, "resfuse-cuda", None, error="unsupported: x"),
            rec("rms_norm_add", 1024, 4096, "resfuse-triton", 1.0),
            rec("add_layer_norm", 2048, 4096, "resfuse-triton", 1.0),
        ]  # triton alone
        # the other families, and other implementations (ignored)
        + pair("rms_norm_add", 2048, 4096, 1.0, 0.5)
        + pair("layer_norm", 768, 4096, 0.5, 1.0)
        + pair("norm_add_layer_norm", 768, 4096, 1.0, 0.5, dtype="float16")
        + [rec("add_rms_norm", 4096, 4096, "eager-hf", 0.01)]
    )


def test_build_picks_the_faster_by_the_sum_over_rows():
    table = generator.build(synthetic())
    assert table["format"] == auto_table.FORMAT and table["slug"] == "nvidia-test-gpu"
    assert table["source"]["command"] == "python -m benchmarks"
    got = {(e["op"], e["direction"], e["hidden"]): e for e in table["entries"]}
    assert set(got) == {
        ("add_rms_norm", "fwd", 4096),
        ("add_rms_norm", "fwd+bwd", 4096),
        ("norm_add_rms_norm", "fwd", 8192),
        ("rms_norm_add", "fwd", 2048),
        ("layer_norm", "fwd", 768),
        ("norm_add_layer_norm", "fwd", 768),
    }
    fwd = got[("add_rms_norm", "fwd", 4096)]
    assert fwd["backend"] == "triton" and fwd["rows"] == [1024, 4096, 65536]
    assert fwd["cuda_ms"] == pytest.approx(5.4) and fwd["triton_ms"] == pytest.approx(4.6)
    assert (fwd["family"], fwd["norm"], fwd["dtype"]) == ("add_norm", "rms", "bfloat16")
    assert got[("add_rms_norm", "fwd+bwd", 4096)]["backend"] == "cuda"
    sandwich = got[("norm_add_rms_norm", "fwd", 8192)]
    assert sandwich["backend"] == "cuda" and sandwich["rows"] == [4096]
    assert sandwich["family"] == "norm_add_norm"
    assert (
        got[("rms_norm_add", "fwd", 2048)]["family"],
        got[("layer_norm", "fwd", 768)]["family"],
        got[("norm_add_layer_norm", "fwd", 768)]["norm"],
    ) == ("norm_add", "norm", "layer")


def test_no_pair_no_table():
    cpu_like = results(
        [
            rec("add_rms_norm", 64, 64, "resfuse-triton", None, error="unavailable: no GPU"),
            rec("add_rms_norm", 64, 64, "resfuse-torch", 1.0),
        ]
    )
    assert generator.build(cpu_like) is None
    assert "## auto's choice" not in report.markdown(cpu_like)


def test_the_written_table_is_what_auto_reads(tmp_path, monkeypatch):
    """main() with the default output: the package's table folder, under the run's slug;
    the loader then answers from it."""
    source = tmp_path / "results.json"
    source.write_text(json.dumps(synthetic()))
    monkeypatch.setattr(auto_table, "TABLE_DIR", tmp_path / "tables")
    path = generator.main([str(source)])
    assert path == tmp_path / "tables" / "nvidia-test-gpu.json"
    table, reason = auto_table.load(path)
    assert reason == "" and len(table) == 6
    assert table.choose("add_norm", "rms", torch.bfloat16, 5000, False) == "triton"
    assert table.choose("add_norm", "rms", torch.bfloat16, 5000, True) == "cuda"
    assert table.choose("norm_add_norm", "rms", torch.bfloat16, 16384, False) == "cuda"
    assert table.choose("norm_add", "rms", torch.bfloat16, 2048, False) == "triton"
    assert table.choose("norm", "layer", torch.bfloat16, 768, False) == "cuda"
    assert table.choose("add_norm", "layer", torch.bfloat16, 2048, False) is None
    out = generator.main([str(source), "-o", str(tmp_path / "elsewhere.json")])
    assert json.loads(out.read_text()) == json.loads(path.read_text())


def test_main_refuses_a_run_without_both_backends(tmp_path):
    source = tmp_path / "results.json"
    source.write_text(json.dumps(results([rec("add_rms_norm", 64, 64, "resfuse-triton", 1.0)])))
    with pytest.raises(SystemExit, match="both resfuse-cuda and resfuse-triton"):
        generator.main([str(source), "-o", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


def test_cli_writes_auto_table_next_to_results_and_reports_the_picks(tmp_path):
    """The CLI's writers on a GPU run's results (--report-only: the run's JSON is given)."""
    report.write_json(synthetic(), tmp_path / report.JSON_NAME)
    cli.run(["--out", str(tmp_path), "--report-only"])
    written = json.loads((tmp_path / report.AUTO_TABLE_NAME).read_text())
    assert written == generator.build(synthetic())
    text = (tmp_path / report.REPORT_NAME).read_text()
    section = text[text.index("## auto's choice") : text.index("## Kernels")]
    assert "| add_rms_norm | bfloat16 | forward | 4,096 | 5.400 | 4.600 | `triton` |" in section
    assert (
        "| add_rms_norm | bfloat16 | forward + backward | 4,096 | 1.000 | 2.000 | `cuda` |"
        in section
    )
    assert "backward |" not in section.replace("forward + backward |", "")


def test_write_all_writes_no_table_without_both_backends(tmp_path):
    written = report.write_all(
        results([rec("add_rms_norm", 64, 64, "resfuse-triton", 1.0)]), tmp_path
    )
    assert "auto_table" not in written and not (tmp_path / report.AUTO_TABLE_NAME).exists()


def test_the_benchmarks_name_devices_as_the_tables_do():
    assert cli.slug is auto_table.slug
