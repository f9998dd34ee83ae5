"""Tiny random-config builders (no downloads) for the families that resfuse's test-suite does not
cover yet, with one input builder per family.

Every ``build_<name>()`` returns an ``nn.Module`` in fp32 whose ``model(**inputs_<name>(gen))`` runs
in a few milliseconds on CPU. A builder raises :class:`Absent` when the installed transformers
release does not ship the family. Works on transformers 4.51.3, 4.57.6, 5.0.0, 5.10.4 and 5.24.0
(see check-<release>.txt) and timm 1.0.31.

Conventions (as in tests/integrations/tiny_models.py): hidden 32, 2 layers, 4 heads / 2 kv heads /
head_dim 8, intermediate 48, vocab 64, token ids of shape (2, 7) in [3, 64); MoE: 4 experts, top-2,
expert intermediate 16, every layer sparse where the config allows; timm models without
drop-path (the suite compares two runs, which random masks would tell apart).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
import transformers

transformers.logging.set_verbosity_error()

VOCAB, HIDDEN, SEQ, BATCH = 64, 32, 7, 2
RELEASE = tuple(int(p) for p in transformers.__version__.split(".")[:2])
V5 = RELEASE >= (5, 0)

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
# MoE sizes: 4 experts, top-2, expert width 16
_MOE_EXPERT = 16


class Absent(RuntimeError):
    """The installed transformers release does not ship this family."""


def _require(model_type: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise Absent(f"{model_type} not in transformers {transformers.__version__}")


def _config(model_type: str, drop=(), **overrides):
    """AutoConfig.for_model with the tiny decoder defaults (minus ``drop``) and ``overrides``."""
    _require(model_type)
    kwargs = {k: v for k, v in {**_DECODER, **overrides}.items() if k not in drop}
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def _causal_lm(model_type: str, drop=(), **overrides):
    return transformers.AutoModelForCausalLM.from_config(_config(model_type, drop, **overrides))


def _rope(theta: float = 10000.0, **params) -> dict:
    """Config kwargs for a rope setting: ``rope_parameters`` on v5, ``rope_theta``/``rope_scaling``
    on v4. ``params`` holds the extra keys (``rope_type``, ``mrope_section``, ...)."""
    if V5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **params}}
    scaling = dict(params) if params else None
    if scaling is not None:
        scaling.setdefault("rope_type", "default")
        scaling["type"] = scaling["rope_type"]
    return {"rope_theta": theta, "rope_scaling": scaling}


# ----------------------------------------------------------------------------------------------
# input builders


def inputs_tokens(gen: torch.Generator) -> dict:
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)}


def inputs_image16(gen: torch.Generator) -> dict:
    """timm models: forward(x)."""
    return {"x": torch.randn(BATCH, 3, 16, 16, generator=gen)}


def inputs_image32(gen: torch.Generator) -> dict:
    return {"x": torch.randn(BATCH, 3, 32, 32, generator=gen)}


def inputs_pixels16(gen: torch.Generator) -> dict:
    """HF vision models: forward(pixel_values)."""
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen)}


# ----------------------------------------------------------------------------------------------
# decoders (AutoModelForCausalLM)


_SLIDING_FULL = [
    "sliding_attention",
    "full_attention",
]  # layer 0 sliding-window (4 < 7 tokens), layer 1 full


def build_ministral():
    return _causal_lm("ministral", sliding_window=4, layer_types=_SLIDING_FULL)


def build_ministral3():
    return _causal_lm("ministral3", sliding_window=4, layer_types=_SLIDING_FULL)


def build_mixtral():
    return _causal_lm(
        "mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=_MOE_EXPERT
    )


def build_qwen2_moe():
    return _causal_lm(
        "qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=_MOE_EXPERT,
        shared_expert_intermediate_size=24,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def build_qwen3_moe():
    return _causal_lm(
        "qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=_MOE_EXPERT,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def build_glm():
    return _causal_lm("glm")


def build_glm4():
    return _causal_lm("glm4")


def build_smollm3():
    return _causal_lm("smollm3")


def _mla(**extra):
    """Multi-head latent attention sizes (DeepSeek-V2/V3, MiniCPM3): q/kv LoRA rank 16,
    nope/rope/v head dims 8; kv heads = heads."""
    return dict(
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        **extra,
    )


def build_deepseek_v2():
    return _causal_lm(
        "deepseek_v2",
        drop=("head_dim",),
        **_mla(),
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=_MOE_EXPERT,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
    )


def build_deepseek_v3():
    return _causal_lm(
        "deepseek_v3",
        drop=("head_dim",),
        **_mla(),
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=_MOE_EXPERT,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
    )


def build_hunyuan_v1_dense():
    return _causal_lm("hunyuan_v1_dense")


def build_hunyuan_v1_moe():
    # experts and the shared MLP both use intermediate_size
    return _causal_lm("hunyuan_v1_moe", num_experts=4, moe_topk=2, intermediate_size=_MOE_EXPERT)


def build_phi3():
    return _causal_lm("phi3")


def build_granite():
    return _causal_lm(
        "granite", residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0
    )


def build_granitemoe():
    return _causal_lm(
        "granitemoe",
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=_MOE_EXPERT,
        residual_multiplier=0.5,
    )


def build_granitemoeshared():
    return _causal_lm(
        "granitemoeshared",
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=_MOE_EXPERT,
        shared_intermediate_size=24,
        residual_multiplier=0.5,
    )


def build_starcoder2():
    return _causal_lm("starcoder2")


def build_olmo():
    return _causal_lm("olmo")


def build_olmo3():
    return _causal_lm("olmo3", sliding_window=4, layer_types=_SLIDING_FULL)


def build_exaone4():
    return _causal_lm("exaone4", sliding_window=4, layer_types=_SLIDING_FULL)


def build_gpt_oss():
    return _causal_lm(
        "gpt_oss",
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=_MOE_EXPERT,
        sliding_window=4,
        layer_types=_SLIDING_FULL,
    )


def build_nemotron():
    return _causal_lm("nemotron")


def build_cohere():
    return _causal_lm("cohere")


def build_cohere2():
    # layer_types from 4.57; 4.51.3 reads sliding_window_pattern (every 2nd layer full)
    return _causal_lm(
        "cohere2", sliding_window=4, layer_types=_SLIDING_FULL, sliding_window_pattern=2
    )


def build_stablelm():
    return _causal_lm("stablelm", use_parallel_residual=False)


def build_stablelm_parallel():
    return _causal_lm("stablelm", use_parallel_residual=True)


def _falcon(**overrides):
    config = transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    return transformers.FalconForCausalLM(config)


def build_falcon():
    # Falcon-7B layout: parallel attention/MLP sharing one input_layernorm, multi-query
    return _falcon()


def build_falcon_sequential():
    # parallel_attn=False: input_layernorm + post_attention_layernorm
    return _falcon(parallel_attn=False, multi_query=False)


def build_falcon_new_arch():
    # Falcon-40B/180B layout: ln_attn + ln_mlp on the same input, grouped kv
    return _falcon(new_decoder_architecture=True, num_kv_heads=2)


def build_gptj():
    config = transformers.GPTJConfig(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_inner=48,
        rotary_dim=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPTJForCausalLM(config)


def build_phi():
    return _causal_lm("phi", drop=("head_dim",), num_key_value_heads=4)


def build_qwen3_next():
    return _causal_lm(
        "qwen3_next",
        layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=_MOE_EXPERT,
        shared_expert_intermediate_size=_MOE_EXPERT,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def build_llama4():
    _require("llama4_text")
    config = transformers.Llama4TextConfig(
        **_DECODER
        | dict(
            intermediate_size=_MOE_EXPERT,  # expert width
            intermediate_size_mlp=48,  # dense layers (none here)
            num_local_experts=4,
            num_experts_per_tok=2,
            interleave_moe_layer_step=1,  # every layer MoE
            no_rope_layers=[
                1,
                0,
            ],  # layer 0 rope + chunked attention, layer 1 NoPE + full attention
            attention_chunk_size=4,  # chunked local attention on the rope layers
        )
    )
    model = transformers.Llama4ForCausalLM(config)
    if RELEASE < (4, 52):
        # 4.51.3's _init_weights skips Llama4TextExperts: gate_up_proj/down_proj stay torch.empty
        # (uninitialised memory, NaN/huge values)
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__ == "Llama4TextExperts":
                    module.gate_up_proj.normal_(0.0, config.initializer_range)
                    module.down_proj.normal_(0.0, config.initializer_range)
    return model


def inputs_llama4(gen):
    # 4.51.3 slices attention_mask for the chunked-attention mask, so it must be given, and its
    # HybridChunkedCache defaults to bfloat16 (k/v dtype mismatch in fp32), hence use_cache=False
    ids = inputs_tokens(gen)["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def build_minicpm3():
    return _causal_lm(
        "minicpm3", drop=("head_dim",), **_mla(), scale_emb=2.0, scale_depth=1.4, dim_model_base=16
    )


# ----------------------------------------------------------------------------------------------
# vision-language models, text-only inputs


def _qwen_vl_text(**extra):
    return {
        **_DECODER,
        **_rope(10000.0, rope_type="default", mrope_section=[2, 1, 1]),
        **extra,
    }


# special tokens out of the input range [3, 64) (never embedded on text-only inputs);
# 4.51.3's Qwen2-VL configs have no defaults for them
_QWEN_VL_TOKENS = dict(
    image_token_id=VOCAB + 1,
    video_token_id=VOCAB + 2,
    vision_start_token_id=VOCAB + 3,
    vision_end_token_id=VOCAB + 4,
)


def build_qwen2_vl():
    _require("qwen2_vl")
    vision = dict(depth=1, embed_dim=16, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=8)
    text = _qwen_vl_text()
    if RELEASE < (4, 52):  # flat text kwargs
        config = transformers.Qwen2VLConfig(vision_config=vision, **text, **_QWEN_VL_TOKENS)
    else:
        config = transformers.Qwen2VLConfig(
            vision_config=vision, text_config=text, **_QWEN_VL_TOKENS
        )
    return transformers.Qwen2VLForConditionalGeneration(config)


def build_qwen2_5_vl():
    _require("qwen2_5_vl")
    vision = dict(
        depth=1,
        hidden_size=16,
        out_hidden_size=HIDDEN,
        intermediate_size=32,
        num_heads=2,
        patch_size=8,
        window_size=16,
        fullatt_block_indexes=[0],
    )
    text = _qwen_vl_text()
    if RELEASE < (4, 52):
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, **text, **_QWEN_VL_TOKENS)
    else:
        config = transformers.Qwen2_5_VLConfig(
            vision_config=vision, text_config=text, **_QWEN_VL_TOKENS
        )
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def _qwen3_vision():
    return dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=8,
        out_hidden_size=HIDDEN,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )


def build_qwen3_vl():
    _require("qwen3_vl")
    text = _qwen_vl_text(
        **_rope(10000.0, rope_type="default", mrope_section=[2, 1, 1], mrope_interleaved=True)
    )
    config = transformers.Qwen3VLConfig(
        vision_config=_qwen3_vision(), text_config=text, **_QWEN_VL_TOKENS
    )
    return transformers.Qwen3VLForConditionalGeneration(config)


def build_qwen3_vl_moe():
    _require("qwen3_vl_moe")
    text = _qwen_vl_text(
        **_rope(10000.0, rope_type="default", mrope_section=[2, 1, 1], mrope_interleaved=True),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=_MOE_EXPERT,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    config = transformers.Qwen3VLMoeConfig(
        vision_config=_qwen3_vision(), text_config=text, **_QWEN_VL_TOKENS
    )
    return transformers.Qwen3VLMoeForConditionalGeneration(config)


def _mllama_text(**extra):
    return dict(
        {k: v for k, v in _DECODER.items() if k != "head_dim"},
        cross_attention_layers=[1],  # layer 0 self-attention, layer 1 cross-attention
        **_rope(500000.0, rope_type="default"),  # 4.x modeling reads rope_scaling["rope_type"]
        **extra,
    )


def _mllama_vision():
    return dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=[0],
        vision_output_dim=32,  # hidden_size * (len(intermediate_layers_indices) + 1)
    )


def _open_gates(model, value=0.5):
    """The cross-attention layer's tanh gates (cross_attn_attn_gate, cross_attn_mlp_gate) are
    initialised to 0, which makes both of its branches vanish; open them so the branches count."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(value)
    return model


