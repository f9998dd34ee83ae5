"""resfuse.patch beyond plain equivalence: the report, hooks, output_hidden_states, gradient
checkpointing, drop-path and dropout in training, torch.compile, fallbacks, unknown
classes, never half-applying, argument errors (the verification of the installed code:
test_verification.py)."""

import copy

import pytest
import torch
from conftest import DEVICE
from patch_fixtures import backend, count_fused  # noqa: F401 (fixtures)
from tiny_models import ARCHS, _encoder, _vit, assert_tracks, forward_backward, logits, transformers
from torch import nn

import resfuse
from resfuse.integrations import fused, patching

LLAMA_LAYER = "transformers.models.llama.modeling_llama:LlamaDecoderLayer"
LLAMA_NORM = "transformers.models.llama.modeling_llama:LlamaRMSNorm"


def _pair(arch="llama", **kwargs):
    spec = ARCHS[arch]
    model = spec.model(**kwargs)
    return spec, model, copy.deepcopy(model)


def _assert_same_training(model, reference, inputs, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    out, grads = forward_backward(model, inputs)
    if seed is not None:
        torch.manual_seed(seed)
    ref_out, ref_grads = forward_backward(reference, inputs)
    assert_tracks(out, ref_out, "logits")
    floor = 1e-6 * max(g.abs().max().item() for g in ref_grads.values())
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_tracks(grads[name], ref_grads[name], f"grad {name}", floor=floor)
    return out


# --------------------------------------------------------------------------- report


def test_report_is_short_and_says_what_happened():
    _, model, _ = _pair()
    report = resfuse.patch(model)
    assert isinstance(report, resfuse.PatchReport)
    text = str(report)
    lines = text.splitlines()
    assert len(lines) <= 6, text
    assert lines[0] == (
        "resfuse.patch(LlamaForCausalLM, fuse_residual=True): 5 norms replaced, "
        "2 adds fused, 0 modules skipped"
    )
    assert "2 x LlamaDecoderLayer: self_attn add + post_attention_layernorm" in text
    assert "fuse_residual='across_layers' fuses it with next layer's input_layernorm" in text
    assert [n.path for n in report.norms][:2] == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
    ]


def test_fuse_residual_false_replaces_norms_only(count_fused):
    spec, model, reference = _pair()
    report = resfuse.patch(model, fuse_residual=False)
    assert len(report.norms) == 5 and not report.fused and not report.unfused
    assert all(not isinstance(m, fused.ChainOverride) for m in model.modules())
    _assert_same_training(model, reference, spec.example())
    assert count_fused == {"add_norm": 0, "norm": 5}


def test_unknown_classes_are_named_and_left_alone():
    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight

    class MyDecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = MyRMSNorm()
            self.ln = nn.LayerNorm(8)
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.ln(x + self.lin(self.norm(x)))

    model = nn.Sequential(MyDecoderLayer())
    x = torch.randn(2, 8)
    expected = model(x)
    report = resfuse.patch(model)
    assert sorted((n.cls, n.what) for n in report.skipped) == sorted(
        [
            ("MyDecoderLayer", "unknown layer class: its residual adds are left as they are"),
            ("MyRMSNorm", "unknown norm class: left as it is"),
        ]
    )
    assert [n.path for n in report.norms] == ["0.ln"]  # torch.nn.LayerNorm: exact semantics
    assert type(model[0]) is MyDecoderLayer and type(model[0].norm) is MyRMSNorm
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_timm_fast_norm_is_left_alone():
    _, model, _ = _pair("vit")
    model.norm._fast_norm = True  # timm.layers.set_fast_norm(True) at construction
    report = resfuse.patch(model)
    assert [(n.path, n.what) for n in report.skipped] == [
        ("norm", "timm's fast_norm is on (it normalizes in the autocast dtype): left as it is")
    ]
    assert not patching.is_patched(model.norm) and len(report.norms) == 4


# --------------------------------------------------------------------------- all or nothing


def test_a_failure_while_applying_restores_everything(monkeypatch):
    _, model, _ = _pair()
    before = [(m, type(m)) for m in model.modules()]
    real = patching._generated_class

    def failing(original, override, spec, verified=None):
        if override is fused.ChainOverride:
            # no __dict__: a different instance layout, so __class__ assignment raises
            return type("Incompatible", (), {"__slots__": ()})
        return real(original, override, spec, verified)

    monkeypatch.setattr(patching, "_generated_class", failing)
    with pytest.raises(TypeError):
        resfuse.patch(model, fuse_residual="across_layers")
    assert all(type(m) is cls for m, cls in before)
    assert not any(k.startswith("_resfuse") for m in model.modules() for k in vars(m))


