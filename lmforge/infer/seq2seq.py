"""Decoding an encoder-decoder model: greedy or sampled, and beam search, batched.

Every source is encoded once; the decoder then runs one position per step for all rows with
a KV cache, reading the cross-attention keys and values computed from the encoder output.
Beam search keeps `beam` hypotheses per source, reordering the cache rows as beams are
chosen, and scores finished ones by log-probability / length ** length_penalty.

`Seq2SeqEngine` serves an encoder-decoder model through the inference engine's request
handling (queue, slots, sampling, stop strings, streaming events), so `lmforge serve`
batches translation requests as it batches completions.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lmforge.infer.engine import Engine, Prefilled, PromptTooLong, Request
from lmforge.infer.sampling import SamplingConfig, sample
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqCache, pad_sources
from lmforge.tokenizer import Tokenizer

# How lmforge frames a target: <|im_start|> target <|im_end|> (tokens every lmforge BPE has).
BOS, EOS = "<|im_start|>", "<|im_end|>"


def framing(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """BOS, EOS and padding ids of a seq2seq model's tokenizer."""
    bos, eos = tokenizer.token_id(BOS), tokenizer.token_id(EOS)
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer has no {BOS} / {EOS} tokens to frame targets with")
    return bos, eos, tokenizer.pad_id if tokenizer.pad_id is not None else 0


def translate(model: Seq2Seq, tokenizer: Tokenizer, texts: list[str], beam: int = 1,
              max_new_tokens: int = 128, batch_size: int = 32, length_penalty: float = 1.0,
              sampling: SamplingConfig | None = None, seed: int | None = None) -> list[str]:
    """Target texts for source texts, `batch_size` at once: beam search, or with beam 1
    greedy (or sampled with `sampling`). An empty source gives an empty target; a source
    past the model's max_length is read up to it (`too_long` finds those)."""
    if beam < 1:
        raise ValueError(f"beam must be at least 1 (1 is greedy), got {beam}")
    bos, eos, pad = framing(tokenizer)
    sources = [tokenizer.encode(t)[:model.cfg.max_length] for t in texts]
    out = [""] * len(texts)
    todo = [i for i, s in enumerate(sources) if s]
    for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        batch = [sources[i] for i in rows]
        if beam == 1:
            ids = generate(model, batch, bos, eos, max_new_tokens, sampling,
                           None if seed is None else seed + start, pad)
        else:
            ids = beam_search(model, batch, bos, eos, beam, max_new_tokens, length_penalty,
                              pad=pad)
        for i, target in zip(rows, ids):
            out[i] = tokenizer.decode(target)
    return out