def build_mllama():
    # text-only inputs: the cross-attention layer (index 1) is skipped by MllamaTextModel
    _require("mllama")
    config = transformers.MllamaConfig(
        vision_config=_mllama_vision(), text_config=_mllama_text(), image_token_index=VOCAB + 1
    )
    return _open_gates(transformers.MllamaForConditionalGeneration(config))


def build_mllama_text():
    """MllamaForCausalLM alone (the text model); inputs_mllama_text passes cross_attention_states so
    the cross-attention layer runs instead of being skipped."""
    _require("mllama")
    from transformers.models.mllama.configuration_mllama import (
        MllamaTextConfig,
    )  # not top-level < 5.10

    return _open_gates(transformers.MllamaForCausalLM(MllamaTextConfig(**_mllama_text())))


def inputs_mllama_text(gen):
    return {
        **inputs_tokens(gen),
        "cross_attention_states": torch.randn(BATCH, 5, HIDDEN, generator=gen),
    }


def _clip_vision(**extra):
    return dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        **extra,
    )


def build_llava():
    _require("llava")
    config = transformers.LlavaConfig(
        vision_config=dict(_clip_vision(), model_type="clip_vision_model"),
        text_config=dict(_DECODER, model_type="llama"),
        image_token_index=VOCAB + 1,  # outside the inputs; never embedded text-only
        image_seq_length=4,
        vision_feature_layer=-1,
    )
    return transformers.LlavaForConditionalGeneration(config)


