"""Domain errors to HTTP: one status table, one JSON renderer, one set of handlers."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors

log = logging.getLogger("camserve.api")

# Most specific first: the first matching class wins.
STATUS: tuple[tuple[type[errors.CamserveError], int], ...] = (
    (errors.OutOfMemory, 503),
    (errors.InvalidImage, 400),
    (errors.InvalidInput, 400),
    (errors.Unauthorized, 401),
    (errors.ModelNotFound, 404),
    (errors.NotAcceptable, 406),
    (errors.PayloadTooLarge, 413),
    (errors.UnsupportedMediaType, 415),
    (errors.InvalidArgument, 422),
    (errors.ModelError, 500),
    (errors.NotReady, 503),
    (errors.Overloaded, 503),
    (errors.RequestTimeout, 504),
)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


def status_of(exc: errors.CamserveError) -> int:
    return next((status for cls, status in STATUS if isinstance(exc, cls)), 500)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.CamserveError)
    status = status_of(exc)
    headers = None
    if isinstance(exc, errors.Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if status >= 500:
        log.warning("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ is not None and status == 500)
    return error_response(status, exc.code, exc.message, headers)


def _describe(err: dict[str, object]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))  # type: ignore[attr-defined]
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"`{loc}`: {err.get('msg')}, got {shown}" if loc else f"{err.get('msg')}"


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = "; ".join(_describe(e) for e in exc.errors()[:5])
    return error_response(422, "invalid_argument", message)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


async def _client_gone(request: Request, exc: Exception) -> Response:
    # 499, nginx's "client closed request": never seen by the client, but counted in metrics and logs.
    return Response(status_code=499)


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.CamserveError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ClientGone, _client_gone)
