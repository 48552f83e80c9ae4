"""Decoding with a KV cache: the prompt is run once, then one token per step.

`stream` yields token ids as they are produced; `generate` collects them. Both use the
same prefill + cached decode steps, so what a user sees streamed is what tests check.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.infer.sampling import SamplingConfig, sample
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from BOS (or a newline, for char models)."""
    ids = tokenizer.encode(text) if text else []
    if ids:
        return ids
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else tokenizer.encode("\n")


@torch.inference_mode()
def stream(model: Decoder, prompt: list[int], max_new_tokens: int,
           sampling: SamplingConfig | None = None, seed: int | None = None,
           stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt`, stopping at a stop id."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. a BOS token)")
    sampling = sampling or SamplingConfig()
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    context = model.cfg.context_length
    # A prompt longer than the context keeps its tail; generation stops at the context end.
    prompt = prompt[-(context - 1):]
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), cache=cache, start=0,
                   last_only=True)[:, -1]
    position = len(prompt)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        token_id = int(token.item())
        yield token_id
        if token_id in stop_ids or i == max_new_tokens - 1:
            return
        logits = model(token.view(1, 1), cache=cache, start=position)[:, -1]
        position += 1


def generate(model: Decoder, prompt: list[int], max_new_tokens: int,
             sampling: SamplingConfig | None = None, seed: int | None = None,
             stop_ids: tuple[int, ...] = ()) -> list[int]:
    return list(stream(model, prompt, max_new_tokens, sampling, seed, stop_ids))