def inputs_paligemma(gen):
    # transformers 5.0 requires the prefix/suffix marks in training: all text is prefix
    tokens = inputs_tokens(gen)
    return {**tokens, "token_type_ids": torch.zeros_like(tokens["input_ids"])}


def build_paligemma():
    _require("paligemma")
    config = transformers.PaliGemmaConfig(
        vision_config=dict(_clip_vision(), model_type="siglip_vision_model"),
        text_config=dict(_DECODER, model_type="gemma"),
        image_token_index=VOCAB + 1,  # outside the inputs; never embedded text-only
        vocab_size=VOCAB,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return transformers.PaliGemmaForConditionalGeneration(config)


def build_internvl():
    _require("internvl")
    config = transformers.InternVLConfig(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=dict(_DECODER, model_type="qwen2"),
        image_token_id=VOCAB + 1,  # outside the inputs; never embedded text-only
        image_seq_length=1,
    )
    return transformers.InternVLForConditionalGeneration(config)


# ----------------------------------------------------------------------------------------------
# encoders


def _bert_like(config_cls, **overrides):
    return config_cls(
        **{
            **dict(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=40,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            **overrides,
        }
    )


def build_xlm_roberta():
    return transformers.XLMRobertaForMaskedLM(
        _bert_like(transformers.XLMRobertaConfig, pad_token_id=1)
    )


def build_electra():
    return transformers.ElectraForMaskedLM(
        _bert_like(transformers.ElectraConfig, embedding_size=HIDDEN)
    )


def build_deberta_v2():
    # DeBERTa-v3 style: relative attention with log buckets, c2p+p2c, layer-normed rel. embeddings
    config = _bert_like(
        transformers.DebertaV2Config,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        pad_token_id=0,
    )
    return transformers.DebertaV2ForMaskedLM(config)


def build_deberta_v2_conv():
    # DeBERTa-v2-xlarge style: adds encoder.conv (ConvLayer after layer 0)
    config = _bert_like(
        transformers.DebertaV2Config,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        conv_kernel_size=3,
        conv_act="gelu",
        pad_token_id=0,
    )
    return transformers.DebertaV2ForMaskedLM(config)


def build_distilbert():
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=2,
        n_heads=4,
        hidden_dim=48,
        max_position_embeddings=40,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
    )
    return transformers.DistilBertForMaskedLM(config)


def build_modernbert():
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        global_attn_every_n_layers=2,  # layer 0 global, layer 1 local (sliding)
        local_attention=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        reference_compile=False,
    )
    return transformers.ModernBertForMaskedLM(config)


