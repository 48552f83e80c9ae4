"""The inference engine: many requests decoding together through one KV cache.

A request waits in a queue until a cache slot is free; its prompt then runs alone through
the model (the prefill, a long prompt a chunk a step between the decode steps of the others)
and its sequence joins the batch, where every step feeds one new token per active sequence
through a single forward pass, sequences at different positions included (with `draft`, also
tokens guessed from each sequence's own text, kept where the model agrees). A finished
sequence frees its slot at once and the next waiting one takes it (continuous batching), so
a server only has to call `step` in a loop. The KV cache is paged
(for the families whose attention reads one: decoder-only and vision-language models): each
sequence takes blocks of `PAGE` positions from a shared pool as it grows and gives them back
when it ends, so the memory held follows the tokens in use, not slots x context, and an idle
engine holds almost none (a compiled step's pool is whole from the start: its shapes are
fixed). Other families' caches hold the slots and positions in use, grown in blocks.

Each step returns `Event`s: the new token, the text it completes (never half a UTF-8
character, never the start of a stop string that may still match), its log-probability and
top alternatives when asked, and why the sequence finished. `stream` and `generate` wrap
the engine for one prompt; `generate`, `chat`, `serve` and evaluation all decode here.

The engine runs any `LanguageModel` (every model family). A family whose sequences start
differently, such as an encoder-decoder whose prompt is a source to encode rather than tokens
to continue, subclasses `Engine` and overrides its public hooks only: `check` (what a request
must be), `room` (how many tokens a prompt leaves to generate) and `prefill` (run a new
sequence into its cache slot). Decode steps are the same for every family. A
vision-language model needs no subclass: a request's images go into its prefill, where they
replace the prompt's image tokens, and image and text-only requests decode together. The
image token itself is never generated: it only ever comes from a prompt, with its image.

A request may carry a `Constraint` (a JSON schema, a regular expression, a grammar; see
`lmforge.infer.constrain`): its sequence then samples only tokens the grammar allows, and
ends when the grammar is complete. Constrained and free sequences decode in the same batch;
the masks of the next tokens are computed in a worker thread while the model runs.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch

from lmforge.compress import kernels
from lmforge.compress.quant import QuantLinear, make_kernel_operands
from lmforge.config import MAX_NEW_TOKENS, PREFILL_CHUNK, VLMConfig
from lmforge.errors import LmforgeError
from lmforge.infer.constrain import Constraint, Matcher
from lmforge.infer.sampling import SamplingConfig, apply_penalties, filtered_logits, sample
from lmforge.infer.speculative import SpeculativeStats, propose
from lmforge.layers import CACHE_DTYPES, KVCache
from lmforge.models import LanguageModel
from lmforge.paths import cache_dir
from lmforge.tokenizer import Tokenizer


class PromptTooLong(LmforgeError, ValueError):
    """A prompt does not fit in the context (or the engine's cache) with room to generate."""


class CacheTooLarge(LmforgeError, MemoryError):
    """The KV cache asked for would not fit in the memory free on the model's device."""


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = MAX_NEW_TOKENS
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None  # the same seed gives the same tokens
    stop: tuple[str, ...] = ()  # stop strings: the text ends just before the first match
    stop_ids: tuple[int, ...] = ()  # stop tokens: kept in the tokens, not in the text
    logprobs: int | None = None  # None: none; k: each token's log-probability + k alternatives
    prompt_logprobs: bool = False  # log-probabilities of the prompt's tokens too (scoring)
    # Pixel tensors (3, size, size), in the order of the prompt's image placeholders, for a
    # vision-language model (see lmforge.images).
    images: tuple[torch.Tensor, ...] = ()
    truncate: bool = False  # keep the tail of a prompt too long for the context, or refuse it
    constraint: Constraint | None = None  # what the output must match (JSON schema, regex...)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before sampling settings, over
    the tokens it may generate: never a vision-language model's image token) and the `top`
    most likely tokens at that position as (token, log-probability), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    request_id: int
    token: int | None  # None only for an event that finishes a sequence without a new token
    text: str  # new text; all of a request's pieces concatenate to its final text
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" or "length" on the sequence's last event
    completion: Completion | None = None  # the whole result, on the last event


@dataclass
class Completion:
    request_id: int
    prompt: list[int]
    tokens: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first token

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens)}


