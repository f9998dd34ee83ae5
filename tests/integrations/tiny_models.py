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

import tiny_families  # noqa: E402

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


def _family(name: str):
    return tiny_families.FAMILIES[name][0]


def _family_inputs(name: str):
    return tiny_families.FAMILIES[name][1]


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
    # fused adds of the report that the example input does not run: vision towers under a
    # text-only input, GPT-2's add without cross-attention (the report lists both orders)
    idle: int = 0

    def model(self, dtype=torch.float32, seed=0) -> torch.nn.Module:
        torch.manual_seed(seed)
        try:
            model = self.build().to(dtype)
        except tiny_families.Absent as e:
            pytest.skip(str(e))
        randomize_norms(model, seed)
        return model.to(DEVICE)

    def example(self, seed=1, dtype=None) -> dict:
        gen = torch.Generator().manual_seed(seed)
        inputs = self.inputs(gen)
        if dtype is not None:
            inputs = {
                k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in inputs.items()
            }
        return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}


def logits(model, inputs) -> torch.Tensor:
    """The model's logits (or last hidden state, for a model without a head)."""
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, "logits", None)
    return value if value is not None else out.last_hidden_state


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
    "gpt2_cross": Arch(_gpt2(add_cross_attention=True), _cross, 6, idle=2),
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
    # the families of tiny_families.py (builders that skip where a release lacks the family)
    "ministral": Arch(_family("ministral"), _family_inputs("ministral"), 2, 2),
    "ministral3": Arch(_family("ministral3"), _family_inputs("ministral3"), 2, 2),
    "mixtral": Arch(_family("mixtral"), _family_inputs("mixtral"), 2, 2),
    "qwen2_moe": Arch(_family("qwen2_moe"), _family_inputs("qwen2_moe"), 2, 2),
    "qwen3_moe": Arch(_family("qwen3_moe"), _family_inputs("qwen3_moe"), 2, 2),
    "qwen2_vl": Arch(_family("qwen2_vl"), _family_inputs("qwen2_vl"), 3, 2, idle=1),
    "qwen2_5_vl": Arch(_family("qwen2_5_vl"), _family_inputs("qwen2_5_vl"), 3, 2, idle=1),
    "qwen3_vl": Arch(_family("qwen3_vl"), _family_inputs("qwen3_vl"), 3, 2, idle=1),
    "qwen3_vl_moe": Arch(_family("qwen3_vl_moe"), _family_inputs("qwen3_vl_moe"), 3, 2, idle=1),
    "glm": Arch(_family("glm"), _family_inputs("glm"), 2, 2),
    "glm4": Arch(_family("glm4"), _family_inputs("glm4"), 4, 0),
    "smollm3": Arch(_family("smollm3"), _family_inputs("smollm3"), 2, 2),
    "deepseek_v2": Arch(_family("deepseek_v2"), _family_inputs("deepseek_v2"), 2, 2),
    "deepseek_v3": Arch(_family("deepseek_v3"), _family_inputs("deepseek_v3"), 2, 2),
    "hunyuan_v1_dense": Arch(_family("hunyuan_v1_dense"), _family_inputs("hunyuan_v1_dense"), 2, 2),
    "hunyuan_v1_moe": Arch(_family("hunyuan_v1_moe"), _family_inputs("hunyuan_v1_moe"), 2, 2),
    "mllama": Arch(_family("mllama"), _family_inputs("mllama"), 2, 0, idle=1),
    "mllama_text": Arch(_family("mllama_text"), _family_inputs("mllama_text"), 1, 0),
    "phi3": Arch(_family("phi3"), _family_inputs("phi3"), 2, 2),
    "granite": Arch(_family("granite"), _family_inputs("granite"), 2, 2),
    "granitemoe": Arch(_family("granitemoe"), _family_inputs("granitemoe"), 2, 2),
    "granitemoeshared": Arch(_family("granitemoeshared"), _family_inputs("granitemoeshared"), 0, 0),
    "starcoder2": Arch(_family("starcoder2"), _family_inputs("starcoder2"), 2, 2),
    "olmo": Arch(_family("olmo"), _family_inputs("olmo"), 2, 2),
    "olmo3": Arch(_family("olmo3"), _family_inputs("olmo3"), 4, 0),
    "exaone4": Arch(_family("exaone4"), _family_inputs("exaone4"), 4, 0),
    "gpt_oss": Arch(_family("gpt_oss"), _family_inputs("gpt_oss"), 2, 2),
    "nemotron": Arch(_family("nemotron"), _family_inputs("nemotron"), 2, 2),
    "cohere": Arch(_family("cohere"), _family_inputs("cohere"), 0, 0),
    "cohere2": Arch(_family("cohere2"), _family_inputs("cohere2"), 0, 0),
    "stablelm": Arch(_family("stablelm"), _family_inputs("stablelm"), 2, 2),
    "stablelm_parallel": Arch(
        _family("stablelm_parallel"), _family_inputs("stablelm_parallel"), 0, 0
    ),
    "falcon": Arch(_family("falcon"), _family_inputs("falcon"), 0, 0),
    "falcon_sequential": Arch(
        _family("falcon_sequential"), _family_inputs("falcon_sequential"), 0, 0
    ),
    "falcon_new_arch": Arch(_family("falcon_new_arch"), _family_inputs("falcon_new_arch"), 0, 0),
    "gptj": Arch(_family("gptj"), _family_inputs("gptj"), 0, 0),
    "phi": Arch(_family("phi"), _family_inputs("phi"), 0, 0),
    "qwen3_next": Arch(_family("qwen3_next"), _family_inputs("qwen3_next"), 2, 2),
    "llama4": Arch(_family("llama4"), _family_inputs("llama4"), 2, 2),
    "minicpm3": Arch(_family("minicpm3"), _family_inputs("minicpm3"), 2, 2),
    "llava": Arch(_family("llava"), _family_inputs("llava"), 3, 2, idle=1),
    "paligemma": Arch(_family("paligemma"), _family_inputs("paligemma"), 3, 2, idle=1),
    "internvl": Arch(_family("internvl"), _family_inputs("internvl"), 3, 2, idle=1),
    "xlm_roberta": Arch(_family("xlm_roberta"), _family_inputs("xlm_roberta"), 4, 0),
    "electra": Arch(_family("electra"), _family_inputs("electra"), 4, 0),
    "deberta_v2": Arch(_family("deberta_v2"), _family_inputs("deberta_v2"), 4, 0),
    "deberta_v2_conv": Arch(_family("deberta_v2_conv"), _family_inputs("deberta_v2_conv"), 4, 0),
    "distilbert": Arch(_family("distilbert"), _family_inputs("distilbert"), 0, 0),
    "modernbert": Arch(_family("modernbert"), _family_inputs("modernbert"), 2, 2),
    "hf_vit": Arch(_family("vit"), _family_inputs("vit"), 2, 2),
    "hf_vit_model": Arch(_family("vit_model"), _family_inputs("vit_model"), 2, 2),
    "clip_text": Arch(_family("clip_text"), _family_inputs("clip_text"), 2, 1),
    "clip_vision": Arch(_family("clip_vision"), _family_inputs("clip_vision"), 2, 1),
    "siglip_text": Arch(_family("siglip_text"), _family_inputs("siglip_text"), 2, 1),
    "siglip_vision": Arch(_family("siglip_vision"), _family_inputs("siglip_vision"), 2, 1),
    "whisper": Arch(_family("whisper"), _family_inputs("whisper"), 0, 0),
    "deit_tiny": Arch(_family("deit_tiny"), _family_inputs("deit_tiny"), 2, 2),
    "deit3_small": Arch(_family("deit3_small"), _family_inputs("deit3_small"), 2, 2),
    "cait_xxs24": Arch(_family("cait_xxs24"), _family_inputs("cait_xxs24"), 2, 1),
    "beit_base": Arch(_family("beit_base"), _family_inputs("beit_base"), 2, 1),
    "eva02_tiny": Arch(_family("eva02_tiny"), _family_inputs("eva02_tiny"), 2, 1),
    "swin_tiny": Arch(_family("swin_tiny"), _family_inputs("swin_tiny"), 0, 0),
    "swinv2_tiny": Arch(_family("swinv2_tiny"), _family_inputs("swinv2_tiny"), 0, 0),
    "convnext_atto": Arch(_family("convnext_atto"), _family_inputs("convnext_atto"), 0, 0),
}


