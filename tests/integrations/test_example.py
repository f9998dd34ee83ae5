"""The example script runs: it patches a model, prints the report, trains, unpatches."""

import importlib.util
from pathlib import Path

from patch_fixtures import backend  # noqa: F401 (fixture)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "patch_and_train.py"


def test_patch_and_train_example(capsys):
    spec = importlib.util.spec_from_file_location("patch_and_train", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "1", "--fuse-residual", "across_layers"])
    out = capsys.readouterr().out
    assert (
        "resfuse.patch(LlamaForCausalLM, fuse_residual='across_layers'): 9 norms replaced, "
        "8 adds fused, 0 modules skipped" in out
    )
    line = next(line for line in out.splitlines() if line.startswith("step 0:"))
    patched, unpatched = float(line.split()[4]), float(line.split()[6])
    assert abs(patched - unpatched) <= 1e-5 * abs(unpatched)
    assert "unpatched: True" in out
