"""The architecture table: which classes resfuse.patch knows, as declarative entries.

Keys are ``"module:qualname"`` (nothing here imports transformers or timm); a model's module
matches an entry when its class is exactly that class. An entry *claims* a computation;
``resfuse.patch`` checks the claim on the installed code before it uses it: each norm is
run against resfuse's norm (probes.py), each layer's forward is read as a dataflow and
matched with its entry (layout.py). Adding an architecture = adding its entries here (a
``Norm`` for its norm class, a ``Chain`` / ``PostNorm`` for the layer whose adds fuse, a
``Stack`` for the module that runs the layers) and a tiny model to
tests/integrations/tiny_models.py.
"""

from __future__ import annotations

from .specs import Chain, Condition, Norm, PostNorm, Stack, Sublayer, Unfused

_T = "transformers.models."

# --------------------------------------------------------------------------- norms

RMS_LLAMA = Norm("rms", eps="variance_epsilon", out_dtype="promote_weight")  # w * x.to(dtype)
RMS_LLAMA4 = Norm("rms", eps="eps", out_dtype="promote_weight")  # norm(x).type_as(x) * w
RMS_ROUND_ONCE = Norm("rms", eps="variance_epsilon")  # (w * x).to(dtype)
RMS_GEMMA = Norm("rms", eps="eps", zero_centered_weight=True)  # x * (1 + w), fp32
RMS_T5 = Norm("rms", eps="variance_epsilon", out_dtype="t5")
LAYER_COHERE = Norm("layer", eps="variance_epsilon")  # fp32, weight only, cast back
LAYER_OLMO = Norm("layer", eps=1e-5)  # no weight, no bias, eps fixed, fp32
# F.layer_norm(x, shape, weight + 1, bias): the autocast cast it does is not verified
LAYER_1P = Norm(
    "layer", eps="eps", zero_centered_weight=True, normalized_shape=True, autocast="original"
)
TORCH_LAYER_NORM = Norm("layer", eps="eps", normalized_shape=True, autocast="layer_norm")
# F.rms_norm's autocast behaviour is not verified on CUDA: under autocast the original runs
TORCH_RMS_NORM = Norm("rms", eps="eps", normalized_shape=True, autocast="original")
_TIMM_FAST_NORM = Condition(
    "_fast_norm",
    False,
    "timm's fast_norm is on (it normalizes in the autocast dtype): left as it is",
)
TIMM_LAYER_NORM = Norm(
    "layer", eps="eps", normalized_shape=True, autocast="layer_norm", conditions=(_TIMM_FAST_NORM,)
)
TIMM_LAYER_NORM_2D = Norm(  # (N, C, H, W), normalized over C
    "layer", eps="eps", channels_first=True, autocast="layer_norm", conditions=(_TIMM_FAST_NORM,)
)


def _hf(family: str, name: str) -> str:
    return f"{_T}{family}.modeling_{family}:{name}"


