"""The bridge between asyncio request handlers and the engine, which runs on its own thread.

Only the engine thread touches the engine: handlers hand it work through a thread-safe inbox
(submit, cancel) and receive events through per-request asyncio queues. Whenever there is
work the thread calls `Engine.step`, so requests that arrive at different times share decode
steps (continuous batching); a cancelled request (a client that went away) frees its slot
before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lmforge.infer.engine import Engine, Event, Request


class QueueFull(Exception):
    """More requests are waiting than the server accepts; try again later."""


@dataclass
class Stats:
    """What `/metrics` reports; updated by the engine thread, read by handlers."""

    requests: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # since the last scrape


@dataclass
class Ticket:
    """A submitted request: its id in the engine and the queue its events arrive on."""

    id: int
    events: asyncio.Queue


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.stats = Stats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ handler side
    async def submit(self, request: Request) -> Ticket:
        """Queue a request; its events arrive on the ticket's queue. Raises QueueFull, or
        the engine's own error (e.g. PromptTooLong) for a request that can never run."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        events: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("submit", request, (loop, events, done)))
        self._wake.set()
        return Ticket(await done, events)

    def cancel(self, request_id: int) -> None:
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    async def events(self, ticket: Ticket, timeout: float | None = None) -> AsyncIterator[Event]:
        """A request's events until it finishes; leaving early (a disconnect, a timeout)
        cancels it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("the request took longer than the server's timeout")
                event = await asyncio.wait_for(ticket.events.get(), remaining)
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancel(ticket.id)

    # ------------------------------------------------------------- engine side
    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            events = self.engine.step()
            self._count(events)
            for event in events:
                self._deliver(event)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload, reply = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "cancel":
                self._listeners.pop(payload, None)
                self.engine.cancel(payload)
                continue
            loop, events, done = reply
            waiting = self.engine.stats().waiting
            if waiting >= self.max_queue:
                self.stats.rejected += 1
                error = QueueFull(f"{waiting} requests are already waiting")
                loop.call_soon_threadsafe(_settle, done, None, error)
                continue
            try:
                request_id = self.engine.submit(payload)
            except Exception as err:  # refused: the handler turns it into a 400
                loop.call_soon_threadsafe(_settle, done, None, err)
                continue
            self._listeners[request_id] = (loop, events)
            self.stats.requests += 1
            self.stats.prompt_tokens += len(payload.prompt)
            loop.call_soon_threadsafe(_settle, done, request_id, None)

    def _count(self, events: list[Event]) -> None:
        stats = self.stats
        stats.steps += 1
        stats.generated_tokens += sum(e.token is not None for e in events)
        stats.batch_sizes.append(len(events))
        del stats.batch_sizes[:-1000]

    def _deliver(self, event: Event) -> None:
        listener = self._listeners.get(event.request_id)
        if listener is None:
            return
        loop, events = listener
        if event.finish_reason is not None:
            del self._listeners[event.request_id]
        loop.call_soon_threadsafe(events.put_nowait, event)


def _settle(future: asyncio.Future, value, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
