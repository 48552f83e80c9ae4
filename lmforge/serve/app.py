"""`lmforge serve`: an OpenAI-compatible HTTP API and a web chat page for one model.

Routes: `GET /` (the chat page), `GET /health`, `GET /metrics` (Prometheus text),
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream` as server-sent events). Every request decodes through one shared `Engine` on its
own thread (see `scheduler.py`), so concurrent requests batch together. Errors use the
OpenAI shape `{"error": {"message", "type", "param", "code"}}`.

No single request can take the server down: chat templates render and long prompts tokenize
on worker threads with limits, an engine failure fails only the requests it was running (a
500, or an error event in a stream), every wait ends by the request's `timeout`, a client
that leaves frees its slot (streaming or not), and `/health` answers 503 once the engine
thread has stopped.

An encoder-decoder (seq2seq) model is served the same way: a completion's prompt is the
source text, and a chat request's last user message is (so the chat page translates).

A vision-language model also reads the image parts of chat messages (`image_url` with a data
URL, or an http(s) URL when allowed; see `images.py`); `/v1/models` and `/health` list the
model's `modalities`, ["text", "image"] for one, ["text"] otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib.resources import files

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Receive

from lmforge.chat import TemplateError, chat_prompt_ids, vision_chat_prompt_ids
from lmforge.config import PREFILL_CHUNK
from lmforge.images import ImageProcessor, Prepared, image_processor, tiles_of
from lmforge.infer.constrain import Constraint, ConstraintError
from lmforge.infer.embed import NoEmbeddings, embed, text_decoder
from lmforge.infer.engine import Completion, Engine, Event, PromptTooLong, TokenLogprob
from lmforge.infer.engine import Request as EngineRequest
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.seq2seq import Seq2SeqEngine
from lmforge.models import LanguageModel, Seq2Seq
from lmforge.serve.images import PartError, check_images, request_images
from lmforge.serve.scheduler import (
    EngineFailed,
    EngineStopped,
    QueueFull,
    Scheduler,
    Ticket,
    within,
)
from lmforge.serve.schemas import (
    SAMPLING,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Message,
    SamplingFields,
)
from lmforge.tokenizer import Tokenizer
from lmforge.toolcalls import (
    CallFilter,
    Function,
    ToolError,
    call_constraint,
    chosen,
    fallback_messages,
    functions_of,
    parse_calls,
    speaks_tools,
)


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    # Positions per sequence, the model's context unless set: the KV cache grows up to
    # max_batch x max_len positions as sequences reach them (the whole of it with compile).
    max_len: int | None = None
    # None: 1 MB, or 20 MB for a model that reads images (base64 images are large); it also
    # bounds an image downloaded with allow_image_urls.
    max_body_bytes: int | None = None
    timeout: float = 600.0  # seconds a request may take, queueing included
    cors_origins: list[str] = field(default_factory=list)
    compile: bool = False
    kv_dtype: torch.dtype | None = None  # the KV cache's values (None: the model's dtype)
    # Prompt tokens a step reads: a longer prompt goes in over several steps, between those
    # of the sequences decoding (0: whole prompts, which stall them while they are read).
    prefill_chunk: int = PREFILL_CHUNK
    draft: int = 0  # speculative decoding: tokens a sequence drafts per step (0: off)
    max_images: int = 8  # per request
    # Per image, checked from its header before it is decoded: 4096 x 4096 passes, and its
    # decoded RGB takes 50 MB while it is scaled down to what the model reads.
    max_image_pixels: int = 4096 * 4096
    allow_image_urls: bool = False  # download http(s) image URLs that clients send
    threads: int | None = None  # torch threads of the engine thread (None: torch's count)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP API requests", ["route", "status"],
                                registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds",
                                 "Time from request to last token", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.first_token = Histogram("lmforge_time_to_first_token_seconds",
                                     "Time from request to first token", registry=r,
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def engine_gauges(self, scheduler: Scheduler) -> None:
        r, stats = self.registry, scheduler.stats
        for name, doc, read in (
            ("lmforge_queue_length", "Requests waiting for a slot",
             lambda: scheduler.engine.stats().waiting),
            ("lmforge_active_sequences", "Sequences decoding",
             lambda: scheduler.engine.stats().active),
            ("lmforge_batch_size", "Sequences in the last decode step",
             lambda: stats.batch_sizes[-1] if stats.batch_sizes else 0),
            ("lmforge_prompt_tokens_total", "Prompt tokens processed", lambda: stats.prompt_tokens),
            ("lmforge_generation_tokens_total", "Tokens generated",
             lambda: stats.generated_tokens),
            ("lmforge_rejected_requests_total", "Requests refused with a full queue",
             lambda: stats.rejected),
            ("lmforge_failed_requests_total", "Requests dropped by a failed engine step",
             lambda: stats.failed),
            ("lmforge_engine_steps_total", "Engine steps", lambda: stats.steps),
        ):
            Gauge(name, doc, registry=r).set_function(read)


def create_app(model: LanguageModel, tokenizer: Tokenizer, stop_ids: tuple[int, ...],
               cfg: ServeConfig, processor: ImageProcessor | None = None) -> FastAPI:
    """The app serving `model`; `processor` says how a vision-language model sees images
    (`OpenedModel.processor`; None: lmforge's own square view for one of lmforge's models)."""
    if isinstance(model, Seq2Seq):
        if cfg.compile or cfg.kv_dtype is not None:
            raise ValueError("--compile and --kv-cache are for decoder-only models; serve this "
                             "seq2seq model without them")
        engine = Seq2SeqEngine(model, tokenizer, cfg.max_batch, cfg.max_len)
    else:
        engine = Engine(model, tokenizer, cfg.max_batch, cfg.max_len, compile=cfg.compile,
                        prefill_chunk=cfg.prefill_chunk, draft=cfg.draft, compile_after=1,
                        kv_dtype=cfg.kv_dtype)
    scheduler = Scheduler(engine, cfg.max_queue, cfg.threads)
    metrics = Metrics()
    metrics.engine_gauges(scheduler)
    processor = processor or image_processor(model.cfg, tokenizer)
    api = _Api(engine, scheduler, tokenizer, stop_ids, cfg, metrics, processor)
    modalities = ["text", "image"] if processor is not None else ["text"]

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.scheduler = engine, scheduler
    app.add_middleware(_Gate, api_key=cfg.api_key, limit=api.body_limit, metrics=metrics,
                       routes=app.router.routes)
    if cfg.cors_origins:
        # Added last, so it runs first: a browser's preflight carries no API key, and the
        # page must be allowed to read a 401 too.
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        reason = first.get("msg", "invalid").removeprefix("Value error, ")
        message = f"{'.'.join(where) or 'body'}: {reason}"
        return ApiError(400, message, param=".".join(where) or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):
        return ApiError(err.status_code, str(err.detail), code=None).response()

    @app.exception_handler(Exception)
    async def crashed(_: Request, err: Exception):
        return ApiError(500, f"internal error: {type(err).__name__}: {err}",
                        type="server_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(files("lmforge.serve").joinpath("static/index.html").read_text())

    @app.get("/health")
    async def health():
        stats = engine.stats()
        state = {"status": "ok", "model": cfg.model_name, "modalities": modalities,
                 "active": stats.active, "waiting": stats.waiting, "slots": stats.slots,
                 "max_len": stats.max_len, "kv_cache_mb": round(stats.kv_cache_bytes / 1e6, 1),
                 "compiled": stats.compiled}
        if not scheduler.alive:
            return JSONResponse({**state, "status": "unavailable", "reason": "the engine "
                                 "thread has stopped: restart the server"}, status_code=503)
        return state

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": cfg.model_name, "object": "model", "created": api.created,
             "owned_by": "lmforge", "max_model_len": engine.stats().max_len,
             "modalities": modalities}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.chat(body, request.receive)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await api.embeddings(body)

    return app


class _Api:
    """The two generation routes; everything here runs on the event loop."""

    def __init__(self, engine: Engine, scheduler: Scheduler, tokenizer: Tokenizer,
                 stop_ids: tuple[int, ...], cfg: ServeConfig, metrics: Metrics,
                 processor: ImageProcessor | None) -> None:
        self.engine, self.scheduler, self.tokenizer = engine, scheduler, tokenizer
        self.stop_ids, self.cfg, self.metrics = stop_ids, cfg, metrics
        self.processor = processor  # None: the model reads text only
        self.created = int(time.time())
        self.body_limit = cfg.max_body_bytes
        if self.body_limit is None:
            self.body_limit = (20 if processor is not None else 1) << 20

    # -------------------------------------------------------------- completions
    async def completions(self, body: CompletionRequest, receive: Receive):
        deadline = time.monotonic() + self.cfg.timeout
        self._check_model(body.model)
        prompts = await self._off_loop(deadline, self._prompts, body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        # Twice the alternatives asked for: tokens that share a text count once (`_top_dict`).
        alternatives = None if body.logprobs is None else 2 * body.logprobs
        constraint = self._constraint(body)
        requests = [self._request(p, body, max_tokens, alternatives, body.echo, (), constraint)
                    for p in prompts for _ in range(body.n)]
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "object": "text_completion", "created": created,
                "model": self.cfg.model_name}
        if body.stream:
            tally = {"completion_tokens": 0}
            # Submitted before the response starts, so a full queue is still a 429.
            tickets = await self._submit_all(requests, deadline)

            async def chunks() -> AsyncIterator[dict]:
                for index, request in enumerate(requests if body.echo else []):
                    yield {**head, "choices": [{"index": index, "text": self._echo_text(request),
                                                "finish_reason": None, "logprobs": None}]}
                async for index, event in self._merged(tickets, tally):
                    yield {**head, "choices": [{
                        "index": index, "text": event.text, "finish_reason":
                        event.finish_reason, "logprobs": self._stream_logprobs(event, body)}]}
            return self._sse(chunks(), head, body, requests, tally)
        done = await self._all(requests, deadline, receive)
        choices = [{"index": i, "text": (self._echo_text(r) if body.echo else "") + c.text,
                    "finish_reason": c.finish_reason,
                    "logprobs": self._completion_logprobs(c, body) if body.logprobs is not None
                    else None} for i, (r, c) in enumerate(zip(requests, done))]
        return {**head, "choices": choices, "usage": _usage(done)}

    def _prompts(self, prompt) -> list[list[int]]:
        """Token ids of each prompt (the engine checks them against the model's vocabulary)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            out.append(ids)
        return out

    def _echo_text(self, request: EngineRequest) -> str:
        return self.tokenizer.decode(request.prompt)

    def _completion_logprobs(self, c: Completion, body: CompletionRequest) -> dict:
        entries = (c.prompt_logprobs or []) if body.echo else []
        entries = list(entries) + list(c.logprobs or [])
        tokens = (list(c.prompt) if body.echo else []) + list(c.tokens)
        return {
            "tokens": [self._token_text(t) for t in tokens],
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [self._top_dict(e, body.logprobs) if e else None for e in entries],
            "text_offset": self._offsets(tokens),
        }

    def _offsets(self, tokens: list[int]) -> list[int]:
        """Where each token starts in the text, in characters; a token that begins inside a
        character starts where that character does."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(utf8.decode(self.tokenizer.token_bytes(token)))
        return offsets

    def _stream_logprobs(self, event: Event, body: CompletionRequest) -> dict | None:
        if body.logprobs is None or event.logprob is None:
            return None
        lp = event.logprob
        return {"tokens": [self._token_text(lp.token)], "token_logprobs": [lp.logprob],
                "top_logprobs": [self._top_dict(lp, body.logprobs)], "text_offset": [0]}

    def _top_dict(self, lp: TokenLogprob, k: int) -> dict[str, float]:
        """The k most likely texts at a position. OpenAI's shape is keyed by text, and two
        tokens can share one (a character and its byte-fallback token): the likelier one
        stays and the next alternatives fill up to k (the engine gives 2k, enough when no
        text has more than two tokens)."""
        top: dict[str, float] = {}
        for token, value in lp.top:
            if len(top) == k:
                break
            top.setdefault(self._token_text(token), value)
        return top

    # --------------------------------------------------------------------- chat
    async def chat(self, body: ChatRequest, receive: Receive):
        deadline = time.monotonic() + self.cfg.timeout
        self._check_model(body.model)
        images = body.image_urls()
        try:
            check_images(images, self.processor is not None, self.cfg.max_images,
                         self.cfg.allow_image_urls)
        except PartError as err:
            raise ApiError(400, str(err), param=err.where) from err
        # A vision-language model's messages keep their image parts (its prompt has image
        # tokens in their places); a text model's have no images, so their text is all.
        messages = [_message(m, self.processor is None) for m in body.messages]
        functions, constraint = self._tools(body)
        native = speaks_tools(self.tokenizer.special.chat_template)
        tools = [f.openai() for f in functions] if native else None
        if not native:
            messages = fallback_messages(messages, functions)
        # The images first: each one's text in the prompt depends on its size.
        prepared = await self._prepared(images, deadline)
        prompt = await self._chat_prompt(messages, prepared, deadline, tools)
        pixels = tiles_of(prepared)
        max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = self.engine.room(prompt)
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = [self._request(prompt, body, max_tokens, top, False, pixels, constraint)
                    for _ in range(body.n)]
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "object": "chat.completion.chunk" if body.stream
                else "chat.completion", "created": created, "model": self.cfg.model_name}
        if body.stream:
            tally = {"completion_tokens": 0}
            # Submitted before the response starts, so a full queue is still a 429.
            tickets = await self._submit_all(requests, deadline)

            async def chunks() -> AsyncIterator[dict]:
                filters = [CallFilter() for _ in requests]
                for index in range(len(requests)):
                    yield {**head, "choices": [{"index": index, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]}
                async for index, event in self._merged(tickets, tally):
                    text = filters[index].push(event.text) if functions else event.text
                    delta = {"content": text} if text else {}
                    logprobs = ({"content": [self._chat_logprob(event.logprob)]}
                                if event.logprob is not None else None)
                    reason = event.finish_reason
                    if reason and functions:
                        calls_delta, reason = _streamed_calls(filters[index], functions, reason)
                        delta.update(calls_delta)
                    if delta or logprobs or reason:
                        yield {**head, "choices": [{"index": index, "delta": delta,
                               "logprobs": logprobs, "finish_reason": reason}]}
            return self._sse(chunks(), head, body, requests, tally)
        done = await self._all(requests, deadline, receive)
        choices = [{"index": i, **_reply(c, functions),
                    "logprobs": {"content": [self._chat_logprob(lp) for lp in c.logprobs]}
                    if c.logprobs is not None else None}
                   for i, c in enumerate(done)]
        return {**head, "choices": choices, "usage": _usage(done)}

    def _tools(self, body: ChatRequest) -> tuple[list[Function], Constraint | None]:
        """The functions the reply may call, and the constraint on its output: one call when
        a call is required, else the response format's."""
        try:
            functions, required = chosen(functions_of(body.tools or []), body.tool_choice)
        except ToolError as err:
            param = "tool_choice" if "tool_choice" in str(err) else "tools"
            raise ApiError(400, str(err), param=param) from err
        if not required:
            return functions, self._constraint(body)
        if body.response_format is not None and body.response_format.type != "text":
            raise ApiError(400, "a required tool call and a response_format cannot both "
                           "shape the reply: drop one", param="response_format")
        return functions, self._checked(call_constraint(functions), "tools")

    def _constraint(self, body: SamplingFields) -> Constraint | None:
        if body.response_format is None:
            return None
        try:
            constraint = body.response_format.constraint()
        except ValueError as err:
            raise ApiError(400, str(err), param="response_format") from err
        return self._checked(constraint, "response_format") if constraint else None

    def _checked(self, constraint: Constraint, param: str) -> Constraint:
        try:
            constraint.grammar()
        except ConstraintError as err:
            raise ApiError(400, str(err), param=param) from err
        return constraint

    async def _chat_prompt(self, messages: list[dict], images: list[Prepared], deadline: float,
                           tools: list[dict] | None = None) -> list[int]:
        if isinstance(self.engine, Seq2SeqEngine):
            said = [m["content"] for m in messages if m["role"] == "user" and m["content"]]
            if not said:
                raise ApiError(400, "a seq2seq model takes the last user message as its "
                               "source: send one with text", param="messages")
            return await self._off_loop(deadline, self.tokenizer.encode, said[-1])
        try:
            if self.processor is not None:
                return await self._off_loop(deadline, vision_chat_prompt_ids, self.tokenizer,
                                            self.processor, messages, images)
            return await self._off_loop(deadline, chat_prompt_ids, self.tokenizer, messages, tools)
        except TemplateError as err:  # the template refused, or went past a limit
            raise ApiError(400, str(err), param="messages") from err
        except ApiError:
            raise
        except Exception as err:  # a template that breaks on these messages
            raise ApiError(400, f"the chat template failed on the messages: "
                           f"{type(err).__name__}: {err}", param="messages") from err

    async def _prepared(self, images: list[tuple[str, str]], deadline: float
                        ) -> list[Prepared]:
        """The images as the model sees them; decoding (and downloading) runs off the loop."""
        if not images:
            return []
        try:
            return await self._off_loop(deadline, request_images, images, self.processor,
                                        self.cfg.max_image_pixels, self.body_limit)
        except PartError as err:
            raise ApiError(400, str(err), param=err.where) from err

    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        def entry(token: int, value: float) -> dict:
            return {"token": self._token_text(token), "logprob": value,
                    "bytes": list(self.tokenizer.token_bytes(token))}

        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    # --------------------------------------------------------------- embeddings
    async def embeddings(self, body: EmbeddingRequest):
        """Unit-length mean-pooled hidden states (lmforge.infer.embed), one per input."""
        deadline = time.monotonic() + self.cfg.timeout
        self._check_model(body.model)
        try:
            decoder = text_decoder(self.engine.model)
        except NoEmbeddings as err:
            raise ApiError(400, str(err), param="model") from err
        if body.dimensions is not None and body.dimensions != decoder.cfg.d_model:
            raise ApiError(400, f"this model's embeddings have {decoder.cfg.d_model} "
                           f"dimensions; dimensions={body.dimensions} cannot be given",
                           param="dimensions")
        inputs = await self._off_loop(deadline, self._prompts, body.input)
        limit, vocab = decoder.cfg.context_length, decoder.cfg.vocab_size
        for i, ids in enumerate(inputs):
            if len(ids) > limit:
                raise ApiError(400, f"input {i} has {len(ids)} tokens; this model reads at "
                               f"most {limit}", param="input", code="context_length_exceeded")
            if not all(0 <= t < vocab for t in ids):
                raise ApiError(400, f"input {i} has a token id outside the vocabulary (0 to "
                               f"{vocab - 1})", param="input")
        vectors = await self._off_loop(deadline, embed, self.engine.model, inputs)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                 if body.encoding_format == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        used = sum(map(len, inputs))
        return {"object": "list", "data": data, "model": self.cfg.model_name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}

    # ------------------------------------------------------------------ shared
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server has "
                           f"{self.cfg.model_name!r}", param="model", code="model_not_found")

    def _request(self, prompt: list[int], body: SamplingFields, max_tokens: int,
                 logprobs: int | None, echo: bool, images: tuple[torch.Tensor, ...] = (),
                 constraint: Constraint | None = None) -> EngineRequest:
        room = self.engine.room(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens, the context holds "
                           f"{self.engine.max_len} (with room for one new token)",
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        given = {k: getattr(body, k) for k in SAMPLING if getattr(body, k) is not None}
        if given.get("top_k", 1) < 1:  # OpenAI-style servers take -1 (or 0) for "no top-k"
            given["top_k"] = None
        return EngineRequest(prompt, min(max_tokens, room), SamplingConfig(**given), body.seed,
                             stop=tuple(body.stop or ()), stop_ids=self.stop_ids, logprobs=logprobs,
                             prompt_logprobs=echo and logprobs is not None, images=images,
                             constraint=constraint)

    def _seeded(self, requests: list[EngineRequest]) -> list[EngineRequest]:
        # n choices from one seed must differ from each other yet repeat as a whole.
        return [replace(r, seed=None if r.seed is None else r.seed + i)
                for i, r in enumerate(requests)]

    async def _off_loop(self, deadline: float, work, *args):
        """work(*args) on a worker thread, by the deadline: rendering a template or
        tokenizing a long prompt on the event loop would stall every other request."""
        try:
            return await within(asyncio.to_thread(work, *args), deadline,
                                "preparing the prompt took longer than the server's timeout")
        except TimeoutError as err:
            raise _failure(err) from err

    async def _submit_all(self, requests: list[EngineRequest], deadline: float
                          ) -> list[Ticket]:
        tickets: list[Ticket] = []
        try:
            for request in self._seeded(requests):
                tickets.append(await self.scheduler.submit(request, deadline))
        # The engine refuses bad requests with ValueError.
        except (QueueFull, ValueError, TimeoutError, EngineFailed) as err:
            for ticket in tickets:
                self.scheduler.cancel(ticket.id)
            if isinstance(err, QueueFull):
                raise ApiError(429, f"the server is busy ({err}); retry shortly",
                               type="server_busy", code="queue_full",
                               headers={"Retry-After": "1"}) from err
            if isinstance(err, ValueError):
                code = "context_length_exceeded" if isinstance(err, PromptTooLong) else None
                raise ApiError(400, str(err), code=code) from err
            raise _failure(err) from err
        return tickets

    async def _collect(self, ticket: Ticket, started: float) -> Completion:
        first = True
        async for event in self.scheduler.events(ticket):
            if first:
                self.metrics.first_token.observe(time.perf_counter() - started)
                first = False
            if event.completion is not None:
                return event.completion
        raise RuntimeError("the engine ended a request without a completion")

    async def _gather(self, tickets: list[Ticket], started: float) -> list[Completion]:
        # A coroutine, run as a task: cancelled, a task ends quietly where a bare gather
        # future would log its CancelledError as never retrieved.
        return await asyncio.gather(*(self._collect(t, started) for t in tickets))

    async def _all(self, requests: list[EngineRequest], deadline: float, receive: Receive
                   ) -> list[Completion]:
        """The completions of all requests; a client that leaves first cancels them, so
        their slots do not decode for nobody."""
        started = time.perf_counter()
        tickets = await self._submit_all(requests, deadline)
        collected = asyncio.ensure_future(self._gather(tickets, started))
        left = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({collected, left}, return_when=asyncio.FIRST_COMPLETED)
            if not collected.done():
                raise ApiError(499, "the client closed the connection", code="client_closed")
            return collected.result()
        except (TimeoutError, EngineFailed) as err:
            raise _failure(err) from err
        finally:
            left.cancel()
            collected.cancel()  # each request's events() then cancels it in the engine

    async def _merged(self, tickets: list[Ticket], tally: dict[str, int]
                      ) -> AsyncIterator[tuple[int, Event]]:
        """Events of several requests as they come, tagged with the request's index;
        counts generated tokens into `tally`."""
        out: asyncio.Queue = asyncio.Queue()
        started = time.perf_counter()

        async def pump(index: int, ticket: Ticket) -> None:
            try:
                first = True
                async for event in self.scheduler.events(ticket):
                    if first:
                        self.metrics.first_token.observe(time.perf_counter() - started)
                        first = False
                    await out.put((index, event))
            except Exception as err:
                await out.put((index, err))

        tasks = [asyncio.create_task(pump(i, t)) for i, t in enumerate(tickets)]
        finished = 0
        try:
            while finished < len(tasks):
                index, item = await out.get()
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason is not None:
                    finished += 1
                tally["completion_tokens"] += item.token is not None
                yield index, item
        finally:
            for task in tasks:
                task.cancel()

    def _sse(self, chunks: AsyncIterator[dict], head: dict, body: SamplingFields,
             requests: list[EngineRequest], tally: dict[str, int]) -> StreamingResponse:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except (TimeoutError, EngineFailed) as err:
                yield f"data: {json.dumps(_failure(err).body())}\n\n"
            if include_usage:
                prompt = sum(len(r.prompt) for r in requests)
                generated = tally["completion_tokens"]
                usage = {"prompt_tokens": prompt, "completion_tokens": generated,
                         "total_tokens": prompt + generated}
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _token_text(self, token: int) -> str:
        """A token's text in logprobs. A piece of a character is spelled as its bytes,
        `bytes:\\xe2\\x80` as OpenAI does, not U+FFFD like every other such piece."""
        raw = self.tokenizer.token_bytes(token)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _message(m: Message, text_only: bool) -> dict:
    """A request message as the chat template reads it (transformers' names)."""
    out = {"role": m.role if m.role != "developer" else "system",
           "content": m.text() if text_only else m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _reply(c: Completion, functions: list[Function]) -> dict:
    """A choice's message and finish reason: the model's tool calls, if it made any."""
    content, calls = parse_calls(c.text, functions) if functions else (c.text, [])
    if not calls:
        return {"message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason}
    return {"message": {"role": "assistant", "content": content, "tool_calls": calls},
            "finish_reason": "tool_calls"}


def _streamed_calls(held: CallFilter, functions: list[Function], reason: str
                    ) -> tuple[dict, str]:
    """The last delta of a streamed reply that may hold tool calls: the calls (each whole,
    with its index), or the text held back if it was none."""
    if not held.calling:
        return {}, reason
    content, calls = parse_calls(held.text[held.sent:], functions)
    if not calls:
        return {"content": content or ""}, reason
    delta: dict = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
    if content:
        delta["content"] = content
    return delta, "tool_calls"


def _failure(err: Exception) -> ApiError:
    """The API error for a request the server could not finish."""
    if isinstance(err, TimeoutError):
        return ApiError(504, str(err), type="timeout", code="timeout")
    if isinstance(err, EngineStopped):
        return ApiError(503, str(err), type="server_error", code="engine_stopped")
    return ApiError(500, str(err), type="server_error", code="engine_failed")


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone (its request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _usage(done: list[Completion]) -> dict[str, int]:
    prompt = sum(len(c.prompt) for c in done)
    completion = sum(len(c.tokens) for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class _Gate:
    """What every request passes first (plain ASGI, so streamed answers and client
    disconnects reach the app untouched): the API key on `/v1/` routes, the body size limit
    (413 before anything parses it), and request counts and latencies for `/metrics`."""

    def __init__(self, app, api_key: str | None, limit: int, metrics: Metrics,
                 routes: list[BaseRoute]) -> None:
        self.app, self.api_key, self.limit, self.metrics = app, api_key, limit, metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self._route(scope)
        error = self._refusal(scope)
        body = b""
        if error is None:
            body, error = await self._read_body(receive)
        if error is not None:
            self.metrics.requests.labels(route, str(error.status)).inc()
            return await error.response()(scope, receive, send)

        started, status = time.perf_counter(), {}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # waits for the client to leave
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def observe(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, observe)
        finally:
            self.metrics.requests.labels(route, str(status.get("code", 500))).inc()
            if route.startswith("/v1/"):
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _route(self, scope) -> str:
        """The route's path template: metric labels must stay few whatever paths clients
        send, so every unknown path shares one."""
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return route.path
        return "unmatched"

    def _refusal(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers", []))
        if scope["path"].startswith("/v1/") and self.api_key is not None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            # The scheme is case-insensitive (RFC 9110); a bare key is not a bearer token.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(
                    given.strip(), self.api_key.encode()):
                return ApiError(401, "missing or wrong API key: send `Authorization: Bearer "
                                "KEY`", code="invalid_api_key")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return self._too_large()
        return None

    async def _read_body(self, receive) -> tuple[bytes, ApiError | None]:
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return b"", self._too_large()
        return body, None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.limit} bytes",
                        code="request_too_large")
