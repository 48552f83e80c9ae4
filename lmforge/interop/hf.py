"""Hugging Face model directories in and out: GPT-2, the Llama family (Llama, Mistral, Qwen2,
Qwen3), Gemma 3 (text), and the vision-language Idefics3 (SmolVLM: a SigLIP encoder, a pixel-shuffle projector, Llama).

A Hugging Face directory is config.json (with a "model_type") + model.safetensors (or shards
listed in model.safetensors.index.json) + tokenizer.json + tokenizer_config.json
(+ generation_config.json). `import_hf` turns one into an lmforge model directory and
`export_hf` does the reverse, producing a directory that `AutoModelForCausalLM` and
`AutoTokenizer` load as they are (`AutoModelForImageTextToText` and, for a model that sees
images as Idefics3 does, `AutoProcessor`, for a vision-language model). An Idefics3 model keeps
its image processor settings (preprocessor_config.json) in the lmforge directory, so that
lmforge cuts images into the same tiles and writes the same prompt text as transformers.

Only architectures that are exactly our decoder are accepted: a config option we do not
implement (rope scaling, a sliding window shorter than the context, another activation...) is
refused with the option named, because a model that loads but computes something else is worse
than no model. Weights are converted to float32 on import (our models train and serialise in
fp32; cast at load time with `open_model(..., dtype=)`), and exported as float32.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.compress.quant import require_float
from lmforge.config import ModelConfig, VisionConfig, VLMConfig
from lmforge.errors import CheckpointMismatch, ConfigError, UnsupportedModel
from lmforge.files import load_safetensors, read_json_object, save_safetensors
from lmforge.images import IMAGE_TOKEN as IDEFICS3_IMAGE_TOKEN
from lmforge.images import Idefics3Preprocess, ImageProcessor, image_processor
from lmforge.modeldir import (
    GENERATION_CONFIG,
    PREPROCESSOR_CONFIG,
    WEIGHTS,
    load_state,
    read_image_settings,
    read_model,
    read_tokenizer,
    resolve_model_dir,
    save_image_settings,
    save_model,
)
from lmforge.models import build_model
from lmforge.models.decoder import Decoder
from lmforge.models.vlm import VLM
from lmforge.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, SpecialTokens, Tokenizer

SAFETENSORS_INDEX = "model.safetensors.index.json"
# transformers 5 writes the image processor's settings inside this one (older: beside it).
PROCESSOR_CONFIG = "processor_config.json"
# transformers >= 4.43 saves the chat template in its own file rather than tokenizer_config.json.
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# model_type -> the causal-LM class of that family.
SUPPORTED = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "idefics3": "Idefics3ForConditionalGeneration",
}
# GPT2Model is the headless GPT-2; its tied output projection is the embedding, so it loads too.
_ARCHITECTURES = {*SUPPORTED.values(), "GPT2Model"}
# Hugging Face's names for the GELUs our MLP computes: the tanh approximation, and exact.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu-exact"}

# (Hugging Face prefix, lmforge prefix) pairs; {i} stands for a layer index. GPT-2's fused
# c_attn is handled separately because one HF tensor becomes three of ours.
_GPT2_NAMES = (
    ("wte.", "embed."),
    ("wpe.", "pos_embed."),
    ("ln_f.", "final_norm."),
    ("h.{i}.ln_1.", "blocks.{i}.attn_norm."),
    ("h.{i}.ln_2.", "blocks.{i}.mlp_norm."),
    ("h.{i}.attn.c_proj.", "blocks.{i}.attn.o_proj."),
    ("h.{i}.mlp.c_fc.", "blocks.{i}.mlp.up_proj."),
    ("h.{i}.mlp.c_proj.", "blocks.{i}.mlp.down_proj."),
    ("lm_head.", "lm_head."),
)
_LLAMA_NAMES = (
    ("model.embed_tokens.", "embed."),
    ("model.norm.", "final_norm."),
    ("model.layers.{i}.input_layernorm.", "blocks.{i}.attn_norm."),
    ("model.layers.{i}.post_attention_layernorm.", "blocks.{i}.mlp_norm."),
    ("model.layers.{i}.self_attn.", "blocks.{i}.attn."),  # q/k/v/o_proj, and Qwen3's q/k_norm
    ("model.layers.{i}.mlp.", "blocks.{i}.mlp."),  # gate/up/down_proj
    ("lm_head.", "lm_head."),
)
# Gemma 3 norms the attention and MLP outputs too, and its post_attention_layernorm is that
# output norm, where Llama's is the MLP's input norm.
_GEMMA3_NAMES = (
    ("model.embed_tokens.", "embed."),
    ("model.norm.", "final_norm."),
    ("model.layers.{i}.input_layernorm.", "blocks.{i}.attn_norm."),
    ("model.layers.{i}.post_attention_layernorm.", "blocks.{i}.attn_post_norm."),
    ("model.layers.{i}.pre_feedforward_layernorm.", "blocks.{i}.mlp_norm."),
    ("model.layers.{i}.post_feedforward_layernorm.", "blocks.{i}.mlp_post_norm."),
    ("model.layers.{i}.self_attn.", "blocks.{i}.attn."),  # q/k/v/o_proj, q/k_norm
    ("model.layers.{i}.mlp.", "blocks.{i}.mlp."),
    ("lm_head.", "lm_head."),
)
# Gemma's RMSNorms scale by (1 + weight): a stored weight is ours minus one.
_GEMMA_NORM = re.compile(r"(^|\.)(\w*norm)\.weight$")
# Idefics3: the SigLIP tower, the projector, and the Llama names under model.text_model.
_IDEFICS3_NAMES = (
    ("model.vision_model.embeddings.patch_embedding.", "vision.patch_embed."),
    ("model.vision_model.embeddings.position_embedding.", "vision.pos_embed."),
    ("model.vision_model.encoder.layers.{i}.layer_norm1.", "vision.blocks.{i}.attn_norm."),
    ("model.vision_model.encoder.layers.{i}.layer_norm2.", "vision.blocks.{i}.mlp_norm."),
    ("model.vision_model.encoder.layers.{i}.self_attn.out_proj.", "vision.blocks.{i}.attn.o_proj."),
    ("model.vision_model.encoder.layers.{i}.self_attn.", "vision.blocks.{i}.attn."),  # q/k/v_proj
    ("model.vision_model.encoder.layers.{i}.mlp.fc1.", "vision.blocks.{i}.mlp.up_proj."),
    ("model.vision_model.encoder.layers.{i}.mlp.fc2.", "vision.blocks.{i}.mlp.down_proj."),
    ("model.vision_model.post_layernorm.", "vision.norm."),
    ("model.connector.modality_projection.", "projector."),
    *((hf.replace("model.", "model.text_model.", 1), "text." + ours)
      for hf, ours in _LLAMA_NAMES if hf != "lm_head."),
    ("lm_head.", "text.lm_head."),
)
# GPT-2 attention buffers (the causal mask) that old checkpoints store; they are not weights.
_GPT2_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias$")
# GPT-2's Conv1D layers store weights as (in, out), the transpose of nn.Linear's.
_GPT2_CONV1D = re.compile(r"h\.\d+\.(attn|mlp)\.c_\w+\.weight$")
_GPT2_QKV = re.compile(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)$")
_OUR_QKV = re.compile(r"blocks\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")

# What each export family needs of a ModelConfig, in the order a person would fix them.
# Gemma's options, which only Gemma 3 has.
_NOT_GEMMA = {"post_norms": False, "embed_scale": False, "layer_types": None,
              "rope_local_base": None, "attn_scale": None}
_EXPORT_NEEDS: dict[str, dict[str, Any]] = {
    "gpt2": {"positions": "learned", "norm": "layernorm", "mlp": ("gelu", "gelu-exact"),
             "qk_norm": False, "sliding_window": None, **_NOT_GEMMA},
    "llama": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False,
              "qkv_bias": False, "sliding_window": None, **_NOT_GEMMA},
    "qwen2": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False,
              "bias": False, "qkv_bias": True, "sliding_window": None, **_NOT_GEMMA},
    "qwen3": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True,
              "bias": False, "qkv_bias": False, "sliding_window": None, **_NOT_GEMMA},
    # Reached only by a model with a window: one without is a Llama.
    "mistral": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False,
                "bias": False, "qkv_bias": False, **_NOT_GEMMA},
    "gemma3_text": {"positions": "rope", "norm": "rmsnorm", "mlp": "geglu", "qk_norm": True,
                    "post_norms": True, "embed_scale": True, "bias": False, "qkv_bias": False},
}


def _choices(need: Any) -> tuple:
    return need if isinstance(need, tuple) else (need,)


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory whose config.json has a "model_type" (lmforge's config has none)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(values, dict) and "model_type" in values


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict[str, Any]) -> ModelConfig | VLMConfig:
    """Our config for a Hugging Face config.json; refuses anything our decoder cannot compute."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    supported = ", ".join(f"{t} ({c})" for t, c in SUPPORTED.items())
    if model_type not in SUPPORTED:
        raise UnsupportedModel(
            f"model_type {model_type!r} (architectures {architectures}) is not supported: "
            f"lmforge imports {supported}"
        )
    unknown = [a for a in architectures if a not in _ARCHITECTURES]
    if unknown:
        raise UnsupportedModel(
            f"architectures {unknown} of model_type {model_type!r} are not causal language "
            f"models lmforge can load: it imports {supported}"
        )
    if model_type == "gpt2":
        return _gpt2_config(hf)
    if model_type == "idefics3":
        return _idefics3_config(hf)
    if model_type == "gemma3_text":
        return _gemma3_config(hf)
    return _llama_config(hf, model_type)


