"""resfuse.patch on every known architecture (tiny random configs, CPU): the patched model
computes what the original computes - logits and every parameter gradient in fp32, a few
optimizer steps, bf16 - unpatch restores it exactly, state_dicts round trip with the
original classes, and the adds the report calls fused really go through the fused op."""

import copy

import pytest
import torch
from patch_fixtures import backend, count_fused  # noqa: F401 (fixtures)
from tiny_models import ARCHS, assert_tracks, forward_backward, logits, refusal_notes, refused

import resfuse

MODES = [True, "across_layers"]


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("mode", MODES, ids=["per_layer", "across_layers"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_every_gradient_match(arch, mode, backend, count_fused):
    spec = ARCHS[arch]
    model = spec.model()
    reference = copy.deepcopy(model)
    inputs = spec.example()

    report = resfuse.patch(model, fuse_residual=mode)
    expected_adds = spec.fused_adds + (spec.linked if mode == "across_layers" else 0)
    reason = refused(arch)
    if reason is None:
        assert len(report.fused) == expected_adds, str(report)
        assert report.norms and not report.skipped, str(report)
    else:  # this release's layer is refused, with its reason: the norms only
        assert any(reason in n.what for n in refusal_notes(report)), str(report)
        assert all(reason in n.what for n in report.skipped), str(report)
        assert report.norms and not report.fused, str(report)
        expected_adds = 0

    out, grads = forward_backward(model, inputs)
    ref_out, ref_grads = forward_backward(reference, inputs)
    assert_tracks(out, ref_out, "logits")
    assert grads.keys() == ref_grads.keys()
    floor = 1e-6 * max(g.abs().max().item() for g in ref_grads.values())
    for name in ref_grads:
        assert_tracks(grads[name], ref_grads[name], f"grad {name}", floor=floor)

    # the report is honest: every fused add site ran the fused op (but those the example does
    # not run: Arch.idle)
    runtime_adds = expected_adds - (spec.idle if reason is None else 0)
    assert count_fused["add_norm"] == runtime_adds


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2", "gpt2", "bert", "t5", "vit"])
def test_optimizer_steps_track_the_unpatched_model(arch):
    # SGD with momentum: Adam would turn gradients that are zero up to rounding (attention key
    # biases) into full-size steps of random sign in either model
    spec = ARCHS[arch]
    model = spec.model()
    reference = copy.deepcopy(model)
    resfuse.patch(model, fuse_residual="across_layers")
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (model, reference)]
    for step in range(3):
        inputs = spec.example(seed=10 + step)
        outs = []
        for m, opt in zip((model, reference), opts):
            outs.append(forward_backward(m, inputs)[0])
            opt.step()
        assert_tracks(outs[0], outs[1], f"logits at step {step}")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        # floor: parameters that only ever received rounding noise (key biases) stay ~1e-10
        assert_tracks(p.detach(), q.detach(), f"{name} after 3 SGD steps", floor=1e-7)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gpt2", "roberta", "t5", "vit"])
def test_unpatch_restores_modules_and_outputs(arch):
    spec = ARCHS[arch]
    model = spec.model()
    inputs = spec.example()
    before = [(name, m, type(m)) for name, m in model.named_modules()]
    params = list(model.parameters())
    with torch.no_grad():
        expected = logits(model, inputs)

    resfuse.patch(model, fuse_residual="across_layers")
    assert any(type(m) is not cls for _, m, cls in before)
    with torch.no_grad():
        logits(model, inputs)
    resfuse.unpatch(model)

    after = list(model.named_modules())
    assert [(n, m) for n, m, _ in before] == after  # the very same module objects
    for _, m, cls in before:
        assert type(m) is cls
        assert not [k for k in vars(m) if k.startswith("_resfuse")]
    assert all(p is q for p, q in zip(params, model.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    resfuse.unpatch(model)  # unpatching an unpatched model changes nothing


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt_neox", "bert", "t5", "vit"])
def test_state_dict_round_trip_with_the_original_classes(arch):
    spec = ARCHS[arch]
    model = spec.model()
    original_keys = list(model.state_dict())
    resfuse.patch(model, fuse_residual="across_layers")
    state = model.state_dict()
    assert list(state) == original_keys

    fresh = spec.model(seed=123)  # other weights, original classes
    fresh.load_state_dict(state)
    inputs = spec.example()
    with torch.no_grad():
        assert_tracks(logits(fresh, inputs), logits(model, inputs), "logits")

    model.load_state_dict(fresh.state_dict())  # and back into the patched model


def test_save_pretrained_round_trip(tmp_path):
    spec = ARCHS["llama"]
    model = spec.model()
    resfuse.patch(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert all(not type(m).__name__.startswith("Resfuse") for m in loaded.modules())
    inputs = spec.example()
    with torch.no_grad():
        assert_tracks(logits(loaded, inputs), logits(model, inputs), "logits")


@pytest.mark.parametrize(
    "arch",
    [
        "llama",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "olmo2",
        "gpt2",
        "gpt_neox",
        "bert",
        "t5",
        "vit",
    ],
)
def test_bf16_forward_close(arch):
    """bf16 logits of the patched model are as close to the fp32 model as the original's
    (resfuse rounds each output once; HF's Llama norm rounds twice)."""
    spec = ARCHS[arch]
    exact = spec.model()
    model = spec.model(torch.bfloat16)
    reference = copy.deepcopy(model)
    resfuse.patch(model, fuse_residual="across_layers")
    inputs = spec.example()
    with torch.no_grad():
        truth = logits(exact, inputs).double()
        ours = logits(model, spec.example(dtype=torch.bfloat16))
        theirs = logits(reference, spec.example(dtype=torch.bfloat16))
    assert ours.dtype == theirs.dtype
    err_ours = (ours.double() - truth).abs().max().item()
    err_theirs = (theirs.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert err_ours <= 1.5 * err_theirs + 1e-2 * scale, (err_ours, err_theirs, scale)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=0.05 * scale, rtol=0.05)
