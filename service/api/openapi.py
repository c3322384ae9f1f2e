"""The OpenAPI document: FastAPI's, plus what it cannot see, because the inference routes parse their
requests themselves: the options as query parameters, and the API-key schemes when keys are set."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api.middleware import is_open

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def query_parameters(options: type[BaseModel]) -> list[dict[str, Any]]:
    """Every option of ``options`` as an optional query parameter (a form or body field wins over it)."""
    props = options.model_json_schema()["properties"]
    params = []
    for name, prop in props.items():
        schema = {k: v for k, v in prop.items() if k not in ("title", "description")}
        if name == "targets":  # repeated or comma-separated in a query string
            schema = {"type": "array", "items": {"type": "string"}}
        params.append({"name": name, "in": "query", "required": False, "schema": schema,
                       "description": prop.get("description", "") + " A form or JSON field of the same name wins."})
    return params


def install(app: FastAPI, api_keys: bool, open_paths: Iterable[str]) -> None:
    """Build the document once, on first request; with ``api_keys``, every operation outside
    ``open_paths`` says it needs a key."""
    opened = tuple(open_paths)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            if api_keys:
                schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
                for path, operations in schema.get("paths", {}).items():
                    for op in operations.values():
                        op["security"] = [] if is_open(path, opened) else [{"bearer": []}, {"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
