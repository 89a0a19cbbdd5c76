"""The Starlette app: OpenAI's `/v1/models`, `/v1/completions` and `/v1/chat/completions`, `/health`,
`/metrics`, and a one-file chat page at `/`.

Every `/v1` route checks the API key (when one is set) and answers 503 until the model has loaded; every
refusal is an `ApiError` in OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.errors import ContextLengthError, UserError
from runtime.textgen import Completion, TextGenerator

from .errors import ApiError
from .metrics import CONTENT_TYPE, ServerMetrics
from .queue import GenerationQueue, QueueFull, Ticket
from .responses import DONE, ResponseShape, event
from .schemas import ChatRequest, CompletionRequest, parse

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions; chat defaults to the context
MAX_BODY_BYTES = 4 * 1024 * 1024  # far above any prompt a context holds; stops a client from filling memory
CHAT_PAGE = Path(__file__).with_name("chat.html")


@dataclass
class ServerState:
    """What the routes share: set up before the port opens; `generator` appears once loading has finished."""
    model_name: str
    queue: GenerationQueue
    metrics: ServerMetrics
    api_key: str | None = None
    generator: TextGenerator | None = None
    loaded_at: int = 0

    def ready(self) -> TextGenerator:
        if self.generator is None:
            raise ApiError(503, f"the model {self.model_name} is still loading; retry in a moment",
                           code="model_loading")
        return self.generator


def build_app(state: ServerState) -> Starlette:
    def guarded(handler: Callable[[Request, TextGenerator], Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                _check_key(request, state.api_key)
                return await handler(request, state.ready())
            except ApiError as exc:
                return exc.response()
        return endpoint

    async def models(request: Request, generator: TextGenerator) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    async def model(request: Request, generator: TextGenerator) -> Response:
        _check_model(request.path_params["model"], state)
        return JSONResponse(_model_card(state))

    async def completions(request: Request, generator: TextGenerator) -> Response:
        arrived = time.perf_counter()
        req = parse(CompletionRequest, await _read_body(request))
        _check_model(req.model, state)
        prompt = req.single_prompt()
        max_tokens = req.max_tokens or DEFAULT_COMPLETION_TOKENS
        completion = _create(lambda: generator.complete(prompt, max_tokens, req.temperature, req.top_p,
                                                        _seed(req.seed), req.stop_strings()), "prompt")
        return await _respond(request, state, completion, arrived, ResponseShape(chat=False, model=state.model_name),
                              req.stream, bool(req.stream_options and req.stream_options.include_usage))

    async def chat(request: Request, generator: TextGenerator) -> Response:
        arrived = time.perf_counter()
        req = parse(ChatRequest, await _read_body(request))
        _check_model(req.model, state)
        completion = _create(lambda: generator.chat(req.message_dicts(), req.token_limit(), req.temperature,
                                                    req.top_p, _seed(req.seed), req.stop_strings()), "messages")
        return await _respond(request, state, completion, arrived, ResponseShape(chat=True, model=state.model_name),
                              req.stream, bool(req.stream_options and req.stream_options.include_usage))

    async def health(request: Request) -> Response:
        body = {"status": "ok" if state.generator is not None else "loading", "model": state.model_name,
                "waiting": state.queue.waiting, "running": state.queue.running}
        return JSONResponse(body, status_code=200 if state.generator is not None else 503)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE)

    async def page(request: Request) -> Response:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}").response()

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        reason = "no API key given (Authorization: Bearer KEY)" if not given else "incorrect API key"
        raise ApiError(401, reason, code="invalid_api_key")


def _check_model(name: str, state: ServerState) -> None:
    if name != state.model_name:
        raise ApiError(404, f"model: {name!r} does not exist; this server serves {state.model_name!r}", "model",
                       "model_not_found")


def _model_card(state: ServerState) -> dict[str, object]:
    return {"id": state.model_name, "object": "model", "created": state.loaded_at, "owned_by": "moeplan"}


def _seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbits(63)  # no seed: a fresh sample each time, as OpenAI


def _create(make: Callable[[], Completion], param: str) -> Completion:
    """The completion, or the 400 that its prompt deserves (too long for the context, a bad token id, a chat
    template that refuses the messages)."""
    try:
        return make()
    except ContextLengthError as exc:
        raise ApiError(400, f"{param}: {exc}", param, "context_length_exceeded") from None
    except UserError as exc:
        raise ApiError(400, str(exc), param) from None
    except TemplateError as exc:
        raise ApiError(400, f"messages: the chat template refused them: {exc}", "messages") from None


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _respond(request: Request, state: ServerState, completion: Completion, arrived: float,
                   shape: ResponseShape, stream: bool, include_usage: bool) -> Response:
    try:
        ticket = state.queue.submit(completion, arrived)
    except QueueFull as exc:
        raise ApiError(429, str(exc), code="queue_full") from None
    if stream:
        return StreamingResponse(_events(ticket, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = await _collect(request, ticket)
    except Exception as exc:
        raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}") from None
    return JSONResponse(shape.whole(completion, text))


async def _events(ticket: Ticket, shape: ResponseShape, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of one streamed response. If the client goes away, Starlette cancels this
    generator at its next await, and leaving `ticket.pieces()` cancels the generation."""
    if shape.chat:
        yield shape.chunk(role=True)
    try:
        async for piece in ticket.pieces():
            yield shape.chunk(piece)
    except Exception as exc:  # the status line went out already: report the failure inside the stream
        yield event(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}").body())
        yield DONE
        return
    yield shape.chunk(finish=ticket.completion)
    if include_usage:
        yield shape.usage_chunk(ticket.completion)
    yield DONE


async def _collect(request: Request, ticket: Ticket) -> str:
    """The whole text of a non-streamed response, cancelling the generation if the client disconnects first."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        ticket.completion.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return "".join([piece async for piece in ticket.pieces()])
    finally:
        watcher.cancel()
