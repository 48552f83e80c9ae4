"""Hugging Face interop: tiny random transformers models in, lmforge models out, and back.

Every conversion is checked the only way that matters: the logits of the converted model equal
the original's (fp32, eval mode) on the same random tokens.
"""

import json

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file
from tokenizers import processors

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import UnsupportedModel  # noqa: E402
from lmforge.interop.hf import config_from_hf, export_hf, import_hf, is_hf_dir  # noqa: E402
from lmforge.modeldir import save_model  # noqa: E402
from lmforge.models.decoder import Decoder  # noqa: E402
from lmforge.open import open_model  # noqa: E402
from lmforge.tokenizer import SpecialTokens, Tokenizer, train_bpe  # noqa: E402

VOCAB = 320  # larger than the tokenizer's 300, as padded vocabularies of real models are
CONTEXT = 64
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["Hello world, the quick brown fox!", "  spaces\tand\nnewlines  ",
         "<|im_end|> naïve 日本"]

_LLAMA = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
              bos_token_id=0, eos_token_id=3)
HF_MODELS = {
    "gpt2": ("GPT2", dict(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=CONTEXT,
                          bos_token_id=0, eos_token_id=3)),
    "gpt2-untied": ("GPT2", dict(n_layer=2, n_head=4, n_embd=32, n_inner=48, vocab_size=VOCAB,
                                 n_positions=CONTEXT, tie_word_embeddings=False)),
    "gpt2-exact-gelu": ("GPT2", dict(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB,
                                     n_positions=CONTEXT, activation_function="gelu")),
    "llama-tied": ("Llama", dict(_LLAMA, rope_theta=10000.0, tie_word_embeddings=True)),
    "llama-untied": ("Llama", dict(_LLAMA, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)),
    "llama-bias": ("Llama", dict(_LLAMA, attention_bias=True, mlp_bias=True)),
    "mistral": ("Mistral", dict(_LLAMA, sliding_window=None)),
    "mistral-window": ("Mistral", dict(_LLAMA, sliding_window=6)),
    "qwen2": ("Qwen2", dict(_LLAMA, tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(_LLAMA, head_dim=8, tie_word_embeddings=True)),
    "llama-wide-heads": ("Llama", dict(_LLAMA, head_dim=16)),
    # Five windowed layers, then a full one, each kind with its own rotary base; the scores'
    # scale from query_pre_attn_scalar rather than head_dim.
    "gemma3": ("Gemma3Text", dict(_LLAMA, num_hidden_layers=7, head_dim=16, num_key_value_heads=1,
                                  sliding_window=5, query_pre_attn_scalar=24,
                                  tie_word_embeddings=True)),
    "gemma3-untied": ("Gemma3Text", dict(_LLAMA, head_dim=8, sliding_window=6,
                                         layer_types=["full_attention", "sliding_attention"],
                                         rope_parameters={
                                             "full_attention": {"rope_type": "default",
                                                                "rope_theta": 50000.0},
                                             "sliding_attention": {"rope_type": "default",
                                                                   "rope_theta": 1000.0}},
                                         tie_word_embeddings=False)),
}


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so a misplaced norm weight or zero bias cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _hf_model(name: str) -> torch.nn.Module:
    family, kwargs = HF_MODELS[name]
    config = getattr(transformers, f"{family}Config")(**kwargs)
    head = {"GPT2": "GPT2LMHeadModel", "Gemma3Text": "Gemma3ForCausalLM"}.get(
        family, f"{family}ForCausalLM")
    torch.manual_seed(0)
    return _perturb(getattr(transformers, head)(config))


def _assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 20,
                     "Hello world! Hello there, world.\n" * 20], vocab_size=300)
    tok.special = SpecialTokens(eos_token="<|im_end|>", chat_template=TEMPLATE)
    return tok


