"""Perplexity and bits per byte of a text, in windows.

Windows of `window` tokens start every `stride` tokens (Hugging Face's sliding-window
perplexity). Each scores the tokens of it no earlier window scored, except its own first
token, which has nothing before it in the window. So:

- stride = window - 1 (`evaluate_perplexity`'s default) scores every token after the text's
  first exactly once; a window's first prediction sees one token of context, much as in
  lm-evaluation-harness's rolling windows (`loglikelihood_rolling`, wikitext), which give
  the same numbers for a text that fits in one window;
- a smaller stride gives every token at least window - stride tokens of context, for
  window / stride times the work;
- stride = window (`perplexity`'s default, kept for the figures measured with it) leaves
  each window's first token unscored.

Bits per byte (nats / ln 2 / UTF-8 bytes) compares models whatever their tokenizers. The
text is scored after a BOS (or EOS) token, so its first token is predicted too and every byte
counts; a tokenizer with neither (char) leaves its first token unscored, and its bytes out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from lmforge.config import PERPLEXITY_WINDOW
from lmforge.eval.loglik import ScoringError, encode_text, prefix_token
from lmforge.eval.results import EvalResult
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first, end) per window over `length` tokens: the window reads tokens
    [begin, end) and scores the predictions of tokens [first, end)."""
    if not 1 <= stride <= window:
        raise ScoringError(f"the stride must be between 1 and the window ({window}), got {stride}")
    spans, scored = [], 1  # the first token has nothing before it
    for begin in range(0, length - 1, stride):
        end = min(begin + window, length)
        first = max(scored, begin + 1)
        if first < end:
            spans.append((begin, first, end))
        scored = end
        if end == length:
            break
    return spans


def token_nll(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: list[int],
              window: int = 512, stride: int | None = None, batch_size: int = 1,
              progress: bool = False) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the tokens the windows score (see the module
    docstring; stride defaults to the window), and how many they are.
    `logits_fn` maps (B, T) ids to (B, T, vocab) logits: a model, or any callable such as
    another library's model wrapped in a lambda."""
    if len(ids) < 2:
        raise ScoringError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    spans = windows(len(ids), window, stride or window)
    # A model takes its ids where its weights are; any other callable takes them on the CPU.
    device = (next(logits_fn.parameters()).device if isinstance(logits_fn, torch.nn.Module)
              else torch.device("cpu"))
    nll, count = 0.0, 0
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress)
    while spans:
        # Full windows all have the same length, so they batch; the last one may not.
        size = spans[0][2] - spans[0][0]
        batch = [s for s in spans[:batch_size] if s[2] - s[0] == size]
        spans = spans[len(batch):]
        inputs = torch.tensor([ids[begin:end] for begin, _, end in batch], device=device)
        with torch.no_grad():
            logits = logits_fn(inputs)
        for row, (begin, first, end) in enumerate(batch):
            predicted = logits[row, first - 1 - begin:end - 1 - begin].double()
            targets = torch.tensor(ids[first:end], device=predicted.device)
            nll += torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
            count += end - first
        bar.update(len(batch))
    bar.close()
    return nll, count


def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: list[int],
               window: int = 512, stride: int | None = None) -> tuple[float, int]:
    """exp(mean NLL) and the number of tokens scored, by default in disjoint windows that
    leave each one's first token unscored (see the module docstring)."""
    nll, count = token_nll(logits_fn, ids, window, stride)
    return math.exp(nll / count), count


LOGITS_BYTES = 512 * 2**20


def evaluate_perplexity(model: Decoder, tokenizer: Tokenizer, text: str,
                        window: int | None = None, stride: int | None = None,
                        batch_size: int = 8, progress: bool = False) -> EvalResult:
    """Perplexity, bits per byte and mean NLL per token of `text`, every token scored once;
    window defaults to the model's context length (at most PERPLEXITY_WINDOW tokens, which
    bounds the memory of a window's logits), stride to window - 1; up to `batch_size` windows
    go through the model at once, fewer when their logits would pass LOGITS_BYTES."""
    context = model.cfg.context_length
    window = window or min(context, PERPLEXITY_WINDOW)
    if not 2 <= window <= context:
        raise ScoringError(f"the window must be between 2 tokens and the model's context "
                           f"({context}), got {window}")
    stride = stride or window - 1
    if stride >= window:
        raise ScoringError(f"a stride of {stride} leaves tokens unscored in windows of "
                           f"{window}: use a stride of at most {window - 1}")
    prefix = prefix_token(tokenizer)
    ids = encode_text(tokenizer, text, add_bos=False)
    scored_bytes = len(text.encode("utf-8"))
    if prefix is not None:
        ids = [prefix, *ids]
    else:
        scored_bytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
    # A batch's logits are rows x window x vocabulary floats: cap the rows so they stay within
    # LOGITS_BYTES whatever the vocabulary (SmolLM2's 49k tokens: 200 MB a 1024-token row).
    rows = max(1, min(batch_size, LOGITS_BYTES // (4 * window * model.cfg.vocab_size)))
    nll, count = token_nll(model, ids, window, stride, rows, progress)
    return EvalResult(
        task="perplexity",
        metrics={"perplexity": math.exp(nll / count),
                 "bits_per_byte": nll / math.log(2) / scored_bytes,
                 "nll_per_token": nll / count},
        n=count, unit="tokens",
        details={"bytes": scored_bytes, "window": window, "stride": stride})
