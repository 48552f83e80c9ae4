"""The bridge between asyncio request handlers and the engine, which runs on its own thread.

Only the engine thread touches the engine: handlers hand it work through a thread-safe inbox
(submit, cancel) and receive events through per-request asyncio queues. Whenever there is
work the thread calls `Engine.step`, so requests that arrive at different times share decode
steps (continuous batching); a cancelled request (a client that went away) frees its slot
before the next step.

One request cannot stop the others: a step that raises fails the requests it was running
(their handlers get `EngineFailed`) and the thread goes on. Every wait of a handler ends by
its request's deadline, and a thread that has ended (`alive` is False) is reported at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from lmforge.infer.engine import Engine, Event, Request

log = logging.getLogger("lmforge.serve")
T = TypeVar("T")


class QueueFull(Exception):
    """More requests are waiting than the server accepts; try again later."""


class EngineFailed(Exception):
    """The engine raised while running this request (the request is dropped, others go on)."""


class EngineStopped(EngineFailed):
    """The engine thread is not running, so no request can be served."""


@dataclass
class Stats:
    """What `/metrics` reports; updated by the engine thread, read by handlers."""

    requests: int = 0
    rejected: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # since the last scrape


@dataclass
class Ticket:
    """A submitted request: its id in the engine, the queue its events arrive on, and the
    time.monotonic() by which it must be done (None: no limit)."""

    id: int
    events: asyncio.Queue
    deadline: float | None = None


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64, threads: int | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.threads = threads or torch.get_num_threads()  # for torch's work on the engine thread
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
        # A daemon thread: a long step need not hold up the process's exit.
        self._thread.join(timeout=2)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ handler side
    async def submit(self, request: Request, deadline: float | None = None) -> Ticket:
        """Queue a request; its events arrive on the ticket's queue. Raises QueueFull, the
        engine's own error (e.g. PromptTooLong) for a request that can never run,
        EngineStopped, or TimeoutError when the engine does not take it by `deadline`."""
        if not self.alive:
            raise EngineStopped("the engine thread is not running: restart the server")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        events: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("submit", request, (loop, events, done)))
        self._wake.set()
        request_id = await within(done, deadline, "the engine did not take the request "
                                  "within the server's timeout")
        return Ticket(request_id, events, deadline)

    def cancel(self, request_id: int) -> None:
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    async def events(self, ticket: Ticket) -> AsyncIterator[Event]:
        """A request's events until it finishes; leaving early (a disconnect, a timeout)
        cancels it. Raises EngineFailed when the engine failed on it."""
        try:
            while True:
                event = await within(ticket.events.get(), ticket.deadline,
                                     "the request took longer than the server's timeout")
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancel(ticket.id)

    # ------------------------------------------------------------- engine side
    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # a thread's own setting
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_work():
                    # (with --compile) on this thread, for its settings, while nothing waits
                    self.engine.compile_if_due()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
        finally:
            self._refuse_all(EngineStopped("the engine thread stopped: restart the server"))

    def _step(self) -> None:
        running = self._running()
        try:
            events = self.engine.step()
        except Exception as err:
            # The requests of a failed step may be half-advanced: drop them, keep the rest.
            log.exception("an engine step failed; dropping its requests")
            self._fail(running | self._running(), err)
            return
        self._count(events)
        for event in events:
            self._deliver(event)

    def _running(self) -> set[int]:
        return set(self.engine.active_requests())

    def _fail(self, request_ids: set[int], err: Exception) -> None:
        failure = EngineFailed(f"the engine failed on this request: {type(err).__name__}: {err}")
        for request_id in request_ids:
            self.engine.cancel(request_id)
            self.stats.failed += 1
            listener = self._listeners.pop(request_id, None)
            if listener is not None:
                loop, events = listener
                _post(loop, events.put_nowait, failure)

    def _refuse_all(self, err: EngineStopped) -> None:
        """Tell every waiting handler at once that nothing more will come."""
        for loop, events in self._listeners.values():
            _post(loop, events.put_nowait, err)
        self._listeners.clear()
        while True:
            try:
                kind, _, reply = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                loop, _, done = reply
                _post(loop, self._settle, done, None, err)

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
                _post(loop, self._settle, done, None, error)
                continue
            try:
                request_id = self.engine.submit(payload)
            except Exception as err:  # refused: the handler turns it into a 400
                _post(loop, self._settle, done, None, err)
                continue
            self._listeners[request_id] = (loop, events)
            self.stats.requests += 1
            self.stats.prompt_tokens += len(payload.prompt)
            _post(loop, self._settle, done, request_id, None)

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
        _post(loop, events.put_nowait, event)

    def _settle(self, future: asyncio.Future, request_id: int | None,
                error: BaseException | None) -> None:
        """Answer a submit (on its event loop); a handler that stopped waiting (its
        timeout) leaves a request nobody will read, so it is cancelled."""
        if future.done():
            if request_id is not None:
                self.cancel(request_id)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(request_id)


def _post(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run `callback` on a handler's event loop, from the engine thread; a loop that has
    closed has nobody left to tell, and must not end the thread."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


async def within(awaitable: Awaitable[T], deadline: float | None, late: str) -> T:
    """The result of `awaitable`, or TimeoutError(late) once time.monotonic() passes
    `deadline` (None: no limit). Not asyncio.wait_for: before Python 3.12 it can swallow a
    cancellation that comes just as the result does, and a request would then decode on
    for a client that has left."""
    task = asyncio.ensure_future(awaitable)
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        task.cancel()  # nothing to cancel when it is done
    if not done:
        raise TimeoutError(late)
    return task.result()
