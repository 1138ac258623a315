"""`cvt serve`'s HTTP proxy middleware (`cvt.serve.http_limits.BoundedRequests`), driven as ASGI without
a server or Ray: a request goes on with its whole body, or is answered by the proxy (413, 408,
429, 431) without reaching the service; a client gone mid-body gets nothing. tests/test_serve.py
checks the same through the real service, with the protocol's bounds on the head."""

from __future__ import annotations

import asyncio
import json

from cvt.serve.http_limits import MAX_HEADERS, BoundedRequests, HttpLimits


def scope(headers: list[tuple[bytes, bytes]] | None = None, client: str = "127.0.0.1") -> dict:
    return {"type": "http", "method": "POST", "path": "/predict", "headers": headers or [],
            "client": (client, 40000)}


class Service:
    """The app behind the middleware: records each request's body as it receives it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.after_body: list[dict] = []

    async def __call__(self, scope: dict, receive, send) -> None:
        message = await receive()
        assert message["more_body"] is False
        self.bodies.append(message["body"])
        self.after_body.append(await receive())  # what follows: the client's disconnect
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run(middleware: BoundedRequests, request_scope: dict, messages: list[dict], pause_s: float = 0) -> list[dict]:
    """Send `messages` (a pause before each) as the client; what the middleware answers."""
    sent: list[dict] = []

    async def receive() -> dict:
        if not messages:
            await asyncio.sleep(3600)
        await asyncio.sleep(pause_s)
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(middleware(request_scope, receive, send))
    return sent


def status_and_error(sent: list[dict]) -> tuple[int, str]:
    return sent[0]["status"], json.loads(sent[1]["body"])["error"]


def chunk(body: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_in_pieces_reaches_the_service_whole_then_the_disconnect():
    service = Service()
    sent = run(BoundedRequests(service, HttpLimits()), scope(),
               [chunk(b"ab", True), chunk(b"cd", True), chunk(b"e", False), {"type": "http.disconnect"}])
    assert sent[0]["status"] == 200
    assert service.bodies == [b"abcde"] and service.after_body == [{"type": "http.disconnect"}]


def test_a_body_over_the_limit_gets_413_and_never_reaches_the_service():
    service = Service()
    middleware = BoundedRequests(service, HttpLimits(max_body_bytes=4))
    status, error = status_and_error(run(middleware, scope(), [chunk(b"abc", True), chunk(b"de", True)]))
    assert (status, service.bodies) == (413, []) and "limit of 4 bytes" in error
    declared = scope([(b"content-length", b"5")])  # refused before a byte is read
    status, error = status_and_error(run(middleware, declared, []))
    assert (status, service.bodies) == (413, []) and "(5 bytes)" in error


def test_a_body_slower_than_its_time_gets_408():
    service = Service()
    middleware = BoundedRequests(service, HttpLimits(body_timeout_s=0.2))
    status, error = status_and_error(run(middleware, scope(), [chunk(b"a", True)] * 10, pause_s=0.05))
    assert (status, service.bodies) == (408, []) and "body took over 0.2 s" in error


def test_a_client_gone_mid_body_gets_no_answer_and_frees_its_place():
    service = Service()
    middleware = BoundedRequests(service, HttpLimits(max_client_requests=1))
    assert run(middleware, scope(), [chunk(b"a", True), {"type": "http.disconnect"}]) == []
    assert service.bodies == [] and not middleware.in_flight


def test_one_address_over_its_requests_in_progress_gets_429_with_retry_after():
    service = Service()
    middleware = BoundedRequests(service, HttpLimits(max_client_requests=2))
    middleware.in_flight["10.0.0.1"] = 2  # two requests of this address under way
    sent = run(middleware, scope(client="10.0.0.1"), [chunk(b"a", False)])
    assert status_and_error(sent)[0] == 429 and (b"retry-after", b"1") in sent[0]["headers"]
    other = run(middleware, scope(client="10.0.0.2"), [chunk(b"a", False), {"type": "http.disconnect"}])
    assert other[0]["status"] == 200  # another address


def test_too_many_header_lines_get_431():
    service = Service()
    many = [(b"x-filler", b"1")] * (MAX_HEADERS + 1)
    status, error = status_and_error(run(BoundedRequests(service, HttpLimits()), scope(many), [chunk(b"a", False)]))
    assert (status, service.bodies) == (431, []) and "header lines" in error


def test_the_limits_reach_the_proxies_through_the_environment(monkeypatch):
    limits = HttpLimits(max_body_bytes=10, header_timeout_s=1.5, body_timeout_s=2.5, max_client_requests=3)
    for name, value in limits.to_env().items():
        monkeypatch.setenv(name, value)
    assert HttpLimits.from_env() == limits
    monkeypatch.delenv(*limits.to_env())
    assert HttpLimits.from_env() == HttpLimits()