def _need(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"the Hugging Face config.json has no {key!r}, which lmforge needs to "
                          "build the model; is it a complete config.json?")
    return hf[key]


def _refuse(model_type: str, problems: list[str]) -> None:
    if problems:
        raise UnsupportedModel(
            f"this {model_type} model uses options lmforge does not implement: "
            f"{'; '.join(problems)}. Only checkpoints whose computation lmforge reproduces "
            "exactly are imported."
        )


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    problems = []
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
        problems.append(f"activation_function={activation!r} (lmforge's GPT-2 MLP is "
                        f"{' / '.join(_GPT2_ACTIVATIONS)})")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false (attention scores always scaled here)")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention"):
        problems.append("add_cross_attention=true (a decoder-only model has no cross-attention)")
    _refuse("gpt2", problems)
    return ModelConfig(
        n_layer=_need(hf, "n_layer"),
        n_head=_need(hf, "n_head"),
        d_model=_need(hf, "n_embd"),
        d_mlp=hf.get("n_inner"),  # None means 4 * n_embd in both libraries
        vocab_size=_need(hf, "vocab_size"),
        context_length=_need(hf, "n_positions"),
        positions="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp=_GPT2_ACTIVATIONS[activation],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        bias=True,
        init_std=hf.get("initializer_range", 0.02),
    )


