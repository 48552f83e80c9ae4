"""`lmforge serve`: an OpenAI-compatible HTTP API and a web chat page for one model.

Routes: `GET /` (the chat page), `GET /health`, `GET /metrics` (Prometheus text),
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream` as server-sent events). Every request decodes through one shared `Engine` on its
own thread (see `scheduler.py`), so concurrent requests batch together. Errors use the
OpenAI shape `{"error": {"message", "type", "param", "code"}}`.

An encoder-decoder (seq2seq) model is served the same way: a completion's prompt is the
source text, and a chat request's last user message is (so the chat page translates).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from lmforge.chat import chat_prompt_ids
from lmforge.infer.engine import Completion, Engine, Event, PromptTooLong, TokenLogprob
from lmforge.infer.engine import Request as EngineRequest
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.seq2seq import Seq2SeqEngine
from lmforge.models import LanguageModel, Seq2Seq
from lmforge.serve.scheduler import QueueFull, Scheduler, Ticket
from lmforge.serve.schemas import ChatRequest, CompletionRequest, SamplingFields
from lmforge.tokenizer import Tokenizer

DEFAULT_MAX_LEN = 4096


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    # Positions per sequence: the model's context, at most DEFAULT_MAX_LEN unless set, as the
    # KV cache is allocated up front for every slot.
    max_len: int | None = None
    max_body_bytes: int = 1 << 20
    timeout: float = 600.0  # seconds a request may take, queueing included
    cors_origins: list[str] = field(default_factory=list)
    compile: bool = False


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
            ("lmforge_engine_steps_total", "Engine steps", lambda: stats.steps),
        ):
            Gauge(name, doc, registry=r).set_function(read)


def create_app(model: LanguageModel, tokenizer: Tokenizer, stop_ids: tuple[int, ...],
               cfg: ServeConfig) -> FastAPI:
    max_len = cfg.max_len or min(model.cfg.context_length, DEFAULT_MAX_LEN)
    if isinstance(model, Seq2Seq):
        if cfg.compile:
            raise ValueError("--compile is for decoder-only models; serve this seq2seq model "
                             "without it")
        engine = Seq2SeqEngine(model, tokenizer, cfg.max_batch, max_len)
    else:
        engine = Engine(model, tokenizer, cfg.max_batch, max_len, compile=cfg.compile)
    scheduler = Scheduler(engine, cfg.max_queue)
    metrics = Metrics()
    metrics.engine_gauges(scheduler)
    api = _Api(engine, scheduler, tokenizer, stop_ids, cfg, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(_Gate, api_key=cfg.api_key, limit=cfg.max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
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
        return {"status": "ok", "model": cfg.model_name, "active": stats.active,
                "waiting": stats.waiting, "slots": stats.slots, "max_len": stats.max_len,
                "kv_cache_mb": round(stats.kv_cache_bytes / 1e6, 1)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": cfg.model_name, "object": "model", "created": api.created,
             "owned_by": "lmforge", "max_model_len": engine.stats().max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await api.completions(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await api.chat(body)

    return app


class _Api:
    """The two generation routes; everything here runs on the event loop."""

    def __init__(self, engine: Engine, scheduler: Scheduler, tokenizer: Tokenizer,
                 stop_ids: tuple[int, ...], cfg: ServeConfig, metrics: Metrics) -> None:
        self.engine, self.scheduler, self.tokenizer = engine, scheduler, tokenizer
        self.stop_ids, self.cfg, self.metrics = stop_ids, cfg, metrics
        self.created = int(time.time())

    # -------------------------------------------------------------- completions
    async def completions(self, body: CompletionRequest):
        self._check_model(body.model)
        prompts = self._prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        requests = [self._request(p, body, max_tokens, body.logprobs, body.echo)
                    for p in prompts for _ in range(body.n)]
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "object": "text_completion", "created": created,
                "model": self.cfg.model_name}
        if body.stream:
            tally = {"completion_tokens": 0}
            # Submitted before the response starts, so a full queue is still a 429.
            tickets = await self._submit_all(requests)

            async def chunks() -> AsyncIterator[dict]:
                for index, request in enumerate(requests if body.echo else []):
                    yield {**head, "choices": [{"index": index, "text": self._echo_text(request),
                                                "finish_reason": None, "logprobs": None}]}
                async for index, event in self._merged(tickets, tally):
                    yield {**head, "choices": [{
                        "index": index, "text": event.text, "finish_reason":
                        event.finish_reason, "logprobs": self._stream_logprobs(event, body)}]}
            return self._sse(chunks(), head, body, requests, tally)
        done = await self._all(requests)
        choices = [{"index": i, "text": (self._echo_text(r) if body.echo else "") + c.text,
                    "finish_reason": c.finish_reason,
                    "logprobs": self._completion_logprobs(c, body) if body.logprobs is not None
                    else None} for i, (r, c) in enumerate(zip(requests, done))]
        return {**head, "choices": choices, "usage": _usage(done)}

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            if max(ids) >= self.tokenizer.vocab_size or min(ids) < 0:
                raise ApiError(400, "the prompt has token ids outside the vocabulary",
                               param="prompt")
            out.append(ids)
        return out

    def _echo_text(self, request: EngineRequest) -> str:
        return self.tokenizer.decode(request.prompt)

    def _completion_logprobs(self, c: Completion, body: CompletionRequest) -> dict:
        entries = (c.prompt_logprobs or []) if body.echo else []
        entries = list(entries) + list(c.logprobs or [])
        tokens = (list(c.prompt) if body.echo else []) + list(c.tokens)
        strings = [self._token_text(t) for t in tokens]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": strings,
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [self._top_dict(e) if e else None for e in entries],
            "text_offset": offsets,
        }

    def _stream_logprobs(self, event: Event, body: CompletionRequest) -> dict | None:
        if body.logprobs is None or event.logprob is None:
            return None
        lp = event.logprob
        return {"tokens": [self._token_text(lp.token)], "token_logprobs": [lp.logprob],
                "top_logprobs": [self._top_dict(lp)], "text_offset": [0]}

    def _top_dict(self, lp: TokenLogprob) -> dict[str, float]:
        return {self._token_text(t): v for t, v in lp.top}

    # --------------------------------------------------------------------- chat
    async def chat(self, body: ChatRequest):
        self._check_model(body.model)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages]
        prompt = self._chat_prompt(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = self.engine.room(prompt)
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = [self._request(prompt, body, max_tokens, top, False) for _ in range(body.n)]
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "object": "chat.completion.chunk" if body.stream
                else "chat.completion", "created": created, "model": self.cfg.model_name}
        if body.stream:
            tally = {"completion_tokens": 0}
            # Submitted before the response starts, so a full queue is still a 429.
            tickets = await self._submit_all(requests)

            async def chunks() -> AsyncIterator[dict]:
                for index in range(len(requests)):
                    yield {**head, "choices": [{"index": index, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]}
                async for index, event in self._merged(tickets, tally):
                    delta = {"content": event.text} if event.text else {}
                    logprobs = ({"content": [self._chat_logprob(event.logprob)]}
                                if event.logprob is not None else None)
                    if delta or logprobs or event.finish_reason:
                        yield {**head, "choices": [{"index": index, "delta": delta,
                               "logprobs": logprobs, "finish_reason": event.finish_reason}]}
            return self._sse(chunks(), head, body, requests, tally)
        done = await self._all(requests)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": [self._chat_logprob(lp) for lp in c.logprobs]}
                    if c.logprobs is not None else None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(done)]
        return {**head, "choices": choices, "usage": _usage(done)}

    def _chat_prompt(self, messages: list[dict]) -> list[int]:
        if isinstance(self.engine, Seq2SeqEngine):
            said = [m["content"] for m in messages if m["role"] == "user" and m["content"]]
            if not said:
                raise ApiError(400, "a seq2seq model takes the last user message as its "
                               "source: send one with text", param="messages")
            return self.tokenizer.encode(said[-1])
        try:
            return chat_prompt_ids(self.tokenizer, messages)
        except Exception as err:  # the model's own template refuses the conversation
            raise ApiError(400, f"the chat template refused the messages: {err}",
                           param="messages") from err

    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        def entry(token: int, value: float) -> dict:
            text = self._token_text(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    # ------------------------------------------------------------------ shared
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server has "
                           f"{self.cfg.model_name!r}", param="model", code="model_not_found")

    def _request(self, prompt: list[int], body: SamplingFields, max_tokens: int,
                 logprobs: int | None, echo: bool) -> EngineRequest:
        room = self.engine.room(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens, the context holds "
                           f"{self.engine.max_len} (with room for one new token)",
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        sampling = SamplingConfig(
            temperature=body.temperature,
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=body.top_p if body.top_p < 1 else None, min_p=body.min_p or None,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        return EngineRequest(prompt, min(max_tokens, room), sampling, body.seed,
                             stop=tuple(body.stop or ()), stop_ids=self.stop_ids, logprobs=logprobs,
                             prompt_logprobs=echo and logprobs is not None)

    def _seeded(self, requests: list[EngineRequest]) -> list[EngineRequest]:
        # n choices from one seed must differ from each other yet repeat as a whole.
        return [replace(r, seed=None if r.seed is None else r.seed + i)
                for i, r in enumerate(requests)]

    async def _submit_all(self, requests: list[EngineRequest]) -> list[Ticket]:
        tickets: list[Ticket] = []
        try:
            for request in self._seeded(requests):
                tickets.append(await self.scheduler.submit(request))
        except (QueueFull, ValueError) as err:  # the engine refuses bad requests with ValueError
            for ticket in tickets:
                self.scheduler.cancel(ticket.id)
            if isinstance(err, QueueFull):
                raise ApiError(429, f"the server is busy ({err}); retry shortly",
                               type="server_busy", code="queue_full",
                               headers={"Retry-After": "1"}) from err
            code = "context_length_exceeded" if isinstance(err, PromptTooLong) else None
            raise ApiError(400, str(err), code=code) from err
        return tickets

    async def _collect(self, ticket: Ticket, started: float) -> Completion:
        first = True
        async for event in self.scheduler.events(ticket, self.cfg.timeout):
            if first:
                self.metrics.first_token.observe(time.perf_counter() - started)
                first = False
            if event.completion is not None:
                return event.completion
        raise RuntimeError("the engine ended a request without a completion")

    async def _all(self, requests: list[EngineRequest]) -> list[Completion]:
        started = time.perf_counter()
        tickets = await self._submit_all(requests)
        try:
            return await asyncio.gather(*(self._collect(t, started) for t in tickets))
        except TimeoutError as err:
            raise ApiError(504, str(err), type="timeout", code="timeout") from err

    async def _merged(self, tickets: list[Ticket], tally: dict[str, int]
                      ) -> AsyncIterator[tuple[int, Event]]:
        """Events of several requests as they come, tagged with the request's index;
        counts generated tokens into `tally`."""
        out: asyncio.Queue = asyncio.Queue()
        started = time.perf_counter()

        async def pump(index: int, ticket: Ticket) -> None:
            try:
                first = True
                async for event in self.scheduler.events(ticket, self.cfg.timeout):
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
            except TimeoutError as err:
                error = ApiError(504, str(err), type="timeout", code="timeout")
                yield f"data: {json.dumps(error.body())}\n\n"
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
        return self.tokenizer.decode([token])


def _usage(done: list[Completion]) -> dict[str, int]:
    prompt = sum(len(c.prompt) for c in done)
    completion = sum(len(c.tokens) for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class _Gate:
    """What every request passes first (plain ASGI, so streamed answers and client
    disconnects reach the app untouched): the API key on `/v1/` routes, the body size limit
    (413 before anything parses it), and request counts and latencies for `/metrics`."""

    def __init__(self, app, api_key: str | None, limit: int, metrics: Metrics) -> None:
        self.app, self.api_key, self.limit, self.metrics = app, api_key, limit, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"].startswith("/v1/") else "other"
        error = self._refusal(scope, route)
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
            if route != "other":
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _refusal(self, scope, route: str) -> ApiError | None:
        headers = dict(scope.get("headers", []))
        if route != "other" and self.api_key is not None:
            given = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(given, self.api_key.encode()):
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