NORMS = {
    "torch.nn.modules.normalization:LayerNorm": TORCH_LAYER_NORM,
    "torch.nn.modules.normalization:RMSNorm": TORCH_RMS_NORM,
    "timm.layers.norm:LayerNorm": TIMM_LAYER_NORM,
    "timm.layers.norm:LayerNorm2d": TIMM_LAYER_NORM_2D,
    # rounds after the weight since transformers 4.54, like Llama's before
    _hf("olmo2", "Olmo2RMSNorm"): (RMS_ROUND_ONCE, RMS_LLAMA),
    _hf("olmo3", "Olmo3RMSNorm"): RMS_ROUND_ONCE,
    _hf("gpt_oss", "GptOssRMSNorm"): RMS_ROUND_ONCE,
    _hf("gemma", "GemmaRMSNorm"): RMS_GEMMA,
    _hf("gemma2", "Gemma2RMSNorm"): RMS_GEMMA,
    _hf("gemma3", "Gemma3RMSNorm"): RMS_GEMMA,
    _hf("qwen3_next", "Qwen3NextRMSNorm"): RMS_GEMMA,
    _hf("t5", "T5LayerNorm"): RMS_T5,
    _hf("llama4", "Llama4TextRMSNorm"): RMS_LLAMA4,
    _hf("cohere", "CohereLayerNorm"): LAYER_COHERE,
    _hf("cohere2", "Cohere2LayerNorm"): LAYER_COHERE,
    _hf("olmo", "OlmoLayerNorm"): LAYER_OLMO,
    _hf("nemotron", "NemotronLayerNorm1P"): LAYER_1P,
}
# Llama's RMSNorm, copied under each family's name
for _family, _name in (
    ("llama", "Llama"),
    ("mistral", "Mistral"),
    ("ministral", "Ministral"),
    ("ministral3", "Ministral3"),
    ("mixtral", "Mixtral"),
    ("qwen2", "Qwen2"),
    ("qwen2_moe", "Qwen2Moe"),
    ("qwen3", "Qwen3"),
    ("qwen3_moe", "Qwen3Moe"),
    ("qwen2_vl", "Qwen2VL"),
    ("qwen2_vl", "Qwen2"),  # transformers < 5: Qwen2-VL's own copy of Qwen2's
    ("qwen2_5_vl", "Qwen2_5_VL"),
    ("qwen2_5_vl", "Qwen2"),
    ("qwen3_vl", "Qwen3VLText"),
    ("qwen3_vl_moe", "Qwen3VLMoeText"),
    ("phi3", "Phi3"),
    ("granite", "Granite"),
    ("granitemoe", "GraniteMoe"),
    ("granitemoeshared", "GraniteMoeShared"),
    ("glm", "Glm"),
    ("glm4", "Glm4"),
    ("smollm3", "SmolLM3"),
    ("deepseek_v2", "DeepseekV2"),
    ("deepseek_v3", "DeepseekV3"),
    ("exaone4", "Exaone4"),
    ("hunyuan_v1_dense", "HunYuanDenseV1"),
    ("hunyuan_v1_moe", "HunYuanMoEV1"),
    ("mllama", "MllamaText"),
    ("minicpm3", "MiniCPM3"),
):
    NORMS[_hf(_family, f"{_name}RMSNorm")] = RMS_LLAMA

# --------------------------------------------------------------------------- layers


def pre_norm(
    attn: str = "self_attn",
    mlp: str = "mlp",
    norm1: str = "input_layernorm",
    norm2: str = "post_attention_layernorm",
    *,
    attn_steps: tuple = (),
    mlp_steps: tuple = (),
    stream: str = "hidden_states",
    conditions: tuple = (),
) -> Chain:
    """``h = h + attn(norm1(h)); h = h + mlp(norm2(h))`` (Llama's layout), with the branch
    steps of each (dropout, a scale) and the attribute names a family uses."""
    return Chain(
        input=stream,
        sublayers=(Sublayer(attn, norm1, steps=attn_steps), Sublayer(mlp, norm2, steps=mlp_steps)),
        conditions=conditions,
    )


LLAMA_STYLE = pre_norm()

# Gemma2/3 (sandwich norms): r = r + post_norm(f); y = next_norm(r): each add is one
# norm_add_norm call (the branch norm, the add and the next norm); the closing add is
# norm_add, or norm_add_norm with the next layer's norm with fuse_residual="across_layers".
SANDWICH = pre_norm(
    norm2="pre_feedforward_layernorm",
    attn_steps=(("post_attention_layernorm", "norm"),),
    mlp_steps=(("post_feedforward_layernorm", "norm"),),
)
# GLM-4: the same, named otherwise (its post_attention_layernorm is the pre-MLP norm)
GLM4_SANDWICH = pre_norm(
    attn_steps=(("post_self_attn_layernorm", "norm"),),
    mlp_steps=(("post_mlp_layernorm", "norm"),),
)

# OLMo2 (reordered norms): r = r + norm(f), no norm after the add: each add is one norm_add
# call; the last layer's closing add can carry into the final norm (norm_add_norm).
REORDERED = Chain(
    input="hidden_states",
    sublayers=(
        Sublayer("self_attn", None, steps=(("post_attention_layernorm", "norm"),)),
        Sublayer("mlp", None, steps=(("post_feedforward_layernorm", "norm"),)),
    ),
)

GPT2_BLOCK = Chain(
    input="hidden_states",
    sublayers=(
        Sublayer("attn", "ln_1"),
        Sublayer("crossattention", "ln_cross_attn", when="encoder_hidden_states"),
        Sublayer("mlp", "ln_2"),
    ),
)

