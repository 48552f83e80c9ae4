"""Model configs: one dataclass is the single source of truth for a model's shape.

Named presets cover the shapes people ask for by name (nanoGPT's Shakespeare baby model,
the GPT-2 family, SmolLM2-135M). `resolve_model_config` turns a preset name plus
overrides into a checked `ModelConfig`; unknown keys fail with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.files import read_json_object


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only Transformer (GPT-2 and Llama style)."""

    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (MHA); fewer = GQA; 1 = MQA
    d_model: int = 128
    d_mlp: int | None = None  # None = 4 * d_model
    vocab_size: int = 65
    context_length: int = 64
    positions: str = "learned"  # learned | rope
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu (tanh approximation, GPT-2's) | gelu-exact | swiglu | geglu | relu2 | relu
    tie_embeddings: bool = True
    qk_norm: bool = False
    bias: bool = False
    qkv_bias: bool = False  # biases on q, k and v alone (Qwen2); `bias` puts them everywhere
    sliding_window: int | None = None  # each position attends to this many, itself included (Mistral)
    # Which layers the window applies to, one entry a layer ("sliding_attention" or
    # "full_attention", Hugging Face's names); None: every layer, when there is a window.
    layer_types: list[str] | None = None
    rope_local_base: float | None = None  # the windowed layers' rotary base (Gemma 3), if not rope_base
    head_dim: int | None = None  # None = d_model // n_head; wider heads than that (Gemma)
    attn_scale: float | None = None  # attention scores' factor; None = 1 / sqrt(head_dim)
    post_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2/3)
    embed_scale: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_types(self)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(f"d_model={self.d_model} must be divisible by "
                                  f"n_head={self.n_head} (or set head_dim)")
            self.head_dim = self.d_model // self.n_head
        _check_positive(self, ("n_layer", "n_head", "n_kv_head", "d_model", "d_mlp", "vocab_size",
                               "context_length", "head_dim"))
        _check_choice("positions", self.positions, ("learned", "rope"))
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("mlp", self.mlp, MLP_KINDS)
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window={self.sliding_window} must be positive (or null "
                              "for attention over the whole context)")
        self._check_layer_types()
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layer:
            raise ConfigError(f"layer_types must list one entry for each of the {self.n_layer} "
                              f"layers, got {self.layer_types!r}")
        for kind in self.layer_types:
            _check_choice("layer_types entry", kind, LAYER_TYPES)
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is "
                              "not set: give the window's length")

    def of_layers(self, layers: list[int]) -> ModelConfig:
        """The config of a model made of these layers of this one, in this order."""
        types = None if self.layer_types is None else [self.layer_types[i] for i in layers]
        return dataclasses.replace(self, n_layer=len(layers), layer_types=types)

    def windowed(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}: expected a config.json")
        return from_dict(cls, read_json_object(path), where=str(path))


