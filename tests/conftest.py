"""Shared fixtures: real text from ../shared/data, prepared once per test session."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is missing (the repo expects ../shared/data beside it)")
    return SHAKESPEARE.read_text()


@pytest.fixture(scope="session")
def char_corpus(tmp_path_factory, shakespeare) -> Path:
    """The first 200k characters of Tiny Shakespeare, prepared with the char tokenizer."""
    from lmforge.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("char-corpus")
    text_file = root / "shakespeare-200k.txt"
    text_file.write_text(shakespeare[:200_000])
    return prepare(PrepareConfig(inputs=[str(text_file)], out_dir=str(root / "prepared"),
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