def test_argument_errors():
    _, model, _ = _pair()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        resfuse.patch("llama")
    for bad in ("yes", 1, None):
        with pytest.raises(
            ValueError, match="fuse_residual must be True, False or 'across_layers'"
        ):
            resfuse.patch(model, fuse_residual=bad)
    resfuse.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        resfuse.patch(model)
    resfuse.unpatch(model)
    resfuse.patch(model, fuse_residual="across_layers")  # patchable again after unpatch


# --------------------------------------------------------------------------- hooks & outputs


def test_hooks_on_a_norm_still_fire(count_fused):
    spec, model, reference = _pair()
    resfuse.patch(model)
    seen = {}
    for name, m in (("patched", model), ("reference", reference)):
        m.model.layers[0].post_attention_layernorm.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out.detach().clone())
        )
    _assert_same_training(model, reference, spec.example())
    assert_tracks(seen["patched"], seen["reference"], "hooked norm output")
    assert count_fused["add_norm"] == 1  # the hooked norm's add ran unfused, the other fused


# (transformers < 4.54 layers return a tuple whose first item is the hidden state)


def _edit_in_place(module, args, out):
    (out[0] if isinstance(out, tuple) else out).mul_(1.5)


def _replace_output(module, args, out):
    return (out[0] * 1.5,) + out[1:] if isinstance(out, tuple) else out * 1.5


def _replace_input(module, args):
    return (args[0] * 0.5,)


@pytest.mark.parametrize("mode", [True, "across_layers"])
def test_output_hidden_states_and_layer_hooks_see_the_true_layer_outputs(mode):
    spec, model, reference = _pair()
    resfuse.patch(model, fuse_residual=mode)
    for m in (model, reference):
        m.model.layers[0].register_forward_hook(_replace_output)
        m.model.layers[1].input_layernorm.register_forward_pre_hook(_replace_input)
    inputs = spec.example()
    _assert_same_training(model, reference, inputs)
    with torch.no_grad():
        ours = model(**inputs, output_hidden_states=True).hidden_states
        theirs = reference(**inputs, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 3
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_tracks(a, b, f"hidden_states[{i}]")


def test_a_layer_output_edited_in_place():
    """Per layer: as before. Across layers the edit invalidates the carried norm output (the
    version counter moved); with autograd on, the fused op saved that tensor for backward,
    so backward refuses an in-place edit, as autograd does for any saved tensor."""
    spec, model, reference = _pair()
    inputs = spec.example()
    for m in (model, reference):
        m.model.layers[0].register_forward_hook(_edit_in_place)
    resfuse.patch(model, fuse_residual=True)
    _assert_same_training(model, reference, inputs)
    resfuse.unpatch(model)
    resfuse.patch(model, fuse_residual="across_layers")
    with torch.no_grad():
        assert_tracks(logits(model, inputs), logits(reference, inputs), "logits")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        forward_backward(model, inputs)


def test_inference_mode_and_no_grad(count_fused):
    spec, model, reference = _pair()
    resfuse.patch(model, fuse_residual="across_layers")
    inputs = spec.example()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert_tracks(logits(model, inputs), logits(reference, inputs), context.__name__)


def test_float64_runs_the_original_code(count_fused):
    spec, model, reference = _pair()
    model, reference = model.double(), reference.double()
    resfuse.patch(model, fuse_residual="across_layers")
    _assert_same_training(model, reference, spec.example())
    assert count_fused == {"add_norm": 0, "norm": 0}


def test_deepcopy_of_a_patched_model_is_patched():
    spec, model, reference = _pair()
    resfuse.patch(model, fuse_residual="across_layers")
    clone = copy.deepcopy(model)
    assert type(clone.model.layers[0]) is type(model.model.layers[0])
    carry_target = vars(clone.model.layers[0])[fused.CARRY_INTO].norm
    assert carry_target is clone.model.layers[1].input_layernorm  # the copy's own norm
    _assert_same_training(clone, reference, spec.example())
    resfuse.unpatch(clone)
    assert type(clone.model.layers[0]).__name__ == "LlamaDecoderLayer"


# --------------------------------------------------------------------------- training features


def _checkpointing(model, enable: bool, kwargs=None):
    # transformers 5.24 names it activation_checkpointing_*; 5.17 (the GPU machines')
    # gradient_checkpointing_* (a deprecated alias in 5.24)
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    method = getattr(model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")
    return method(kwargs) if enable else method()


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("mode", [True, "across_layers"])
def test_transformers_gradient_checkpointing(mode, use_reentrant, count_fused):
    spec, model, reference = _pair()
    for m in (model, reference):
        _checkpointing(m, True, {"use_reentrant": use_reentrant})
        m.train()
    resfuse.patch(model, fuse_residual=mode)
    inputs = spec.example()
    _assert_same_training(model, reference, inputs)
    # the patched layers ran under checkpointing: forward + recompute, 1 fused add each
    # (no carry across layers while checkpointing)
    assert count_fused["add_norm"] == 2 * 2
    _checkpointing(model, False)  # and the patched layers work without it again
    _checkpointing(reference, False)
    _assert_same_training(model, reference, inputs)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", [True, "across_layers"])
def test_timm_drop_path_and_layer_scale_in_training(mode, checkpointing, count_fused):
    torch.manual_seed(0)
    model = _vit(drop_path_rate=0.5)().to(DEVICE)
    model.set_grad_checkpointing(checkpointing)
    model.train()
    reference = copy.deepcopy(model)
    report = resfuse.patch(model, fuse_residual=mode)
    assert len(report.fused) == (4 if mode == "across_layers" else 2)
    inputs = {"x": torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)}
    out = _assert_same_training(model, reference, inputs, seed=7)
    assert count_fused["add_norm"] > 0
    torch.manual_seed(8)  # another draw of the drop-path masks gives other logits
    assert not torch.allclose(logits(model, inputs), out)


def test_bert_dropout_in_training():
    torch.manual_seed(0)
    model = _encoder(transformers.BertConfig, transformers.BertForMaskedLM)().to(DEVICE)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.2
    model.train()
    reference = copy.deepcopy(model)
    resfuse.patch(model)
    _assert_same_training(model, reference, ARCHS["bert"].example(), seed=3)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "bert", "t5", "vit"])