def _llama_config(hf: dict[str, Any], model_type: str) -> ModelConfig:
    problems = []
    hidden, heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    context = _need(hf, "max_position_embeddings")
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        problems.append(f"hidden_act={activation!r} (lmforge's SwiGLU uses silu)")
    rope_theta = _rope_theta(hf, problems)
    window = _sliding_window(hf, model_type, context, problems)
    # Llama has separate switches for attention and MLP biases; we have one for both. Qwen3's
    # attention_bias covers q/k/v/o and its MLP never has one, so mlp_bias defaults to False.
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        problems.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (lmforge "
                        "has biases everywhere or nowhere)")
    _refuse(model_type, problems)
    return ModelConfig(
        n_layer=_need(hf, "num_hidden_layers"),
        n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        d_model=hidden,
        d_mlp=_need(hf, "intermediate_size"),
        vocab_size=_need(hf, "vocab_size"),
        context_length=context,
        positions="rope",
        rope_base=rope_theta,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qk_norm=model_type == "qwen3",
        bias=bool(attention_bias),
        qkv_bias=model_type == "qwen2",  # Qwen2's q, k and v always have biases, o never
        sliding_window=window,
        init_std=hf.get("initializer_range", 0.02),
    )


def _sliding_window(hf: dict[str, Any], model_type: str, context: int, problems: list[str]
                    ) -> int | None:
    """The window every layer attends over, or None for the whole context. Mistral slides
    whenever sliding_window is set; Qwen2 and Qwen3 only with use_sliding_window, and then
    only on the layers `layer_types` names (transformers 5 writes it for every family)."""
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", model_type == "mistral") or (window or 0) >= context:
        window = None  # a window over the whole context is full attention
    default = "full_attention" if window is None else "sliding_attention"
    types = {"full_attention" if window is None and t == "sliding_attention" else t
             for t in hf.get("layer_types") or [default]}
    if types == {"sliding_attention"}:
        return window
    if types != {"full_attention"}:
        problems.append(f"layer_types {sorted(types)} (lmforge slides one window over every "
                        "layer or none)")
    return None


