"""Bounded request heads: the real uvicorn server (``service.api.server``) on a loopback port answers
431 for a header line, a header count or a whole head over its limits, and stops reading a huge
head early instead of holding it."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from service.api.header_limits import HeaderBound, HeaderLimits
from service.api.server import Server
from service.app import create_app
from service.config import ConfigError, Settings
from tests.api.models import tiny_model
from tests.api.server import free_port

LIMITS = {"max_header_bytes": 8192, "max_header_line_bytes": 2048, "max_headers": 20}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    settings = Settings(port=free_port(), shutdown_grace_s=0, **LIMITS)
    server = Server(create_app(settings, models=[tiny_model()]), settings)
    thread = threading.Thread(target=server.run, daemon=True)  # no signal handlers off the main thread
    thread.start()
    while not server.started:
        thread.join(0.05)
        assert thread.is_alive(), "the server did not start"
    yield settings.port
    server.should_exit = True
    thread.join(10)


def _exchange(port: int, head: bytes, chunk: int = 4096) -> tuple[bytes, int]:
    """Send ``head`` in pieces, stopping once the server answers; (what it answered, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            while sent < len(head):
                if select.select([s], [], [], 0.005)[0]:
                    break  # answered before the head was complete
                s.sendall(head[sent:sent + chunk])
                sent += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            reply += data
            if b"\r\n\r\n" in reply and reply.endswith(b"}"):
                break
    return reply, min(sent, len(head))


def _request(path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status_and_body(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_ordinary_headers_pass(port):
    reply, _ = _exchange(port, _request("/healthz", [(f"x-h{i}", "v" * 100) for i in range(15)]))
    assert _status_and_body(reply) == (200, {"status": "ok"})


@pytest.mark.parametrize(("headers", "message"), [
    ([("x-big", "v" * 3000)], "request header 'x-big' is over the limit of 2048 bytes"),
    ([(f"x-h{i}", "v") for i in range(21)], "more than 20 request headers"),
    ([(f"x-h{i}", "v" * 1500) for i in range(6)], "over the limit of 8192 bytes in all"),
])
def test_heads_over_a_limit_get_431(port, headers, message):
    reply, _ = _exchange(port, _request("/predict", headers))
    status, body = _status_and_body(reply)
    assert status == 431, reply[:300]
    assert body["error"]["code"] == "headers_too_large"
    assert message in body["error"]["message"]
    assert b"connection: close" in reply.lower()


def test_open_inference_routes_get_their_dialect(port):
    reply, _ = _exchange(port, _request("/v2/health/ready", [("x-big", "v" * 3000)]))
    status, body = _status_and_body(reply)
    assert status == 431 and "over the limit of 2048 bytes" in body["error"]


def test_a_huge_header_is_refused_before_it_is_all_sent(port):
    """One 4 MB header line: refused once the head passes its limit, not read to the end."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * (4 * 1024 * 1024)
    reply, sent = _exchange(port, head, chunk=16384)
    assert _status_and_body(reply)[0] == 431
    assert sent < 1024 * 1024, f"the server read {sent} bytes of an over-limit head"


def test_a_huge_url_is_bounded_too(port):
    reply, _ = _exchange(port, f"GET /healthz?{'q' * 20000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _status_and_body(reply)[0] == 431


def test_the_second_request_on_a_connection_is_bounded(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(_request("/healthz", []))
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(_request("/healthz", [("x-big", "v" * 3000)]))
        second = s.recv(65536)
    assert second.startswith(b"HTTP/1.1 431")


def test_header_limits_are_settings():
    with pytest.raises(ConfigError, match="`max_headers` must be at least 1, got 0"):
        Settings(max_headers=0)
    with pytest.raises(ConfigError, match="`max_header_bytes` must be at least 1"):
        Settings(max_header_bytes=-5)


def test_the_asgi_bound_checks_parsed_headers():
    """``HeaderBound`` is what a front whose parser camserve does not own (Ray's proxy) applies."""
    import asyncio

    sent: list[dict] = []
    called: list[bool] = []

    async def app(scope, receive, send):
        called.append(True)

    async def send(message):
        sent.append(message)

    bound = HeaderBound(app, HeaderLimits(max_bytes=100, max_line_bytes=50, max_count=2))
    scope = {"type": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b""}
    asyncio.run(bound({**scope, "headers": [(b"a", b"1"), (b"b", b"2")]}, None, send))
    assert called == [True] and not sent
    asyncio.run(bound({**scope, "headers": [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]}, None, send))
    assert sent[0]["status"] == 431 and b"more than 2 request headers" in sent[1]["body"]
    assert called == [True]