def _vit_config():
    return transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=8,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_vit():
    return transformers.ViTForImageClassification(_vit_config())


def build_vit_model():
    return transformers.ViTModel(_vit_config())


def build_clip_text():
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.CLIPTextModel(config)


def build_clip_vision():
    config = transformers.CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    return transformers.CLIPVisionModel(config)


def build_siglip_text():
    config = transformers.SiglipTextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.SiglipTextModel(config)


def build_siglip_vision():
    config = transformers.SiglipVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    return transformers.SiglipVisionModel(config)


WHISPER_MELS, WHISPER_SOURCE = 8, 8


def build_whisper():
    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=WHISPER_MELS,
        d_model=HIDDEN,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=48,
        max_source_positions=WHISPER_SOURCE,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return transformers.WhisperForConditionalGeneration(config)


def inputs_whisper(gen):
    # the encoder requires exactly 2 * max_source_positions frames (two convs, the 2nd with stride 2)
    return {
        "input_features": torch.randn(BATCH, WHISPER_MELS, 2 * WHISPER_SOURCE, generator=gen),
        "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen),
    }


# ----------------------------------------------------------------------------------------------
# timm


def _timm_vit(name, **extra):
    kwargs = dict(
        pretrained=False,
        drop_path_rate=0.0,
        img_size=16,
        patch_size=8,
        embed_dim=HIDDEN,
        depth=2,
        num_heads=4,
        num_classes=10,
    )
    return timm.create_model(name, **{**kwargs, **extra})


