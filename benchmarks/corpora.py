"""Where the benchmarks find Tiny Shakespeare: data/tinyshakespeare.txt in the repo (where the
recipes' headers put it), else ../shared/data beside the repo (the project's own machines)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                        "tinyshakespeare/input.txt")
PLACES = (REPO / "data" / "tinyshakespeare.txt",
          REPO.parent / "shared" / "data" / "tinyshakespeare.txt")


def tiny_shakespeare() -> Path:
    """The whole Tiny Shakespeare file (1.1 MB); exits with the command that fetches it."""
    for path in PLACES:
        if path.is_file():
            return path
    raise SystemExit(f"Tiny Shakespeare is not at {PLACES[0]}; fetch it (1.1 MB) with\n"
                     f"  curl --create-dirs -o {PLACES[0]} {TINY_SHAKESPEARE_URL}")