def load_config(path: str | Path) -> ModelConfig | Seq2SeqConfig | VLMConfig:
    """The config.json of a model directory, of either family."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    values = read_json_object(path) if path.is_file() else {}
    if values.get("family") == "seq2seq":
        values.pop("family")
        return from_dict(Seq2SeqConfig, values, where=str(path))
    if values.get("family") == "vlm":
        values.pop("family")
        return from_dict(VLMConfig, values, where=str(path))
    return ModelConfig.load(path)


MLP_KINDS = ("gelu", "gelu-exact", "swiglu", "geglu", "relu2", "relu")
LAYER_TYPES = ("sliding_attention", "full_attention")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


# What a field's annotation allows, for the plain types configs are made of, and how a
# message names it.
_PLAIN_TYPES = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"),
                "str": ((str,), "text"), "bool": ((bool,), "true or false"),
                "None": ((type(None),), "null")}


def _kinds(field: dataclasses.Field) -> list[str]:
    return [k.strip() for k in str(field.type).split("|")]


def check_types(config: Any) -> None:
    """Refuse a value of the wrong type (a hand-edited config.json, a recipe's typo) before
    it fails deep inside model construction or hours into training. Fields of other types
    (lists, mappings) are left to their users."""
    for f in dataclasses.fields(config):
        value, kinds = getattr(config, f.name), _kinds(f)
        if not all(k in _PLAIN_TYPES for k in kinds):
            continue
        allowed = tuple(t for k in kinds for t in _PLAIN_TYPES[k][0])
        # JSON's true is a Python int too, but no count of layers.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            wanted = " or ".join(_PLAIN_TYPES[k][1] for k in kinds)
            raise ConfigError(f"{f.name}={value!r} must be {wanted}")


def _check_positive(config: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}={getattr(config, key)} must be at least 1")


def closest_hint(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    return f"did you mean {match[0]!r}? " if match else ""


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from `values`, failing on unknown keys (with the closest match)
    and on values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            hint = closest_hint(key, list(fields))
            raise ConfigError(f"unknown key {key!r} in {where}: " + (
                hint.rstrip() if hint else f"valid keys are: {', '.join(fields)}"))
    # YAML 1.1 reads 3e-4 (no dot) as a string, and that is how people write learning rates.
    values = {k: float(v) if isinstance(v, str) and _SCIENTIFIC.fullmatch(v)
              and "float" in _kinds(fields[k]) else v for k, v in values.items()}
    try:
        config = cls(**values)
        check_types(config)
    except ConfigError as err:
        raise ConfigError(f"{err} (in {where})") from None
    return config


_SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


# Named shapes. The quickstart preset is small enough to learn something in minutes on 2 cores.
PRESETS: dict[str, dict[str, Any]] = {
    "shakespeare-char": dict(
        n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=65, bias=False,
        mlp="gelu-exact",  # nanoGPT's GELU
    ),
    "quickstart": dict(
        n_layer=4, n_head=4, d_model=192, context_length=128, vocab_size=4096,
        positions="rope", norm="rmsnorm", mlp="swiglu", d_mlp=512, qk_norm=True,
    ),
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, context_length=1024, vocab_size=50257,
                 bias=True),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024, context_length=1024,
                        vocab_size=50257, bias=True),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280, context_length=1024,
                       vocab_size=50257, bias=True),
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600, context_length=1024,
                    vocab_size=50257, bias=True),
    # Llama 3.2 1B's shape (1.24 B parameters), for pretraining at a 2,048-token context.
    "llama-1b": dict(
        n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_mlp=8192, vocab_size=128256,
        context_length=2048, positions="rope", rope_base=500000.0, norm="rmsnorm",
        norm_eps=1e-5, mlp="swiglu", tie_embeddings=True,
    ),
    "smollm2-135m": dict(
        n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_mlp=1536, vocab_size=49152,
        context_length=8192, positions="rope", rope_base=100000.0, norm="rmsnorm",
        norm_eps=1e-5, mlp="swiglu", tie_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}: {closest_hint(name, list(PRESETS))}"
            f"presets are: {', '.join(PRESETS)}"
        )
    return from_dict(ModelConfig, {**PRESETS[name], **overrides}, where=f"preset {name!r}")


def resolve_model_config(spec: dict[str, Any] | str | None) -> ModelConfig:
    """A model section of a recipe: a preset name, or a dict with optional `preset` and fields."""
    if spec is None:
        return ModelConfig()
    if isinstance(spec, str):
        return preset(spec)
    spec = dict(spec)
    name = spec.pop("preset", None)
    if name is None:
        return from_dict(ModelConfig, spec, where="model")
    return preset(name, **spec)


@dataclass
class Seq2SeqConfig:
    """Shape and options of an encoder-decoder Transformer (translation and other
    sequence-to-sequence tasks). The defaults are the original paper's base model."""

    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    d_mlp: int = 2048
    vocab_size: int = 8192  # one vocabulary for source and target (a joint tokenizer)
    max_length: int = 256  # longest source or target, in tokens
    positions: str = "sinusoidal"  # sinusoidal | learned | rope (self-attention only)
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_first: bool = False  # pre-norm (stabler, no warmup needed) or the original post-norm
    norm_eps: float = 1e-5
    mlp: str = "relu"  # relu | gelu | swiglu | relu2
    bias: bool = True
    dropout: float = 0.1
    tie_embeddings: bool = True  # source, target and output share one matrix
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_types(self)
        _check_positive(self, ("n_encoder_layer", "n_decoder_layer"))
        _check_choice("positions", self.positions, ("sinusoidal", "learned", "rope"))
        self.block_config()  # the shared layers check the rest

    def block_config(self) -> ModelConfig:
        """The settings the shared layers (attention, MLP) read."""
        return ModelConfig(n_layer=self.n_encoder_layer, n_head=self.n_head, d_model=self.d_model,
                           d_mlp=self.d_mlp, vocab_size=self.vocab_size,
                           context_length=self.max_length,
                           positions="rope" if self.positions == "rope" else "learned",
                           rope_base=self.rope_base, norm=self.norm, norm_eps=self.norm_eps,
                           mlp=self.mlp, bias=self.bias, dropout=self.dropout,
                           init_std=self.init_std)

    @property
    def context_length(self) -> int:
        """Positions in a target: what the inference engine sizes its cache by."""
        return self.max_length

    def to_dict(self) -> dict[str, Any]:
        return {"family": "seq2seq", **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def resolve_seq2seq_config(spec: dict[str, Any] | str) -> Seq2SeqConfig:
    """A seq2seq model section of a recipe: a preset name, or fields with optional `preset`."""
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("preset", "transformer-small")
    if name not in SEQ2SEQ_PRESETS:
        raise ConfigError(f"unknown seq2seq preset {name!r}: {closest_hint(name, list(SEQ2SEQ_PRESETS))}"
                          f"presets are: {', '.join(SEQ2SEQ_PRESETS)}")
    return from_dict(Seq2SeqConfig, {**SEQ2SEQ_PRESETS[name], **spec}, where="model")


SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    "transformer-base": {},  # Vaswani et al. 2017: 6+6 layers, width 512, 8 heads, MLP 2048
    "transformer-small": dict(n_encoder_layer=3, n_decoder_layer=3, n_head=4, d_model=256,
                              d_mlp=1024, norm_first=True),
    "transformer-tiny": dict(n_encoder_layer=2, n_decoder_layer=2, n_head=4, d_model=128,
                             d_mlp=512, norm_first=True, dropout=0.0),
}


@dataclass
class VisionConfig:
    """A SigLIP-style vision encoder: square images cut into patches, a patch-embedding
    convolution, learned positions, pre-norm Transformer blocks that see every patch, a final
    LayerNorm. The defaults are vlm-small's."""

    image_size: int = 64
    patch_size: int = 8
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int | None = None  # default 4 * d_model
    norm_eps: float = 1e-6
    image_mean: float = 0.5  # pixels are (x / 255 - mean) / std, the same for each channel
    image_std: float = 0.5
    init_std: float = 0.02
    # patch: one convolution with stride patch_size (SigLIP's). conv: 3x3 convolutions of
    # stride 2 that halve the image log2(patch_size) times, then a 1x1 to d_model; from
    # nothing on a small dataset they learn shapes several times faster than one large
    # patch kernel (Xiao et al. 2021, "Early convolutions help transformers see better").
    stem: str = "patch"
    # Centre each image's channels and scale it to unit spread inside the encoder: a plain
    # background of any colour then reads as zero, so the first layers see edges rather than
    # the background (from nothing, single characters at random places on tinted backgrounds
    # stayed at chance for 1,500 steps without it, and began to be read after 600 with it).
    # lmforge's own: Idefics3 (SmolVLM) export refuses it.
    per_image_norm: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        _check_positive(self, ("image_size", "patch_size", "n_layer", "n_head", "d_model"))
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
        _check_choice("stem", self.stem, ("patch", "conv"))
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"stem 'conv' halves the image until a patch is one position, so "
                              f"patch_size must be a power of 2, not {self.patch_size}")
        self.block_config()

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block_config(self) -> ModelConfig:
        """The settings the shared layers (attention, MLP, norms) read."""
        return ModelConfig(n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                           d_mlp=self.d_mlp, vocab_size=1, context_length=self.patches,
                           positions="learned", norm="layernorm", norm_eps=self.norm_eps,
                           mlp="gelu", bias=True, init_std=self.init_std)


