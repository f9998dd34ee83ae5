"""Tiny random-config models of every architecture resfuse.patch knows (no downloads), with
inputs and the logits to compare. Norm weights, biases and LayerScale gammas are randomized:
at their initial values (ones / zeros) a wrong weight convention would go unnoticed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import DEVICE

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
transformers.logging.set_verbosity_error()

VOCAB, HIDDEN, SEQ, BATCH = 64, 32, 7, 2
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _decoder(model_type: str, **overrides):
    def build():
        config = transformers.AutoConfig.for_model(model_type, **{**_DECODER, **overrides})
        return transformers.AutoModelForCausalLM.from_config(config)

    return build


def _gpt2(**overrides):
    def build():
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            **overrides,
        )
        return transformers.GPT2LMHeadModel(config)

    return build


def _gpt_neox(**overrides):
    def build():
        config = transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            bos_token_id=1,
            eos_token_id=2,
            **overrides,
        )
        return transformers.GPTNeoXForCausalLM(config)

    return build


def _encoder(config_cls, model_cls, **overrides):
    def build():
        config = config_cls(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=40,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **overrides,
        )
        return model_cls(config)

    return build


def _t5():
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def _vit(**overrides):
    def build():
        kwargs = dict(
            pretrained=False,
            img_size=16,
            patch_size=8,
            embed_dim=HIDDEN,
            depth=2,
            num_heads=4,
            init_values=0.5,
            num_classes=10,
        )
        return timm.create_model("vit_tiny_patch16_224", **{**kwargs, **overrides})

    return build


def _tokens(gen):
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)}


def _seq2seq(gen):
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}


def _cross(gen):
    return {**_tokens(gen), "encoder_hidden_states": torch.randn(BATCH, 5, HIDDEN, generator=gen)}


def _image(gen):
    return {"x": torch.randn(BATCH, 3, 16, 16, generator=gen)}


@dataclass(frozen=True)
class Arch:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], dict]
    fused_adds: int  # adds fused with fuse_residual=True (2 layers)
    linked: int = 2  # extra adds fused with "across_layers"

    def model(self, dtype=torch.float32, seed=0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = self.build().to(dtype)
        randomize_norms(model, seed)
        return model.to(DEVICE)

    def example(self, seed=1, dtype=None) -> dict:
        gen = torch.Generator().manual_seed(seed)
        inputs = self.inputs(gen)
        if dtype is not None:
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        return {k: v.to(DEVICE) for k, v in inputs.items()}


def logits(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = (
                type(model.get_submodule(name.rsplit(".", 1)[0])).__name__ if "." in name else ""
            )
            if "Norm" in owner or leaf == "gamma":
                noise = torch.randn(p.shape, generator=gen)
                base = 0.0 if (leaf == "bias" or "Gemma" in owner) else 1.0
                p.copy_((base + 0.3 * noise).to(p.dtype))


ARCHS = {
    "llama": Arch(_decoder("llama"), _tokens, 2),
    "mistral": Arch(_decoder("mistral"), _tokens, 2),
    "qwen2": Arch(_decoder("qwen2"), _tokens, 2),
    "qwen3": Arch(_decoder("qwen3"), _tokens, 2),
    "gemma": Arch(_decoder("gemma"), _tokens, 2),
    # sandwich / reordered norms: both adds of each layer fuse with their branch norm
    # (norm_add_norm / norm_add); across layers the closing adds fuse with the next norm
    # as well, which changes how they fuse, not how many do
    "gemma2": Arch(_decoder("gemma2"), _tokens, 4, linked=0),
    "gemma3": Arch(_decoder("gemma3_text"), _tokens, 4, linked=0),
    "olmo2": Arch(_decoder("olmo2"), _tokens, 4, linked=0),
    "gpt2": Arch(_gpt2(), _tokens, 2),
    "gpt2_cross": Arch(_gpt2(add_cross_attention=True), _cross, 6),
    "gpt_neox": Arch(_gpt_neox(use_parallel_residual=False), _tokens, 2),
    "gpt_neox_parallel": Arch(_gpt_neox(use_parallel_residual=True), _tokens, 0, linked=0),
    "bert": Arch(_encoder(transformers.BertConfig, transformers.BertForMaskedLM), _tokens, 4, 0),
    "roberta": Arch(
        _encoder(transformers.RobertaConfig, transformers.RobertaForMaskedLM, pad_token_id=1),
        _tokens,
        4,
        0,
    ),
    "t5": Arch(_t5, _seq2seq, 0, linked=0),
    "vit": Arch(_vit(), _image, 2),
}


# Layers the installed transformers release writes so that resfuse refuses them, with the
# reason patch must give (tools/test_releases.py runs the suite on older releases): the
# tests then require that refusal, norms-only patching and the unpatched results
_RELEASE = tuple(int(p) for p in transformers.__version__.split(".")[:2])
_SLIDING_MASK = "which is neither a layer argument nor a constant"  # a mask sliced in the layer
REFUSED = {
    # transformers < 4.54: Gemma2/3's layer slices the sliding-window mask itself
    "gemma2": _SLIDING_MASK if _RELEASE < (4, 54) else None,
    "gemma3": _SLIDING_MASK if _RELEASE < (4, 54) else None,
}
# transformers < 4.54 layers return a tuple (hidden_states, ...)
LAYERS_RETURN_TUPLES = _RELEASE < (4, 54)


def refused(arch: str):
    """The reason resfuse refuses ``arch``'s layers on this release, or None."""
    return REFUSED.get(arch)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = logits(model, inputs)
    # a loss that weighs every logit differently, so no gradient cancels by symmetry
    weights = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).reshape(out.shape)
    (out.float() * weights).sum().backward()
    return out.detach(), _grads(model)


def assert_tracks(actual, expected, name, rel=1e-4, floor=1e-12):
    """fp32 agreement up to reassociation: |a - e| <= rel * (|e| + max|e|) + floor
    elementwise (``floor``: for tensors that are zero up to rounding, e.g. the gradient of
    an attention key bias, which softmax cancels)."""
    assert actual.shape == expected.shape, name
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs()
    bound = rel * (expected.double().abs() + scale) + floor
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: error {err.max().item():.3e} exceeds {rel} x (|e| + {scale:.3e})"