_PARALLEL = (
    "parallel residual (attention and MLP both read the layer input): no add precedes a norm"
)
GPT_NEOX_LAYER = pre_norm(
    "attention",
    attn_steps=(("post_attention_dropout", "module"),),
    mlp_steps=(("post_mlp_dropout", "module"),),
    conditions=(Condition("use_parallel_residual", False, _PARALLEL),),
)
STABLELM_LAYER = pre_norm(
    mlp_steps=(("dropout", "module"),),
    conditions=(Condition("use_parallel_residual", False, _PARALLEL),),
)

# Granite and MiniCPM3 scale each branch by a number the layer holds
GRANITE = pre_norm(
    attn_steps=(("residual_multiplier", "scale"),), mlp_steps=(("residual_multiplier", "scale"),)
)
GRANITE_MOE = pre_norm(
    mlp="block_sparse_moe",
    attn_steps=(("residual_multiplier", "scale"),),
    mlp_steps=(("residual_multiplier", "scale"),),
)
MINICPM3 = pre_norm(
    attn_steps=(("residual_scale", "scale"),), mlp_steps=(("residual_scale", "scale"),)
)
PHI3 = pre_norm(
    attn_steps=(("resid_attn_dropout", "module"),), mlp_steps=(("resid_mlp_dropout", "module"),)
)

TIMM_BLOCK = pre_norm(
    "attn",
    "mlp",
    "norm1",
    "norm2",
    attn_steps=(("ls1", "layer_scale"), ("drop_path1", "drop_path")),
    mlp_steps=(("ls2", "layer_scale"), ("drop_path2", "drop_path")),
    stream="x",
)


def _timm_gammas(drop1: str, drop2: str, gamma1: bool = True, gamma2: bool = True) -> Chain:
    """timm blocks that hold their LayerScale as parameters (``gamma_1 * attn(...)``)."""
    return pre_norm(
        "attn",
        "mlp",
        "norm1",
        "norm2",
        attn_steps=((("gamma_1", "scale"),) if gamma1 else ()) + ((drop1, "drop_path"),),
        mlp_steps=((("gamma_2", "scale"),) if gamma2 else ()) + ((drop2, "drop_path"),),
        stream="x",
    )


BERT_OUTPUT = PostNorm(
    input="hidden_states", residual="input_tensor", steps=("dense", "dropout"), norm="LayerNorm"
)

_T5_REASON = (
    "its add closes the sublayer; the next norm is in the next sublayer module, "
    "after T5Block's fp16 clamp"
)