def _save_hf_tokenizer(directory, tok) -> None:
    """What transformers writes: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|pad|>")
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(directory)


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24))


def _to_hub_gpt2_layout(weights) -> None:
    """Rewrite a GPT-2 checkpoint as the original hub files are: no "transformer." prefix, and
    the attention-mask buffers saved beside the weights."""
    state = {k.removeprefix("transformer."): v for k, v in load_file(weights).items()}
    for i in range(HF_MODELS["gpt2"][1]["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, CONTEXT, CONTEXT).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("name", [*HF_MODELS, "llama-sharded", "gpt2-hub-layout"])
def test_import_then_export_keeps_transformers_logits(name, tmp_path, tokenizer, ids):
    variant = {"llama-sharded": "llama-untied", "gpt2-hub-layout": "gpt2"}.get(name, name)
    hf_model = _hf_model(variant)
    src = tmp_path / "hf"
    sharded = name == "llama-sharded"
    hf_model.save_pretrained(src, safe_serialization=True,
                             **({"max_shard_size": "20KB"} if sharded else {}))
    assert (src / "model.safetensors.index.json").is_file() == sharded
    if name == "gpt2-hub-layout":
        _to_hub_gpt2_layout(src / "model.safetensors")
    _save_hf_tokenizer(src, tokenizer)

    model = open_model(import_hf(src, tmp_path / "ours")).model
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    _assert_same_logits(ours, theirs)
    assert model.embed.weight.dtype == torch.float32

    exported = export_hf(tmp_path / "ours", tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        _assert_same_logits(reloaded(ids).logits, ours)


NATIVE = {
    "gpt2-like-without-bias": dict(positions="learned", norm="layernorm", mlp="gelu"),
    "nanogpt-like-exact-gelu": dict(positions="learned", norm="layernorm", mlp="gelu-exact"),
    "gpt2-like-untied": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True,
                             tie_embeddings=False),
    "llama-gqa-untied": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                             tie_embeddings=False, rope_base=50000.0),
    "qwen2-qkv-bias-untied": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                                  qkv_bias=True, tie_embeddings=False),
    "qwen3-qk-norm-mqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1,
                              qk_norm=True),
    "mistral-window": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                           sliding_window=7),
    "gemma3-like": dict(positions="rope", norm="rmsnorm", mlp="geglu", n_kv_head=1, head_dim=12,
                        qk_norm=True, post_norms=True, embed_scale=True, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention"],
                        rope_local_base=10000.0, rope_base=1e6, attn_scale=20 ** -0.5),
}


@pytest.mark.parametrize("name", NATIVE)
def test_lmforge_model_exports_and_comes_back(name, tmp_path, tokenizer, ids):
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, d_mlp=64, vocab_size=VOCAB,
                      context_length=CONTEXT, **NATIVE[name])
    model = _perturb(Decoder(cfg))
    save_model(tmp_path / "ours", model, tokenizer)

    exported = export_hf(tmp_path / "ours", tmp_path / "exported")
    assert is_hf_dir(exported) and not is_hf_dir(tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    back = open_model(import_hf(exported, tmp_path / "back")).model
    with torch.no_grad():
        ours = model(ids)
        _assert_same_logits(reloaded(ids).logits, ours)
        _assert_same_logits(back(ids), ours)


def test_tokenizer_and_chat_template_survive_both_directions(tmp_path, tokenizer):
    src = tmp_path / "hf"
    _hf_model("gpt2").save_pretrained(src)
    _save_hf_tokenizer(src, tokenizer)
    source = transformers.AutoTokenizer.from_pretrained(src)

    ours = open_model(import_hf(src, tmp_path / "ours")).tokenizer
    assert ours.chat_template == TEMPLATE
    assert (ours.special.bos_token, ours.special.eos_token, ours.special.pad_token) == (
        "<|endoftext|>", "<|im_end|>", "<|pad|>")
    for text in TEXTS:
        assert ours.encode(text) == source(text, add_special_tokens=False).input_ids

    exported = transformers.AutoTokenizer.from_pretrained(
        export_hf(tmp_path / "ours", tmp_path / "exported"))
    assert exported.chat_template == TEMPLATE
    assert exported.eos_token == "<|im_end|>" and exported.pad_token == "<|pad|>"
    assert exported.model_max_length == CONTEXT
    for text in TEXTS:
        assert exported(text).input_ids == ours.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_bos_added_by_the_tokenizer_template_becomes_add_bos_token(tmp_path, tokenizer):
    # transformers 5 writes no add_bos_token; a Llama tokenizer.json prepends BOS in its template.
    src = tmp_path / "hf"
    _hf_model("llama-tied").save_pretrained(src)
    _save_hf_tokenizer(src, tokenizer)
    assert "add_bos_token" not in json.loads((src / "tokenizer_config.json").read_text())
    plain = open_model(import_hf(src, tmp_path / "plain")).tokenizer
    assert not plain.special.add_bos_token

    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    _save_hf_tokenizer(src, Tokenizer(backend))
    with_bos = open_model(import_hf(src, tmp_path / "with-bos")).tokenizer
    assert with_bos.special.add_bos_token


def test_generation_config_is_copied_or_made_from_config(tmp_path, tokenizer):
    src = tmp_path / "hf"
    _hf_model("llama-tied").save_pretrained(src)
    _save_hf_tokenizer(src, tokenizer)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 0,
                                                            "eos_token_id": [3, 0]}))
    export_hf(import_hf(src, tmp_path / "ours"), tmp_path / "exported")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "exported")
    assert generation.eos_token_id == [3, 0]

    (src / "generation_config.json").unlink()
    made = json.loads((import_hf(src, tmp_path / "ours2") / "generation_config.json").read_text())
    assert made == {"bos_token_id": 0, "eos_token_id": 3}


_BASE_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], **_LLAMA)


@pytest.mark.parametrize("change,named", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "yarn"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16,
          layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
])
def test_options_we_do_not_implement_are_refused(change, named):
    with pytest.raises(UnsupportedModel, match=named):
        config_from_hf({**_BASE_LLAMA, **change})


def test_gpt2_with_another_activation_is_refused():
    gpt2 = dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=8, vocab_size=10, n_positions=8)
    assert config_from_hf(gpt2).mlp == "gelu"
    assert config_from_hf({**gpt2, "activation_function": "gelu"}).mlp == "gelu-exact"
    with pytest.raises(UnsupportedModel, match="activation_function='relu'"):
        config_from_hf({**gpt2, "activation_function": "relu"})


def test_mistral_window_covering_the_context_is_full_attention():
    cfg = config_from_hf({**_BASE_LLAMA, "model_type": "mistral", "sliding_window": 4096})
    assert (cfg.context_length, cfg.n_kv_head, cfg.positions) == (CONTEXT, 2, "rope")


def test_unsupported_model_type_names_it_and_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert",
                                                      "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(UnsupportedModel, match="bert") as err:
        import_hf(tmp_path, tmp_path / "out")
    assert "gpt2" in str(err.value) and "llama" in str(err.value)


def test_missing_tokenizer_and_pickled_weights_are_refused(tmp_path, tokenizer):
    src = tmp_path / "hf"
    _hf_model("gpt2").save_pretrained(src)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        import_hf(src, tmp_path / "out")
    _save_hf_tokenizer(src, tokenizer)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")  # never opened
    with pytest.raises(UnsupportedModel, match="safetensors"):
        import_hf(src, tmp_path / "out")


def test_model_of_no_hf_family_is_refused_on_export(tmp_path, tokenizer):
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=VOCAB, positions="rope",
                      norm="rmsnorm", mlp="relu2")
    save_model(tmp_path / "ours", Decoder(cfg), tokenizer)
    with pytest.raises(UnsupportedModel, match="mlp='swiglu' \\(has 'relu2'\\)"):
        export_hf(tmp_path / "ours", tmp_path / "exported")
