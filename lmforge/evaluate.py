"""Scoring a model on held-out text."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: list[int],
               window: int = 512) -> tuple[float, int]:
    """exp(mean NLL) of `ids` and the number of tokens scored, over non-overlapping windows
    (each window's first token is not scored). `logits_fn` maps (1, T) ids to (1, T, vocab)
    logits: a model, or any callable such as another library's model wrapped in a lambda."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start:start + window]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = logits_fn(chunk)[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count), count
