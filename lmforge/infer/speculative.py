"""Prompt-lookup speculative decoding: draft tokens by copying, check them in one forward.

When the output repeats its input (rewriting, correcting, quoting, editing code), the tokens
after the latest earlier occurrence of the last few tokens are a good guess at what comes
next. `propose` makes that guess; `speculative_stream` feeds the last token and the draft to
the model in one forward pass and keeps the draft's longest prefix the model agrees with,
plus one token of the model's own. A forward over a few tokens reads the weights once, like
a one-token step: for SmolLM2-135M on two CPU cores nine tokens cost about two steps, so
accepted drafts save most of the steps they replace.

The output follows plain decoding: greedy gives the tokens of `engine.stream` (up to float
rounding, which differs between a forward over several tokens and over one and can only
matter at a near-tie), and sampling draws from the same distribution (a draft token d is kept
with probability p(d); after a rejection the token is drawn from p without d, renormalised).
Repetition penalties and stop strings are not supported yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.infer.engine import Detokenizer, PromptTooLong, Request
from lmforge.infer.sampling import SamplingConfig, filtered_logits, sample
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer


@dataclass
class SpeculativeStats:
    """Counters a caller passes in and reads afterwards (they add up over runs)."""

    forwards: int = 0  # model forward passes, the prompt's included
    drafted: int = 0  # draft tokens checked by the model
    accepted: int = 0  # draft tokens kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def propose(tokens: list[int], ngram: int, max_draft: int) -> list[int]:
    """Up to `max_draft` tokens that followed the latest earlier occurrence of the last n
    tokens, for the longest n <= `ngram` that occurred before; [] when none did.

    When fewer than `max_draft` tokens follow it, the occurrence overlaps the end: the
    tokens are repeating with that period, and the draft goes on repeating them (so a
    loop like "a b a b" drafts a full "a b a b ..." instead of a single token).
    A plain scan: for a few thousand tokens it takes about a millisecond in the worst case,
    against tens of milliseconds for a forward pass of even a small model.
    """
    end = len(tokens)
    if max_draft <= 0:
        return []
    for n in range(min(ngram, end - 1), 0, -1):
        suffix = tokens[end - n:]
        last = suffix[-1]
        # Right to left, so the latest occurrence wins; an occurrence needs a token after it.
        for start in range(end - n - 1, -1, -1):
            if tokens[start + n - 1] == last and tokens[start:start + n] == suffix:
                follow = tokens[start + n:start + n + max_draft]
                return (follow * -(-max_draft // len(follow)))[:max_draft]
    return []


@torch.inference_mode()
def speculative_stream(model: Decoder, prompt: list[int], max_new_tokens: int,
                       sampling: SamplingConfig | None = None, seed: int | None = None,
                       stop_ids: tuple[int, ...] = (), truncate: bool = False, ngram: int = 3,
                       max_draft: int = 8, stats: SpeculativeStats | None = None
                       ) -> Iterator[int]:
    """Token ids after `prompt` (batch 1), as `engine.stream` yields them (a stop id is
    yielded, then decoding ends), drafting from the prompt and the output so far.
    ngram: the longest suffix looked up; max_draft: tokens drafted per forward.
    stats, if given, counts forwards, drafted and accepted tokens."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. a BOS token)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = sampling or SamplingConfig()
    if sampling.penalised:
        raise ConfigError("speculative decoding does not apply repetition, presence or "
                          "frequency penalties yet: leave them at their defaults, or decode "
                          "without speculation")
    stats = stats if stats is not None else SpeculativeStats()
    device = next(model.parameters()).device  # a VLM keeps its embedding in model.text
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    context = model.cfg.context_length
    # The same limits as plain decoding: room for one new token, or the prompt's tail if
    # asked, then generation up to the context end.
    if len(prompt) >= context and not truncate:
        raise PromptTooLong(f"the prompt has {len(prompt)} tokens; at most {context - 1} fit "
                            f"(context {context}) with room for one new token: shorten it, "
                            "or ask for truncation to keep its end")
    prompt = prompt[-(context - 1):]
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    if max_new_tokens == 0:
        return
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    tokens = list(prompt)
    # Every token before tokens[-1] is in the cache; tokens[-1] goes in at `position`,
    # together with the draft, so the prompt's last token is checked like any other step.
    position = len(prompt) - 1
    if position:
        model(torch.tensor([tokens[:-1]], device=device), cache=cache, start=0, last_only=True)
        stats.forwards += 1
    generated = 0
    while generated < max_new_tokens:
        # One token always comes from the model, so a full draft never overshoots the limit
        # (nor the cache, which is sized for exactly max_new_tokens).
        draft = propose(tokens, ngram, min(max_draft, max_new_tokens - generated - 1))
        logits = model(torch.tensor([tokens[-1:] + draft], device=device), cache=cache,
                       start=position)[0]
        new = _verify(logits, draft, sampling, generator)
        stats.forwards += 1
        stats.drafted += len(draft)
        stats.accepted += len(new) - 1
        for token in new:
            yield token
            if token in stop_ids:
                return
        tokens += new
        generated += len(new)
        # Cache entries past the accepted tokens are stale; the next forward overwrites them
        # and attention never reads beyond what has been written at the current step.
        position += len(new)


def speculative_text(model: Decoder, tokenizer: Tokenizer, request: Request, ngram: int = 3,
                     max_draft: int = 8, stats: SpeculativeStats | None = None
                     ) -> Iterator[str]:
    """The text of an engine `Request` decoded speculatively, in pieces as they become final
    (as `engine.stream_one`'s events carry it): a stop token ends it unseen."""
    if request.stop:
        raise ConfigError("speculative decoding does not cut at stop strings yet (stop "
                          "tokens work): drop the stop strings, or decode without speculation")
    detokenizer = Detokenizer(tokenizer)
    for token in speculative_stream(model, request.prompt, request.max_new_tokens,
                                    request.sampling, request.seed, request.stop_ids,
                                    request.truncate, ngram, max_draft, stats):
        if token in request.stop_ids:
            break
        yield detokenizer.push(token)
    yield detokenizer.flush()


def _verify(logits: torch.Tensor, draft: list[int], cfg: SamplingConfig,
            generator: torch.Generator | None) -> list[int]:
    """The draft's accepted prefix and one token from the model: at the first rejection, or
    after the whole draft. logits (len(draft) + 1, vocab): row i predicts draft[i]."""
    if cfg.greedy:
        best = sample(logits, cfg).tolist()
        n = 0
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        return draft[:n] + [best[n]]
    if draft:
        probs = torch.softmax(filtered_logits(logits[:-1], cfg), dim=-1)
        coins = torch.rand(len(draft), generator=generator, device=probs.device).tolist()
        p_draft = probs[torch.arange(len(draft), device=probs.device), draft].tolist()
        for i, (coin, p) in enumerate(zip(coins, p_draft)):
            if coin >= p:
                # The draft is a point mass q: the residual max(p - q, 0), renormalised, is p
                # without the rejected token, which makes the output distribution exactly p.
                rest = probs[i].clone()
                rest[draft[i]] = 0
                return draft[:i] + [int(torch.multinomial(rest, 1, generator=generator))]
    return draft + [int(sample(logits[-1:], cfg, generator))]