def too_long(model: Seq2Seq, tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """Indices of the texts longer than the model reads (translate cuts them)."""
    return [i for i, t in enumerate(texts) if len(tokenizer.encode(t)) > model.cfg.max_length]


def _encode(model: Seq2Seq, sources: list[list[int]], pad: int, repeat: int = 1):
    """The sources' mask and the decoder's cross-attention memory, each row repeated
    `repeat` times (for beams)."""
    ids, mask = pad_sources(sources, pad, model.embed.weight.device)
    ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
    return mask, model.memory(model.encode(ids, mask))


def _budget(model: Seq2Seq, max_new_tokens: int) -> int:
    return min(max_new_tokens, model.cfg.max_length - 1)


@torch.no_grad()
def generate(model: Seq2Seq, sources: list[list[int]], bos: int, eos: int,
             max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
             seed: int | None = None, pad: int = 0) -> list[list[int]]:
    """Target ids for each source (without BOS and EOS): greedy, or sampled with `sampling`."""
    sampling = sampling or SamplingConfig(temperature=0.0)
    generator = None
    if seed is not None:
        generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    steps = _budget(model, max_new_tokens)
    mask, memory = _encode(model, sources, pad)
    cache = model.decoder_cache(len(sources), steps + 1)
    token = torch.full((len(sources), 1), bos, dtype=torch.long, device=mask.device)
    out = [[] for _ in sources]
    done = torch.zeros(len(sources), dtype=torch.bool, device=mask.device)
    for t in range(steps):
        logits = model.decode(token, memory, mask, cache, start=t)[:, -1].float()
        token = sample(logits, sampling, generator).view(-1, 1)
        for i in (~done).nonzero().flatten().tolist():
            if token[i, 0] == eos:
                done[i] = True
            else:
                out[i].append(int(token[i, 0]))
        if done.all():
            break
    return out


def _reorder(cache, rows: torch.Tensor, length: int) -> None:
    """Make cache row i hold what row rows[i] held in its first `length` positions (in place,
    so per-layer views stay valid)."""
    cache.k[:, :, :, :length] = cache.k[:, rows, :, :length]
    cache.v[:, :, :, :length] = cache.v[:, rows, :, :length]


@torch.no_grad()
def beam_search(model: Seq2Seq, sources: list[list[int]], bos: int, eos: int, beam: int = 4,
                max_new_tokens: int = 128, length_penalty: float = 1.0,
                early_stopping: bool = False, pad: int = 0) -> list[list[int]]:
    """The best-scoring target ids for each source (without BOS and EOS).

    A source goes on while a live beam, scored at its current length, still beats the best
    ended hypothesis. early_stopping=True stops it as soon as `beam` hypotheses have ended:
    faster, but on a confident model the weak beams end first (they are the short, wrong
    readings) and the best one is cut off before it ends.
    """
    if beam == 1:
        # A beam of one is greedy decoding. (The search below would not stop at greedy's
        # first EOS: its runner-up token lives on, and length normalisation can let it win.)
        return generate(model, sources, bos, eos, max_new_tokens, pad=pad)
    B, K = len(sources), beam
    steps = _budget(model, max_new_tokens)
    mask, memory = _encode(model, sources, pad, repeat=K)
    device = mask.device
    cache = model.decoder_cache(B * K, steps + 1)
    # Only the first beam of each source is live at the start (the others are copies).
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    history = torch.full((B * K, 1), bos, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(steps):
        logp = model.decode(history[:, -1:], memory, mask, cache, start=t)[:, -1].float()
        logp = logp.log_softmax(-1).view(B, K, -1)
        vocab = logp.shape[-1]
        top, index = (scores[:, :, None] + logp).view(B, -1).topk(2 * K, dim=1)
        next_scores = torch.full((B, K), float("-inf"), device=device)
        next_rows = torch.arange(B * K, device=device)  # done sources keep their rows
        next_tokens = torch.full((B * K,), eos, dtype=torch.long, device=device)
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for rank, (score, flat) in enumerate(zip(top[b].tolist(), index[b].tolist())):
                k, token = divmod(flat, vocab)
                if token == eos:
                    # Only an ending among the K best candidates counts: the extra K are
                    # there to keep K beams alive, and a weak early ending would win the
                    # length-normalised comparison unfairly.
                    if rank < K and (len(finished[b]) < K or not early_stopping):
                        tokens = history[b * K + k, 1:].tolist()
                        finished[b].append((score / max(len(tokens) + 1, 1) ** length_penalty,
                                            tokens))
                    continue
                next_scores[b, kept] = score
                next_rows[b * K + kept] = b * K + k
                next_tokens[b * K + kept] = token
                kept += 1
                if kept == K:
                    break
            done[b] = _source_done(finished[b], next_scores[b], K, t + 1, length_penalty,
                                   early_stopping)
        if all(done):
            break
        _reorder(cache, next_rows, t + 1)
        history = torch.cat([history[next_rows], next_tokens[:, None]], dim=1)
        scores = next_scores
    for b in range(B):
        if done[b]:
            continue
        # The budget ran out: live beams compete with the ended ones, cut where they are.
        for k in range(K):
            if scores[b, k] > float("-inf"):
                tokens = history[b * K + k, 1:].tolist()
                finished[b].append((float(scores[b, k]) / max(len(tokens), 1) ** length_penalty,
                                    tokens))
    return [max(f, key=lambda f: f[0])[1] for f in finished]


def _source_done(finished: list, live: torch.Tensor, beam: int, length: int,
                 length_penalty: float, early_stopping: bool) -> bool:
    if len(finished) < beam:
        return False
    if early_stopping:
        return True
    # The usual heuristic: compare the best live beam as if it ended now.
    best_live = float(live.max()) / (length + 1) ** length_penalty
    return max(f[0] for f in finished) >= best_live


class Seq2SeqEngine(Engine):
    """The inference engine for an encoder-decoder model: a request's prompt is the source.

    Prefilling a request encodes its source into its slot of the cache (a `Seq2SeqCache`
    keeps each row's cross-attention memory) and feeds BOS; decode steps are the engine's own,
    each row reading its own source. The target ends at EOS.
    """

    def __init__(self, model: Seq2Seq, tokenizer: Tokenizer, max_batch: int = 8,
                 max_len: int | None = None) -> None:
        super().__init__(model, tokenizer, max_batch, max_len)
        self.bos, self.eos, _ = framing(tokenizer)

    def check(self, request: Request) -> Request:
        if not request.prompt:
            raise ValueError("the source is empty: give some text to translate")
        if request.prompt_logprobs:
            raise ValueError("an encoder-decoder model does not score its source: ask for "
                             "logprobs without echo")
        limit = self.model.cfg.max_length
        if len(request.prompt) > limit:
            if not request.truncate:
                raise PromptTooLong(f"the source has {len(request.prompt)} tokens; the model "
                                    f"reads at most {limit}: shorten or split it")
            request = replace(request, prompt=request.prompt[:limit])
        return super().check(replace(request, stop_ids=(*request.stop_ids, self.eos)))

    def room(self, prompt: list[int]) -> int:
        return self.max_len - 1  # the target starts afresh after BOS, whatever the source

    def prefill(self, request: Request, cache: Seq2SeqCache) -> Prefilled:
        self.model.start_sequence(torch.tensor(request.prompt, device=self.device), cache)
        bos = torch.tensor([[self.bos]], device=self.device)
        return Prefilled([self.bos], self.model(bos, cache=cache, start=0)[0])
