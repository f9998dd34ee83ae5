"""The release workflow (.github/workflows/wheels.yml): actionlint-clean, and its jobs do what
the release process relies on (the build runs `make wheel-check` and uploads dist/, publishing
happens only for a pushed v* tag, after the build)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "wheels.yml"
# the venv's bin/ (not resolved: sys.executable may be a symlink out of the venv)
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def test_actionlint_clean():
    if not ACTIONLINT.is_file():
        pytest.skip(f"actionlint not installed next to the interpreter ({ACTIONLINT})")
    result = subprocess.run(
        [str(ACTIONLINT), str(WORKFLOW)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output == ""


@pytest.fixture(scope="module")
def workflow():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    return yaml.safe_load(WORKFLOW.read_text())


def _runs(job):
    return [step["run"] for step in job["steps"] if "run" in step]


def _uses(job, action):
    return [step for step in job["steps"] if step.get("uses", "").startswith(action + "@")]


def test_triggers(workflow):
    # YAML 1.1 reads the bare key `on` as the boolean True
    on = workflow.get("on", workflow.get(True))
    assert on["push"]["branches"] == ["main"]
    assert on["push"]["tags"] == ["v*"]
    assert "pull_request" in on and "workflow_dispatch" in on
    assert workflow["permissions"] == {"contents": "read"}


def test_build_job(workflow):
    build = workflow["jobs"]["build"]
    assert build["container"].startswith("quay.io/pypa/manylinux_2_28")
    assert any(run.split()[:2] == ["make", "wheel-check"] for run in _runs(build))
    (upload,) = _uses(build, "actions/upload-artifact")
    assert upload["with"]["name"] == "dist"
    paths = upload["with"]["path"].split()
    assert "dist/*.whl" in paths and "dist/*.tar.gz" in paths


def test_publish_job(workflow):
    publish = workflow["jobs"]["publish"]
    assert publish["needs"] in ("build", ["build"])
    assert "startsWith(github.ref, 'refs/tags/v')" in publish["if"]
    assert publish["permissions"] == {"id-token": "write"}
    environment = publish["environment"]
    assert (environment["name"] if isinstance(environment, dict) else environment) == "pypi"
    (download,) = _uses(publish, "actions/download-artifact")
    assert download["with"]["name"] == "dist"
    assert _uses(publish, "pypa/gh-action-pypi-publish")