LAYERS = {
    _hf("gemma2", "Gemma2DecoderLayer"): SANDWICH,
    _hf("gemma3", "Gemma3DecoderLayer"): SANDWICH,
    _hf("glm4", "Glm4DecoderLayer"): GLM4_SANDWICH,
    _hf("olmo2", "Olmo2DecoderLayer"): REORDERED,
    _hf("olmo3", "Olmo3DecoderLayer"): REORDERED,
    _hf("exaone4", "Exaone4DecoderLayer"): REORDERED,
    _hf("gpt2", "GPT2Block"): GPT2_BLOCK,
    _hf("gpt_neox", "GPTNeoXLayer"): GPT_NEOX_LAYER,
    _hf("stablelm", "StableLmDecoderLayer"): STABLELM_LAYER,
    _hf("phi3", "Phi3DecoderLayer"): PHI3,
    _hf("granite", "GraniteDecoderLayer"): GRANITE,
    _hf("granitemoe", "GraniteMoeDecoderLayer"): GRANITE_MOE,
    _hf("minicpm3", "MiniCPM3DecoderLayer"): MINICPM3,
    # the MoE block is `block_sparse_moe` before transformers 5
    _hf("mixtral", "MixtralDecoderLayer"): (LLAMA_STYLE, pre_norm(mlp="block_sparse_moe")),
    # hybrid: a layer holds either linear attention or full attention (its block type)
    _hf("qwen3_next", "Qwen3NextDecoderLayer"): (LLAMA_STYLE, pre_norm("linear_attn")),
    # its MoE layers view the routed (tokens, hidden) output as the residual before the add
    _hf("llama4", "Llama4TextDecoderLayer"): pre_norm(mlp="feed_forward"),
    _hf("modernbert", "ModernBertEncoderLayer"): pre_norm("attn", "mlp", "attn_norm", "mlp_norm"),
    # transformers >= 5.10; before, the MLP's add is inside ViTOutput
    _hf("vit", "ViTLayer"): (
        pre_norm(
            "attention",
            "mlp",
            "layernorm_before",
            "layernorm_after",
            attn_steps=(("dropout", "module"),),
            mlp_steps=(("dropout", "module"),),
        ),
        Unfused("its MLP's add is inside its ViTOutput module (transformers < 5.10)"),
    ),
    _hf("clip", "CLIPEncoderLayer"): pre_norm(norm1="layer_norm1", norm2="layer_norm2"),
    # the vision towers of the VLMs (ungated: Mllama's global layers gate each branch)
    _hf("mllama", "MllamaVisionEncoderLayer"): pre_norm(
        conditions=(Condition("is_gated", False, "a learned tanh gate scales each branch"),)
    ),
    _hf("qwen2_vl", "Qwen2VLVisionBlock"): pre_norm("attn", "mlp", "norm1", "norm2"),
    _hf("qwen2_5_vl", "Qwen2_5_VLVisionBlock"): pre_norm("attn", "mlp", "norm1", "norm2"),
    _hf("qwen3_vl", "Qwen3VLVisionBlock"): pre_norm("attn", "mlp", "norm1", "norm2"),
    _hf("qwen3_vl_moe", "Qwen3VLMoeVisionBlock"): pre_norm("attn", "mlp", "norm1", "norm2"),
    _hf("internvl", "InternVLVisionLayer"): tuple(
        pre_norm(
            "attention",
            "mlp",
            "layernorm_before",
            "layernorm_after",
            attn_steps=(("lambda_1", "scale"),),
            mlp_steps=(("dropout", "module"),) + lambda_2,
        )
        for lambda_2 in ((("lambda_2", "scale"),), ())
    ),
    _hf("siglip", "SiglipEncoderLayer"): pre_norm(norm1="layer_norm1", norm2="layer_norm2"),
    "timm.models.vision_transformer:Block": TIMM_BLOCK,
    "timm.models.cait:LayerScaleBlock": _timm_gammas("drop_path", "drop_path"),
    "timm.models.beit:Block": (
        _timm_gammas("drop_path1", "drop_path2"),
        _timm_gammas("drop_path1", "drop_path2", gamma1=False, gamma2=False),
    ),
    "timm.models.eva:EvaBlock": (
        _timm_gammas("drop_path1", "drop_path2"),
        _timm_gammas("drop_path1", "drop_path2", gamma2=False),
        _timm_gammas("drop_path1", "drop_path2", gamma1=False, gamma2=False),
    ),
    _hf("t5", "T5LayerSelfAttention"): Unfused(_T5_REASON),
    _hf("t5", "T5LayerCrossAttention"): Unfused(_T5_REASON),
    _hf("t5", "T5LayerFF"): Unfused(_T5_REASON),
    _hf("cohere", "CohereDecoderLayer"): Unfused(_PARALLEL),
    _hf("cohere2", "Cohere2DecoderLayer"): Unfused(_PARALLEL),
    _hf("phi", "PhiDecoderLayer"): Unfused(_PARALLEL),
    _hf("gptj", "GPTJBlock"): Unfused(_PARALLEL),
    _hf("falcon", "FalconDecoderLayer"): Unfused(
        "parallel attention and MLP in most configurations; the others add through "
        "`dropout_add(...)` and return a tuple built around it"
    ),
    _hf("granitemoeshared", "GraniteMoeSharedDecoderLayer"): Unfused(
        "its MLP branch is the sum of two modules (the routed and the shared experts)"
    ),
    _hf("mllama", "MllamaCrossAttentionDecoderLayer"): Unfused(
        "a learned tanh gate scales each branch, and text-only inputs skip the layer"
    ),
    _hf("distilbert", "TransformerBlock"): Unfused(
        "post-norm adds around an attention call inside one block (not yet a layout)"
    ),
    _hf("whisper", "WhisperEncoderLayer"): Unfused(
        "its MLP is written inline (fc1, activation, fc2) and its dropouts are functional"
    ),
    _hf("whisper", "WhisperDecoderLayer"): Unfused(
        "its MLP is written inline (fc1, activation, fc2) and its dropouts are functional"
    ),
    "timm.models.cait:LayerScaleBlockClassAttn": Unfused(
        "its norm reads the class token concatenated with the patches, not the residual"
    ),
    "timm.models.swin_transformer:SwinTransformerBlock": Unfused(
        "window partitioning, shifts and reshapes sit between the norm and the attention"
    ),
    "timm.models.swin_transformer_v2:SwinTransformerV2Block": Unfused(
        "window partitioning, shifts and reshapes sit between the norm and the attention"
    ),
    "timm.models.convnext:ConvNeXtBlock": Unfused(
        "its norm follows the depthwise convolution on the branch; no norm follows its add"
    ),
}
for _family, _name in (
    ("llama", "LlamaDecoderLayer"),
    ("mistral", "MistralDecoderLayer"),
    ("ministral", "MinistralDecoderLayer"),
    ("ministral3", "Ministral3DecoderLayer"),
    ("qwen2", "Qwen2DecoderLayer"),
    ("qwen2_moe", "Qwen2MoeDecoderLayer"),
    ("qwen3", "Qwen3DecoderLayer"),
    ("qwen3_moe", "Qwen3MoeDecoderLayer"),
    ("qwen2_vl", "Qwen2VLDecoderLayer"),
    ("qwen2_5_vl", "Qwen2_5_VLDecoderLayer"),
    ("qwen3_vl", "Qwen3VLTextDecoderLayer"),
    ("qwen3_vl_moe", "Qwen3VLMoeTextDecoderLayer"),
    ("gemma", "GemmaDecoderLayer"),
    ("glm", "GlmDecoderLayer"),
    ("smollm3", "SmolLM3DecoderLayer"),
    ("deepseek_v2", "DeepseekV2DecoderLayer"),
    ("deepseek_v3", "DeepseekV3DecoderLayer"),
    ("hunyuan_v1_dense", "HunYuanDenseV1DecoderLayer"),
    ("hunyuan_v1_moe", "HunYuanMoEV1DecoderLayer"),
    ("mllama", "MllamaSelfAttentionDecoderLayer"),
    ("olmo", "OlmoDecoderLayer"),
    ("gpt_oss", "GptOssDecoderLayer"),
    ("nemotron", "NemotronDecoderLayer"),
    ("starcoder2", "Starcoder2DecoderLayer"),
):
    LAYERS[_hf(_family, _name)] = LLAMA_STYLE
