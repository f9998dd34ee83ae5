"""resfuse under the engines people train with, on 2 CPU ranks over gloo: FSDP2, DDP,
activation checkpointing, DTensor tensor + sequence parallelism, and the ops on DTensors.

Every engine case trains a patched tiny model next to an unpatched one under the same
engine (tests/distributed/scenarios.py) and requires the logits and every gradient to match
(fp32, up to reassociation), and the number of fused adds each step to be what the engine
allows: never a crash, never a silently different result, and the report saying what ran.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed with gloo", allow_module_level=True)

pytest.importorskip("transformers")

from distributed.world import World  # noqa: E402

ACROSS = "across_layers"


@pytest.fixture(scope="module")
def world():
    w = World("distributed.scenarios")
    yield w
    w.close()


def _matches(result: dict) -> None:
    # errors are in units of the tolerance (rel 1e-4 of |e| + max|e|): <= 1 passes
    assert result["logits"] <= 1.0, f"logits differ: {result['logits']:.3g} x tolerance"
    assert result["grads"] <= 1.0, f"a gradient differs: {result['grads']:.3g} x tolerance"
    assert result["grads_compared"] > 0


def _same_on_every_rank(results: list, key: str):
    assert all(r[key] == results[0][key] for r in results), f"{key} differs between ranks"
    return results[0][key]


# --------------------------------------------------------------------------- FSDP2

# fused adds per training step of the 2-layer tiny models (both ranks), per mode: Llama fuses
# the attention add in each layer; Gemma2 the attention add (norm_add_norm) and the closing
# add with its own branch norm (norm_add). Across layers under per-layer fully_shard the
# closing add cannot reach the next layer's norm (sharded on its own) nor the final norm
# (the layer's backward must start at its output), so the counts are per-layer ones.
PER_LAYER_ADDS = {"llama": 2, "gemma2": 4}


@pytest.mark.parametrize("reshard_after_forward", [True, False])
@pytest.mark.parametrize("mode", [True, ACROSS])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fsdp2_per_layer(world, arch, mode, reshard_after_forward):
    results = world.run("fsdp2", arch=arch, mode=mode, reshard_after_forward=reshard_after_forward)
    for r in results:
        _matches(r)
        assert r["adds_per_step"] == [PER_LAYER_ADDS[arch]] * 2
    r = results[0]
    if mode == ACROSS:
        # the report now says why, and one warning per reason said so
        assert "not fused with next layer's input_layernorm: FSDP2 shards" in r["report"]
        assert "final norm: FSDP2 shards" in r["report"]
        assert any("FSDP2" in w for w in r["warnings"])
    else:
        assert r["warnings"] == []


def test_fsdp2_root_only_keeps_the_fusion_across_layers(world):
    """fully_shard on the root only: every parameter is gathered for the whole forward, so
    the closing adds do fuse with the next norm and the final norm."""
    results = world.run("fsdp2", arch="llama", mode=ACROSS, units="root")
    for r in results:
        _matches(r)
        assert r["adds_per_step"] == [4, 4]
        assert r["warnings"] == []


@pytest.mark.parametrize("mode", [True, ACROSS])
def test_fsdp2_patched_after_fully_shard_and_unpatched(world, mode):
    results = world.run("fsdp2_patch_after_shard", arch="llama", mode=mode)
    for r in results:
        _matches(r)
        assert r["adds_per_step"] == [2, 2]
        assert r["classes_after_unpatch"] == r["classes_before_patch"]
        assert r["unpatched_logits"] <= 1.0


@pytest.mark.parametrize("mode", [True, ACROSS])
@pytest.mark.parametrize("checkpointing", ["wrapper", "transformers"])
def test_fsdp2_with_activation_checkpointing(world, checkpointing, mode):
    """checkpoint_wrapper on every layer (non-reentrant) or transformers' own gradient
    checkpointing: each layer's add fuses in the forward and again in its recomputation;
    nothing is carried across layers while checkpointing (the two passes must save the same
    tensors)."""
    results = world.run("fsdp2", arch="llama", mode=mode, checkpointing=checkpointing)
    for r in results:
        _matches(r)
        assert r["adds_per_step"] == [4, 4]


# --------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("mode", [True, ACROSS])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_ddp(world, arch, mode):
    results = world.run("ddp", arch=arch, mode=mode)
    expected = {
        ("llama", True): 2,
        ("llama", ACROSS): 4,
        ("gemma2", True): 4,
        ("gemma2", ACROSS): 4,
    }
    for r in results:
        _matches(r)
        assert r["adds_per_step"] == [expected[arch, mode]] * 2
        assert r["warnings"] == []


# --------------------------------------------------------------------------- tensor parallel


@pytest.mark.parametrize("mode", [True, ACROSS])
@pytest.mark.parametrize("norms", ["sequence_parallel", "replicated"])
def test_tensor_and_sequence_parallel(world, norms, mode):
    """torchtitan's layout on a tiny Llama. With SequenceParallel on the norms their hooks
    convert the input, so an add fuses only across layers (where the carried output is
    handed over only if the hook passes the very tensor on); with the norms' parameters
    replicated and the stream a Shard(1) DTensor, every add fuses, on DTensors."""
    results = world.run("tensor_parallel", mode=mode, norms=norms)
    expected = {
        ("sequence_parallel", True): 0,
        ("sequence_parallel", ACROSS): 2,
        ("replicated", True): 2,
        ("replicated", ACROSS): 4,
    }
    for r in results:
        _matches(r)
        assert r["dtensor_params"] > 0
        assert r["adds_per_step"] == [expected[norms, mode]] * 2


# --------------------------------------------------------------------------- the ops on DTensors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shard_dim", [0, 1])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_ops_on_row_sharded_dtensors(world, norm, shard_dim, dtype):
    """Sharded over batch or sequence, parameters replicated: each rank computes its rows
    (y, h and the activation gradients identical to the whole call, no gather), and the
    parameter gradients come out Partial(sum) for DTensor to reduce."""
    r = world.run("dtensor_ops", norm=norm, shard_dim=shard_dim, dtype=dtype)[0]
    shard = f"S({shard_dim})"
    for name in ("y", "h", "dx", "dresidual"):
        assert r[name] == 0.0, f"{name} differs from the whole call"
        assert r[f"{name}_placements"] == [shard]
    params = ["dweight", "dbranch_scale"] + (["dbias"] if norm == "layer" else [])
    # fp32 sums over other row groupings: reassociation only (bf16: the rounding of the sum)
    bound = 1.0 if dtype == "float32" else 100.0
    for name in params:
        assert r[name] <= bound, f"{name}: {r[name]:.3g} x tolerance"
        assert r[f"{name}_placements"] == ["P(sum)"]


def test_dtensor_errors_name_the_argument_and_placement(world):
    r = world.run("dtensor_errors")[0]
    assert r["hidden_sharded"].startswith("ValueError: x is a DTensor sharded over its last")
    assert "S(2)" in r["hidden_sharded"]
    assert r["weight_sharded"].startswith("ValueError: weight is a DTensor placed as (S(0))")
    assert r["weight_plain"].startswith("TypeError: weight is a torch.Tensor but x is a DTensor")
    assert r["residual_plain"].startswith("TypeError: residual is a torch.Tensor")
    assert r["x_plain"].startswith("TypeError: weight is a DTensor but x is a torch.Tensor")


def test_modules_accept_dtensor_parameters(world):
    r = world.run("modules_with_dtensor_parameters")[0]
    for name in ("RMSNorm", "LayerNorm", "AddNorm", "NormAddNorm"):
        assert r[name] <= 1.0
        assert r[name + "_param_types"] == ["DTensor"]
