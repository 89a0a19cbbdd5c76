"""Open the port, load the model behind it, serve until Ctrl-C, drain, and stop.

The port opens first and answers 503 while the model loads (minutes, for Mixtral), so clients and health
checks see a loading server rather than a refused connection. A load that fails (a user error in the plan
or checkpoint) stops the server and is reported as the command's one-line error.
"""
from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from runtime.plan import Plan
from runtime.textgen import TextGenerator, model_name

from .app import ServerState, build_app
from .binding import address
from .metrics import ServerMetrics
from .queue import GenerationQueue

log = logging.getLogger("moeplan.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the signal that stopped it is not raised again once it has drained: a
    Ctrl-C that let every running and queued request finish is a clean exit (0). A second Ctrl-C forces it.
    `on_listening` runs once the port accepts connections (the model starts loading then)."""

    on_listening: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_listening is not None:
            self.on_listening()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(plan: Plan, model_dir: str | None, sock: socket.socket, api_key: str | None, max_queue: int,
          context_tokens: int | None, huge_pages: bool | None) -> None:
    """Serve on `sock` (bound by binding.bind) until Ctrl-C; a load that fails raises its error here."""
    name = model_name(plan, model_dir)
    metrics = ServerMetrics()
    queue = GenerationQueue(max_queue)
    state = ServerState(name, queue, metrics, api_key)
    queue.on_finished = lambda ticket: metrics.finished(ticket.completion, ticket.arrived_at)
    metrics.watch(lambda: state.generator.session.engine.stats() if state.generator else {"cache": {"per_layer": []}},
                  lambda: queue.waiting, lambda: queue.running)
    server = _DrainingServer(uvicorn.Config(build_app(state), log_config=None, access_log=False))
    failure: list[BaseException] = []

    def load() -> None:
        start = time.perf_counter()
        try:
            generator = TextGenerator.load(plan, model_dir, context_tokens, huge_pages)
        except BaseException as exc:  # reported by the main thread once the server has stopped
            failure.append(exc)
            server.should_exit = True
            return
        if not generator.has_chat_template:
            log.warning("the tokenizer has no chat template: chat requests use the plain fallback format "
                        "(\"User: ...\" turns ending in \"Assistant:\", see README, moeplan serve)")
        state.loaded_at = int(time.time())
        state.generator = generator
        log.info("loaded %s in %.1f s (context %d tokens); serving http://%s/v1", name,
                 time.perf_counter() - start, generator.context_tokens, address(sock))

    def listening() -> None:
        log.info("listening on http://%s (503 until %s has loaded; Ctrl-C drains and stops)", address(sock), name)
        queue.run_first(load)

    server.on_listening = listening
    try:
        server.run(sockets=[sock])
    finally:
        queue.close()
        sock.close()
    if failure:
        raise failure[0]
    log.info("stopped")
