"""What camserve adds to Ray Serve's proxy, without a cluster: the proxy's own 404/5xx (or no answer)
become a 503 with Retry-After, replicas' answers pass untouched, head limits come from the environment."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvicorn.config
from starlette.middleware import Middleware

from service.api.header_limits import HeaderBound, HeaderLimits
from service.api.ray_proxy import REPLICA_HEADER, ReplicaUnavailable, limits_from_env, proxy_middlewares


def _through(app, path: str = "/predict") -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    asyncio.run(ReplicaUnavailable(app)({"type": "http", "path": path, "headers": []}, None, send))
    return sent


def _answer(status: int, headers=(), body: bytes = b"x"):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})
    return app


async def _silent(scope, receive, send):
    """Serve's proxy when the replica holding the request died: no answer at all."""


async def _raises(scope, receive, send):
    raise RuntimeError("actor died")


@pytest.mark.parametrize("app", [_silent, _raises, _answer(500), _answer(404), _answer(503)])
def test_the_proxys_own_failures_become_a_503_to_retry(app):
    start, body = _through(app)
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"1"
    error = json.loads(body["body"])["error"]
    assert error["code"] == "not_ready" and "no camserve replica could answer" in error["message"]
    assert headers[b"content-length"] == str(len(body["body"])).encode()


def test_the_open_inference_routes_get_their_dialect():
    _, body = _through(_silent, "/v2/models/shapes/infer")
    assert set(json.loads(body["body"])) == {"error"}
    assert isinstance(json.loads(body["body"])["error"], str)


@pytest.mark.parametrize("status", [200, 404, 500, 503])
def test_replica_answers_pass_untouched(status):
    start, body = _through(_answer(status, [(REPLICA_HEADER.encode(), b"r1")], b"model says no"))
    assert start["status"] == status and body["body"] == b"model says no"


def test_serves_own_health_route_passes_untouched():
    start, _ = _through(_answer(503, body=b"This node is being drained."), "/-/healthz")
    assert start["status"] == 503 and b"retry-after" not in dict(start["headers"])


def test_limits_come_from_the_environment():
    assert limits_from_env({}) == HeaderLimits()
    assert limits_from_env({"SERVICE_MAX_HEADER_BYTES": "9000", "SERVICE_MAX_HEADERS": "12",
                            "SERVICE_MAX_HEADER_LINE_BYTES": "junk"}) == HeaderLimits(9000, 16 * 1024, 12)


def test_the_callback_bounds_the_proxys_parser(monkeypatch):
    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", uvicorn.config.HTTP_PROTOCOLS["auto"])
    monkeypatch.setenv("SERVICE_MAX_HEADERS", "7")
    middlewares = proxy_middlewares()
    assert all(isinstance(m, Middleware) for m in middlewares)
    assert middlewares[-1].cls is HeaderBound  # outermost: Serve wraps in list order
    protocol = uvicorn.config.HTTP_PROTOCOLS["auto"]
    assert protocol == "service.api.ray_proxy:ProxyHttpTools"
    from uvicorn.importer import import_from_string

    assert import_from_string(protocol).limits == HeaderLimits(max_count=7)
