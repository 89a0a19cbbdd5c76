"""Requests run one at a time on one worker thread, behind a bounded queue.

The model's caches (KV, experts) serve one generation at a time, so generations are serialised on a single
thread; the event loop only moves text. Past `max_waiting` requests waiting behind the running one, a new
request is refused (429) instead of waiting without bound. A request whose client goes away is cancelled:
a running one stops before its next token, a waiting one is skipped when its turn comes.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from runtime.textgen import Completion

log = logging.getLogger(__name__)

_END = object()


class QueueFull(Exception):
    pass


class Ticket:
    """One admitted request: its completion runs on the worker and its pieces arrive here, in order."""

    def __init__(self, completion: Completion, arrived_at: float, loop: asyncio.AbstractEventLoop) -> None:
        self.completion = completion
        self.arrived_at = arrived_at  # time.perf_counter() when the request came in
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces as they are generated; leaving early (the client went away) cancels the generation."""
        try:
            while True:
                item = await self._events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.completion.cancel()  # a no-op once it has finished

    def deliver(self, item: Any) -> None:
        """From the worker thread: hand a piece, an exception or the end to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop has closed (a forced shutdown): nobody is listening any more
            pass


class GenerationQueue:
    def __init__(self, max_waiting: int, on_finished: Callable[[Ticket], None] | None = None) -> None:
        self.max_waiting = max_waiting
        self.on_finished = on_finished
        self.waiting = 0
        self.running = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # a daemon: Ctrl-C while a large model is still loading must not wait for the load to finish
        self._thread = threading.Thread(target=self._work, name="moeplan-generate", daemon=True)
        self._thread.start()

    def run_first(self, job: Callable[[], None]) -> None:
        """A job outside the bound, run before later requests (loading the model)."""
        self._jobs.put(job)

    def submit(self, completion: Completion, arrived_at: float) -> Ticket:
        """Admit a completion (QueueFull past the bound); call from the event loop."""
        with self._lock:
            if self.waiting >= self.max_waiting and self.running + self.waiting > 0:
                raise QueueFull(f"{self.waiting} requests are waiting behind the running one (the limit is "
                                f"{self.max_waiting}, --max-queue); retry later")
            self.waiting += 1
        ticket = Ticket(completion, arrived_at, asyncio.get_running_loop())
        self._jobs.put(lambda: self._run(ticket))
        return ticket

    def close(self) -> None:
        """Let the worker finish what it holds, then stop (called once the server no longer accepts requests)."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def _run(self, ticket: Ticket) -> None:
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            for piece in ticket.completion:  # ends at once for a request cancelled while it waited
                ticket.deliver(piece)
            ticket.deliver(_END)
        except Exception as exc:  # a bug in generation: log it here, report it to that client, keep serving
            log.exception("generation failed")
            ticket.deliver(exc)
        finally:
            with self._lock:
                self.running -= 1
            if self.on_finished is not None:
                self.on_finished(ticket)
