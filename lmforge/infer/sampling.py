"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, greedy.

The order is the usual one: penalties change the model's logits, temperature scales them,
then top-k, top-p and min-p cut the tail, and a token is drawn from what is left.

Every value the settings accept gives finite logits and a proper distribution, however
extreme (a temperature, top_p or repetition penalty of 1e-300 included): the logits are
float32, where such numbers round to zero, so each step keeps its numbers in range.

The settings are a `SamplingConfig` (in `lmforge.config`, with lmforge's one set of defaults).
"""

from __future__ import annotations

import torch

from lmforge.compress import kernels
from lmforge.config import SamplingConfig

_FLOAT32 = torch.finfo(torch.float32)


def apply_penalties(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
    """Penalised logits (vocab,): `seen` marks tokens of the prompt and output (for the
    repetition penalty), `counts` how often each was generated (presence and frequency)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1:
        # A penalty past float32's range would become 0 (dividing by it gives inf) or inf
        # (times a zero logit gives NaN); the scaled logits stay finite for the same reason.
        penalty = min(max(cfg.repetition_penalty, _FLOAT32.tiny), _FLOAT32.max)
        # Dividing a negative logit would raise it: scale towards lower probability instead.
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled.clamp(_FLOAT32.min, _FLOAT32.max), logits)
    if cfg.presence_penalty or cfg.frequency_penalty:
        logits = logits - cfg.presence_penalty * (counts > 0) - cfg.frequency_penalty * counts
    return logits


def filtered_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Logits (B, vocab) after temperature, top-k, top-p and min-p: softmax of these is the
    distribution a token is drawn from (cut tokens are -inf). Needs a temperature that is
    not greedy."""
    logits = logits.float()
    # The best token at 0 and the rest below: a small temperature then sends them towards
    # -inf, never the best one to +inf (softmax of inf is NaN).
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = _nucleus(logits, cfg.top_p)
    if cfg.min_p:
        probs = torch.softmax(logits, dim=-1)
        floor = cfg.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab)."""
    if cfg.greedy:
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and kernels.available():
            return kernels.greedy_tokens(logits)
        return logits.argmax(dim=-1)
    probs = torch.softmax(filtered_logits(logits, cfg), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
    # Said, not left to the comparison: a top_p of 1e-300 is 0 in float32, which drops all.
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
