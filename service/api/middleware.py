"""Pure ASGI middleware: request ids and the last-resort 500, body size limit, API keys.

Pure ASGI rather than ``BaseHTTPMiddleware`` so the body is never buffered here and a body over the
limit is refused from its ``Content-Length`` before it is read.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import errors as api_errors
from service.errors import CamserveError, PayloadTooLarge, Unauthorized

log = logging.getLogger("camserve.access")

_SAFE_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")


def note_request(scope: Scope, **fields: object) -> None:
    """Add fields to this request's access-log line and metrics labels (``model``, ``images``)."""
    scope.setdefault("state", {}).setdefault("log_extra", {}).update(fields)


def request_notes(scope: Scope) -> dict[str, object]:
    extra: dict[str, object] = scope.get("state", {}).get("log_extra", {})
    return extra


def _error_messages(scope: Scope, exc: CamserveError, close: bool = False) -> tuple[Message, Message]:
    status, headers, body = api_errors.render(scope["path"], exc)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *((k.lower().encode(), v.encode()) for k, v in headers.items())]
    if close:
        raw.append((b"connection", b"close"))
    return ({"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": body})


class RequestContext:
    """Gives every request an id (echoing a safe ``X-Request-ID``), sets it on every response,
    logs one access line, and turns an unhandled exception into a JSON 500 without a trace."""

    def __init__(self, app: ASGIApp, on_response: Callable[[Scope, int, float], None] | None = None) -> None:
        self.app = app
        self.on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if _SAFE_ID.match(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = time.perf_counter()
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid})
            if not response_started:
                body = api_errors.body(scope["path"], "internal_error",
                                       f"internal server error; see the server log for request {rid}")
                await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            if self.on_response is not None:
                self.on_response(scope, status, time.perf_counter() - started)
            log.info("%s %s %d %.1fms", scope["method"], scope["path"], status,
                     (time.perf_counter() - started) * 1000,
                     extra={"request_id": rid, "status": status, "path": scope["path"],
                            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                            **request_notes(scope)})


class HttpEdges:
    """``HEAD`` is answered as ``GET`` without the body (load balancers probe with it), and a trailing
    slash is dropped (``POST /predict/`` is ``/predict``) instead of FastAPI's bodyless 307, which
    clients do not follow for a POST and curl shows as nothing at all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "/")
        head = scope.get("method") == "HEAD"
        slash = len(path) > 1 and path.endswith("/")
        if scope["type"] != "http" or not (head or slash):
            await self.app(scope, receive, send)
            return
        # A copy: the server keeps reading its own scope, and must still see HEAD to send no body.
        inner = dict(scope)
        if slash:
            inner["path"] = path.rstrip("/") or "/"
            inner["raw_path"] = inner["path"].encode()
        if head:
            inner["method"] = "GET"

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(inner, receive, without_body if head else send)
        finally:
            if "route" in inner:  # for the metrics label, read from the outer scope
                scope["route"] = inner["route"]


class BodyLimit:
    """413 for a body over ``max_bytes``: from ``Content-Length`` before reading, else while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = PayloadTooLarge(f"request body is over the limit of {self.max_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            for m in _error_messages(scope, too_large, close=True):
                await send(m)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            for m in _error_messages(scope, too_large, close=True):
                await send(m)


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes the limit; turned into a 413 above."""


def is_open(path: str, open_paths: Iterable[str]) -> bool:
    """``path`` is one of ``open_paths`` or below one (``/v2/health`` opens ``/v2/health/live``; ``/``
    opens only itself)."""
    if "/../" in f"{path}/":  # routes match literally, so this reaches none; still, no way around a key
        return False
    return any(path == p or (p.rstrip("/") and path.startswith(p.rstrip("/") + "/")) for p in open_paths)


class ApiKeyAuth:
    """Requires ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` except on ``open_paths`` and
    below them.

    Every configured key is compared with ``hmac.compare_digest`` so the time taken does not reveal
    which key, or how much of one, matched.
    """

    def __init__(self, app: ASGIApp, keys: Iterable[str], open_paths: Iterable[str]) -> None:
        self.app = app
        # Settings refuse empty keys; this drops them again so that no list, however it was built, can
        # make a request without a key compare equal to one.
        self.keys = [k.strip().encode() for k in keys if k.strip()]
        self.open_paths = tuple(open_paths)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not given:
            return False
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"], self.open_paths) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        refused = Unauthorized("a valid API key is required: send `Authorization: Bearer <key>` or "
                               "`X-API-Key: <key>`")
        for m in _error_messages(scope, refused):
            await send(m)