# BERT's post-norm outputs: LayerNorm(dropout(dense(x)) + input), in each family's copy
for _family, _name in (
    ("bert", "Bert"),
    ("roberta", "Roberta"),
    ("xlm_roberta", "XLMRoberta"),
    ("electra", "Electra"),
    ("deberta_v2", "DebertaV2"),
):
    LAYERS[_hf(_family, f"{_name}SelfOutput")] = BERT_OUTPUT
    LAYERS[_hf(_family, f"{_name}Output")] = BERT_OUTPUT

# Known modules that look like layers by name but hold no residual add of their own.
CONTAINERS = {
    _hf("t5", "T5Block"),
}

# --------------------------------------------------------------------------- stacks

# transformers < 4.54 keeps the gradient checkpointing switch on the stack (the stack's loop
# checkpoints each layer), later releases on each layer as well
_HF_CHECKPOINTING = "gradient_checkpointing"
_HF_DECODER_STACK = Stack(layers="layers", final_norm="norm", checkpointing=_HF_CHECKPOINTING)
STACKS = {
    _hf("gpt2", "GPT2Model"): Stack(layers="h", final_norm="ln_f", checkpointing=_HF_CHECKPOINTING),
    _hf("gpt_neox", "GPTNeoXModel"): Stack(
        layers="layers", final_norm="final_layer_norm", checkpointing=_HF_CHECKPOINTING
    ),
    _hf("modernbert", "ModernBertModel"): Stack(
        layers="layers", final_norm="final_norm", checkpointing=_HF_CHECKPOINTING
    ),
    _hf("vit", "ViTModel"): Stack(
        layers="layers", final_norm="layernorm", checkpointing=_HF_CHECKPOINTING
    ),
    # the text models' final norms are outside the encoder
    _hf("clip", "CLIPEncoder"): Stack(layers="layers", final_norm=None),
    _hf("mllama", "MllamaVisionEncoder"): Stack(layers="layers", final_norm=None),
    _hf("internvl", "InternVLVisionEncoder"): Stack(layers="layer", final_norm=None),
    _hf("qwen2_vl", "Qwen2VisionTransformerPretrainedModel"): Stack(
        layers="blocks", final_norm=None
    ),
    _hf("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"): Stack(
        layers="blocks", final_norm=None
    ),
    _hf("qwen3_vl", "Qwen3VLVisionModel"): Stack(layers="blocks", final_norm=None),
    _hf("qwen3_vl_moe", "Qwen3VLMoeVisionModel"): Stack(layers="blocks", final_norm=None),
    _hf("siglip", "SiglipEncoder"): Stack(layers="layers", final_norm=None),
    "timm.models.vision_transformer:VisionTransformer": Stack(
        layers="blocks", final_norm="norm", checkpointing="grad_checkpointing"
    ),
    "timm.models.beit:Beit": Stack(
        layers="blocks", final_norm="norm", checkpointing="grad_checkpointing"
    ),
    "timm.models.eva:Eva": Stack(
        layers="blocks", final_norm="norm", checkpointing="grad_checkpointing"
    ),
    # the class-attention blocks follow the patch blocks: no norm follows the last one
    "timm.models.cait:Cait": Stack(
        layers="blocks", final_norm=None, checkpointing="grad_checkpointing"
    ),
}
for _family, _name in (
    ("llama", "LlamaModel"),
    ("llama4", "Llama4TextModel"),
    ("mistral", "MistralModel"),
    ("ministral", "MinistralModel"),
    ("ministral3", "Ministral3Model"),
    ("mixtral", "MixtralModel"),
    ("qwen2", "Qwen2Model"),
    ("qwen2_moe", "Qwen2MoeModel"),
    ("qwen3", "Qwen3Model"),
    ("qwen3_moe", "Qwen3MoeModel"),
    ("qwen3_next", "Qwen3NextModel"),
    ("qwen2_vl", "Qwen2VLTextModel"),
    ("qwen2_vl", "Qwen2VLModel"),  # transformers < 4.52: the text model itself
    ("qwen2_5_vl", "Qwen2_5_VLTextModel"),
    ("qwen2_5_vl", "Qwen2_5_VLModel"),
    ("qwen3_vl", "Qwen3VLTextModel"),
    ("qwen3_vl_moe", "Qwen3VLMoeTextModel"),
    ("gemma", "GemmaModel"),
    ("gemma2", "Gemma2Model"),
    ("gemma3", "Gemma3TextModel"),
    ("glm", "GlmModel"),
    ("glm4", "Glm4Model"),
    ("smollm3", "SmolLM3Model"),
    ("deepseek_v2", "DeepseekV2Model"),
    ("deepseek_v3", "DeepseekV3Model"),
    ("hunyuan_v1_dense", "HunYuanDenseV1Model"),
    ("hunyuan_v1_moe", "HunYuanMoEV1Model"),
    ("mllama", "MllamaTextModel"),
    ("olmo", "OlmoModel"),
    ("olmo2", "Olmo2Model"),
    ("olmo3", "Olmo3Model"),
    ("exaone4", "Exaone4Model"),
    ("gpt_oss", "GptOssModel"),
    ("nemotron", "NemotronModel"),
    ("starcoder2", "Starcoder2Model"),
    ("stablelm", "StableLmModel"),
    ("phi3", "Phi3Model"),
    ("granite", "GraniteModel"),
    ("granitemoe", "GraniteMoeModel"),
    ("minicpm3", "MiniCPM3Model"),
):
    STACKS[_hf(_family, _name)] = _HF_DECODER_STACK