def _gemma3_config(hf: dict[str, Any]) -> ModelConfig:
    problems = []
    heads, n_layer = _need(hf, "num_attention_heads"), _need(hf, "num_hidden_layers")
    head_dim = _need(hf, "head_dim")
    activation = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_new"):
        problems.append(f"hidden_activation={activation!r} (lmforge's GeGLU uses the tanh GELU)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            problems.append(f"{key}={hf[key]}")
    if hf.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=true (a causal decoder only)")
    if hf.get("attention_bias"):
        problems.append("attention_bias=true")
    types = hf.get("layer_types")
    if types is None:  # configs older than transformers 4.53 give a period instead
        period = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                 for i in range(n_layer)]
    full, local = _gemma3_rope_bases(hf, problems)
    _refuse("gemma3_text", problems)
    windowed = "sliding_attention" in types
    scalar = hf.get("query_pre_attn_scalar", head_dim)
    return ModelConfig(
        n_layer=n_layer, n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, d_model=_need(hf, "hidden_size"),
        d_mlp=_need(hf, "intermediate_size"), vocab_size=_need(hf, "vocab_size"),
        context_length=_need(hf, "max_position_embeddings"), positions="rope",
        rope_base=full, rope_local_base=local if windowed and local != full else None,
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="geglu",
        tie_embeddings=hf.get("tie_word_embeddings", True), qk_norm=True,
        sliding_window=_need(hf, "sliding_window") if windowed else None,
        layer_types=list(types) if windowed else None,
        attn_scale=None if scalar == head_dim else float(scalar) ** -0.5,
        post_norms=True, embed_scale=True, init_std=hf.get("initializer_range", 0.02))


def _gemma3_rope_bases(hf: dict[str, Any], problems: list[str]) -> tuple[float, float]:
    """The rotary bases of full and windowed layers: transformers 5 keys rope_parameters by
    layer type; older configs give rope_theta and rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        full = _rope_theta({"rope_parameters": params["full_attention"]}, problems)
        local = _rope_theta({"rope_parameters": params.get("sliding_attention", {})}, problems)
        return full, local
    full = _rope_theta(hf, problems)
    return full, float(hf.get("rope_local_base_freq", 10000.0))


def _idefics3_config(hf: dict[str, Any]) -> VLMConfig:
    vision, text = _need(hf, "vision_config"), _need(hf, "text_config")
    problems = []
    if text.get("model_type", "llama") != "llama":
        problems.append(f"text_config.model_type={text['model_type']!r} (lmforge's Idefics3 "
                        "reads a Llama text model)")
    activation = vision.get("hidden_act", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_new"):
        problems.append(f"vision_config.hidden_act={activation!r} (lmforge's vision MLP is "
                        "the tanh GELU, gelu_pytorch_tanh)")
    if vision.get("num_channels", 3) != 3:
        problems.append(f"vision_config.num_channels={vision['num_channels']} (RGB only)")
    sizes = {key: _square(vision, key, problems) for key in ("image_size", "patch_size")}
    _refuse("idefics3", problems)
    # transformers 5 ties by the top-level key; older configs may carry it in text_config only.
    tied = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    cfg = VLMConfig(
        vision=VisionConfig(
            image_size=sizes["image_size"], patch_size=sizes["patch_size"],
            n_layer=_need(vision, "num_hidden_layers"),
            n_head=_need(vision, "num_attention_heads"), d_model=_need(vision, "hidden_size"),
            d_mlp=_need(vision, "intermediate_size"),
            norm_eps=vision.get("layer_norm_eps", 1e-6),
            init_std=vision.get("initializer_range", 0.02)),
        text=_llama_config({**text, "tie_word_embeddings": tied}, "llama"),
        scale_factor=hf.get("scale_factor", 2),
        image_token_id=_need(hf, "image_token_id"))
    _check_patch_positions(cfg.vision, "import")
    return cfg


def _square(vision: dict[str, Any], key: str, problems: list[str]) -> int:
    """An image or patch size that may be written as [n, n]; 0 (refused) for a rectangle."""
    value = _need(vision, key)
    if isinstance(value, list):
        if len(set(value)) != 1:
            problems.append(f"vision_config.{key}={value} (square images and patches only)")
            return 0
        value = value[0]
    return int(value)


def _check_patch_positions(vision: VisionConfig, what: str) -> None:
    """Refuse an encoder whose patches transformers would give other positions than lmforge.

    transformers' Idefics3 vision embeddings bucket each patch's fractional coordinate in
    float32. For a full tile (Idefics3 tiles are always full: images are resized to whole
    tiles, so no patch mask is needed) that gives patch i position i for most grid sides (32:
    SmolVLM's 512 / 16; 26: Idefics3-8B's 364 / 14) but not all (19, 25, 29, 31...), where
    rounding puts two patches on one position.
    """
    side = vision.image_size // vision.patch_size
    step = 1.0 / torch.tensor(side)  # float32, as transformers computes it
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * step, max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, torch.arange(1 / side, 1.0, 1 / side), right=True)
    if not torch.equal(buckets, torch.arange(side)):
        raise UnsupportedModel(
            f"cannot {what} an Idefics3 model whose tiles are {side} x {side} patches "
            f"(image_size {vision.image_size} / patch_size {vision.patch_size}): transformers "
            "rounds some of those patches onto their neighbours' learned positions, which "
            "lmforge's encoder does not reproduce")


def _rope_theta(hf: dict[str, Any], problems: list[str]) -> float:
    """The rotary base, from transformers 5's rope_parameters or the older top-level keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            problems.append(f"rope scaling of type {kind!r} (lmforge has plain rotary only)")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial} (rotary over the whole head only)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _hf_config(cfg: ModelConfig, family: str, tokenizer: Tokenizer) -> dict[str, Any]:
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "torch_dtype": "float32", **ids}
    if family == "gpt2":
        return {
            "architectures": [SUPPORTED["gpt2"]], "model_type": "gpt2",
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.d_model,
            "n_inner": cfg.d_mlp, "n_positions": cfg.context_length,
            "activation_function": "gelu" if cfg.mlp == "gelu-exact" else "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            **common,
        }
    llama = {
        "architectures": [SUPPORTED[family]], "model_type": family,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.d_model,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.d_mlp, "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
        # The pre-5.0 spelling of the rotary settings, which transformers 5 still reads.
        "rope_theta": cfg.rope_base, "rope_scaling": None,
        "attention_bias": cfg.bias, "attention_dropout": cfg.dropout,
        **common,
    }
    if family == "gemma3_text":
        return _gemma3_hf_config(cfg, llama)
    if family in ("qwen2", "qwen3"):
        return {**llama, "use_sliding_window": False, "sliding_window": None}
    if family == "mistral":
        return {**llama, "sliding_window": cfg.sliding_window}
    return {**llama, "mlp_bias": cfg.bias}


