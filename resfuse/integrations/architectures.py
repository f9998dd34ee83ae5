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

from .specs import Call, Chain, Condition, Norm, PostNorm, Stack, Sublayer, Unfused

_T = "transformers.models."

# --------------------------------------------------------------------------- norms

RMS_LLAMA = Norm("rms", eps="variance_epsilon", out_dtype="promote_weight")  # w * x.to(dtype)
RMS_ROUND_ONCE = Norm("rms", eps="variance_epsilon")  # (w * x).to(dtype)
RMS_GEMMA = Norm("rms", eps="eps", zero_centered_weight=True)  # x * (1 + w), fp32
RMS_T5 = Norm("rms", eps="variance_epsilon", out_dtype="t5")
TORCH_LAYER_NORM = Norm("layer", eps="eps", normalized_shape=True, autocast="layer_norm")
# F.rms_norm's autocast behaviour is not verified on CUDA: under autocast the original runs
TORCH_RMS_NORM = Norm("rms", eps="eps", normalized_shape=True, autocast="original")
TIMM_LAYER_NORM = Norm(
    "layer",
    eps="eps",
    normalized_shape=True,
    autocast="layer_norm",
    conditions=(
        Condition(
            "_fast_norm",
            False,
            "timm's fast_norm is on (it normalizes in the autocast dtype): left as it is",
        ),
    ),
)

NORMS = {
    "torch.nn.modules.normalization:LayerNorm": TORCH_LAYER_NORM,
    "torch.nn.modules.normalization:RMSNorm": TORCH_RMS_NORM,
    "timm.layers.norm:LayerNorm": TIMM_LAYER_NORM,
    _T + "llama.modeling_llama:LlamaRMSNorm": RMS_LLAMA,
    _T + "mistral.modeling_mistral:MistralRMSNorm": RMS_LLAMA,
    _T + "qwen2.modeling_qwen2:Qwen2RMSNorm": RMS_LLAMA,
    _T + "qwen3.modeling_qwen3:Qwen3RMSNorm": RMS_LLAMA,
    # rounds after the weight since transformers 4.54, like Llama's before
    _T + "olmo2.modeling_olmo2:Olmo2RMSNorm": (RMS_ROUND_ONCE, RMS_LLAMA),
    _T + "gemma.modeling_gemma:GemmaRMSNorm": RMS_GEMMA,
    _T + "gemma2.modeling_gemma2:Gemma2RMSNorm": RMS_GEMMA,
    _T + "gemma3.modeling_gemma3:Gemma3RMSNorm": RMS_GEMMA,
    _T + "t5.modeling_t5:T5LayerNorm": RMS_T5,
}

# --------------------------------------------------------------------------- layers

# transformers attention: ``self_attn(hidden_states=normed, <every layer argument>, **kwargs)``,
# returning (output, weights)
_HF_ATTENTION = Call(output="first")

LLAMA_STYLE = Chain(
    input="hidden_states",
    sublayers=(
        Sublayer("self_attn", "input_layernorm", _HF_ATTENTION),
        Sublayer("mlp", "post_attention_layernorm"),
    ),
)

# Gemma2/3 (sandwich norms): r = r + post_norm(f); y = next_norm(r): each add is one
# norm_add_norm call (the branch norm, the add and the next norm); the closing add is
# norm_add, or norm_add_norm with the next layer's norm with fuse_residual="across_layers".
SANDWICH = Chain(
    input="hidden_states",
    sublayers=(
        Sublayer(
            "self_attn",
            "input_layernorm",
            _HF_ATTENTION,
            steps=(("post_attention_layernorm", "norm"),),
        ),
        Sublayer(
            "mlp", "pre_feedforward_layernorm", steps=(("post_feedforward_layernorm", "norm"),)
        ),
    ),
)

# OLMo2 (reordered norms): r = r + norm(f), no norm after the add: each add is one norm_add
# call; the last layer's closing add can carry into the final norm (norm_add_norm).
REORDERED = Chain(
    input="hidden_states",
    sublayers=(
        Sublayer("self_attn", None, _HF_ATTENTION, steps=(("post_attention_layernorm", "norm"),)),
        Sublayer("mlp", None, steps=(("post_feedforward_layernorm", "norm"),)),
    ),
)

GPT2_BLOCK = Chain(
    input="hidden_states",
    sublayers=(
        Sublayer(
            "attn",
            "ln_1",
            Call(output="first"),
        ),
        Sublayer(
            "crossattention",
            "ln_cross_attn",
            Call(output="first"),
            when="encoder_hidden_states",
        ),
        Sublayer("mlp", "ln_2"),
    ),
)

GPT_NEOX_LAYER = Chain(
    input="hidden_states",
    sublayers=(
        Sublayer(
            "attention",
            "input_layernorm",
            Call(output="first"),
            steps=(("post_attention_dropout", "module"),),
        ),
        Sublayer("mlp", "post_attention_layernorm", steps=(("post_mlp_dropout", "module"),)),
    ),
    conditions=(
        Condition(
            "use_parallel_residual",
            False,
            "parallel residual (attention and MLP both read the layer input): "
            "no add precedes a norm",
        ),
    ),
)