class Detokenizer:
    """Text of a growing token list, released only once it is final.

    A token can end inside a multi-byte character (byte-level vocabularies), and some
    tokenizers decode a token differently at the start of a string, so each new piece is
    decoded together with the tokens just before it and only the difference is released.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # tokens before `prefix` are fully released
        self.read = 0  # tokens before `read` are released, decoded from `prefix` on

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (a dangling partial character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return self.tokenizer.decode(self.ids[self.prefix:])[len(before):]


class _Sequence:
    """One request's state while it decodes."""

    def __init__(self, request_id: int, request: Request, tokenizer: Tokenizer | None,
                 vocab_size: int, device: torch.device) -> None:
        self.id, self.request = request_id, request
        self.tokens = list(request.prompt)  # prompt + generated; the last one is not cached yet
        self.generated: list[int] = []
        self.slot = -1
        self.limit = 0  # most tokens it may generate, set on admission
        self.generator = torch.Generator(device=device)
        if request.seed is not None:
            # Any integer is a seed: torch takes 64 bits, clients may send more.
            self.generator.manual_seed(request.seed % 2**64)
        else:
            self.generator.seed()
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self.text = ""  # text so far, stop strings not yet cut
        self.sent = 0  # characters of `text` already released
        self.seen = self.counts = None
        self.matcher: Matcher | None = None
        # While its prompt goes into the cache a chunk a step: how much of it is there, and
        # the logits of those positions when the prompt is scored.
        self.filling = False
        self.filled = 0
        self.prompt_logits: list[torch.Tensor] = []
        if request.sampling.penalised:
            self.counts = torch.zeros(vocab_size, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)

    def start(self, tokens: list[int]) -> None:
        """Continue from `tokens` (what the prefill left in the cache, the last one not yet):
        the repetition penalty counts them as seen."""
        self.tokens = list(tokens)
        if self.seen is not None:
            self.seen[torch.tensor(tokens, device=self.seen.device)] = True

    @property
    def position(self) -> int:
        """Where the next token fed to the model sits."""
        return len(self.tokens) - 1

    def next_token(self, logits: torch.Tensor, draft: int | None = None) -> torch.Tensor:
        """Sample from this sequence's last logits (vocab,); with a `draft` token guessed for
        this position, keep it with its probability, else draw from the others (renormalised):
        the token then follows the same distribution as without a draft (greedy: the same
        token)."""
        cfg = self.request.sampling
        if self.counts is not None:
            logits = apply_penalties(logits, cfg, self.seen, self.counts)
        if draft is None or cfg.greedy:
            return sample(logits.view(1, -1), cfg, self.generator)[0]
        probs = torch.softmax(filtered_logits(logits.view(1, -1), cfg), dim=-1)[0]
        coin = torch.rand((), generator=self.generator, device=probs.device)
        if coin < probs[draft]:
            return torch.tensor(draft)
        probs[draft] = 0
        return torch.multinomial(probs, 1, generator=self.generator)[0]

    def accept(self, token: int, logits: torch.Tensor) -> Event:
        """Record a sampled token and describe it; finishes the sequence when it should."""
        self.tokens.append(token)
        self.generated.append(token)
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True
        logprob = None
        if self.request.logprobs is not None:
            logprob = token_logprobs(logits.view(1, -1), [token], self.request.logprobs)[0]
        if token in self.request.stop_ids:
            return self.finish(token, logprob, "stop")
        if self.detok is not None:
            self.text += self.detok.push(token)
        cut = self._stop_string_at()
        if cut is not None:
            released, self.text = self.text[self.sent:cut], self.text[:cut]
            self.sent = cut
            return Event(self.id, token, released, logprob, "stop")
        if self.matcher is not None:
            self.matcher.accept(token)
            if self.matcher.done:
                return self.finish(token, logprob, "stop")
        if len(self.generated) >= self.limit:
            return self.finish(token, logprob, "length")
        safe = len(self.text) - self._held_back()
        released = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return Event(self.id, token, released, logprob)

    def finish(self, token: int | None, logprob: TokenLogprob | None, reason: str) -> Event:
        if self.detok is not None:
            self.text += self.detok.flush()
        released = self.text[self.sent:]
        self.sent = len(self.text)
        return Event(self.id, token, released, logprob, reason)

    def _stop_string_at(self) -> int | None:
        """Where the earliest stop string starts in the text, if one has appeared."""
        stops = self.request.stop
        if not stops:
            return None
        # Only text near the end can hold a match that was not there before.
        start = max(0, self.sent - max(map(len, stops)))
        hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest end of the text that could begin a stop string."""
        best = 0
        for stop in self.request.stop:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def completion(self, reason: str, logprobs: list[TokenLogprob] | None,
                   prompt_logprobs: list[TokenLogprob | None] | None) -> Completion:
        return Completion(self.id, list(self.request.prompt), self.generated, self.text, reason,
                          logprobs, prompt_logprobs)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` under logits (N, vocab), one row each, with the `top`
    alternatives of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # long even when there are no tokens (a one-token prompt has none to score)
    chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
    if top:
        values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in tokens]
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alternatives)]


@dataclass
class Prefilled:
    """What `Engine.prefill` leaves: the tokens a new sequence continues from (the last one
    not yet in the cache) and logits (T, vocab) of its prefilled positions, the last row
    predicting the first new token (only that row unless the prompt is being scored)."""

    tokens: list[int]
    logits: torch.Tensor


def default_kv_dtype(model: LanguageModel) -> torch.dtype | None:
    """The KV cache's values when none is asked for: float16 for a model whose int8 or int4
    weights compute in float32, as llama.cpp keeps them: its weights were rounded far more
    than 16-bit keys and values are, and the cache is what grows with the sequences decoding
    together (int4 SmolLM2, 8 sequences, compiled: 992 tok/s against 857 with a float32
    cache). Otherwise the model's own dtype (None)."""
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float16 if quantized and floats == {torch.float32} else None


