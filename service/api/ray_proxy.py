"""What camserve adds to Ray Serve's HTTP proxy, the HTTP front of ``camserve serve --ray``.

Serve runs :func:`proxy_middlewares` in its proxy process when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
names it (``service.rayserve.proxy_environment`` sets that, and the limits, before Ray starts). It

- bounds request heads as the plain server does (``service.api.header_limits``): the proxy's uvicorn
  gets the bounded httptools protocol, and parsed headers are checked again before routing;
- answers 503 with ``Retry-After`` (``not_ready``, in the route's dialect) when no replica could:
  the replica taking the request died (Serve answers a bare 500, or nothing), no replica is running,
  or the application is being deleted (Serve answers 404 for a route it no longer has). Responses
  from a replica carry :data:`REPLICA_HEADER` and pass untouched, a model's own 500 included.

Ray is not imported here: this is plain ASGI, run inside Serve's proxy.
"""

from __future__ import annotations

import logging
import os

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import errors as api_errors
from service.api.header_limits import BoundedHttpTools, HeaderBound, HeaderLimits, bounded_protocol
from service.errors import NotReady

log = logging.getLogger("camserve.ray")

# Which replica answered: set by every replica on every response; the proxy's own answers lack it.
REPLICA_HEADER = "x-camserve-replica"
CALLBACK = "service.api.ray_proxy:proxy_middlewares"
RETRY_AFTER_S = 1

# Set by proxy_middlewares: the protocol class uvicorn imports by name (uvicorn.config.HTTP_PROTOCOLS).
ProxyHttpTools: type[BoundedHttpTools] = BoundedHttpTools


def limits_from_env(env: os._Environ[str] | dict[str, str] | None = None) -> HeaderLimits:
    """The head limits from ``SERVICE_MAX_HEADER_BYTES``, ``..._LINE_BYTES``, ``SERVICE_MAX_HEADERS``."""
    env = os.environ if env is None else env
    d = HeaderLimits()

    def read(name: str, default: int) -> int:
        value = env.get(name, "")
        return int(value) if value.strip().isdigit() and int(value) > 0 else default

    return HeaderLimits(max_bytes=read("SERVICE_MAX_HEADER_BYTES", d.max_bytes),
                        max_line_bytes=read("SERVICE_MAX_HEADER_LINE_BYTES", d.max_line_bytes),
                        max_count=read("SERVICE_MAX_HEADERS", d.max_count))


class ReplicaUnavailable:
    """A 503 with ``Retry-After`` in place of the proxy's own 404/5xx answers, or of no answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.header = REPLICA_HEADER.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "/")
        if scope["type"] != "http" or path.startswith("/-/"):  # Serve's own health and routes
            await self.app(scope, receive, send)
            return
        started = replaced = False

        async def guarded(message: Message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                ours = any(k.lower() == self.header for k, _ in message.get("headers", []))
                status = message["status"]
                if not ours and (status == 404 or status >= 500):
                    replaced = True
                    return
            elif message["type"] == "http.response.body" and replaced:
                if not message.get("more_body", False):
                    await self._unavailable(path, send)
                return
            await send(message)

        try:
            await self.app(scope, receive, guarded)
        except Exception:  # Serve's proxy answers a dead replica by raising or returning nothing
            log.warning("no replica answered %s", path, exc_info=True)
            if not started:
                await self._unavailable(path, send)
                return
            raise
        if not started:
            await self._unavailable(path, send)

    @staticmethod
    async def _unavailable(path: str, send: Send) -> None:
        exc = NotReady("no camserve replica could answer: one is stopping, starting or being replaced; "
                       "retry after the Retry-After seconds")
        status, headers, body = api_errors.render(path, exc)
        headers = {**headers, "Retry-After": str(RETRY_AFTER_S)}
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middlewares above, and the bounded parser for the proxy's uvicorn."""
    global ProxyHttpTools
    limits = limits_from_env()
    try:
        import httptools  # noqa: F401  (uvicorn's "auto" picks it when present)
        import uvicorn.config

        # Serve builds the proxy's uvicorn.Config itself, with the default parser; this callback is the
        # one hook Serve runs in the proxy process before that server starts.
        ProxyHttpTools = bounded_protocol(limits)
        uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:ProxyHttpTools"
    except ImportError:  # uvicorn falls back to h11, which bounds an incomplete head at 16 KiB itself
        pass
    # Serve wraps in list order, so the last is outermost: heads are checked before anything else.
    return [Middleware(ReplicaUnavailable), Middleware(HeaderBound, limits=limits)]