@dataclass
class VLMConfig:
    """A vision-language model: a vision encoder, a projector that pixel-shuffles its output
    (space-to-depth by `scale_factor`, r^2 fewer image tokens) and maps it to the decoder's
    width, and a decoder-only language model. An image is `image_tokens` copies of
    `image_token_id` in the prompt."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: ModelConfig = field(default_factory=ModelConfig)
    scale_factor: int = 2
    projector: str = "linear"  # linear | mlp (linear, GELU, linear)
    image_token_id: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = from_dict(VisionConfig, self.vision, where="vision")
        if isinstance(self.text, dict):
            self.text = from_dict(ModelConfig, self.text, where="text")
        check_types(self)
        _check_choice("projector", self.projector, ("linear", "mlp"))
        side = self.vision.image_size // self.vision.patch_size
        if self.scale_factor < 1 or side % self.scale_factor:
            raise ConfigError(f"scale_factor {self.scale_factor} does not divide the "
                              f"{side} x {side} patches of an image")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id {self.image_token_id} is outside the text "
                              f"vocabulary of {self.text.vocab_size}")

    @property
    def image_tokens(self) -> int:
        """Tokens an image takes in the prompt."""
        return self.vision.patches // self.scale_factor ** 2

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def tie_embeddings(self) -> bool:
        return self.text.tie_embeddings

    def to_dict(self) -> dict[str, Any]:
        return {"family": "vlm", **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


VLM_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: 32 px images, 4 image tokens, a two-layer decoder.
    "vlm-tiny": dict(vision=dict(image_size=32, patch_size=8, n_layer=2, n_head=2, d_model=32),
                     text=dict(n_layer=2, n_head=2, d_model=32, context_length=128,
                               positions="rope", norm="rmsnorm", mlp="swiglu")),
    # 64 px images, 16 image tokens: a ViT of 0.8 M parameters with a convolutional stem
    # (from nothing it learns shapes several times faster than with one patch kernel) that
    # normalises each image by itself, and a 2 M-parameter decoder.
    "vlm-small": dict(vision=dict(stem="conv", per_image_norm=True),
                      text=dict(n_layer=4, n_head=4, d_model=192, context_length=256,
                                positions="rope", norm="rmsnorm", mlp="swiglu")),
    # SmolVLM-256M's shape: SigLIP-B/16 at 512 px, r = 4 (64 tokens a tile), SmolLM2-135M.
    "smolvlm-256m": dict(
        vision=dict(image_size=512, patch_size=16, n_layer=12, n_head=12, d_model=768,
                    d_mlp=3072),
        text=dict(n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_mlp=1536,
                  vocab_size=49280, context_length=8192, positions="rope",
                  rope_base=100000.0, norm="rmsnorm", mlp="swiglu", norm_eps=1e-5,
                  tie_embeddings=False),
        scale_factor=4),
}


def resolve_vlm_config(spec: dict[str, Any] | str) -> VLMConfig:
    """A VLM model section of a recipe: a preset name, or a mapping with optional `preset`,
    whose `vision` and `text` mappings override the preset's fields one by one."""
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("preset", "vlm-small")
    if name not in VLM_PRESETS:
        raise ConfigError(f"unknown vision-language preset {name!r}: "
                          f"{closest_hint(name, list(VLM_PRESETS))}"
                          f"presets are: {', '.join(VLM_PRESETS)}")
    base = VLM_PRESETS[name]
    values = {**base, **spec}
    for part in ("vision", "text"):
        values[part] = {**base.get(part, {}), **spec.get(part, {})}
    return from_dict(VLMConfig, values, where="model")


