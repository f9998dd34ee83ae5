"""resfuse.patch verifies the computation, not the text (layout.py for layers, probes.py for
norms and branch steps): a forward rewritten cosmetically still patches and computes what it
computes; a forward whose computation changed is refused with the reason, and nothing of it
is patched. The forwards below replace transformers' own for one test each, written to a
file so that their source can be read as a release's would be."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
from patch_fixtures import backend, count_fused  # noqa: F401 (fixtures)
from tiny_models import (
    ARCHS,
    LAYERS_RETURN_TUPLES,
    _vit,
    assert_tracks,
    forward_backward,
    logits,
    refused,
    transformers,
)

import resfuse
from resfuse.integrations import layout, patching
from resfuse.integrations.specs import Chain, Sublayer

llama = pytest.importorskip("transformers.models.llama.modeling_llama")

_HEADER = """
import torch
from torch import nn
"""


@pytest.fixture
def code(tmp_path, monkeypatch):
    """code(source) -> the module it defines, importable with its source on disk."""
    count = [0]

    def load(source: str):
        count[0] += 1
        path = tmp_path / f"release_{count[0]}.py"
        path.write_text(_HEADER + textwrap.dedent(source))
        spec = importlib.util.spec_from_file_location(f"resfuse_test_release_{count[0]}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def verified_caches(monkeypatch):
    """Each test's forwards are verified afresh (the caches are per class)."""
    monkeypatch.setattr(patching, "_VERIFIED", {})
    monkeypatch.setattr(patching.probes, "_PROBED", {})


def _with_forward(monkeypatch, cls, module, name="forward"):
    monkeypatch.setattr(cls, "forward", getattr(module, name))


def _train_both(model, reference, inputs):
    out, grads = forward_backward(model, inputs)
    ref_out, ref_grads = forward_backward(reference, inputs)
    assert_tracks(out, ref_out, "logits")
    for name in ref_grads:
        assert_tracks(grads[name], ref_grads[name], f"grad {name}", floor=1e-9)


# --------------------------------------------------------------------------- layers

# A release that renames the stream, reorders statements, drops type hints, adds a layer
# argument passed on to attention under another name, a keyword constant, comments: the
# same computation
COSMETIC = """
def forward(self, x, attention_mask=None, position_ids=None, cache=None, use_cache=False,
            position_embeddings=None, new_flag=None, **kw):
    # attention
    skip = x
    normed = self.input_layernorm(x)
    out, _weights = self.self_attn(
        hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
        cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
        extra_option=new_flag, dropout_override=None, **kw)
    x = out + skip  # the add, other order
    if new_flag is not None:
        pass
    # feed forward
    y = self.mlp(self.post_attention_layernorm(x))
    return x + y
"""

# Releases that change what the layer computes: each must be refused, with why
CHANGED = {
    "a scaled branch": (
        """
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
            hidden_states = residual + 0.5 * hidden_states
            residual = hidden_states
            hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
            return residual + hidden_states
        """,
        "the add after `self_attn`",
    ),
    "a clamp on the stream": (
        """
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            residual = hidden_states
            hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states))
            hidden_states = (residual + hidden_states).clamp(-100, 100)
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        """,
        "clamp",
    ),
    "mlp before attention": (
        """
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
            out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states))
            return hidden_states + out
        """,
        "the add after `mlp`",
    ),
    "a branch on the activation": (
        """
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            residual = hidden_states
            hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states))
            hidden_states = residual + hidden_states
            if hidden_states.dtype == torch.float16:
                hidden_states = hidden_states.clamp(-1000, 1000)
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        """,
        "a branch on the activation",
    ),
    "a computed argument": (
        """
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            residual = hidden_states
            mask = attention_mask * 2 if attention_mask is not None else None
            hidden_states, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states), attention_mask=mask)
            hidden_states = residual + hidden_states
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        """,
        "neither a layer argument nor a constant",
    ),
    "a method of its own": (
        """
        def forward(self, hidden_states, **kwargs):
            residual = hidden_states
            hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states))
            hidden_states = self._scale(residual + hidden_states)
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        """,
        "not a submodule",
    ),
}


