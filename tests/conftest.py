"""Shared fixtures: real text kept in tests/data (its README says where each file comes from),
prepared once per test session."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
SHAKESPEARE = DATA / "tinyshakespeare-head.txt"
TATOEBA = DATA / "tatoeba-eng-fra-sample.tsv"


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The first 7,552 lines of Tiny Shakespeare: 199,994 characters, 62 distinct."""
    return SHAKESPEARE.read_text()


@pytest.fixture(scope="session")
def char_corpus(tmp_path_factory) -> Path:
    """The Tiny Shakespeare slice, prepared with the char tokenizer."""
    from lmforge.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("char-corpus")
    return prepare(PrepareConfig(inputs=[str(SHAKESPEARE)], out_dir=str(root / "prepared"),
                                 tokenizer="char"), progress=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests out of the user's real cache directory."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def bpe_tokenizer(shakespeare):
    """A small byte-level BPE tokenizer (400 tokens) trained on 50k characters of Shakespeare."""
    from lmforge.tokenizer import train_bpe

    return train_bpe([shakespeare[:50_000]], vocab_size=400)


@pytest.fixture(scope="session")
def smolvlm_tokenizer_json(bpe_tokenizer) -> str:
    """`bpe_tokenizer` with SmolVLM's image tokens added, as tokenizer.json text."""
    import tokenizers

    from lmforge.images import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN

    backend = tokenizers.Tokenizer.from_str(bpe_tokenizer.backend.to_str())
    backend.add_special_tokens([FAKE_IMAGE_TOKEN, IMAGE_TOKEN, "<end_of_utterance>",
                                GLOBAL_IMAGE_TOKEN]
                               + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
    return backend.to_str()


@pytest.fixture(scope="session")
def tiny_llama():
    """Builds a tiny random Llama-style decoder (GQA, rotary, SwiGLU) for a vocabulary size
    and context length: the model the engine and server tests decode with."""
    import torch

    from lmforge.config import ModelConfig
    from lmforge.models.decoder import Decoder

    def build(vocab_size: int, context_length: int):
        torch.manual_seed(0)
        return Decoder(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                   vocab_size=vocab_size, context_length=context_length,
                                   positions="rope", norm="rmsnorm", mlp="swiglu")).eval()

    return build


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, bpe_tokenizer, tiny_llama) -> Path:
    """A tiny Llama-style model directory to fine-tune."""
    import torch

    from lmforge.modeldir import save_model

    directory = tmp_path_factory.mktemp("base")
    model = tiny_llama(bpe_tokenizer.vocab_size, 128)
    # A random 32-wide model's tied output weights (std 0.02) cap its logits near +-0.6, so
    # adapters on the blocks alone could not make any prediction confident; a pretrained
    # model's are far larger.
    with torch.no_grad():
        model.embed.weight.mul_(10)
    save_model(directory, model, bpe_tokenizer)
    return directory