def build_deit_tiny():
    return _timm_vit("deit_tiny_patch16_224")


def build_deit3_small():
    # LayerScale ls1/ls2 (init_values=1e-6 from the model def), no_embed_class
    return _timm_vit("deit3_small_patch16_224")


def build_cait_xxs24():
    # 2 LayerScaleBlocks + 1 class-attention block (depth_token_only)
    return _timm_vit("cait_xxs24_224", depth_token_only=1)


def build_beit_base():
    return _timm_vit("beit_base_patch16_224")


def build_eva02_tiny():
    return _timm_vit("eva02_tiny_patch14_224", ref_feat_shape=(2, 2))


def build_swin_tiny():
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        drop_path_rate=0.0,
        img_size=16,
        patch_size=4,
        window_size=2,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        num_classes=10,
    )


def build_swinv2_tiny():
    return timm.create_model(
        "swinv2_tiny_window8_256",
        pretrained=False,
        drop_path_rate=0.0,
        img_size=16,
        patch_size=4,
        window_size=2,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        num_classes=10,
    )


def build_convnext_atto():
    # ConvNeXt always has 4 stages (stem /4, then /2 per stage 1-3): a 32x32 input -> 8, 4, 2, 1.
    # convnext_atto sets conv_mlp=True: blocks use LayerNorm2d (NCHW) + ConvMlp, no permute
    return timm.create_model(
        "convnext_atto",
        pretrained=False,
        drop_path_rate=0.0,
        depths=(2, 2, 2, 2),
        dims=(8, 16, 16, 32),
        num_classes=10,
    )


