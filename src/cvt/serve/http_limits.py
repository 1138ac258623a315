"""What one client can hold of `cvt serve`'s HTTP proxy, bounded where Ray Serve has no setting.

Ray Serve's proxy is uvicorn, started by Ray with its HTTP options: they bound idle keep-alive
time (`keep_alive_timeout_s`, which `cvt.serve` sets) and nothing else a client sends. The rest is
here, installed in each proxy as it starts through Ray Serve's proxy callback
(`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=cvt.serve.http_limits:install`, with the limits in
`CVT_SERVE_HTTP_LIMITS`; `cvt serve` sets both for its private Ray instance):

- `BoundedHttpProtocol`, uvicorn's httptools protocol with the request's head bounded: 431 as
  soon as it passes MAX_HEAD_BYTES (so the proxy never holds more), 408 when it is not complete
  `header_timeout_s` after the connection opened or the request began;
- `BoundedRequests`, an ASGI middleware: 431 over MAX_HEADERS header lines; 413 for a body over
  the limit (from its Content-Length, or while it arrives); 408 when the body is not complete
  `body_timeout_s` after the head; 429 with Retry-After over `max_client_requests` requests in
  flight from one address. It reads the whole body before the request goes on to a replica, so
  a slow or stalled client holds a proxy connection for a bounded time, never a replica's slot.

This module imports no torch: every proxy imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import install_hint

try:
    import uvicorn.config
    from starlette.middleware import Middleware
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError as err:  # absolute imports: the packages, never this module
    raise ImportError(f"cvt.serve.http_limits needs Ray Serve's HTTP stack: {install_hint('serve')}") from err

ENV = "CVT_SERVE_HTTP_LIMITS"  # the limits, as JSON, for the proxies
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; uvicorn's h11 parser allows 16 KiB, nginx 32 KiB
MAX_HEADERS = 100  # header lines
RETRY_AFTER_S = 1
LINGER_S = 2.0  # how long a refused connection is read (and the bytes dropped) before it is closed

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """What one request may take of a proxy: its body's size, the time to send its head and its
    body, and how many requests one address may have in flight."""

    max_body_bytes: int = 32_000_000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_client_requests: int = 32

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls) -> HttpLimits:
        return cls(**json.loads(os.environ[ENV])) if os.environ.get(ENV) else cls()


def install() -> list[Middleware]:
    """Ray Serve's proxy callback: run in each HTTP proxy before its server starts. Ray builds
    uvicorn's settings itself, with the default protocol ("auto"), and offers no setting for it:
    "auto" is made to name `BoundedHttpProtocol` here, in the proxy's process only."""
    limits = HttpLimits.from_env()
    BoundedHttpProtocol.limits = limits
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{BoundedHttpProtocol.__name__}"
    return [Middleware(BoundedRequests, limits=limits)]


def error_headers(body: bytes, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    """The headers of cvt's JSON error `body`, whose connection then closes (its request's body
    may be unread)."""
    return [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close"),
            *extra]


def refusal(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 answer, for a request refused before it is parsed: cvt's JSON error."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in error_headers(body))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, the request's head bounded in bytes and in time (uvicorn
    keeps a head of any size, for as long as the client takes to send it)."""

    limits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # a connection that sends nothing is held no longer than a slow head

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return  # dropped
        super().data_received(data)
        if self._in_head:  # counted after parsing: a chunk may end the head and carry the body
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"the request's headers are over this service's limit of {MAX_HEAD_BYTES:,} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        if self._head_timer is None:
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self._start_head_timer()  # a pipelined head waits for the answer before it: wait on
            return
        self._head_timer = None
        self._refuse(408, f"the request's headers took over {self.limits.header_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer and close, reading on for a while: closed with unread bytes, the connection
        would be reset, and the client could lose the answer before it reads it."""
        self._stop_head_timer()
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self.transport.write(refusal(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


class BoundedRequests:
    """The ASGI middleware of the proxy: header lines, the body's size and time, and requests in
    flight per client address bounded; the body read whole before the request goes on."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limits: HttpLimits) -> None:
        self.app, self.limits = app, limits
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        if self.in_flight[client] >= self.limits.max_client_requests:
            await answer(send, 429, f"this address has {self.limits.max_client_requests} requests in "
                         "progress, this service's limit: retry when one ends", ("retry-after", str(RETRY_AFTER_S)))
            return
        self.in_flight[client] += 1
        try:
            await self._forward(scope, receive, send)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(scope["headers"]) > MAX_HEADERS:
            await answer(send, 431, f"the request has {len(scope['headers'])} header lines, over this "
                         f"service's limit of {MAX_HEADERS}")
            return
        try:
            body = await asyncio.wait_for(read_body(scope, receive, self.limits.max_body_bytes),
                                          self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            await answer(send, 408, f"the request's body took over {self.limits.body_timeout_s:g} s")
            return
        except BodyOverLimit as err:
            await answer(send, 413, str(err))
            return
        except ClientGone:
            return  # nobody to answer
        await self.app(scope, replay(body, receive), send)


class BodyOverLimit(Exception):
    """A body over the limit: 413."""


class ClientGone(Exception):
    """The client closed its connection before its body ended."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused as soon as it is known to exceed `limit` bytes: from its
    Content-Length before reading (so `Expect: 100-continue` gets its answer without the body),
    or while it arrives."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise BodyOverLimit(f"the body ({int(declared):,} bytes) is over this service's limit of {limit:,} bytes")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyOverLimit(f"the body is over this service's limit of {limit:,} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read, then what the client sends next (its disconnect)."""
    given = False

    async def receive_again() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


async def answer(send: Send, status: int, message: str, *extra: tuple[str, str]) -> None:
    """cvt's JSON error as an ASGI answer."""
    body = json.dumps({"error": message}).encode()
    headers = [(k.encode(), v.encode()) for k, v in error_headers(body, *extra)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
