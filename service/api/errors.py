"""Domain errors to HTTP: one status table, one body renderer, one set of handlers.

The table is keyed by error class and looked up along the exception's class hierarchy (as Starlette
looks up exception handlers), so a subclass inherits its parent's status unless it has its own row.
Bodies come in the dialect of the route: camserve's own ``{"error": {"code", "message"[, "field"]}}``,
or ``{"error": "<message>"}`` on the KServe V1 and Open Inference Protocol routes, whose clients parse
that shape. Middleware, handlers and routes all render through :func:`render`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors

log = logging.getLogger("camserve.api")

# Class -> (status, what it means to a client; shown in the OpenAPI document).
STATUS: dict[type[errors.CamserveError], tuple[int, str]] = {
    errors.CamserveError: (500, "Internal error"),
    errors.InvalidInput: (400, "Undecodable body or base64, or not an image"),
    errors.Unauthorized: (401, "Missing or wrong API key"),
    errors.Forbidden: (403, "The key may not do this, or the action is disabled"),
    errors.ModelNotFound: (404, "Unknown model"),
    errors.NotAcceptable: (406, "Nothing the `Accept` header allows can be produced"),
    errors.PayloadTooLarge: (413, "Body, image pixels, image count or output size over the limits"),
    errors.HeadersTooLarge: (431, "Request headers over their size or count limits"),
    errors.UnsupportedMediaType: (415, "Neither JSON nor multipart"),
    errors.InvalidArgument: (422, "Bad option value"),
    errors.ModelError: (500, "The model failed on this batch"),
    errors.NotReady: (503, "Not ready, or overloaded (see Retry-After)"),
    errors.Overloaded: (503, "Not ready, or overloaded (see Retry-After)"),
    errors.RequestTimeout: (504, "Timed out"),
}

# Class -> gRPC status code name (``grpc.StatusCode[name]``), for the gRPC binding of the Open Inference
# Protocol; looked up along the class hierarchy like ``STATUS``. Named, so that this module needs no grpcio.
GRPC_CODES: dict[type[errors.CamserveError], str] = {
    errors.CamserveError: "INTERNAL",
    errors.InvalidInput: "INVALID_ARGUMENT",
    errors.InvalidArgument: "INVALID_ARGUMENT",
    errors.Unauthorized: "UNAUTHENTICATED",
    errors.Forbidden: "PERMISSION_DENIED",
    errors.ModelNotFound: "NOT_FOUND",
    errors.NotAcceptable: "INVALID_ARGUMENT",
    errors.PayloadTooLarge: "RESOURCE_EXHAUSTED",
    errors.UnsupportedMediaType: "INVALID_ARGUMENT",
    errors.ModelError: "INTERNAL",
    errors.NotReady: "UNAVAILABLE",
    errors.Overloaded: "RESOURCE_EXHAUSTED",
    errors.RequestTimeout: "DEADLINE_EXCEEDED",
}

# Statuses Starlette raises itself (routing, method), with the codes our clients see.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}

# Route prefixes that speak the platforms' dialect: `{"error": "<message>"}`.
PLAIN_PREFIXES = ("/v1/", "/v2")


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


def status_of(exc: errors.CamserveError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls][0]
    return 500


def grpc_code_of(exc: errors.CamserveError) -> str:
    for cls in type(exc).__mro__:
        if cls in GRPC_CODES:
            return GRPC_CODES[cls]
    return "INTERNAL"


def openapi_responses(*classes: type[errors.CamserveError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the errors a route may raise, described from the table."""
    from service.api.schemas import ErrorResponse

    out: dict[int | str, dict[str, Any]] = {}
    for cls in classes:
        status, text = STATUS[cls]
        prior = out.get(status)
        out[status] = {"model": ErrorResponse,
                       "description": text if prior is None or prior["description"] == text
                       else f"{prior['description']}; {text}"}
    return out


def body(path: str, code: str, message: str, field: str | None = None) -> bytes:
    """The JSON error body for a route at ``path``."""
    if path.startswith(PLAIN_PREFIXES):
        return json.dumps({"error": message}).encode()
    err: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return json.dumps({"error": err}).encode()


def headers_of(exc: errors.CamserveError) -> dict[str, str]:
    if isinstance(exc, errors.Overloaded):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, errors.Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def render(path: str, exc: errors.CamserveError) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a domain error on the route at ``path``."""
    field = exc.field if isinstance(exc, errors.InvalidArgument) else None
    status, headers = status_of(exc), headers_of(exc)
    if path.startswith(PLAIN_PREFIXES):
        # KServe and Triton clients know bad input as 400 only, and retry a 503 after Retry-After.
        if status == 422:
            status = 400
        if isinstance(exc, errors.NotReady):
            headers = {**headers, "Retry-After": "1"}
    return status, headers, body(path, exc.code, exc.message, field)


def response(path: str, exc: errors.CamserveError) -> Response:
    status, headers, content = render(path, exc)
    return Response(content, status_code=status, headers=headers, media_type="application/json")


async def _domain(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.CamserveError)
    status = status_of(exc)
    if status >= 500:
        log.warning("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ is not None and status == 500)
    return response(request.url.path, exc)


def _describe(err: dict[str, object]) -> tuple[str, str]:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))  # type: ignore[attr-defined]
    shown = repr(err.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return loc, (f"`{loc}`: {err.get('msg')}, got {shown}" if loc else f"{err.get('msg')}")


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    described = [_describe(e) for e in exc.errors()[:5]]
    field = described[0][0] if described and described[0][0] else "body"
    return response(request.url.path, errors.InvalidArgument(field, "; ".join(m for _, m in described)))


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return Response(body(request.url.path, code, str(exc.detail)), status_code=exc.status_code,
                    headers=dict(exc.headers or {}), media_type="application/json")


async def _client_gone(request: Request, exc: Exception) -> Response:
    # 499, nginx's "client closed request": never seen by the client, but counted in metrics and logs.
    return Response(status_code=499)


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.CamserveError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ClientGone, _client_gone)