def _gemma3_hf_config(cfg: ModelConfig, llama: dict[str, Any]) -> dict[str, Any]:
    types = [("sliding_attention" if cfg.windowed(i) else "full_attention")
             for i in range(cfg.n_layer)]
    out = {k: v for k, v in llama.items() if k not in ("hidden_act", "attention_bias")}
    return {
        **out, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
        "layer_types": types, "sliding_window": cfg.sliding_window or cfg.context_length,
        "rope_local_base_freq": cfg.rope_local_base or cfg.rope_base,
        "query_pre_attn_scalar": _query_pre_attn_scalar(cfg),
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
    }


def _query_pre_attn_scalar(cfg: ModelConfig) -> int:
    """Gemma's whole number s whose 1 / sqrt(s) scales attention scores."""
    if cfg.attn_scale is None:
        return cfg.head_dim
    scalar = cfg.attn_scale ** -2
    if abs(scalar - round(scalar)) > 1e-6 * scalar:
        raise UnsupportedModel(f"attn_scale={cfg.attn_scale}: Gemma 3 scales attention by "
                               "1 / sqrt(query_pre_attn_scalar), a whole number")
    return round(scalar)


# ---------------------------------------------------------------------------------------------
# Weights


def _prefix_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rename(name: str, table: tuple[tuple[str, str], ...], reverse: bool = False) -> str | None:
    """`name` with its prefix swapped by `table` (HF -> ours, or ours -> HF), None if none fits."""
    for hf_prefix, our_prefix in table:
        source, target = (our_prefix, hf_prefix) if reverse else (hf_prefix, our_prefix)
        match = _prefix_pattern(source).match(name)
        if match:
            layer = match.groupdict().get("i") or ""
            return target.replace("{i}", layer) + name[match.end():]
    return None


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory, from model.safetensors or the shards of its index."""
    if (src / WEIGHTS).is_file():
        return load_safetensors(src / WEIGHTS)
    if (src / SAFETENSORS_INDEX).is_file():
        weight_map = read_json_object(src / SAFETENSORS_INDEX)["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{src / SAFETENSORS_INDEX} lists shards that are not in "
                                    f"{src}: {', '.join(missing)}; download them too")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_safetensors(src / shard))
        return state
    pickles = sorted(p.name for p in src.glob("pytorch_model*.bin"))
    if pickles:
        # Unpickling a file can run arbitrary code; safetensors cannot.
        raise UnsupportedModel(
            f"{src} stores its weights as {pickles[0]}, a pickle, which lmforge never loads "
            "because unpickling can run code. Convert it to safetensors first, e.g. in Python: "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(src), or pick a "
            "revision of the model that ships model.safetensors."
        )
    raise FileNotFoundError(f"no weights in {src}: expected {WEIGHTS} or {SAFETENSORS_INDEX} "
                            "with its shards")


def _our_state(hf_state: dict[str, torch.Tensor], entries) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors; `entries(hf_name, tensor)` gives the (our name, tensor)
    pairs one HF tensor becomes (our name None: a tensor we cannot place)."""
    state, unknown = {}, []
    for hf_name, tensor in hf_state.items():
        for ours, value in entries(hf_name, tensor):
            if ours is None:
                unknown.append(hf_name)
            else:
                state[ours] = value
    _no_unknown(unknown)
    return state