@dataclass
class FlopsReport:
    params: int
    non_embedding_params: int
    flops_per_token: int  # forward + backward, at full context
    extra: dict[str, int] = field(default_factory=dict)


def count_flops(cfg: ModelConfig, params: int, embedding_params: int) -> FlopsReport:
    """Training FLOPs per token: 6 per weight multiply-add plus attention's score/value work.

    The attention term (12 * layers * width * context, the PaLM appendix estimate) is why a
    long context costs more than the parameter count alone says.
    """
    non_embedding = params - embedding_params
    # The output projection is a matmul per token even when tied to the embedding.
    matmul_params = non_embedding + cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layer * cfg.d_model * cfg.context_length
    return FlopsReport(
        params=params,
        non_embedding_params=non_embedding,
        flops_per_token=6 * matmul_params + attention,
    )


# How many tokens a request generates unless it says: generate, chat and the Python API.
MAX_NEW_TOKENS = 256
# Prompt tokens the engine reads in one step (a longer prompt takes several, between the
# decode steps of the sequences already running); `lmforge serve --prefill-chunk` sets it.
PREFILL_CHUNK = 512
# Tokens a sequence drafts per step with speculative decoding (`--speculative`).
SPECULATIVE_DRAFT = 8
# `--kv-cache`: the KV cache's values (auto: the engine's default, see `default_kv_dtype`;
# model: the model's own float type)
KV_CACHE_CHOICES = ("auto", "model", "float32", "bfloat16", "float16")
# Perplexity windows: at most this many tokens per forward pass unless asked, as the logits
# of a window take window x vocabulary floats (SmolLM2's 8,192-token context: 1.6 GB a row).
PERPLEXITY_WINDOW = 1024


# Temperatures below this decode greedily: sampling there is greedy in all but exact ties, and
# dividing logits by a number that rounds to 0 in float32 would give inf and NaN.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingConfig:
    """How a token is drawn from the logits (see `lmforge.infer.sampling`).

    The defaults are lmforge's one set, used wherever a setting is not given: `lmforge
    generate`, `lmforge chat`, the HTTP API, `lmforge translate --beam 1` and the Python API.
    Temperature 0.8 with top-p 0.95 keeps a small model's text varied without its long tail
    of unlikely tokens; temperature 0 is greedy decoding.
    """

    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = 0.95
    min_p: float | None = None  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages any token already in the sequence
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)
