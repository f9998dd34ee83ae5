"""The families of the architecture table (architectures.FAMILIES), each with a tiny model
of the suite: at least 45 of them; on the installed release each patches as the table
says (its adds fused inside its layers, or its norms only with the reason reported), and
test_patch_models.py checks what every one of those models computes."""

from __future__ import annotations

import pytest
from patch_fixtures import backend  # noqa: F401 (fixture)
from tiny_models import ARCHS, refused

import resfuse
from resfuse.integrations import architectures

# family -> the tiny models of tiny_models.ARCHS that exercise it
MODELS = {
    "Llama": ["llama"],
    "Llama 4 (text)": ["llama4"],
    "Mistral": ["mistral"],
    "Ministral": ["ministral"],
    "Ministral 3": ["ministral3"],
    "Mixtral": ["mixtral"],
    "Qwen2": ["qwen2"],
    "Qwen2-MoE": ["qwen2_moe"],
    "Qwen3": ["qwen3"],
    "Qwen3-MoE": ["qwen3_moe"],
    "Qwen3-Next": ["qwen3_next"],
    "Qwen2-VL": ["qwen2_vl"],
    "Qwen2.5-VL": ["qwen2_5_vl"],
    "Qwen3-VL": ["qwen3_vl"],
    "Qwen3-VL-MoE": ["qwen3_vl_moe"],
    "Phi-3": ["phi3"],
    "Phi": ["phi"],
    "Granite": ["granite"],
    "GraniteMoE": ["granitemoe"],
    "GraniteMoE-Shared": ["granitemoeshared"],
    "GLM": ["glm"],
    "GLM-4": ["glm4"],
    "SmolLM3": ["smollm3"],
    "OLMo": ["olmo"],
    "OLMo2": ["olmo2"],
    "OLMo3": ["olmo3"],
    "DeepSeek-V2": ["deepseek_v2"],
    "DeepSeek-V3": ["deepseek_v3"],
    "GPT-OSS": ["gpt_oss"],
    "Nemotron": ["nemotron"],
    "EXAONE-4": ["exaone4"],
    "Hunyuan (dense)": ["hunyuan_v1_dense"],
    "Hunyuan (MoE)": ["hunyuan_v1_moe"],
    "MiniCPM3": ["minicpm3"],
    "Gemma": ["gemma"],
    "Gemma2": ["gemma2"],
    "Gemma3 (text)": ["gemma3"],
    "Cohere": ["cohere"],
    "Cohere2": ["cohere2"],
    "StableLM": ["stablelm", "stablelm_parallel"],
    "Falcon": ["falcon", "falcon_sequential", "falcon_new_arch"],
    "GPT-2": ["gpt2", "gpt2_cross"],
    "GPT-NeoX": ["gpt_neox", "gpt_neox_parallel"],
    "GPT-J": ["gptj"],
    "Starcoder2": ["starcoder2"],
    "T5": ["t5"],
    "Mllama (text and vision)": ["mllama", "mllama_text"],
    "Llava (its language model and CLIP tower)": ["llava"],
    "PaliGemma (its language model and SigLIP tower)": ["paligemma"],
    "InternVL (its language model and vision tower)": ["internvl"],
    "BERT": ["bert"],
    "RoBERTa": ["roberta"],
    "XLM-RoBERTa": ["xlm_roberta"],
    "ELECTRA": ["electra"],
    "DeBERTa-v2": ["deberta_v2", "deberta_v2_conv"],
    "DistilBERT": ["distilbert"],
    "ModernBERT": ["modernbert"],
    "ViT (transformers)": ["hf_vit", "hf_vit_model"],
    "CLIP": ["clip_text", "clip_vision"],
    "SigLIP": ["siglip_text", "siglip_vision"],
    "Whisper": ["whisper"],
    "ViT (timm)": ["vit"],
    "DeiT / DeiT-III (timm)": ["deit_tiny", "deit3_small"],
    "CaiT (timm)": ["cait_xxs24"],
    "BEiT (timm)": ["beit_base"],
    "EVA (timm)": ["eva02_tiny"],
    "Swin (timm)": ["swin_tiny"],
    "Swin v2 (timm)": ["swinv2_tiny"],
    "ConvNeXt (timm)": ["convnext_atto"],
}


def test_at_least_45_families_each_with_a_tiny_model():
    assert len(architectures.FAMILIES) >= 45
    assert set(MODELS) == set(architectures.FAMILIES)
    for family, names in MODELS.items():
        assert names and all(n in ARCHS for n in names), family


@pytest.mark.parametrize("family", list(architectures.FAMILIES))
def test_each_family_patches_as_the_table_says(family):
    _, how = architectures.FAMILIES[family]
    reports = []
    for name in MODELS[family]:
        model = ARCHS[name].model()  # skips where this release lacks the family
        report = resfuse.patch(model, fuse_residual="across_layers")
        assert report.norms, f"{name}: no norm replaced\n{report}"
        reason = refused(name)
        if reason is None:
            assert not report.skipped, f"{name}\n{report}"
        else:  # this release's code is refused, or not fusable, with its reason
            notes = report.skipped + report.unfused
            assert any(reason in n.what for n in notes), f"{name}\n{report}"
        reports.append((name, report))
    if how == "fused" and not any(refused(n) for n, _ in reports):
        assert any(r.fused for _, r in reports), f"{family}: no add fused"
    if how == "norms":
        # the adds stay unfused, and the report says why
        assert all(not r.fused for _, r in reports), family
        assert all(r.unfused for _, r in reports), family
