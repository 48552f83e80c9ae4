"""Batches of token windows from prepared shards, deterministic by (seed, step, slot).

A training batch is never drawn from a stateful stream: the windows of micro-batch `slot`
of optimizer step `step` are a pure function of (seed, step, slot). That makes three
things true by construction: a resumed run sees exactly the data it would have seen,
a rank reads a disjoint part of the global batch, and 2 processes x 1 accumulation step
read the same global batch as 1 process x 2 accumulation steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import DataError
from lmforge.files import read_json_object

# Validation batches draw from their own stream, apart from every training step's.
_EVAL_STEP = 2**32


class TokenShards:
    """The token files of one prepared corpus, memory-mapped (nothing is read up front)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.dir} is not a prepared corpus (no meta.json): run `lmforge prepare` on "
                "your text first, or point `data` at a text file, folder, JSONL or parquet"
            )
        self.meta = read_json_object(meta_path)
        self._tokens: dict[str, np.memmap] = {}

    def split(self, name: str) -> np.ndarray:
        if name not in self._tokens:
            path = self.dir / f"{name}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"missing {path}: re-run `lmforge prepare`")
            dtype = np.dtype(self.meta["dtype"])
            # numpy cannot map an empty file; a corpus prepared with val_fraction=0 has one.
            empty = path.stat().st_size == 0
            self._tokens[name] = np.empty(0, dtype) if empty else np.memmap(path, dtype, mode="r")
        return self._tokens[name]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def bytes_per_token(self, split: str) -> float:
        info = self.meta["splits"][split]
        return info["bytes"] / max(info["tokens"], 1)


def window_batch(tokens: np.ndarray, starts: np.ndarray, length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(starts), length), as int64."""
    rows = np.stack([np.asarray(tokens[s:s + length + 1], dtype=np.int64) for s in starts])
    data = torch.from_numpy(rows)
    return data[:, :-1], data[:, 1:]


def random_starts(n_tokens: int, length: int, batch: int, seed: int, step: int, slot: int
                  ) -> np.ndarray:
    if n_tokens <= length + 1:
        raise DataError(
            f"the split has {n_tokens} tokens, too few for windows of {length} + 1: "
            "use a shorter context_length or more text"
        )
    rng = np.random.default_rng([seed, step, slot])
    return rng.integers(0, n_tokens - length - 1, size=batch)


def train_batch(tokens: np.ndarray, length: int, batch: int, seed: int, step: int, slot: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `slot` of optimizer step `step`: `batch` random windows."""
    return window_batch(tokens, random_starts(len(tokens), length, batch, seed, step, slot), length)


def eval_batches(tokens: np.ndarray, length: int, batch: int, n_batches: int, seed: int,
                 rank: int = 0, world: int = 1
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the validation batches.

    n_batches > 0: that many fixed random batches (the same at every evaluation, so the
    curve is not noisier than the model). n_batches == 0: the whole split in consecutive
    windows, so the figure is the split's true loss.
    """
    if n_batches > 0:
        for i in range(rank, n_batches, world):
            yield train_batch(tokens, length, batch, seed, step=_EVAL_STEP, slot=i)
        return
    starts = np.arange(0, len(tokens) - length, length)
    for i in range(rank * batch, len(starts), batch * world):
        yield window_batch(tokens, starts[i:i + batch], length)


def in_order(rows: list, batch: int, n_batches: int, rank: int = 0, world: int = 1
             ) -> Iterator[list]:
    """This rank's share of consecutive batches of held-out rows (examples, pairs):
    the first n_batches, or all of them when n_batches is 0."""
    starts = range(0, len(rows), batch)
    if n_batches > 0:
        starts = starts[:n_batches]
    for start in starts[rank::world]:
        yield rows[start:start + batch]