# ----------------------------------------------------------------------------------------------

_T = inputs_tokens
FAMILIES = {
    "ministral": (build_ministral, _T),
    "ministral3": (build_ministral3, _T),
    "mixtral": (build_mixtral, _T),
    "qwen2_moe": (build_qwen2_moe, _T),
    "qwen3_moe": (build_qwen3_moe, _T),
    "qwen2_vl": (build_qwen2_vl, _T),
    "qwen2_5_vl": (build_qwen2_5_vl, _T),
    "qwen3_vl": (build_qwen3_vl, _T),
    "qwen3_vl_moe": (build_qwen3_vl_moe, _T),
    "glm": (build_glm, _T),
    "glm4": (build_glm4, _T),
    "smollm3": (build_smollm3, _T),
    "deepseek_v2": (build_deepseek_v2, _T),
    "deepseek_v3": (build_deepseek_v3, _T),
    "hunyuan_v1_dense": (build_hunyuan_v1_dense, _T),
    "hunyuan_v1_moe": (build_hunyuan_v1_moe, _T),
    "mllama": (build_mllama, _T),
    "mllama_text": (build_mllama_text, inputs_mllama_text),
    "phi3": (build_phi3, _T),
    "granite": (build_granite, _T),
    "granitemoe": (build_granitemoe, _T),
    "granitemoeshared": (build_granitemoeshared, _T),
    "starcoder2": (build_starcoder2, _T),
    "olmo": (build_olmo, _T),
    "olmo3": (build_olmo3, _T),
    "exaone4": (build_exaone4, _T),
    "gpt_oss": (build_gpt_oss, _T),
    "nemotron": (build_nemotron, _T),
    "cohere": (build_cohere, _T),
    "cohere2": (build_cohere2, _T),
    "stablelm": (build_stablelm, _T),
    "stablelm_parallel": (build_stablelm_parallel, _T),
    "falcon": (build_falcon, _T),
    "falcon_sequential": (build_falcon_sequential, _T),
    "falcon_new_arch": (build_falcon_new_arch, _T),
    "gptj": (build_gptj, _T),
    "phi": (build_phi, _T),
    "qwen3_next": (build_qwen3_next, _T),
    "llama4": (build_llama4, inputs_llama4),
    "minicpm3": (build_minicpm3, _T),
    "llava": (build_llava, _T),
    "paligemma": (build_paligemma, inputs_paligemma),
    "internvl": (build_internvl, _T),
    "xlm_roberta": (build_xlm_roberta, _T),
    "electra": (build_electra, _T),
    "deberta_v2": (build_deberta_v2, _T),
    "deberta_v2_conv": (build_deberta_v2_conv, _T),
    "distilbert": (build_distilbert, _T),
    "modernbert": (build_modernbert, _T),
    "vit": (build_vit, inputs_pixels16),
    "vit_model": (build_vit_model, inputs_pixels16),
    "clip_text": (build_clip_text, _T),
    "clip_vision": (build_clip_vision, inputs_pixels16),
    "siglip_text": (build_siglip_text, _T),
    "siglip_vision": (build_siglip_vision, inputs_pixels16),
    "whisper": (build_whisper, inputs_whisper),
    "deit_tiny": (build_deit_tiny, inputs_image16),
    "deit3_small": (build_deit3_small, inputs_image16),
    "cait_xxs24": (build_cait_xxs24, inputs_image16),
    "beit_base": (build_beit_base, inputs_image16),
    "eva02_tiny": (build_eva02_tiny, inputs_image16),
    "swin_tiny": (build_swin_tiny, inputs_image16),
    "swinv2_tiny": (build_swinv2_tiny, inputs_image16),
    "convnext_atto": (build_convnext_atto, inputs_image32),
}