# --------------------------------------------------------------------------- branch steps

# Classes a "layer_scale" / "drop_path" step may hold (Identity: the step does nothing).
STEP_CLASSES = {
    "layer_scale": ("timm.layers.layer_scale:LayerScale", "torch.nn.modules.linear:Identity"),
    "drop_path": ("timm.layers.drop:DropPath", "torch.nn.modules.linear:Identity"),
}

# --------------------------------------------------------------------------- families

# The model families the table covers (for the report of `make test-releases`, the README and
# the test that each has a tiny model): family -> the module its classes live in, and how its
# residual adds run ("fused": inside its layers; "norms": its norms only, the reason being its
# layers' Unfused entry).
FAMILIES = {
    "Llama": ("transformers.models.llama", "fused"),
    "Llama 4 (text)": ("transformers.models.llama4", "fused"),
    "Mistral": ("transformers.models.mistral", "fused"),
    "Ministral": ("transformers.models.ministral", "fused"),
    "Ministral 3": ("transformers.models.ministral3", "fused"),
    "Mixtral": ("transformers.models.mixtral", "fused"),
    "Qwen2": ("transformers.models.qwen2", "fused"),
    "Qwen2-MoE": ("transformers.models.qwen2_moe", "fused"),
    "Qwen3": ("transformers.models.qwen3", "fused"),
    "Qwen3-MoE": ("transformers.models.qwen3_moe", "fused"),
    "Qwen3-Next": ("transformers.models.qwen3_next", "fused"),
    "Qwen2-VL": ("transformers.models.qwen2_vl", "fused"),
    "Qwen2.5-VL": ("transformers.models.qwen2_5_vl", "fused"),
    "Qwen3-VL": ("transformers.models.qwen3_vl", "fused"),
    "Qwen3-VL-MoE": ("transformers.models.qwen3_vl_moe", "fused"),
    "Phi-3": ("transformers.models.phi3", "fused"),
    "Phi": ("transformers.models.phi", "norms"),
    "Granite": ("transformers.models.granite", "fused"),
    "GraniteMoE": ("transformers.models.granitemoe", "fused"),
    "GraniteMoE-Shared": ("transformers.models.granitemoeshared", "norms"),
    "GLM": ("transformers.models.glm", "fused"),
    "GLM-4": ("transformers.models.glm4", "fused"),
    "SmolLM3": ("transformers.models.smollm3", "fused"),
    "OLMo": ("transformers.models.olmo", "fused"),
    "OLMo2": ("transformers.models.olmo2", "fused"),
    "OLMo3": ("transformers.models.olmo3", "fused"),
    "DeepSeek-V2": ("transformers.models.deepseek_v2", "fused"),
    "DeepSeek-V3": ("transformers.models.deepseek_v3", "fused"),
    "GPT-OSS": ("transformers.models.gpt_oss", "fused"),
    "Nemotron": ("transformers.models.nemotron", "fused"),
    "EXAONE-4": ("transformers.models.exaone4", "fused"),
    "Hunyuan (dense)": ("transformers.models.hunyuan_v1_dense", "fused"),
    "Hunyuan (MoE)": ("transformers.models.hunyuan_v1_moe", "fused"),
    "MiniCPM3": ("transformers.models.minicpm3", "fused"),
    "Gemma": ("transformers.models.gemma", "fused"),
    "Gemma2": ("transformers.models.gemma2", "fused"),
    "Gemma3 (text)": ("transformers.models.gemma3", "fused"),
    "Cohere": ("transformers.models.cohere", "norms"),
    "Cohere2": ("transformers.models.cohere2", "norms"),
    "StableLM": ("transformers.models.stablelm", "fused"),
    "Falcon": ("transformers.models.falcon", "norms"),
    "GPT-2": ("transformers.models.gpt2", "fused"),
    "GPT-NeoX": ("transformers.models.gpt_neox", "fused"),
    "GPT-J": ("transformers.models.gptj", "norms"),
    "Starcoder2": ("transformers.models.starcoder2", "fused"),
    "T5": ("transformers.models.t5", "norms"),
    "Mllama (text and vision)": ("transformers.models.mllama", "fused"),
    "Llava (its language model and CLIP tower)": ("transformers.models.llava", "fused"),
    "PaliGemma (its language model and SigLIP tower)": ("transformers.models.paligemma", "fused"),
    "InternVL (its language model and vision tower)": ("transformers.models.internvl", "fused"),
    "BERT": ("transformers.models.bert", "fused"),
    "RoBERTa": ("transformers.models.roberta", "fused"),
    "XLM-RoBERTa": ("transformers.models.xlm_roberta", "fused"),
    "ELECTRA": ("transformers.models.electra", "fused"),
    "DeBERTa-v2": ("transformers.models.deberta_v2", "fused"),
    "DistilBERT": ("transformers.models.distilbert", "norms"),
    "ModernBERT": ("transformers.models.modernbert", "fused"),
    "ViT (transformers)": ("transformers.models.vit", "fused"),
    "CLIP": ("transformers.models.clip", "fused"),
    "SigLIP": ("transformers.models.siglip", "fused"),
    "Whisper": ("transformers.models.whisper", "norms"),
    "ViT (timm)": ("timm.models.vision_transformer", "fused"),
    "DeiT / DeiT-III (timm)": ("timm.models.deit", "fused"),
    "CaiT (timm)": ("timm.models.cait", "fused"),
    "BEiT (timm)": ("timm.models.beit", "fused"),
    "EVA (timm)": ("timm.models.eva", "fused"),
    "Swin (timm)": ("timm.models.swin_transformer", "norms"),
    "Swin v2 (timm)": ("timm.models.swin_transformer_v2", "norms"),
    "ConvNeXt (timm)": ("timm.models.convnext", "norms"),
}