@pytest.mark.skipif(LAYERS_RETURN_TUPLES, reason="this release's LlamaModel expects tuples")
def test_a_cosmetically_rewritten_layer_still_patches(
    code, monkeypatch, verified_caches, count_fused
):
    _with_forward(monkeypatch, llama.LlamaDecoderLayer, code(COSMETIC))
    spec = ARCHS["llama"]
    model = spec.model()
    reference = spec.model()
    report = resfuse.patch(model, fuse_residual="across_layers")
    assert not report.skipped, str(report)
    assert len(report.fused) == 4
    _train_both(model, reference, spec.example())
    assert count_fused["add_norm"] == 4
    # the calls are replayed as this code makes them: the renamed keyword, the constant
    binding = type(model.model.layers[0])._resfuse_bindings["self_attn"]
    assert binding.input == "hidden_states"
    assert ("extra_option", ("arg", "new_flag")) in binding.kwargs
    assert ("dropout_override", ("const", None)) in binding.kwargs
    assert binding.var_kwargs


@pytest.mark.parametrize("change", list(CHANGED))
def test_a_layer_whose_computation_changed_is_refused(
    change, code, monkeypatch, verified_caches, count_fused
):
    source, reason = CHANGED[change]
    _with_forward(monkeypatch, llama.LlamaDecoderLayer, code(source))
    model = ARCHS["llama"].model()
    before = {id(m): type(m) for m in model.model.layers}
    report = resfuse.patch(model, fuse_residual="across_layers")
    skipped = [n for n in report.skipped if n.cls == "LlamaDecoderLayer"]
    assert len(skipped) == 2, str(report)
    assert "does not compute the pre-norm layer it is listed as" in skipped[0].what
    assert reason in skipped[0].what, skipped[0].what
    assert not report.fused
    assert all(type(m) is before[id(m)] for m in model.model.layers)  # nothing half-patched
    assert len(report.norms) == 5  # the norms are verified on their own


TUPLE_RETURN = """
def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
            output_attentions=False, use_cache=False, position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, self_attn_weights = self.self_attn(
        hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
        cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    outputs = (hidden_states,)
    if output_attentions:
        outputs += (self_attn_weights,)
    return outputs
"""


@pytest.mark.parametrize("output_attentions", [False, True])
def test_a_layer_returning_a_tuple_returns_the_same_tuple(
    output_attentions, code, monkeypatch, verified_caches
):
    """transformers 4.x layers return ``(hidden_states,)`` plus the attention weights when
    asked: the generic forward returns the same structure, from the same values."""
    _with_forward(monkeypatch, llama.LlamaDecoderLayer, code(TUPLE_RETURN))
    model = ARCHS["llama"].model()
    layer = model.model.layers[0]
    reference = llama.LlamaDecoderLayer(model.config, 0)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(x, torch.arange(5)[None])
    kwargs = dict(position_embeddings=cos_sin, output_attentions=output_attentions)
    expected = reference(x, **kwargs)
    report = resfuse.patch(layer)
    assert len(report.fused) == 1 and not report.skipped, str(report)
    assert type(layer)._resfuse_verified.returns is not None
    out = layer(x, **kwargs)
    assert isinstance(out, tuple) and len(out) == len(expected) == (2 if output_attentions else 1)
    assert_tracks(out[0], expected[0], "hidden states")


# --------------------------------------------------------------------------- norms

NORM_SOURCES = {
    "cosmetic": (
        """
        def forward(self, x):
            dtype = x.dtype
            x32 = x.to(torch.float32)
            ms = (x32 * x32).mean(dim=-1, keepdim=True)  # x ** 2, written otherwise
            return self.weight * (x32 * torch.rsqrt(ms + self.variance_epsilon)).to(dtype)
        """,
        None,
    ),
    "eps outside the root": (
        """
        def forward(self, x):
            dtype = x.dtype
            x = x.to(torch.float32)
            x = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)
            return self.weight * x.to(dtype)
        """,
        "computes something else",
    ),
    "(1 + weight)": (
        """
        def forward(self, x):
            dtype = x.dtype
            x = x.to(torch.float32)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1 + self.weight) * x.to(dtype)
        """,
        "computes something else",
    ),
    "another output dtype": (
        """
        def forward(self, x):
            x = x.to(torch.float32)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight.float() * x
        """,
        "returns torch.float32 where resfuse returns",
    ),
}