def kv_dtype_named(name: str, model: LanguageModel) -> torch.dtype | None:
    """The cache dtype that `--kv-cache NAME` asks for: auto, the engine's default (None);
    model, the model's own float type; or that float type."""
    if name == "auto":
        return None
    if name == "model":
        return next(p.dtype for p in model.parameters() if p.is_floating_point())
    return getattr(torch, name)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for a server's health and metrics."""

    waiting: int  # requests queued for a slot
    active: int  # sequences decoding
    slots: int  # sequences that can decode at once
    max_len: int  # positions per sequence: prompt + generated
    kv_cache_bytes: int
    compiled: bool = False  # decode steps run through the compiled step


class Engine:
    """Decodes many requests together; see the module docstring.

    max_batch: sequences decoding at once (cache slots). max_len: positions per slot
    (prompt + generated), the model's context length by default; the cache holds up to
    2 x layers x max_batch x kv_heads x max_len x head_dim values (`cache_bytes`), as many
    slots as are in use and positions as the furthest sequence reaches (at least a block).
    compile: run decode steps through `torch.compile` with static shapes (every slot, the
    whole cache, masked, so the cache is then allocated whole): faster, because a step no
    longer pays Python's cost for each of its hundreds of small ops. Compiling takes a minute
    or two on a small CPU the first time, then seconds once lmforge's cache holds the
    kernels. The first step compiles (or `start_compiling`); on a CPU, a step compiled
    before then compiles on a thread of its own while the engine decodes eagerly, and the
    next step after it is done switches over (`wait_compiled` waits for it).
    compile_after: requests to answer before compiling starts. A server answers its first
    request eagerly (1) rather than beside the compile: on a CPU, tracing holds Python's lock
    for seconds, and an eager step running beside it takes several times as long.
    prefill_chunk: the most prompt tokens a step runs into the cache (0: no limit). A longer
    prompt goes in over several steps, each after the decode step of the sequences already
    running, so that they keep producing tokens while it is read (chunked prefill). Prompts
    with images, and families without a paged cache, are read whole.
    draft: speculative decoding, off at 0: each step, a sequence may feed up to this many
    tokens more, guessed from its own text (the tokens after the latest earlier occurrence of
    its last `ngram` ones: `propose`), and keep those the model then agrees with, all in the
    same forward pass, which reads the weights once (on a CPU a step of a few tokens costs
    little more than one of a single token). Greedy output is plain decoding's (up to float
    rounding at near-ties); sampled output follows the same distribution; penalties, stop
    strings and limits apply token by token as in plain decoding. Constrained sequences do
    not draft; steps with drafts run eagerly. `speculation` counts steps and tokens.
    kv_dtype: the cache's values: torch.float32, or torch.bfloat16 or torch.float16 for half
    the memory, and a decoding step's attention (on a CPU, lmforge's kernel) reads half the
    bytes. The keys and values are rounded as they are stored; the rest of the model computes
    as before. By default (None) the model's dtype, or float16 for int8 or int4 weights
    (`default_kv_dtype`).
    """

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer | None = None,
                 max_batch: int = 8, max_len: int | None = None, compile: bool = False,
                 prefill_chunk: int = PREFILL_CHUNK, draft: int = 0, ngram: int = 3,
                 compile_after: int = 0, kv_dtype: torch.dtype | None = None) -> None:
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: no limit), got {prefill_chunk}")
        if draft < 0 or ngram < 1:
            raise ValueError(f"draft must be >= 0 and ngram >= 1, got {draft} and {ngram}")
        self.draft, self.ngram = draft, ngram
        self.speculation = SpeculativeStats()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_len = min(max_len or model.cfg.context_length, model.cfg.context_length)
        if kv_dtype not in (None, *CACHE_DTYPES):
            raise ValueError(f"kv_dtype must be torch.float32, bfloat16 or float16, got {kv_dtype}")
        self.kv_dtype = kv_dtype or default_kv_dtype(model)
        if compile:
            self._check_fits(max_batch, self.max_len)  # the compiled step's whole cache
        self.paged = hasattr(model, "new_paged_cache")
        self.cache = (self._new_paged_cache(max_batch) if self.paged
                      else self._new_cache(1, min(CACHE_BLOCK, self.max_len)))
        self.slots: list[_Sequence | None] = [None] * max_batch
        self.waiting: deque[_Sequence] = deque()
        self.filling: deque[_Sequence] = deque()  # in a slot, the prompt partly in the cache
        self.prefill_chunk = prefill_chunk
        self._ids = itertools.count()
        self._logprobs: dict[int, list[TokenLogprob]] = {}
        self._prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self._rows: dict[tuple[int, int], KVCache] = {}
        self._step_model = None
        self._guards_checked = False  # by a compiled step, in this thread
        self._compiling: Future | None = None
        self._compile_pending = compile and self.device.type != "cuda"
        self.compile_after = compile_after
        self.answered = 0  # requests finished, for `compile_after`
        self._mask_worker: ThreadPoolExecutor | None = None
        if compile and self.device.type == "cuda":
            self._use_step(_compiled(model))
        # Generated, an image token would stand for an image nobody gave (and a decoder whose
        # vocabulary grew by it would no longer decode text as it did before).
        self._never = (torch.tensor([model.cfg.image_token_id], device=self.device)
                       if isinstance(model.cfg, VLMConfig) else None)

    # ----------------------------------------------- hooks a model family may override
    def check(self, request: Request) -> Request:
        """The request as this engine runs it, or an error for one that can never run."""
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. a BOS token)")
        if request.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        if (request.stop or request.constraint) and self.tokenizer is None:
            raise ValueError("stop strings and constraints need a tokenizer to read the text")
        vocab = self.model.cfg.vocab_size
        outside = [t for t in request.prompt if not 0 <= t < vocab]
        if outside:  # the tokenizer's vocabulary may be larger than the model's
            raise ValueError(f"the prompt has token id {outside[0]}, outside the model's "
                             f"vocabulary (0 to {vocab - 1})")
        self._check_images(request)
        if self.room(request.prompt) >= 1:
            return request
        if not request.truncate:
            raise PromptTooLong(
                f"the prompt has {len(request.prompt)} tokens; at most {self.max_len - 1} fit "
                f"(context {self.max_len}) with room for one new token: shorten it, or ask "
                "for truncation to keep its end")
        return replace(request, prompt=request.prompt[-(self.max_len - 1):])

    def room(self, prompt: list[int]) -> int:
        """Most tokens a sequence with this prompt can generate."""
        return self.max_len - len(prompt)

    def prefill(self, request: Request, cache: KVCache, begin: int = 0,
                end: int | None = None) -> Prefilled:
        """Run a new sequence's prompt (and images) into `cache`, its slot's one row; a
        request that scores its prompt gets the logits of every prompt position. `begin` and
        `end`: only those positions of the prompt, the ones before being in the cache already
        (a chunk of a long prompt; asked of families with a paged cache only)."""
        ids = torch.tensor([request.prompt[begin:end]], device=self.device)
        images = {"images": torch.stack(request.images).to(self.device)} if request.images else {}
        logits = self.model(ids, cache=cache, start=begin,
                            last_only=not request.prompt_logprobs, **images)
        return Prefilled(request.prompt, logits[0])

    def _check_images(self, request: Request) -> None:
        """A request's images against the model and the prompt's image placeholders (a
        vision-language model's image tokens)."""
        cfg = self.model.cfg
        if not isinstance(cfg, VLMConfig):
            if request.images:
                raise ValueError("this model reads text only: it takes no images (serve a "
                                 "vision-language model for that)")
            return
        placeholders = sum(t == cfg.image_token_id for t in request.prompt)
        if placeholders != len(request.images) * cfg.image_tokens:
            raise ValueError(f"the prompt has {placeholders} image tokens for "
                             f"{len(request.images)} image(s) of {cfg.image_tokens} tokens each: "
                             "give one image per image placeholder")
        size = (3, cfg.vision.image_size, cfg.vision.image_size)
        for i, image in enumerate(request.images):
            if tuple(image.shape) != size:
                raise ValueError(f"image {i} has shape {tuple(image.shape)}; this model reads "
                                 f"{size} pixel tensors (see lmforge.images)")

    # ----------------------------------------------------------------- requests
    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. Refuses what can never run, right away."""
        request = self.check(request)
        seq = _Sequence(next(self._ids), request, self.tokenizer, self.model.cfg.vocab_size,
                        self.device)
        seq.limit = min(request.max_new_tokens, self.room(request.prompt))
        if request.constraint is not None:
            seq.matcher = Matcher(request.constraint, self.tokenizer, self.model.cfg.vocab_size,
                                  request.stop_ids)
        self.waiting.append(seq)
        return seq.id

    def cache_bytes(self, slots: int, length: int | None = None) -> int:
        """Bytes of a cache for `slots` sequences of `length` positions (max_len by default),
        measured on caches of one and two positions (a family may keep a fixed share per
        sequence, too)."""
        one, two = (self._new_cache(1, n).nbytes for n in (1, 2))
        per_position = two - one
        return slots * (one - per_position + per_position * (length or self.max_len))

    def _new_cache(self, rows: int, length: int) -> KVCache:
        return self.model.new_cache(rows, length, dtype=self.kv_dtype)

    def _new_paged_cache(self, rows: int, blocks: int = 0) -> KVCache:
        return self.model.new_paged_cache(rows, self.max_len, PAGE, blocks, dtype=self.kv_dtype)

    def start_compiling(self) -> None:
        """Compile the decode step (compile=True, on a CPU) for as many torch threads as the
        calling thread, the one that decodes, has; the first step does it otherwise.

        A step compiled before (its kernels are in the compile cache) compiles again on a
        thread of its own while the engine decodes eagerly. The first time, it compiles here
        and now: compiling from nothing traces modules by patching `nn.Module.__call__` for
        a while, and the model running on another thread meanwhile would be caught in it.
        """
        if not self._compile_pending:
            return
        self._compile_pending = False
        threads = torch.get_num_threads()
        marker = _compiled_marker(self.model, len(self.slots), self.max_len, threads,
                                  self.cache.k.dtype)
        if marker.exists():
            self._compiling = _in_background(partial(self._compile_step, threads))
            return
        self._use_step(self._compile_step(threads))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def compile_if_due(self) -> None:
        """`start_compiling`, once `compile_after` requests have been answered."""
        if self.answered >= self.compile_after:
            self.start_compiling()

    def _compile_step(self, threads: int):
        """The compiled decode step, compiled by running it once on a whole cache of its own
        (the engine's cache is in use meanwhile)."""
        torch.set_num_threads(threads)  # the generated kernels use this many
        # Importing the compiler and tracing hold Python's lock for long stretches: handing it
        # over every 0.1 ms rather than 5 keeps the eager steps, and a server's event loop,
        # answering meanwhile.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            step, rows = _compiled(self.model), len(self.slots)
            cache = (self._new_paged_cache(rows, self._all_blocks() - 1) if self.paged
                     else self._new_cache(rows, self.max_len))
            cache.static = True
            with torch.inference_mode():
                # made here, as `step` makes its inputs: a tensor made outside inference mode
                # fails the compiled step's guards there, and the first step compiles again
                zeros = torch.zeros(rows, dtype=torch.long, device=self.device)
                make_kernel_operands(self.model)  # made in the step, they would be made each time
                kernels.available()  # known before tracing: the step's attention asks
                step(zeros[:, None], cache=cache, start=zeros)
        finally:
            sys.setswitchinterval(interval)
        return step

    def _use_step(self, step) -> None:
        """Decode through the compiled `step` from now on, on the whole cache."""
        if self.paged:
            self._check_fits(len(self.slots), self.max_len)
            self.cache.grow(self._all_blocks() - self.cache.k.shape[1])
            self._rows.clear()
        else:
            self._resize(len(self.slots), self.max_len)
        self.cache.static = True
        self._step_model = step

    def _switch_when_compiled(self, wait: bool = False) -> None:
        if self._compiling is None or not (wait or self._compiling.done()):
            return
        compiling, self._compiling = self._compiling, None
        try:
            step = compiling.result()
        except Exception as err:  # the eager step still works: keep it
            warnings.warn(f"compiling the decode step failed, decoding goes on without it: "
                          f"{type(err).__name__}: {err}", stacklevel=3)
            return
        self._use_step(step)

    @property
    def compiled(self) -> bool:
        """Whether decode steps run through the compiled step now."""
        return self._step_model is not None

    def wait_compiled(self) -> None:
        """Wait until a compiled engine's compiled step is ready, and use it from now on."""
        self.start_compiling()
        self._switch_when_compiled(wait=True)

    def _check_fits(self, slots: int, length: int) -> None:
        """Refuse a cache that would not fit: allocating it would fail late or push the
        machine into swap."""
        needed, free = self.cache_bytes(slots, length), available_memory(self.device)
        if free is not None and needed > free:
            raise CacheTooLarge(
                f"a KV cache for {slots} sequences of {length} positions needs "
                f"{needed / 1e9:.2f} GB ({self.cache_bytes(1) / 1e6:.1f} MB per sequence of "
                f"{self.max_len}) and {free / 1e9:.2f} GB is free on {self.device}: lower "
                "max_batch or max_len (`lmforge serve --max-batch N --max-len N`)")

    def _all_blocks(self) -> int:
        """Blocks of a paged cache whose every slot is full (and the free slots' block)."""
        return 1 + self.cache.table.numel()

    def _reserve_pages(self, slot: int, end: int) -> None:
        """Blocks for `slot` up to position `end`; the pool grows when it runs out."""
        cache = self.cache
        short = cache.missing(slot, end) - len(cache.free)
        if short > 0:
            more = min(max(short, cache.k.shape[1] // 2), self._all_blocks() - cache.k.shape[1])
            needed, free = cache.nbytes + more * cache.block_bytes, available_memory(self.device)
            if free is not None and more * cache.block_bytes > free:
                raise CacheTooLarge(
                    f"the KV cache needs {needed / 1e9:.2f} GB for the sequences decoding and "
                    f"{free / 1e9:.2f} GB is free on {self.device}: lower max_batch or max_len "
                    "(`lmforge serve --max-batch N --max-len N`)")
            cache.grow(more)
            self._rows.clear()
        cache.reserve(slot, end)

    def _free_slot(self, slot: int) -> None:
        self.slots[slot] = None
        if self.paged:
            self.cache.release(slot)

    def _reserve(self, rows: int, end: int) -> None:
        """Grow the cache to hold slots 0..rows-1 up to position `end` (a compiled step's
        cache is whole already): by at least half its length, so that a long sequence
        costs a few copies, in whole blocks."""
        cache = self.cache
        if rows <= cache.batch and end <= cache.length:
            return
        length = cache.length
        if end > length:
            length = min(self.max_len, _blocks(max(end, length + length // 2)))
        self._resize(max(rows, cache.batch), length)

    def _shrink(self) -> None:
        """Give memory back once the sequences left reach a quarter of the cache's length or
        use half its slots or fewer (none at all, when idle); it keeps twice the positions in
        use, so that growing again is not the next step."""
        active = [s for s in self.slots if s is not None]
        if self.paged:
            if not active and self.cache.k.shape[1] > 1:
                self.cache.empty()
                self._rows.clear()
            return
        rows = max((s.slot + 1 for s in active), default=1)
        end = max((s.position + 1 for s in active), default=1)
        cache = self.cache
        shorter = cache.length > CACHE_BLOCK and end <= cache.length // 4
        if shorter or rows <= cache.batch // 2:
            self._resize(rows, _blocks(2 * end) if shorter else cache.length)

    def _resize(self, rows: int, length: int) -> None:
        if rows * length > self.cache.batch * self.cache.length:
            self._check_fits(rows, length)
        self.cache.resize(rows, length)
        self._rows.clear()

    def cancel(self, request_id: int) -> None:
        """Forget a request (a client went away): its slot is free for the next step."""
        self.waiting = deque(s for s in self.waiting if s.id != request_id)
        self.filling = deque(s for s in self.filling if s.id != request_id)
        for i, seq in enumerate(self.slots):
            if seq is not None and seq.id == request_id:
                self._free_slot(i)
        self._logprobs.pop(request_id, None)
        self._prompt_logprobs.pop(request_id, None)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def active_requests(self) -> list[int]:
        """Ids of the requests in a slot (decoding, or being admitted)."""
        return [s.id for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active > 0

    def stats(self) -> EngineStats:
        return EngineStats(len(self.waiting), self.active, len(self.slots), self.max_len,
                           self.cache.nbytes, self.compiled)

    # --------------------------------------------------------------- decoding
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Advance every decoding sequence by a token (more where drafts are kept) in one
        batched forward pass, then give waiting requests the free slots and run their prompts
        into the cache (up to `prefill_chunk` tokens of them; the sequences whose prompt is
        all in produce their first token)."""
        self.compile_if_due()
        self._switch_when_compiled()
        events = self._decode_active()
        while self.waiting and None in self.slots:
            seq = self.waiting.popleft()
            seq.slot, seq.filling = self.slots.index(None), True
            self.slots[seq.slot] = seq
            self.filling.append(seq)
        events += self._fill()
        self.answered += sum(event.finish_reason is not None for event in events)
        if self._step_model is None:
            self._shrink()
        return events

    def _fill(self) -> list[Event]:
        """Run the prompts of the sequences in `filling` into their slots, in order, up to
        `prefill_chunk` tokens in all (at least one chunk); a prompt that cannot be split
        goes in whole."""
        events, budget = [], self.prefill_chunk or math.inf
        while self.filling and budget > 0:
            seq = self.filling[0]
            request = seq.request
            whole = len(request.prompt)
            split = self.paged and not request.images
            end = min(whole, seq.filled + budget) if split else whole
            masks = self._start_masks([seq]) if end == whole else None
            if self.paged:
                self._reserve_pages(seq.slot, end)
            else:
                self._reserve(seq.slot + 1, min(end, self.max_len))
            rows = self._cache_rows(seq.slot, 1)
            done = (self.prefill(request, rows, seq.filled, end) if split
                    else self.prefill(request, rows))
            budget -= end - seq.filled
            seq.filled = end
            if request.prompt_logprobs:
                seq.prompt_logits.append(done.logits)
            if end == whole:
                self.filling.popleft()
                seq.filling = False
                events.append(self._start(seq, done.tokens, done.logits[-1], masks))
        return events

    def _start(self, seq: _Sequence, tokens: list[int], logits: torch.Tensor,
               masks: Future | None) -> Event:
        """A sequence whose prompt is in the cache: its first token, from `logits`."""
        request = seq.request
        seq.start(tokens)
        if request.prompt_logprobs:
            self._prompt_logprobs[seq.id] = [None] + token_logprobs(
                torch.cat(seq.prompt_logits)[:-1], request.prompt[1:], request.logprobs or 0)
            seq.prompt_logits = []
        if request.logprobs is not None:
            self._logprobs[seq.id] = []
        if seq.limit == 0:
            return self._record(seq, seq.finish(None, None, "length"))
        return self._emit(seq, logits, masks)

    def _decode_active(self) -> list[Event]:
        active = [s for s in self.slots if s is not None and not s.filling]
        if not active:
            return []
        drafts = {s.slot: self._guess(s) for s in active}
        width = 1 + max(map(len, drafts.values()))
        compiled = self._step_model is not None and width == 1
        # A compiled step always takes every slot; otherwise free slots past the last
        # active one are left out.
        rows = len(self.slots) if compiled else max(s.slot for s in active) + 1
        at = {s.slot: s.position for s in active}
        # A row whose prompt is still going in is fed tokens too, where its next chunk will
        # write: nothing it holds is overwritten.
        at.update((s.slot, s.filled) for s in self.filling if s.slot < rows)
        # Every row is fed `width` tokens (drafts padded): all must fit in the context.
        width = min(width, self.max_len - max(at.values()))
        tokens = torch.zeros(rows, width, dtype=torch.long)
        starts = torch.zeros(rows, dtype=torch.long)
        for s in active:
            drafts[s.slot] = drafts[s.slot][:width - 1]
            fed = [s.tokens[-1], *drafts[s.slot]]
            tokens[s.slot, :len(fed)] = torch.tensor(fed)
        for slot, position in at.items():
            starts[slot] = position
        tokens, starts = tokens.to(self.device), starts.to(self.device)
        if self.paged:
            for slot, position in at.items():
                self._reserve_pages(slot, position + width)
        else:
            self._reserve(rows, max(at.values()) + width)
        masks = self._start_masks(active)
        self.speculation.forwards += 1
        if compiled:
            # Fixed shapes: checking all of the graph's guards each step cost 1.6 ms of a 13 ms
            # int4 SmolLM2 step. The first step checks them, as it may compile once more (a
            # step compiled on another thread, as a server's is, does), the others do not.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=self._guards_checked):
                logits = self._step_model(tokens, cache=self.cache, start=starts)
            self._guards_checked = True
        else:
            shared = set(at.values())  # one start for all rows: the faster path
            logits = self.model(tokens, cache=self._cache_rows(0, rows),
                                start=shared.pop() if len(shared) == 1 else starts)
        return [e for s in active for e in self._emit_drafted(s, logits[s.slot], drafts[s.slot],
                                                              masks)]

    def _guess(self, seq: _Sequence) -> list[int]:
        """Tokens to feed after a sequence's last one, which it may keep (see `draft`): as
        many as leave room for the model's own token within its limit."""
        if not self.draft or seq.matcher is not None:
            return []
        guess = propose(seq.tokens, self.ngram,
                        min(self.draft, seq.limit - len(seq.generated) - 1))
        if self._never is not None and int(self._never) in guess:
            guess = guess[:guess.index(int(self._never))]
        return guess

    def _emit_drafted(self, seq: _Sequence, logits: torch.Tensor, draft: list[int],
                      masks: Future | None) -> list[Event]:
        """A sequence's events from a step that fed it its last token and `draft` (logits
        (T, vocab), row i predicting draft[i]): token by token as plain decoding would take
        them, until one differs from the draft or the sequence ends."""
        events = []
        for i in range(len(draft) + 1):
            guess = draft[i] if i < len(draft) else None
            events.append(self._emit(seq, logits[i], masks, guess))
            if guess is None or events[-1].finish_reason is not None \
                    or events[-1].token != guess:
                break
        self.speculation.drafted += len(draft)
        self.speculation.accepted += len(events) - 1
        return events

    def _cache_rows(self, first: int, count: int) -> KVCache:
        # Views are cheap but not free; a decode step should not rebuild 2 x layers of them.
        key = (first, count)
        if key not in self._rows:
            self._rows[key] = self.cache.rows(first, count)
        return self._rows[key]

    def _start_masks(self, seqs: list[_Sequence]) -> Future | None:
        """The allowed next tokens of the constrained ones among `seqs`, as {id: mask},
        computed in a worker thread (the grammar library lets go of Python's lock) while
        the caller runs the model."""
        constrained = [s for s in seqs if s.matcher is not None]
        if not constrained:
            return None
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="lmforge-masks")
        return self._mask_worker.submit(lambda: {s.id: s.matcher.allowed() for s in constrained})

    def _emit(self, seq: _Sequence, logits: torch.Tensor, masks: Future | None = None,
              draft: int | None = None) -> Event:
        if self._never is not None:
            logits = logits.index_fill(-1, self._never, float("-inf"))
        allowed = logits
        if seq.matcher is not None:
            mask = masks.result()[seq.id].to(logits.device)
            allowed = logits.masked_fill(~mask, float("-inf"))
        token = int(seq.next_token(allowed, draft))
        return self._record(seq, seq.accept(token, logits))

    def _record(self, seq: _Sequence, event: Event) -> Event:
        if event.logprob is not None:
            self._logprobs[seq.id].append(event.logprob)
        if event.finish_reason is not None:
            self._free_slot(seq.slot)
            event.completion = seq.completion(
                event.finish_reason, self._logprobs.pop(seq.id, None),
                self._prompt_logprobs.pop(seq.id, None))
        return event

    # ------------------------------------------------------------ conveniences
    def run(self, requests: list[Request]) -> list[Completion]:
        """Decode all requests (batched) and return their completions in order."""
        ids = [self.submit(r) for r in requests]
        done: dict[int, Completion] = {}
        while self.has_work():
            done.update((e.request_id, e.completion) for e in self.step()
                        if e.completion is not None)
        return [done[i] for i in ids]

    def stream(self, request: Request) -> Iterator[Event]:
        """Events of one request as they happen (other queued requests advance too)."""
        request_id = self.submit(request)
        try:
            while True:
                for event in self.step():
                    if event.request_id == request_id:
                        yield event
                        if event.finish_reason is not None:
                            return
        finally:
            self.cancel(request_id)


CACHE_BLOCK = 256  # positions a growing (not paged) cache takes at a time
PAGE = 16  # positions in a block of a paged cache


def _blocks(positions: int) -> int:
    return -(-positions // CACHE_BLOCK) * CACHE_BLOCK


def _in_background(work: Callable[[], Any]) -> Future:
    """`work()` on a daemon thread, which never holds up the interpreter's exit (a script
    that is done before the compile is, ends at once)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as err:  # handed to whoever asks for the result
            future.set_exception(err)

    threading.Thread(target=run, name="lmforge-compile", daemon=True).start()
    return future


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's tokens (after BOS, for a tokenizer that asks for it); an empty prompt
    starts from BOS (or a newline, for char models)."""
    ids = tokenizer.encode_prompt(text) if text else []
    if ids:
        return ids
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else tokenizer.encode("\n")


def available_memory(device: torch.device) -> int | None:
    """Bytes that new tensors on `device` can take, or None where that is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return psutil.virtual_memory().available


def _meminfo_available() -> int | None:
    """Linux's estimate of the memory new allocations can take without swapping."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return None


def _compile_cache() -> Path:
    # Compiled kernels kept in lmforge's cache rather than the temporary directory, so a
    # second start of the same model reuses them after a reboot too.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _compiled_marker(model: LanguageModel, slots: int, length: int, threads: int,
                     cache_dtype: torch.dtype) -> Path:
    """A file in the compile cache that says this decode step was compiled there before:
    named by what shapes its kernels (the modules, their settings and dtypes, the cache's
    shape and dtype, the threads, torch's version, lmforge's code)."""
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
    key = "\n".join(map(str, (torch.__version__, _source_digest(), model, model.cfg, dtypes,
                               slots, length, threads, next(model.parameters()).device,
                               cache_dtype)))
    return _compile_cache() / "lmforge-steps" / hashlib.sha256(key.encode()).hexdigest()[:24]


@cache
def _source_digest() -> str:
    """A digest of lmforge's source: another version of the code traces another step, which
    must compile from nothing (in the foreground, see `start_compiling`), not in the background."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".cpp"):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _compiled(model: LanguageModel):
    _compile_cache()
    if next(model.parameters()).device.type == "cuda":
        return torch.compile(model, dynamic=False, mode="reduce-overhead")
    # On a CPU the generated C++ launcher (instead of Python) is most of the gain.
    return torch.compile(model, dynamic=False, options={"cpp_wrapper": True})


def stream_one(model: LanguageModel, tokenizer: Tokenizer | None, request: Request,
               draft: int = 0) -> Iterator[Event]:
    """Events of a single request, through an engine with a cache just big enough for it
    (`draft`: speculative decoding, see `Engine`)."""
    needed = len(request.prompt) + max(request.max_new_tokens, 1)
    engine = Engine(model, tokenizer, max_batch=1,
                    max_len=min(needed, model.cfg.context_length), draft=draft)
    yield from engine.stream(request)


def stream(model: LanguageModel, prompt: list[int], max_new_tokens: int,
           sampling: SamplingConfig | None = None, seed: int | None = None,
           stop_ids: tuple[int, ...] = (), truncate: bool = False) -> Iterator[int]:
    """Token ids after `prompt`, one at a time; a stop id is yielded, then decoding ends."""
    request = Request(list(prompt), max_new_tokens, sampling or SamplingConfig(), seed,
                      stop_ids=tuple(stop_ids), truncate=truncate)
    for event in stream_one(model, None, request):
        if event.token is not None:
            yield event.token


def generate(model: LanguageModel, prompt: list[int], max_new_tokens: int,
             sampling: SamplingConfig | None = None, seed: int | None = None,
             stop_ids: tuple[int, ...] = (), truncate: bool = False) -> list[int]:
    return list(stream(model, prompt, max_new_tokens, sampling, seed, stop_ids, truncate))
