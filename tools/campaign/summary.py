"""summary.md: what the campaign did and found, short enough to be the last thing it prints
(the device tool's reply shows only the end of the output): one line per phase, then the
headline bandwidth figures (bf16, hidden 4096, every implementation, % of the copy bandwidth
of the same run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import common, plan

HEADLINE_DTYPE, HEADLINE_HIDDEN = "bfloat16", 4096
HEADLINE_IMPLS = (
    "resfuse-cuda",
    "resfuse-triton",
    "liger",
    "flash-attn",
    "torch.compile",
    "eager-torch",
    "eager-hf",
)


def _results(run_dir: Path) -> Optional[dict]:
    path = run_dir / "results.json"
    try:
        return common.read_json(path) if path.exists() else None
    except ValueError:
        return None


def _env(run_dir: Path) -> dict:
    path = run_dir / common.PHASE_DIR / "env.json"
    try:
        return common.read_json(path) if path.exists() else {}
    except ValueError:
        return {}


def headline(
    results: dict, dtype: str = HEADLINE_DTYPE, hidden: int = HEADLINE_HIDDEN
) -> list[str]:
    """A table: per op and direction, each implementation's GB/s (% of copy) at one shape."""
    recs = {}
    for r in results.get("kernels", []):
        if r["dtype"] == dtype and r["hidden"] == hidden:
            recs[(r["op"], r["direction"], r["impl"])] = r
    impls = [i for i in HEADLINE_IMPLS if any(k[2] == i for k in recs)]
    if not impls:
        return []
    lines = [
        f"| {dtype} D={hidden} | " + " | ".join(impls) + " |",
        "| --- | " + " | ".join("---:" for _ in impls) + " |",
    ]
    for op in plan.BANDWIDTH_OPS:
        for direction in ("fwd", "bwd", "fwd+bwd"):
            cells = []
            for impl in impls:
                r = recs.get((op, direction, impl))
                if r is None:
                    cells.append("")
                elif r.get("gbps"):
                    cells.append(f"{r['gbps']:,.0f} ({100 * r['frac_copy']:.0f}%)")
                else:
                    cells.append(
                        "n/a"
                        if (r.get("error") or "").startswith(("unsupported", "unavailable"))
                        else "err"
                    )
            if any(cells):
                lines.append(f"| {op} {direction} | " + " | ".join(cells) + " |")
    return lines


def markdown(run_dir: Path, campaign: dict) -> str:
    env = _env(run_dir)
    device = env.get("device", {}).get("name") or env.get("device_name") or "?"
    lines = [
        f"# resfuse GPU campaign{' rehearsal (CPU)' if campaign.get('mode') == 'rehearsal' else ''}: {device}",
        "",
    ]
    facts = [
        f"started {campaign.get('started', '?')}",
        f"{campaign.get('elapsed_s', 0):.0f} s of {campaign.get('budget_s', 0):.0f}",
    ]
    if env.get("copy"):
        facts.append(f"copy bandwidth {env['copy']['bytes_per_s'] / 1e9:,.0f} GB/s (read + write)")
    if env.get("versions"):
        v = env["versions"]
        facts.append(f"torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}")
    lines += ["; ".join(facts), "", "| phase | status | s | result |", "| --- | --- | ---: | --- |"]
    for p in campaign.get("phases", []):
        text = (p.get("summary") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {p['phase']} | {p['status']} | {p.get('seconds', 0):.0f} | {text[:160]} |")
    results = _results(run_dir)
    table = headline(results) if results else []
    if table:
        lines += [
            "",
            "GB/s on the minimal bytes (% of the copy bandwidth of the same run):",
            "",
        ] + table
    lines += [
        "",
        "Full results: report.md, results.json, campaign/*.json and campaign/logs/ "
        f"(in {plan.ARCHIVE_NAME} where $OUT was used).",
    ]
    return "\n".join(lines) + "\n"


def write(run_dir: Path, campaign: dict) -> str:
    text = markdown(run_dir, campaign)
    tmp = run_dir / ".summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "summary.md")
    return text


def terminal(text: str, limit: int = 9000) -> str:
    """The summary as printed last: whole when it fits the reply's tail, else its start."""
    return text if len(text) <= limit else text[:limit] + "\n[... summary.md has the rest]"
