"""The outermost ASGI layer: request ids, the access log line, and the shutdown gate.

Every HTTP request gets an id: the client's ``X-Request-Id`` (sanitised by
:func:`policymix.logs.clean_request_id`) or a new one. It is set in the logging context for the
whole request (so every log line written while serving it carries it) and echoed in the
``x-request-id`` response header, on streams and on errors alike. When the request ends, one
``policymix.access`` line records method, path, status, latency and model (and, only with
``server.log_prompts``, the prompt).

The layer sits outside FastAPI's error handlers, so even a crash's 500 carries the header. It also
keeps each response in flight as a :class:`Flight`, which the shutdown drain can end cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable, MutableMapping

import anyio

from ..logs import REQUEST_ID, clean_request_id, new_request_id
from .errors import error_body
from .lifecycle import Lifecycle

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("policymix.access")

HEADER = b"x-request-id"
RETRY_AFTER_S = 2  # what a client refused during a drain is told; another replica (or this one restarted)
MAX_PEEK = 1 << 20  # request bodies up to this size are parsed for the access line's model
_LOCK_WAIT_S = 1.0  # a client that does not read (its send is blocked) gets its stream cut instead
_QUIET = ("/health", "/metrics")  # polled every few seconds: their access lines are debug-level


def shutdown_error() -> dict:
    return error_body("the server is shutting down; retry the request", "server_error", None,
                      "server_shutting_down")


class Flight:
    """One response in flight: passes the app's messages on, and can end the response itself.

    ``end`` (at the shutdown deadline) sends what a client can parse, a 503 before the headers or an
    SSE error event and ``[DONE]`` in a stream, then cancels the handler; a lock keeps it from
    interleaving with a message the app is sending.
    """

    def __init__(self, request_id: str, send: Send):
        self.request_id = request_id
        self._send = send
        self._lock = asyncio.Lock()
        self.scope = anyio.CancelScope()
        self.status: int | None = None
        self.started_at: float | None = None  # perf_counter at the response's first byte
        self.sse = False
        self.ended = False

    async def send(self, message: Message) -> None:
        async with self._lock:
            if self.ended:  # the drain ended this response; the handler's late messages go nowhere
                return
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, self.request_id.encode())]
                self.status = message["status"]
                self.started_at = time.perf_counter()
                ctype = dict(message["headers"]).get(b"content-type", b"")
                self.sse = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.ended = True
            await self._send(message)

    async def refuse(self) -> None:
        """Answer 503 at once: the server is draining."""
        await self._json(503, shutdown_error())
        self.ended = True

    async def end(self) -> None:
        """End the response now with a clean shutdown error, and cancel its handler."""
        try:
            await asyncio.wait_for(self._lock.acquire(), _LOCK_WAIT_S)
        except asyncio.TimeoutError:
            access_log.warning("a client that does not read its stream was cut off at shutdown",
                               extra={"request_id": self.request_id})
        else:
            try:
                if not self.ended:
                    await self._end_locked()
            except Exception:  # noqa: BLE001 - the client is gone; nothing more to tell it
                pass
            finally:
                self._lock.release()
        self.ended = True
        self.scope.cancel()

    async def _end_locked(self) -> None:
        if self.status is None:
            await self._json(503, shutdown_error())
        elif self.sse:
            event = json.dumps(shutdown_error(), separators=(",", ":"))
            await self._send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                              "more_body": False})
        else:  # a JSON body is sent in one message, so this is rare: all the client can get is the cut
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _json(self, status: int, body: dict) -> None:
        self.status = status
        self.started_at = time.perf_counter()
        await self._send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode()),
            (b"connection", b"close"), (HEADER, self.request_id.encode())]})
        await self._send({"type": "http.response.body", "body": json.dumps(body).encode(), "more_body": False})


class _BodyPeek:
    """Keeps a copy of the request body (up to MAX_PEEK bytes) as the app reads it."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self.chunks: list[bytes] = []
        self.size = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and self.size <= MAX_PEEK:
            body = message.get("body", b"")
            self.size += len(body)
            self.chunks.append(body)
        return message

    def fields(self, log_prompts: bool) -> dict[str, Any]:
        """The access line's fields from a JSON request body: model, stream (and the prompt if allowed)."""
        if not self.chunks or self.size > MAX_PEEK:
            return {}
        try:
            body = json.loads(b"".join(self.chunks))
        except ValueError:
            return {}
        if not isinstance(body, dict):
            return {}
        out = {k: body[k] for k in ("model", "stream") if isinstance(body.get(k), (str, bool))}
        if log_prompts:
            out.update({k: body[k] for k in ("prompt", "messages") if k in body})
        return out


class RequestContext:
    """ASGI middleware: request id in, header out, one access line per request, refusals while draining."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, log_prompts: bool = False):
        self.app = app
        self.lifecycle = lifecycle
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope.get("headers", []) if k == HEADER), b"")
        request_id = clean_request_id(raw.decode("latin-1")) or new_request_id()
        token = REQUEST_ID.set(request_id)
        flight = Flight(request_id, send)
        body = _BodyPeek(receive)
        t0 = time.perf_counter()
        try:
            if self.lifecycle.refuses(scope["path"]):
                await flight.refuse()
                return
            with self.lifecycle.track(flight), flight.scope:
                await self.app(scope, body.receive, flight.send)
        finally:
            self._log(scope, flight, body, t0)
            REQUEST_ID.reset(token)

    def _log(self, scope: Scope, flight: Flight, body: _BodyPeek, t0: float) -> None:
        now = time.perf_counter()
        status = flight.status or 500  # an exception before any response: uvicorn answers 500
        fields: dict[str, Any] = {
            "method": scope["method"], "path": scope["path"], "status": status,
            "latency_ms": round((now - t0) * 1000, 1),
        }
        if flight.started_at is not None and flight.sse:
            fields["ttfb_ms"] = round((flight.started_at - t0) * 1000, 1)
        client = scope.get("client")
        if client:
            fields["client"] = client[0]
        if scope["method"] == "POST":
            fields.update(body.fields(self.log_prompts))
        if flight.scope.cancel_called:
            fields["ended_by"] = "shutdown"
        level = logging.DEBUG if scope["path"] in _QUIET and status < 500 else (
            logging.WARNING if status >= 500 else logging.INFO)
        access_log.log(level, "%s %s %d", scope["method"], scope["path"], status, extra=fields)
