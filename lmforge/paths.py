"""Where lmforge keeps downloads and prepared data: one cache directory, overridable."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_dir() -> Path:
    """$LMFORGE_CACHE, else the user cache dir (~/.cache/lmforge on Linux)."""
    path = Path(os.environ.get("LMFORGE_CACHE") or user_cache_dir("lmforge"))
    path.mkdir(parents=True, exist_ok=True)
    return path
