"""Tests for lmforge.interop.gguf: round trips through GGUF on a tiny model (fast), refusals of
files we cannot read, and parity with transformers on the real SmolLM2-135M GGUF (slow)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UnsupportedModel
from lmforge.eval import perplexity
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.interop.gguf import (
    GGUFFileError,
    export_gguf,
    import_gguf,
    read_gguf,
)
from lmforge.modeldir import GENERATION_CONFIG, save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model
from lmforge.tokenizer import SpecialTokens, Tokenizer, train_bpe

from .cli_errors import one_line_error
from .smollm2 import smollm2_gguf, transformers_from_gguf

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n",
    "def main(argv):\n    return 42  # the answer\n",
    "café naïve 日本語 😀 1234 5678\n",
] * 20
TEXTS = [
    "Hello, world!",
    "  two leading spaces and trailing  ",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "naïve café — “quotes” ¿qué? 日本語 你好，世界。 emoji 😀🎉 🇫🇷",
    "def f(x):\n    return x**2  # square\n\n\tindented",
    "x = 12345 + 3.14",
    "line1\r\nline2\n\n\nline3   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]
# A small llama-shaped model: GQA, widths that are multiples of Q8_0's 32-element blocks.
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_mlp=128, context_length=64,
            positions="rope", rope_base=10000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
            init_std=0.1)


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    trained = train_bpe(CORPUS, vocab_size=320)
    special = SpecialTokens(bos_token="<|endoftext|>", eos_token="<|im_end|>",
                            pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
    return Tokenizer(trained.backend, special)


def tiny_model_dir(directory: Path, tokenizer: Tokenizer, tie: bool = True,
                   extra_vocab: int = 0) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, tie_embeddings=tie, vocab_size=tokenizer.vocab_size + extra_vocab)
    model = Decoder(cfg)
    with torch.no_grad():  # norms start at 1; make them count in the comparison
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return save_model(directory, model, tokenizer)


def logits_of(model: Decoder, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def sample_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(CORPUS[0] + CORPUS[3])[:48]


# --------------------------------------------------------------------------- fast round trips


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_f32_round_trip_is_exact(tmp_path, tiny_tokenizer, tie):
    source = tiny_model_dir(tmp_path / "src", tiny_tokenizer, tie=tie)
    model = open_model(source).model
    path = export_gguf(source, tmp_path / "tiny.gguf")

    cfg, state, tokenizer, generation = read_gguf(path)
    # The init scale is a training setting, which a GGUF file does not carry.
    assert cfg == dataclasses.replace(model.cfg, init_std=cfg.init_std)
    expected = model.state_dict()
    if tie:
        expected.pop("lm_head.weight")
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert generation == {"bos_token_id": tiny_tokenizer.bos_id,
                          "eos_token_id": tiny_tokenizer.eos_id,
                          "pad_token_id": tiny_tokenizer.pad_id}

    imported = import_gguf(path, tmp_path / "imported")
    again = open_model(imported).model
    ids = sample_ids(tiny_tokenizer)
    assert (logits_of(again, ids) - logits_of(model, ids)).abs().max().item() <= 1e-6
    saved = json.loads((imported / GENERATION_CONFIG).read_text())
    assert saved == generation


@pytest.mark.parametrize("dtype, weight_tol, logit_tol", [("f16", 1e-3, 1e-2), ("q8_0", 1e-2, 0.2)])
def test_f16_and_q8_0_round_trip_within_quantization_error(tmp_path, tiny_tokenizer, dtype,
                                                           weight_tol, logit_tol):
    source = tiny_model_dir(tmp_path / "src", tiny_tokenizer, tie=False)
    model = open_model(source).model
    path = export_gguf(source, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"  # norms are never quantized
    assert kinds["blk.0.attn_q.weight"] == dtype.upper()

    _, state, _, _ = read_gguf(path)
    expected = model.state_dict()
    weight_error = max((state[k] - v).abs().max().item() for k, v in expected.items())
    ids = sample_ids(tiny_tokenizer)
    again = Decoder(model.cfg)
    again.load_state_dict(state)
    reference = logits_of(model, ids)
    logit_error = (logits_of(again, ids) - reference).abs().max().item()
    print(f"\n{dtype}: max weight error {weight_error:.2e}, max logit error {logit_error:.2e} "
          f"(logits span {reference.min().item():.2f}..{reference.max().item():.2f})")
    assert 0 < weight_error <= weight_tol
    assert logit_error <= logit_tol


def test_tokenizer_round_trip(tmp_path, tiny_tokenizer):
    path = export_gguf(tiny_model_dir(tmp_path / "src", tiny_tokenizer), tmp_path / "tiny.gguf")
    _, _, tokenizer, _ = read_gguf(path)
    for text in TEXTS:
        assert tokenizer.encode(text) == tiny_tokenizer.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.special == tiny_tokenizer.special
    assert tokenizer.vocab_size == tiny_tokenizer.vocab_size


def test_padded_vocab_gets_placeholder_tokens(tmp_path, tiny_tokenizer):
    source = tiny_model_dir(tmp_path / "src", tiny_tokenizer, extra_vocab=13)
    path = export_gguf(source, tmp_path / "tiny.gguf")
    cfg, state, tokenizer, _ = read_gguf(path)
    assert cfg.vocab_size == tiny_tokenizer.vocab_size + 13 == state["embed.weight"].shape[0]
    assert tokenizer.backend.id_to_token(cfg.vocab_size - 1) == f"[PAD{cfg.vocab_size - 1}]"
    assert tokenizer.encode(TEXTS[2]) == tiny_tokenizer.encode(TEXTS[2])


def test_transformers_reads_our_export(tmp_path, tiny_tokenizer):
    """An independent reader agrees: catches a q/k reordering that is self-consistent but
    wrong, which a round trip through our own reader cannot."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    source = tiny_model_dir(tmp_path / "src", tiny_tokenizer, tie=False)
    model = open_model(source).model
    path = export_gguf(source, tmp_path / "tiny.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == \
            tiny_tokenizer.encode(text), text
    ids = sample_ids(tiny_tokenizer)
    with torch.no_grad():
        their_logits = theirs(torch.tensor([ids])).logits[0]
    assert (their_logits - logits_of(model, ids)).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- refusals


def write_gguf(path: Path, arch: str = "llama", tokenizer_model: str = "gpt2",
               tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A minimal GGUF: a one-block model's metadata, a 4-token vocabulary and `tensors`."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(["a", "b", "c", "d"])
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_file_is_refused_with_its_name(tmp_path, tiny_tokenizer):
    path = export_gguf(tiny_model_dir(tmp_path / "src", tiny_tokenizer), tmp_path / "tiny.gguf")
    data = path.read_bytes()
    for size in (100, len(data) // 2, len(data) - 7):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(GGUFFileError, match=rf"{cut.name}.*truncated"):
            read_gguf(cut)


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("not a gguf file at all")
    with pytest.raises(GGUFFileError, match="not a GGUF file"):
        read_gguf(path)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_other_architectures_are_refused(tmp_path, arch):
    path = write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    with pytest.raises(UnsupportedModel, match=rf"'{arch}' model.*'llama'"):
        read_gguf(path)


def test_sentencepiece_tokenizer_is_refused(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(UnsupportedModel, match="'llama' tokenizer"):
        read_gguf(path)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    path = write_gguf(tmp_path / "int.gguf",
                      tensors={"token_embd.weight": np.zeros((4, 8), dtype=np.int32)})
    with pytest.raises(UnsupportedModel, match="token_embd.weight.*I32"):
        read_gguf(path)


def test_unknown_tensor_is_refused(tmp_path):
    path = write_gguf(tmp_path / "bias.gguf",
                      tensors={"blk.0.attn_q.bias": np.zeros(8, dtype=np.float32)})
    with pytest.raises(UnsupportedModel, match="blk.0.attn_q.bias"):
        read_gguf(path)


def test_export_refuses_models_llama_cannot_describe(tmp_path, tiny_tokenizer):
    cfg = ModelConfig(**{**TINY, "norm": "layernorm", "mlp": "gelu", "qk_norm": True},
                      vocab_size=tiny_tokenizer.vocab_size)
    source = save_model(tmp_path / "gpt", Decoder(cfg), tiny_tokenizer)
    with pytest.raises(UnsupportedModel, match="norm='layernorm', mlp='gelu', qk_norm=True"):
        export_gguf(source, tmp_path / "gpt.gguf")
    assert not list(tmp_path.glob("gpt.gguf*"))
    with pytest.raises(ValueError, match="dtype='q4_0'"):
        export_gguf(source, tmp_path / "gpt.gguf", dtype="q4_0")
    wide = ModelConfig(**TINY, head_dim=32, vocab_size=tiny_tokenizer.vocab_size)
    source = save_model(tmp_path / "wide", Decoder(wide), tiny_tokenizer)
    with pytest.raises(UnsupportedModel, match="head_dim=32"):  # llama.cpp would take 16
        export_gguf(source, tmp_path / "wide.gguf")


# --------------------------------------------------------------------------- hostile files

U8, STRING, ARRAY = 0, 8, 9


def header(*pairs: bytes, n_tensors: int = 0, n_kv: int | None = None, tail: bytes = b"") -> bytes:
    """A GGUF v3 header written by hand: packed key/value `pairs`, then `tail`."""
    n_kv = len(pairs) if n_kv is None else n_kv
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(pairs) + tail


def pair(key: str, kind: int, value: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value


HOSTILE_HEADERS = {
    "2^40 bytes": (header(pair("general.x", ARRAY, struct.pack("<IQ", U8, 1 << 40))),
                   r"an array of 1,099,511,627,776 items"),
    "2^40 strings": (header(pair("general.x", ARRAY, struct.pack("<IQ", STRING, 1 << 40))),
                     r"an array of 1,099,511,627,776 items"),
    "a 2^62-byte string": (header(pair("general.x", STRING, struct.pack("<Q", 1 << 62))),
                           r"a string in metadata 'general.x'"),
    "a 2^62-byte key": (header(struct.pack("<Q", 1 << 62) + bytes(64)), r"a metadata key of"),
    "arrays nested 100,000 deep": (
        header(pair("general.x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 100_000)),
        r"nests arrays more than 4 deep"),
    "2^60 keys": (header(n_kv=1 << 60), r"1,152,921,504,606,846,976 metadata keys"),
    "2^60 tensors": (header(n_tensors=1 << 60), r"1,152,921,504,606,846,976 tensors"),
    "a 2^31-dimension tensor": (header(n_tensors=1, tail=struct.pack("<Q", 1) + b"x"
                                       + struct.pack("<I", 1 << 31) + bytes(64)),
                                r"tensor 'x' has 2,147,483,648 dimensions"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_a_hostile_header_is_refused_before_anything_is_sized_from_it(tmp_path, case):
    data, message = HOSTILE_HEADERS[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(GGUFFileError, match=rf"hostile.gguf is damaged.*{message}"):
        read_gguf(path)
    assert time.perf_counter() - start < 2


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("tiny-gguf")
    return export_gguf(tiny_model_dir(root / "model", tiny_tokenizer), root / "tiny.gguf")


def with_metadata(source: Path, path: Path, **values: int) -> Path:
    """A copy of `source` with some llama.* numbers overwritten in place."""
    shutil.copyfile(source, path)
    reader = gguf.GGUFReader(path, "r+")
    for key, value in values.items():
        field = reader.fields[f"llama.{key}"]
        field.parts[field.data[0]][0] = value
    reader.data.flush()
    return path


@pytest.mark.parametrize("values, error, message", [
    ({"block_count": 2**31 - 1}, UnsupportedModel,
     r"block_count is 2,147,483,647, and it holds tensors of 2 blocks"),
    ({"context_length": 2**31 - 1}, UnsupportedModel,
     r"context_length=2,147,483,647; lmforge reads models of up to 1,048,576 positions"),
    ({"attention.head_count": 0}, GGUFFileError,
     r"llama.attention.head_count is 0, where a positive whole number belongs"),
    ({"attention.head_count": 3}, GGUFFileError,
     r"embedding_length 64 is not a multiple of head_count 3"),
    ({"feed_forward_length": 0}, GGUFFileError, r"llama.feed_forward_length is 0"),
], ids=["block_count 2^31-1", "context_length 2^31-1", "head_count 0", "head_count 3",
        "feed_forward_length 0"])
def test_hyperparameters_are_checked_before_anything_is_built(tmp_path, tiny_gguf, values,
                                                              error, message):
    path = with_metadata(tiny_gguf, tmp_path / "hostile.gguf", **values)
    start = time.perf_counter()
    with pytest.raises(error, match=rf"hostile.gguf .*{message}"):
        import_gguf(path, tmp_path / "imported")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "imported").exists()


def test_a_hostile_file_is_a_one_line_cli_error(tmp_path, capsys):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE_HEADERS["2^40 strings"][0])
    assert "is damaged or truncated" in one_line_error(capsys, "info", str(path))


# --------------------------------------------------------------------------- SmolLM2 parity

SMOLLM2_PPL = 41.808  # transformers on the same file and text, measured once
PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    """transformers' model and tokenizer from the same GGUF (loaded once: it takes ~35 s)."""
    return transformers_from_gguf(smollm2)


@pytest.fixture(scope="module")
def our_smollm2(smollm2, tmp_path_factory):
    start = time.perf_counter()
    directory = import_gguf(smollm2, tmp_path_factory.mktemp("smollm2"))
    opened = open_model(directory)
    model, tokenizer = opened.model, opened.tokenizer
    print(f"\nimport_gguf + open_model took {time.perf_counter() - start:.1f} s")
    return directory, model, tokenizer


@pytest.mark.slow
def test_smollm2_config_and_tokens_match_transformers(our_smollm2, hf_smollm2):
    directory, model, tokenizer = our_smollm2
    hf_model, hf_tokenizer = hf_smollm2
    assert model.cfg.n_layer == hf_model.config.num_hidden_layers == 30
    assert (model.cfg.n_head, model.cfg.n_kv_head) == (9, 3)
    assert model.cfg.tie_embeddings and model.cfg.rope_base == 100000.0
    assert tokenizer.eos_id == 2 and not tokenizer.special.add_bos_token
    assert tokenizer.chat_template == hf_tokenizer.chat_template
    assert json.loads((directory / GENERATION_CONFIG).read_text())["eos_token_id"] == 2
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_smollm2_chat_prompt_matches_transformers(our_smollm2, hf_smollm2):
    from lmforge.chat import chat_prompt_ids, render_chat

    _, _, tokenizer = our_smollm2
    _, hf_tokenizer = hf_smollm2
    conversation = [{"role": "user", "content": "Hi! What is 2 + 2?"},
                    {"role": "assistant", "content": "4."},
                    {"role": "user", "content": "Et en français ? 😀"}]
    for messages in (conversation, [{"role": "system", "content": "Be brief."}, *conversation]):
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=True)
        assert render_chat(tokenizer, messages) == expected
        assert chat_prompt_ids(tokenizer, messages) == hf_tokenizer(
            expected, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_smollm2_digits_split_like_llama_cpp(our_smollm2):
    """SmolLM2's pre-tokenizer ("smollm") isolates each digit before GPT-2's regex, so a run of
    spaces before a digit stays one piece. transformers' GGUF loader applies GPT-2's regex alone
    and splits it ("a  2" -> a, Ġ, Ġ, 2); we follow llama.cpp and the original tokenizer."""
    _, _, tokenizer = our_smollm2
    ids = tokenizer.backend.token_to_id
    assert tokenizer.encode("a  2") == [ids("a"), ids("ĠĠ"), ids("2")]
    assert tokenizer.encode(" 2024") == [ids("Ġ"), ids("2"), ids("0"), ids("2"), ids("4")]


@pytest.mark.slow
@pytest.mark.timeout(900)  # transformers' perplexity and generation: minutes on a busy CPU
def test_smollm2_logits_greedy_and_perplexity_match_transformers(our_smollm2, hf_smollm2,
                                                                 shakespeare):
    _, model, tokenizer = our_smollm2
    hf_model, hf_tokenizer = hf_smollm2
    ids = tokenizer.encode(shakespeare[:20_000])
    assert ids == hf_tokenizer(shakespeare[:20_000], add_special_tokens=False)["input_ids"]
    assert len(ids) == 6087

    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids[:512]])), hf_model(torch.tensor([ids[:512]])).logits
    logit_diff = (ours - theirs).abs().max().item()

    start = time.perf_counter()
    our_ppl, count = perplexity(model, ids)
    our_seconds = time.perf_counter() - start
    start = time.perf_counter()
    their_ppl, _ = perplexity(lambda x: hf_model(x).logits, ids)
    their_seconds = time.perf_counter() - start

    prompt = tokenizer.encode(PROMPT)
    our_tokens = generate(model, prompt, 30, SamplingConfig(temperature=0))
    their_tokens = list(prompt)
    with torch.no_grad():  # plain greedy steps: transformers' generate would stop at EOS
        for _ in range(30):
            their_tokens.append(int(hf_model(torch.tensor([their_tokens])).logits[0, -1].argmax()))
    their_tokens = their_tokens[len(prompt):]

    print(f"\nSmolLM2 max |logit diff| over 512 tokens: {logit_diff:.3g}"
          f"\nperplexity on {count} tokens: ours {our_ppl:.4f} ({our_seconds:.1f} s), "
          f"transformers {their_ppl:.4f} ({their_seconds:.1f} s)"
          f"\ngreedy continuation: {tokenizer.decode(our_tokens)!r}")
    assert logit_diff < 1e-3
    assert count == 6075
    assert abs(our_ppl / their_ppl - 1) < 1e-3
    assert abs(our_ppl - SMOLLM2_PPL) < 0.05
    assert our_tokens == their_tokens


@pytest.mark.slow
def test_smollm2_q8_0_export_round_trip(our_smollm2, tmp_path, shakespeare):
    directory, model, tokenizer = our_smollm2
    start = time.perf_counter()
    path = export_gguf(directory, tmp_path / "smollm2-q8_0.gguf", dtype="q8_0")
    cfg, state, again_tokenizer, _ = read_gguf(path)
    seconds = time.perf_counter() - start
    assert cfg == model.cfg
    assert again_tokenizer.special == tokenizer.special
    assert again_tokenizer.encode(TEXTS[3]) == tokenizer.encode(TEXTS[3])
    again = Decoder(cfg).eval()
    again.load_state_dict({**state, "lm_head.weight": state["embed.weight"]})

    ids = tokenizer.encode(shakespeare[:5_000])[:1024]
    reference = logits_of(model, ids[:512])
    diff = (logits_of(again, ids[:512]) - reference).abs().max().item()
    ppl, q8_ppl = perplexity(model, ids)[0], perplexity(again, ids)[0]
    print(f"\nSmolLM2 Q8_0 export + read back ({path.stat().st_size / 2**20:.0f} MiB, "
          f"{seconds:.1f} s): max |logit diff| {diff:.3g} over 512 tokens (logits span "
          f"{reference.min().item():.1f}..{reference.max().item():.1f}); perplexity on "
          f"{len(ids) - 2} tokens {ppl:.3f} -> {q8_ppl:.3f}")
    # Re-quantizing to 8 bits moves each weight by up to half a step of 1/127 of its block's
    # largest magnitude (about 0.6% RMS): small next to the logits, and below 2% perplexity.
    assert diff < 2.0
    assert abs(q8_ppl / ppl - 1) < 0.02
