"""Phase 7, report: from results.json (the bandwidth and model phases'), the benchmark report
(report.md and its PNG plots, benchmarks/report.py) and auto's table (auto_table.json,
benchmarks/build_auto_table.py: per op, dtype, direction and hidden size the faster of
resfuse-cuda and resfuse-triton). auto_table.json is always written: without both backends
measured (a CPU rehearsal, a GPU whose extension failed) it has no entries and says why.
`make gpu-campaign-import` installs a table with entries into resfuse/auto_tables/."""

from __future__ import annotations

from . import common, summary


def run(ctx: common.Context) -> dict:
    from benchmarks import build_auto_table, report

    results_path = ctx.run_dir / report.JSON_NAME
    if not results_path.exists():
        empty = {
            "format": 1,
            "entries": [],
            "why_empty": "no results.json: the bandwidth phase measured nothing",
        }
        common.write_json(ctx.run_dir / report.AUTO_TABLE_NAME, empty)
        (ctx.run_dir / report.REPORT_NAME).write_text(
            "# resfuse GPU campaign: no measurements\n\nThe bandwidth phase wrote no results "
            "(see summary.md and campaign/logs/bandwidth.log).\n"
        )
        return {"status": "failed", "summary": "no results.json to report on"}
    results = report.read_json(results_path)
    written = report.write_all(results, ctx.run_dir)
    table = build_auto_table.build(results)
    if table is None:
        table = {
            "format": 1,
            "device": results["meta"].get("device"),
            "slug": results["meta"].get("slug"),
            "entries": [],
            "why_empty": "no shape has both resfuse-cuda and resfuse-triton measured",
        }
        common.write_json(ctx.run_dir / report.AUTO_TABLE_NAME, table)
    picks = [e["backend"] for e in table["entries"]]
    headline = summary.headline(results)
    record = {
        "written": sorted(p.name for p in written.values()),
        "plots": results.get("plots", []),
        "auto_table_entries": len(picks),
        "auto_table_cuda": picks.count("cuda"),
        "headline": headline,
    }
    record["summary"] = (
        f"report.md, {len(record['plots'])} plots; auto table: {len(picks)} "
        f"entries"
        + (
            f" ({picks.count('cuda')} cuda, {picks.count('triton')} triton)"
            if picks
            else f" ({table.get('why_empty')})"
        )
    )
    record["status"] = "ok"
    return record