@pytest.mark.parametrize("variant", list(NORM_SOURCES))
def test_norms_are_verified_by_running_them(variant, code, monkeypatch, verified_caches):
    source, reason = NORM_SOURCES[variant]
    _with_forward(monkeypatch, llama.LlamaRMSNorm, code(source))
    model = ARCHS["llama"].model()
    reference = ARCHS["llama"].model()
    report = resfuse.patch(model, fuse_residual="across_layers")
    if reason is None:
        assert len(report.norms) == 5 and not report.skipped, str(report)
        with torch.no_grad():
            inputs = ARCHS["llama"].example()
            assert_tracks(logits(model, inputs), logits(reference, inputs), "logits")
        return
    assert not report.norms and not report.fused
    assert len(report.skipped) == 5
    assert all(reason in n.what and n.what.startswith("LlamaRMSNorm ") for n in report.skipped)
    assert not any(patching.is_patched(m) for m in model.modules())


def test_a_changed_drop_path_is_refused(code, monkeypatch, verified_caches):
    """The branch steps resfuse folds into the call are probed too: a DropPath that draws
    its mask otherwise (per token, not per sample) keeps the block unfused."""
    timm_drop = pytest.importorskip("timm.layers.drop")
    module = code(
        """
        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1 - self.drop_prob
            return x * x.new_empty(x.shape[:-1] + (1,)).bernoulli_(keep) / keep
        """
    )
    _with_forward(monkeypatch, timm_drop.DropPath, module)
    model = _vit(drop_path_rate=0.2)()
    report = resfuse.patch(model)
    # timm's drop rates rise from 0: block 0's steps are Identity (nothing to verify), block 1's
    # DropPath is refused
    assert [n.path for n in report.skipped] == ["blocks.1"]
    assert "its drop_path step DropPath computes something else" in report.skipped[0].what
    assert [n.path for n in report.fused] == ["blocks.0"]


# --------------------------------------------------------------------------- the interpreter


def test_static_branches_follow_the_instance_and_argument_branches_stay(code):
    module = code(
        """
        class Layer(nn.Module):
            def forward(self, x, flag=None):
                if self.parallel:
                    return x + self.attn(self.norm(x)) + self.mlp(self.norm(x))
                h = x + self.attn(self.norm(x))
                if flag is not None:
                    h = h + 0  # a computation on an argument path: must be refused
                return h + self.mlp(self.norm2(h))
        """
    )
    layer = module.Layer()
    for name in ("attn", "mlp", "norm", "norm2"):
        setattr(layer, name, torch.nn.Identity())
    spec = Chain(input="x", sublayers=(Sublayer("attn", "norm"), Sublayer("mlp", "norm2")))
    layer.parallel = True
    with pytest.raises(layout.Refused, match="the add after `mlp`"):
        layout.verify_chain(module.Layer, layer, spec)
    layer.parallel = False
    with pytest.raises(layout.Refused):  # the `h + 0` path is not the layout
        layout.verify_chain(module.Layer, layer, spec)


def test_the_installed_releases_every_entry_verifies():
    """Every layer entry verifies on the installed transformers / timm, for the tiny
    models' instances (test_patch_models checks what the patched models compute)."""
    for name, arch in ARCHS.items():
        report = resfuse.patch(arch.model(), fuse_residual="across_layers")
        reason = refused(name)
        if reason is None:
            assert not report.skipped, f"{name}: {report}"
        else:
            assert all(reason in n.what for n in report.skipped), f"{name}: {report}"
            assert any(reason in n.what for n in report.skipped + report.unfused), name
    assert transformers.__version__