TIMM_BLOCK = Chain(
    input="x",
    sublayers=(
        Sublayer(
            "attn",
            "norm1",
            Call(),
            steps=(("ls1", "layer_scale"), ("drop_path1", "drop_path")),
        ),
        Sublayer("mlp", "norm2", steps=(("ls2", "layer_scale"), ("drop_path2", "drop_path"))),
    ),
)

BERT_OUTPUT = PostNorm(
    input="hidden_states", residual="input_tensor", steps=("dense", "dropout"), norm="LayerNorm"
)

_T5_REASON = (
    "its add closes the sublayer; the next norm is in the next sublayer module, "
    "after T5Block's fp16 clamp"
)

LAYERS = {
    _T + "llama.modeling_llama:LlamaDecoderLayer": LLAMA_STYLE,
    _T + "mistral.modeling_mistral:MistralDecoderLayer": LLAMA_STYLE,
    _T + "qwen2.modeling_qwen2:Qwen2DecoderLayer": LLAMA_STYLE,
    _T + "qwen3.modeling_qwen3:Qwen3DecoderLayer": LLAMA_STYLE,
    _T + "gemma.modeling_gemma:GemmaDecoderLayer": LLAMA_STYLE,
    _T + "gemma2.modeling_gemma2:Gemma2DecoderLayer": SANDWICH,
    _T + "gemma3.modeling_gemma3:Gemma3DecoderLayer": SANDWICH,
    _T + "olmo2.modeling_olmo2:Olmo2DecoderLayer": REORDERED,
    _T + "gpt2.modeling_gpt2:GPT2Block": GPT2_BLOCK,
    _T + "gpt_neox.modeling_gpt_neox:GPTNeoXLayer": GPT_NEOX_LAYER,
    _T + "bert.modeling_bert:BertSelfOutput": BERT_OUTPUT,
    _T + "bert.modeling_bert:BertOutput": BERT_OUTPUT,
    _T + "roberta.modeling_roberta:RobertaSelfOutput": BERT_OUTPUT,
    _T + "roberta.modeling_roberta:RobertaOutput": BERT_OUTPUT,
    "timm.models.vision_transformer:Block": TIMM_BLOCK,
    _T + "t5.modeling_t5:T5LayerSelfAttention": Unfused(_T5_REASON),
    _T + "t5.modeling_t5:T5LayerCrossAttention": Unfused(_T5_REASON),
    _T + "t5.modeling_t5:T5LayerFF": Unfused(_T5_REASON),
}

# Known modules that look like layers by name but hold no residual add of their own.
CONTAINERS = {
    _T + "t5.modeling_t5:T5Block",
}

# --------------------------------------------------------------------------- stacks

# transformers < 4.54 keeps the gradient checkpointing switch on the stack (the stack's loop
# checkpoints each layer), later releases on each layer as well
_HF_CHECKPOINTING = "gradient_checkpointing"
_HF_DECODER_STACK = Stack(layers="layers", final_norm="norm", checkpointing=_HF_CHECKPOINTING)
STACKS = {
    _T + "llama.modeling_llama:LlamaModel": _HF_DECODER_STACK,
    _T + "mistral.modeling_mistral:MistralModel": _HF_DECODER_STACK,
    _T + "qwen2.modeling_qwen2:Qwen2Model": _HF_DECODER_STACK,
    _T + "qwen3.modeling_qwen3:Qwen3Model": _HF_DECODER_STACK,
    _T + "gemma.modeling_gemma:GemmaModel": _HF_DECODER_STACK,
    _T + "gemma2.modeling_gemma2:Gemma2Model": _HF_DECODER_STACK,
    _T + "gemma3.modeling_gemma3:Gemma3TextModel": _HF_DECODER_STACK,
    _T + "olmo2.modeling_olmo2:Olmo2Model": _HF_DECODER_STACK,
    _T + "gpt2.modeling_gpt2:GPT2Model": Stack(layers="h", final_norm="ln_f", checkpointing=_HF_CHECKPOINTING),
    _T + "gpt_neox.modeling_gpt_neox:GPTNeoXModel": Stack(
        layers="layers", final_norm="final_layer_norm", checkpointing=_HF_CHECKPOINTING
    ),
    "timm.models.vision_transformer:VisionTransformer": Stack(
        layers="blocks", final_norm="norm", checkpointing="grad_checkpointing"
    ),
}

# --------------------------------------------------------------------------- branch steps

# Classes a "layer_scale" / "drop_path" step may hold (Identity: the step does nothing).
STEP_CLASSES = {
    "layer_scale": ("timm.layers.layer_scale:LayerScale", "torch.nn.modules.linear:Identity"),
    "drop_path": ("timm.layers.drop:DropPath", "torch.nn.modules.linear:Identity"),
}
