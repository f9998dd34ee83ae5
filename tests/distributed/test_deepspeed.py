"""resfuse under DeepSpeed ZeRO-3 on 2 CPU ranks (DeepSpeed's CPU accelerator over gloo),
the same comparison as test_engines.py: the patched tiny model against the unpatched one,
each in its own ZeRO-3 engine, logits and every (gathered) gradient over two steps.

ZeRO-3 partitions every module's parameters and gathers them in hooks around the module's
own call. resfuse therefore runs a fused add + norm *inside* the norm's call when the norm's
hooks are all ZeRO-3's (``engines.hook_owner``), and never fuses a layer's closing add with
the next layer's norm (that norm's parameters are not gathered while the layer runs).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed with gloo", allow_module_level=True)

pytest.importorskip("transformers")
pytest.importorskip(
    "deepspeed", reason="DeepSpeed is not installed (make install puts it in the venv)"
)

from distributed.world import World  # noqa: E402

ACROSS = "across_layers"


@pytest.fixture(scope="module")
def world():
    # the CPU accelerator is chosen before deepspeed is imported in each rank
    w = World("distributed.deepspeed_scenarios", env={"DS_ACCELERATOR": "cpu"}, start_timeout=300)
    yield w
    w.close()


# fused adds per step of the 2-layer tiny models under ZeRO-3, the same in both modes: each
# add whose norm follows it in the same layer fuses inside that norm's call (Llama: the
# attention add; BERT: both post-norm adds; Gemma2 / OLMo2: the add of each sandwich or
# reordered norm, the sandwich's branch norm then running on its own)
ADDS = {"llama": 2, "gemma2": 4, "olmo2": 4, "bert": 4}


@pytest.mark.parametrize(
    "arch,mode",
    [("llama", True), ("llama", ACROSS), ("gemma2", ACROSS), ("olmo2", ACROSS), ("bert", True)],
)
def test_zero3(world, arch, mode):
    results = world.run("zero3", timeout=300, arch=arch, mode=mode)
    for r in results:
        assert r["logits"] <= 1.0, f"logits differ: {r['logits']:.3g} x tolerance"
        assert r["grads"] <= 1.0, f"{r['worst_grad']} differs: {r['grads']:.3g} x tolerance"
        assert r["grads_compared"] > 0
        assert r["adds_per_step"] == [ADDS[arch]] * 2
    if mode == ACROSS:
        assert "not fused with" in results[0]["report"]
        assert "DeepSpeed ZeRO-3 partitions its parameters" in results[0]["report"]


def test_zero3_partitioned_before_patching(world):
    """Built under ZeRO-3's partitioning (transformers' from_config under HfDeepSpeedConfig),
    so resfuse.patch already sees partitioned parameters: the report says so at once."""
    r = world.run("zero3", timeout=300, arch="llama", mode=ACROSS, partitioned_at_build=True)[0]
    assert r["logits"] <= 1.0 and r["grads"] <= 1.0
    assert r["adds_per_step"] == [2, 2]
    assert "not fused with next layer's input_layernorm: DeepSpeed ZeRO-3" in r["report"]
    assert r["warnings"] == []  # known when patching: nothing to discover at run time