def test_autocast_gives_every_layer_output_its_original_dtype(arch):
    """Under bf16 autocast (CPU here, CUDA on a GPU run, where autocast runs F.layer_norm in
    float32) each layer returns the dtype it returned before patching."""
    spec, model, reference = _pair(arch)
    resfuse.patch(model, fuse_residual="across_layers")
    dtypes = {"patched": [], "reference": []}
    for name, m in (("patched", model), ("reference", reference)):
        for module in m.modules():
            if type(module).__name__.endswith(("DecoderLayer", "Block", "Output", "LayerFF")):
                module.register_forward_hook(
                    lambda mod, args, out, seen=dtypes[name]: seen.append(
                        (
                            type(mod).__name__.removeprefix("Resfuse"),
                            (out[0] if isinstance(out, tuple) else out).dtype,
                        )
                    )
                )
    inputs = spec.example()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16), torch.no_grad():
        ours, theirs = logits(model, inputs), logits(reference, inputs)
    assert dtypes["patched"] == dtypes["reference"] and dtypes["patched"]
    assert ours.dtype == theirs.dtype
    scale = theirs.float().abs().max().item()
    torch.testing.assert_close(ours.float(), theirs.float(), atol=0.05 * scale, rtol=0.05)


# --------------------------------------------------------------------------- torch.compile


def test_torch_compile_of_a_patched_llama():
    """fullgraph: the patched forwards trace without graph breaks, and the fused ops are in
    the graph (a carry across layers is a side channel, so compiled code keeps per-layer
    fusion)."""
    spec, model, reference = _pair()
    resfuse.patch(model, fuse_residual="across_layers")
    ops_in_graph = []

    def counting_backend(gm, example_inputs):
        ops_in_graph.extend(
            n.args[1] is not None
            for n in gm.graph.nodes
            if n.op == "call_function"
            and n.target in (torch.ops.resfuse.add_norm, torch.ops.resfuse.add_norm.default)
        )
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    inputs = spec.example()
    out = logits(compiled, inputs)
    out.sum().backward()
    expected = logits(reference, inputs)
    expected.sum().backward()
    assert_tracks(out.detach(), expected.detach(), "logits")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_tracks(p.grad, q.grad, f"grad {name}", floor=1e-6 * q.grad.abs().max().item())
    assert sorted(ops_in_graph) == [False] * 3 + [True] * 2  # 3 norms, 2 fused adds
