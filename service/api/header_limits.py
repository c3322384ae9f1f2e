"""Bounds on request headers: 431 beyond them, checked while the head is still arriving.

uvicorn's httptools parser has no header limit of its own (h11's ``h11_max_incomplete_event_size``
does not apply to it), and httptools keeps appending to a header it has not finished, so one
unauthenticated connection could make the server hold a 100 MB header. :class:`BoundedHttpTools`
counts the head's bytes as they arrive and refuses with 431 as soon as a limit is passed, before
the request reaches routing or the application; :class:`HeaderBound` checks parsed headers in ASGI,
for a front whose parser camserve does not own (Ray Serve's proxy; it also gets the protocol when
its uvicorn picks the parser, see ``service.rayproxy``).

The defaults sit between what common fronts allow: Envoy 60 KiB and 100 headers, nginx 8 KiB a
line and 32 KiB in all, Node 16 KiB in all; a camserve request needs well under 1 KiB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.api import errors as api_errors
from service.errors import HeadersTooLarge

log = logging.getLogger("camserve.access")


@dataclass(frozen=True)
class HeaderLimits:
    """``max_bytes``: the request line and every header line together; ``max_line_bytes``: one
    header's name and value; ``max_count``: how many headers."""

    max_bytes: int = 64 * 1024
    max_line_bytes: int = 16 * 1024
    max_count: int = 100

    def check_one(self, name: bytes, value: bytes, count: int, total: int) -> str | None:
        """The problem with header number ``count`` (from 1), ``total`` bytes of head so far; or ``None``."""
        if count > self.max_count:
            return f"more than {self.max_count} request headers"
        if len(name) + len(value) > self.max_line_bytes:
            shown = name[:40].decode("latin-1")
            return f"request header {shown!r} is over the limit of {self.max_line_bytes} bytes"
        if total > self.max_bytes:
            return f"request headers are over the limit of {self.max_bytes} bytes in all"
        return None

    def check(self, headers: Iterable[tuple[bytes, bytes]], head: int = 0) -> str | None:
        """The first problem with already parsed ``headers`` (after ``head`` bytes of request line)."""
        total = head
        for count, (name, value) in enumerate(headers, 1):
            total += len(name) + len(value) + 4  # ": " and CRLF
            problem = self.check_one(name, value, count, total)
            if problem:
                return problem
        return None


def refusal(path: str, problem: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and JSON body of the 431 for ``path``, in that route's error dialect."""
    status, headers, body = api_errors.render(path, HeadersTooLarge(problem))
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in headers.items())]
    return status, raw, body


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the parser wraps it, ``send_400_response`` sends 431."""


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`HeaderLimits`. Use :func:`bounded_protocol` to set them."""

    limits: ClassVar[HeaderLimits] = HeaderLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request head
        self._head_bytes = 0
        self._count = self._total = 0
        self._problem: str | None = None
        self._began = self._completed = False

    def data_received(self, data: bytes) -> None:
        if self._problem is not None:
            return
        self._began = self._completed = False
        super().data_received(data)
        # Still inside a head after this chunk: httptools holds it all, so count it. A chunk that also
        # ended the previous (pipelined) request is not counted; the next one is.
        if self._problem is None and self._in_head and not (self._began and self._completed):
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_bytes:
                self._refuse(f"request headers are over the limit of {self.limits.max_bytes} bytes in all")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._count, self._began = True, 0, 0, True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count += 1
        self._total = (len(self.url) if self._count == 1 else self._total) + len(name) + len(value) + 4
        problem = self.limits.check_one(name, value, self._count, self._total)
        if problem:
            self._problem = problem
            raise _Refused(problem)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._completed = True
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._problem is None:
            super().send_400_response(msg)
            return
        self._refuse(self._problem)

    def _refuse(self, problem: str) -> None:
        self._problem = problem
        path = self.url.split(b"?", 1)[0].decode("latin-1") if getattr(self, "url", b"") else "/"
        status, headers, body = refusal(path if path.startswith("/") else "/", problem)
        log.warning("refused a request from %s: %s", self.client[0] if self.client else "?", problem)
        head = [STATUS_LINE[status], *(k + b": " + v + b"\r\n" for k, v in headers), b"\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def bounded_protocol(limits: HeaderLimits) -> type[BoundedHttpTools]:
    """The protocol class to give uvicorn (``uvicorn.Config(http=...)``) for these limits."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {"limits": limits})


class HeaderBound:
    """431 for parsed headers over ``limits``, before anything else sees the request."""

    def __init__(self, app: ASGIApp, limits: HeaderLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            problem = self.limits.check(scope["headers"], head)
            if problem:
                status, headers, body = refusal(scope.get("path", "/"), problem)
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