# Layers the installed transformers release writes so that resfuse refuses them (or lists
# as not fusable), with the reason patch must give (tools/test_releases.py runs the suite on
# older releases): the tests then require that reason in the report, norms-only patching and
# the unpatched results
_RELEASE = tuple(int(p) for p in transformers.__version__.split(".")[:2])
_SLIDING_MASK = "which is neither a layer argument nor a constant"  # a mask sliced in the layer
_VIT_OUTPUT = "its MLP's add is inside its ViTOutput module"
REFUSED = {
    # transformers < 4.54: Gemma2/3's layer slices the sliding-window mask itself
    "gemma2": _SLIDING_MASK if _RELEASE < (4, 54) else None,
    "gemma3": _SLIDING_MASK if _RELEASE < (4, 54) else None,
    # transformers < 4.52: Llama 4's layer swaps in the chunked mask for its RoPE layers
    "llama4": "takes other arguments on another path" if _RELEASE < (4, 52) else None,
    # transformers < 5.10: ViTLayer's second add is in a submodule
    "hf_vit": _VIT_OUTPUT if _RELEASE < (5, 10) else None,
    "hf_vit_model": _VIT_OUTPUT if _RELEASE < (5, 10) else None,
}
# transformers < 4.54 layers return a tuple (hidden_states, ...)
LAYERS_RETURN_TUPLES = _RELEASE < (4, 54)


def refused(arch: str):
    """The reason resfuse leaves ``arch``'s layers unfused on this release, or None."""
    return REFUSED.get(arch)


def refusal_notes(report) -> list:
    """The report's notes that a refusal (or an unfused variant) may give."""
    return list(report.skipped) + list(report.unfused)


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
