"""lmforge: make your own Transformer language models.

The public Python API (`lmforge.open_model`, `lmforge.Trainer`, `lmforge.load_recipe`,
`lmforge.Engine`, ...) lives in `lmforge.api` and is loaded on first use, so importing one
submodule (say `lmforge.config`) stays cheap.
"""

from __future__ import annotations


def __getattr__(name: str):
    import lmforge.api as api

    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
