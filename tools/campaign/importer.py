"""``make gpu-campaign-import FROM=<folder>``: after a GPU campaign, put what came back where
it is committed: the results folder (from campaign.tar.gz) into benchmarks/results/<gpu>/,
and auto's table, when it has entries, into resfuse/auto_tables/<gpu>.json.

    python tools/campaign/importer.py FROM [--results-root benchmarks/results] [--tables DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from campaign import common, plan  # noqa: E402
else:
    from . import common, plan


def import_run(
    source: Path, results_root: Path, tables: Path, allow_rehearsal: bool = False
) -> dict:
    archive = source / plan.ARCHIVE_NAME if source.is_dir() else source
    if not archive.exists():
        raise SystemExit(f"no {plan.ARCHIVE_NAME} in {source}")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():  # the archive's own folder only, plain files
                if (
                    not member.isfile()
                    or member.name.startswith("/")
                    or ".." in Path(member.name).parts
                ):
                    raise SystemExit(f"{archive}: unexpected member {member.name!r}")
            try:
                tar.extractall(tmp, filter="data")
            except TypeError:  # Python without extraction filters: members checked above
                tar.extractall(tmp)
        roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(roots) != 1:
            raise SystemExit(f"{archive}: expected one folder, found {[p.name for p in roots]}")
        run = roots[0]
        campaign = common.read_json(run / common.PHASE_DIR / "campaign.json")
        if campaign.get("mode") == "rehearsal" and not allow_rehearsal:
            raise SystemExit(f"{archive} is a CPU rehearsal, not a GPU run: not imported")
        env = common.read_json(run / common.PHASE_DIR / "env.json")
        slug = env["slug"]
        dest = results_root / slug
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(run, dest)
    out = {"results": dest, "slug": slug, "table": None}
    table_path = dest / "auto_table.json"
    if table_path.exists():
        table = common.read_json(table_path)
        if table.get("entries"):
            tables.mkdir(parents=True, exist_ok=True)
            out["table"] = tables / f"{slug}.json"
            shutil.copyfile(table_path, out["table"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("source", type=Path, help="the folder the campaign's files came back to")
    ap.add_argument("--results-root", type=Path, default=common.ROOT / "benchmarks" / "results")
    ap.add_argument("--tables", type=Path, default=common.ROOT / "resfuse" / "auto_tables")
    ap.add_argument("--allow-rehearsal", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = import_run(args.source, args.results_root, args.tables, args.allow_rehearsal)
    print(f"results: {out['results']}")
    print(f"auto table: {out['table'] or 'none (no entries: nothing measured both backends)'}")
    print((out["results"] / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