def _gpt2_entries(hf_name: str, tensor: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    name = hf_name.removeprefix("transformer.")
    if _GPT2_BUFFER.match(name):
        return []
    if _GPT2_CONV1D.match(name):
        tensor = tensor.T
    fused = _GPT2_QKV.match(name)
    if fused:
        layer, kind = fused.groups()
        return [(f"blocks.{layer}.attn.{proj}_proj.{kind}", part)
                for proj, part in zip("qkv", tensor.chunk(3, dim=0))]
    return [(_rename(name, _GPT2_NAMES), tensor)]


def _llama_entries(hf_name: str, tensor: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return []  # a buffer old checkpoints saved; we compute the same table from rope_base
    return [(_rename(hf_name, _LLAMA_NAMES), tensor)]


def _gemma3_entries(hf_name: str, tensor: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    if _GEMMA_NORM.search(hf_name):
        tensor = tensor.float() + 1
    return [(_rename(hf_name, _GEMMA3_NAMES), tensor)]


def _idefics3_entries(hf_name: str, tensor: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return []
    return [(_rename(hf_name, _IDEFICS3_NAMES), tensor)]


def _no_unknown(names: list[str]) -> None:
    if names:
        raise CheckpointMismatch(
            f"the checkpoint has tensors lmforge cannot place: {', '.join(names[:5])}"
            f"{f' and {len(names) - 5} more' if len(names) > 5 else ''}; its config.json "
            "says it is a supported model, but these weights belong to something else"
        )


def _gpt2_state(model: Decoder) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors of `model`; a bias-free model gets zero biases, which compute nothing."""
    ours = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
            if module.bias is None:
                ours[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    out = {}
    for name, tensor in ours.items():
        qkv = _OUR_QKV.match(name)
        if qkv:
            layer, proj, kind = qkv.groups()
            if proj == "q":
                parts = [ours[f"blocks.{layer}.attn.{p}_proj.{kind}"] for p in "qkv"]
                fused = torch.cat(parts, dim=0)
                fused = fused.T if kind == "weight" else fused  # Conv1D layout
                out[f"transformer.h.{layer}.attn.c_attn.{kind}"] = fused
            continue
        hf_name = _rename(name, _GPT2_NAMES, reverse=True)
        if _GPT2_CONV1D.match(hf_name):
            tensor = tensor.T
        out[hf_name if hf_name.startswith("lm_head.") else f"transformer.{hf_name}"] = tensor
    return out


def _llama_state(model: Decoder) -> dict[str, torch.Tensor]:
    return {_rename(name, _LLAMA_NAMES, reverse=True): tensor
            for name, tensor in model.state_dict().items()}


def _gemma3_state(model: Decoder) -> dict[str, torch.Tensor]:
    return {_rename(name, _GEMMA3_NAMES, reverse=True): tensor - 1 if _GEMMA_NORM.search(name)
            else tensor for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _special_tokens(src: Path, backend_spec: dict[str, Any]) -> SpecialTokens:
    """What tokenizer.json alone does not say, gathered from the files transformers writes."""
    values = {**_read_json(src / "special_tokens_map.json"),
              **_read_json(src / TOKENIZER_CONFIG_FILE)}
    if (src / CHAT_TEMPLATE_FILE).is_file():
        values["chat_template"] = (src / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    elif "chat_template" not in values and (src / "chat_template.json").is_file():
        values["chat_template"] = _read_json(src / "chat_template.json").get("chat_template")
    special = SpecialTokens.from_json(values)
    if "add_bos_token" not in values:
        # transformers 5 no longer writes add_bos_token: the post-processor template says it.
        special.add_bos_token = _template_adds_bos(backend_spec, special.bos_token)
    return special


def _template_adds_bos(spec: dict[str, Any], bos_token: str | None) -> bool:
    processor = spec.get("post_processor") or {}
    for step in processor.get("processors", [processor]):
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0].get("SpecialToken", {})
            return bos_token is not None and first.get("id") == bos_token
    return False


def _read_tokenizer(src: Path) -> Tokenizer:
    if not (src / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"{src} has no {TOKENIZER_FILE}; lmforge reads only the fast-tokenizer file. If the "
            "model ships a slow tokenizer (tokenizer.model, or vocab.json + merges.txt), write "
            "one with transformers: AutoTokenizer.from_pretrained(src).save_pretrained(src)"
        )
    backend = Tokenizer.load(src / TOKENIZER_FILE).backend
    return Tokenizer(backend, _special_tokens(src, json.loads(backend.to_str())))


def _hf_tokenizer_config(tokenizer: Tokenizer, cfg: ModelConfig) -> dict[str, Any]:
    return {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special.to_json(),
            "model_max_length": cfg.context_length}


# ---------------------------------------------------------------------------------------------
# Directories


def import_hf(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an lmforge model directory (weights in float32) converted from a HF directory."""
    src, out = Path(src_dir), Path(out_dir)
    if not is_hf_dir(src):
        raise FileNotFoundError(f"{src} is not a Hugging Face model directory: expected a "
                                "config.json with a model_type")
    if out.resolve() == src.resolve():
        raise ConfigError(f"import_hf would overwrite {src} with its own conversion; pass "
                          "another output directory")
    hf = read_json_object(src / "config.json")
    cfg = config_from_hf(hf)
    tokenizer = _read_tokenizer(src)
    processor = _hf_image_processor(src, cfg, tokenizer) if isinstance(cfg, VLMConfig) else None
    hf_state = _read_hf_weights(src)
    entries = {"gpt2": _gpt2_entries, "idefics3": _idefics3_entries,
               "gemma3_text": _gemma3_entries}.get(hf["model_type"], _llama_entries)
    model = build_model(cfg)
    load_state(model, _our_state(hf_state, entries), str(src))
    save_model(out, model, tokenizer)
    save_image_settings(out, processor)
    if (src / GENERATION_CONFIG).is_file():
        shutil.copyfile(src / GENERATION_CONFIG, out / GENERATION_CONFIG)
    else:
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if hf.get(k) is not None}
        (out / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2) + "\n")
    return out


def _hf_image_processor(src: Path, cfg: VLMConfig, tokenizer: Tokenizer) -> Idefics3Preprocess:
    """The image processor of a HF Idefics3 directory, checked against its model."""
    files = [src / name for name in (PREPROCESSOR_CONFIG, PROCESSOR_CONFIG)]
    settings = [read_json_object(f) for f in files if f.is_file()]
    if not settings:
        raise FileNotFoundError(f"{src} has neither {PREPROCESSOR_CONFIG} nor "
                                f"{PROCESSOR_CONFIG}: an Idefics3 model needs its image "
                                "processor's settings; download them with the model")
    merged = {k: v for config in settings for k, v in config.items()}
    seq_len = merged.get("image_seq_len", cfg.image_tokens)
    if seq_len != cfg.image_tokens:
        raise UnsupportedModel(f"{src / PROCESSOR_CONFIG} sets image_seq_len={seq_len}, and the "
                               f"model reads {cfg.image_tokens} tokens a tile ((image_size / "
                               "patch_size)^2 / scale_factor^2): they must agree")
    if tokenizer.backend.id_to_token(cfg.image_token_id) != IDEFICS3_IMAGE_TOKEN:
        raise UnsupportedModel(
            f"the tokenizer in {src} has {tokenizer.backend.id_to_token(cfg.image_token_id)!r} "
            f"at image_token_id={cfg.image_token_id}, where transformers' Idefics3 processor "
            f"writes {IDEFICS3_IMAGE_TOKEN}")
    return image_processor(cfg, tokenizer, merged)


def _export_family(cfg: ModelConfig) -> str:
    """The HF family computing exactly what `cfg` does, or UnsupportedModel saying what differs."""
    reasons = {}
    for family, needs in _EXPORT_NEEDS.items():
        wrong = [f"{k}={' or '.join(map(repr, _choices(needs[k])))} (has {getattr(cfg, k)!r})"
                 for k in needs if getattr(cfg, k) not in _choices(needs[k])]
        if family == "gpt2" and cfg.n_kv_head != cfg.n_head:
            wrong.append(f"n_kv_head={cfg.n_head} (has {cfg.n_kv_head}; GPT-2 has no grouped "
                         "key/value heads)")
        if not wrong:
            return family
        reasons[family] = wrong
    raise UnsupportedModel(
        "this model maps onto no Hugging Face architecture lmforge exports: "
        + "; ".join(f"{SUPPORTED[f]} would need {', '.join(w)}" for f, w in reasons.items())
    )


def hf_module_names(cfg: ModelConfig) -> Callable[[str], str] | None:
    """For a Llama-family model, a function from our module names to Hugging Face's
    (`blocks.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj`), as PEFT keys adapters by
    them; None for shapes whose layers do not map one to one (GPT-2's fused attention)."""
    try:
        family = _export_family(cfg)
    except UnsupportedModel:
        return None
    if family not in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        return None
    table = _GEMMA3_NAMES if family == "gemma3_text" else _LLAMA_NAMES
    return lambda name: _rename(name + ".", table, reverse=True)[:-1]


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a HF directory (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 3 or Idefics3; float32)
    for an lmforge model or run dir."""
    src, out = resolve_model_dir(model_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ConfigError(f"export_hf would overwrite the lmforge model in {src}; pass another "
                          "output directory")
    model, tokenizer = read_model(src), read_tokenizer(src)
    # A vision-language model's quantized layers would be its decoder's.
    require_float(model.text if isinstance(model, VLM) else model, str(src),
                  "a Hugging Face export")
    if tokenizer is None:
        raise FileNotFoundError(f"{src} has no {TOKENIZER_FILE}, which a Hugging Face directory "
                                "needs; save the model with its tokenizer")
    if isinstance(model, VLM):
        hf, state = _idefics3_export(model, tokenizer)
    else:
        family = _export_family(model.cfg)
        hf = _hf_config(model.cfg, family, tokenizer)
        state = {"gpt2": _gpt2_state, "gemma3_text": _gemma3_state}.get(
            family, _llama_state)(model)
    if model.cfg.tie_embeddings:
        # transformers ties it back from the embedding
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_safetensors({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS,
                     metadata={"format": "pt"})
    tokenizer.save(out)
    (out / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(_hf_tokenizer_config(tokenizer, model.cfg), indent=2, ensure_ascii=False) + "\n"
    )
    if isinstance(model.cfg, VLMConfig):
        _write_hf_processor(out, image_processor(model.cfg, tokenizer, read_image_settings(src)),
                            tokenizer)
    if (src / GENERATION_CONFIG).is_file():
        shutil.copyfile(src / GENERATION_CONFIG, out / GENERATION_CONFIG)
    else:
        ids = {k: v for k, v in hf.items() if k.endswith("_token_id") and v is not None}
        (out / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2) + "\n")
    return out


def _idefics3_export(model: VLM, tokenizer: Tokenizer
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The Idefics3 config.json and tensors of a vision-language model, or UnsupportedModel
    saying what Idefics3 does not compute."""
    cfg = model.cfg
    if cfg.projector != "linear":
        raise UnsupportedModel(f"projector={cfg.projector!r}: Idefics3's projector is one "
                               "linear layer (projector=linear)")
    if cfg.vision.stem != "patch":
        raise UnsupportedModel(f"vision stem={cfg.vision.stem!r}: Idefics3's vision encoder "
                               "embeds patches with one convolution (stem=patch)")
    if cfg.vision.per_image_norm:
        raise UnsupportedModel("vision per_image_norm=True: Idefics3's vision encoder takes the "
                               "pixels as its processor normalised them (per_image_norm=false)")
    if _export_family(cfg.text) != "llama":
        raise UnsupportedModel("Idefics3's text model is Llama: the decoder would need "
                               f"{', '.join(f'{k}={v!r}' for k, v in _EXPORT_NEEDS['llama'].items())}")
    _check_patch_positions(cfg.vision, "export")
    vision = cfg.vision
    text = _hf_config(cfg.text, "llama", tokenizer)
    hf = {
        "architectures": [SUPPORTED["idefics3"]], "model_type": "idefics3",
        "image_token_id": cfg.image_token_id, "scale_factor": cfg.scale_factor,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        "vision_config": {
            "model_type": "idefics3_vision", "hidden_size": vision.d_model,
            "intermediate_size": vision.block_config().d_mlp,
            "num_hidden_layers": vision.n_layer, "num_attention_heads": vision.n_head,
            "image_size": vision.image_size, "patch_size": vision.patch_size,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vision.norm_eps,
            "num_channels": 3, "initializer_range": vision.init_std},
        "text_config": {k: v for k, v in text.items() if k != "architectures"},
    }
    state = {_rename(name, _IDEFICS3_NAMES, reverse=True): tensor
             for name, tensor in model.state_dict().items()}
    return hf, state


def _write_hf_processor(out: Path, processor: ImageProcessor, tokenizer: Tokenizer) -> None:
    """transformers' Idefics3 processor files, for a model that sees images as Idefics3 does.
    lmforge's own square view has no transformers processor to match (it resizes once, to a
    square, and reads its own image token), so its users build prompts as lmforge does."""
    if not isinstance(processor, Idefics3Preprocess):
        return
    if tokenizer.chat_template is not None:  # the processor's own copy: it renders chats
        (out / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
    (out / PREPROCESSOR_CONFIG).write_text(json.dumps(processor.to_hf(), indent=2) + "\n")
    (out / PROCESSOR_CONFIG).write_text(json.dumps(
        {"processor_class": "Idefics3Processor", "image_seq_len": processor.image_seq_len},
        indent=2) + "\n")
