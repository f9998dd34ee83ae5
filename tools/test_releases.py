"""The integration tests against several transformers releases, each in its own environment
beside the shared torch (``make test-releases``).

For each release an environment ``build/releases/transformers-<version>/`` is made once: a
venv whose ``.pth`` puts the main venv's site-packages (torch, timm, resfuse's editable
install) behind its own, into which pip installs that transformers release and the
huggingface-hub / tokenizers it needs. The suite ``tests/integrations`` then runs there, and
the patch report of every tiny model of the suite is collected: ``--table`` writes the
per-family table of the README (``docs/RELEASES.md``): what is fused on which release.

    python tools/test_releases.py [--releases 4.57.6 5.0.0 ...] [--table docs/RELEASES.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ("4.51.3", "4.57.6", "5.0.0", "5.10.4")
# requirements-dev.txt's release: the main venv's, tested by `make test`
PINNED = importlib.metadata.version("transformers")

_REPORT = r"""
import json, os, sys
sys.path[:0] = ["tests", "tests/integrations"]
os.environ["HF_HUB_OFFLINE"] = "1"
import transformers
from tiny_models import ARCHS
import resfuse
out = {}
for name, arch in ARCHS.items():
    try:
        model = arch.model()
    except BaseException as e:  # a family this release does not ship (pytest.skip)
        out[name] = {"absent": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        continue
    report = resfuse.patch(model, fuse_residual="across_layers")
    out[name] = {
        "norms": len(report.norms),
        "adds": len(report.fused),
        "fused": sorted({n.what for n in report.fused}),
        "unfused": sorted({n.what for n in report.unfused}),
        "skipped": sorted({f"{n.cls}: {n.what}" for n in report.skipped}),
    }
print("RESULT " + json.dumps({"transformers": transformers.__version__, "families": out}))
"""


def environment(version: str) -> Path:
    """The environment of ``version``, made on first use; returns its python."""
    env = ROOT / "build" / "releases" / f"transformers-{version}"
    python = env / "bin" / "python"
    marker = env / ".installed"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    own = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shared = site.getsitepackages()[0]
    lines = [shared]
    # the main venv's editable install of resfuse is a .pth import hook: run it here too
    for pth in sorted(Path(shared).glob("__editable__*.pth")):
        lines += [ln for ln in pth.read_text().splitlines() if ln.startswith("import ")]
    (Path(own) / "resfuse-shared.pth").write_text("\n".join(lines) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"transformers=={version}"], check=True
    )
    marker.touch()
    return python


def run(version: str, python: Path, pytest_args: list, tests: bool = True) -> dict:
    """The suite (unless ``tests`` is False: the report only) and the report on ``version``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    command = [str(python), "-m", "pytest", "tests/integrations", "-q", "-p", "no:cacheprovider"]
    if tests:
        ran = subprocess.run(
            command + pytest_args, cwd=ROOT, env=env, capture_output=True, text=True
        )
    else:  # the main venv: `make test` has just run the suite there
        ran = subprocess.CompletedProcess(command, 0, "(the suite of make test)", "")
    summary = (ran.stdout.strip().splitlines() or ["(no output)"])[-1]
    report = subprocess.run(
        [str(python), "-c", _REPORT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    lines = [ln for ln in report.stdout.splitlines() if ln.startswith("RESULT ")]
    if report.returncode == 0 and lines:
        families = json.loads(lines[-1][len("RESULT ") :])
    else:
        families = {"error": (report.stdout + report.stderr)[-2000:]}
    return {
        "release": version,
        "passed": ran.returncode == 0,
        "summary": summary,
        "seconds": round(time.monotonic() - start, 1),
        "output": ran.stdout[-6000:] if ran.returncode else "",
        "report": families,
    }


def _short(reason: str) -> str:
    """The gist of a refusal for a table cell: its innermost parenthesis (the first thing that
    did not match), else its end."""
    inner = reason.rsplit(" (", 1)[-1].rstrip(")") if reason.endswith(")") else reason
    inner = inner.replace("|", "/").replace("\n", " ")
    return inner if len(inner) <= 160 else inner[:157] + "..."


def table(results: list) -> str:
    """Markdown: per family (the tiny models of the suite), per release, what patch does."""
    releases = [r["release"] for r in results]
    families = []
    for r in results:
        for name in r["report"].get("families", {}):
            if name not in families:
                families.append(name)
    lines = [
        "# What `resfuse.patch` does per model family and transformers release",
        "",
        "Written by `python tools/test_releases.py --table docs/RELEASES.md` (`make "
        "test-releases`) from the patch reports of the test suite's tiny models, "
        '`fuse_residual="across_layers"`; every release listed also passed '
        "`tests/integrations` (logits and every gradient against the unpatched model, "
        "unpatch, state_dict round trips). Cells: adds fused and norms replaced; a reason where "
        "a layer was left alone (the whole reason is in the patch report).",
        "",
        "| family | " + " | ".join(releases) + " |",
        "| --- | " + " | ".join("---" for _ in releases) + " |",
    ]
    for name in families:
        cells = []
        for r in results:
            f = r["report"].get("families", {}).get(name)
            if f is None or "absent" in f:
                cells.append("not in this release")
            elif f["skipped"]:
                cells.append(f"{f['norms']} norms; layers left alone: " + _short(f["skipped"][0]))
            elif f["adds"] == 0 and f["unfused"]:
                cells.append(f"{f['norms']} norms; adds not fused: " + _short(f["unfused"][0]))
            else:
                cells.append(f"{f['adds']} adds fused, {f['norms']} norms")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", nargs="+", default=list(RELEASES))
    parser.add_argument("--table", type=Path, help="write the per-family markdown table here")
    parser.add_argument(
        "--with-pinned", action="store_true", help=f"also {PINNED}, in the main venv"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest")
    args = parser.parse_args()
    results = []
    for version in args.releases:
        python = environment(version)
        result = run(version, python, args.pytest_args)
        results.append(result)
        print(
            f"transformers {version}: {'ok' if result['passed'] else 'FAILED'}, {result['summary']} ({result['seconds']} s)",
            flush=True,
        )
        if not result["passed"]:
            print(result["output"])
    if args.with_pinned:
        result = run(PINNED, Path(sys.executable), args.pytest_args, tests=False)
        results.append(result)
        print(
            f"transformers {PINNED} (pinned): {'ok' if result['passed'] else 'FAILED'}, {result['summary']}"
        )
    out = ROOT / "build" / "releases" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if args.table:
        args.table.write_text(table(results))
        print(f"wrote {args.table}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
