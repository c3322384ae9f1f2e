"""The Open Inference Protocol's model repository extension: list, load and unload models while the
server keeps serving the others.

Loading runs code chosen by the caller (a ``python:`` source, a TorchScript file), so these are
operator actions. With ``admin_api_keys`` set they need one of those keys (401 with none, 403 with any
other key); with none set they are refused (403) unless ``enable_repository_api`` is true, and then
they are open to whoever may call the server (a server with ``api_keys`` but no admin key refuses them).

A server that is one of several replicas (Ray Serve) sets ``app.state.repository_fixed`` to why: a load
or unload would reach only the replica that takes the request, so they are refused (403, like
Triton's load and unload outside explicit model control); the index, read-only, stays.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import APIRouter, Request

from service.api.deps import RepositoryDep, SettingsDep
from service.api.oip import VERSION
from service.api.oip_v2 import read_body
from service.api.parsing import json_object
from service.config import Settings
from service.errors import Forbidden, InvalidInput, ModelNotFound, Unauthorized
from service.modelspec import ModelSpec, SpecError
from service.registry import ModelLoadError
from service.repository import ModelRepository, ModelState, ServedModel

router = APIRouter(tags=["open inference protocol (v2): model repository"], include_in_schema=False)
log = logging.getLogger("camserve")

# Triton's state names, which its clients and dashboards show.
_STATES = {ModelState.LOADING: "LOADING", ModelState.READY: "READY", ModelState.DRAINING: "UNLOADING",
           ModelState.FAILED: "UNAVAILABLE", ModelState.UNLOADED: "UNAVAILABLE"}


def given_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a caller sent: ``Authorization: Bearer <key>``, else ``X-API-Key`` (HTTP headers or gRPC
    call metadata alike)."""
    auth = authorization or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return api_key


def key_matches(given: str | None, keys: tuple[str, ...]) -> bool:
    ok = False
    for key in keys:  # every key compared, so timing tells nothing
        ok |= hmac.compare_digest((given or "").encode(), key.encode())
    return ok and bool(given)


def check_admin_key(given: str | None, settings: Settings) -> None:
    admin_keys = tuple(k for k in settings.admin_api_keys if k.strip())  # fail closed, whatever the list holds
    if settings.admin_api_keys:
        if not given or not admin_keys:
            raise Unauthorized("the model repository API needs an admin key: send `Authorization: Bearer <key>` "
                               "or `X-API-Key: <key>`")
        if not key_matches(given, admin_keys):
            raise Forbidden("this key may not use the model repository API; it needs an admin key")
        return
    if not settings.enable_repository_api:
        raise Forbidden("the model repository API is disabled: set admin_api_keys, or enable_repository_api = true")
    if settings.all_api_keys():
        raise Forbidden("the model repository API needs an admin key (admin_api_keys), and none is configured")


def check_admin(request: Request, settings: Settings) -> None:
    check_admin_key(given_key(request.headers.get("authorization"), request.headers.get("x-api-key")), settings)


def check_changeable(request: Request) -> None:
    reason: str | None = getattr(request.app.state, "repository_fixed", None)
    if reason:
        raise Forbidden(reason)


def entry(served: ServedModel) -> dict[str, Any]:
    item: dict[str, Any] = {"name": served.name, "version": VERSION, "state": _STATES[served.state]}
    if served.state is ModelState.FAILED and served.error:
        item["reason"] = served.error
    elif served.state is ModelState.UNLOADED:
        item["reason"] = "unloaded"
    return item


async def _json_body(request: Request, settings: Settings) -> dict[str, Any]:
    raw = await read_body(request, settings.max_body_bytes)
    if not raw.strip():
        return {}
    return json_object(raw)


@router.post("/v2/repository/index")
async def index(request: Request, repository: RepositoryDep, settings: SettingsDep) -> list[dict[str, Any]]:
    """Every model the server knows, in whatever state; ``{"ready": true}`` lists only ready ones."""
    check_admin(request, settings)
    body = await _json_body(request, settings)
    only_ready = body.get("ready", False)
    if not isinstance(only_ready, bool):
        raise InvalidInput(f"`ready` must be true or false, got {only_ready!r}")
    return [entry(m) for m in repository if m.ready or not only_ready]


def spec_for(name: str, params: Any, settings: Settings, known: ServedModel | None) -> ModelSpec:
    """The model table from ``parameters.config`` (an object, or JSON text as Triton's clients send
    it), else the spec the model was served with, else the configured one."""
    params = params or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"`parameters` must be a JSON object, got {type(params).__name__}")
    config = params.get("config")
    if config is not None:
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except (ValueError, RecursionError) as exc:
                raise InvalidInput(f"`parameters.config` is not valid JSON: {exc}") from None
        try:
            return ModelSpec.from_table(name, config)
        except SpecError as exc:
            raise InvalidInput("; ".join(exc.problems)) from None
    if known is not None and known.spec is not None:
        return known.spec
    for spec in settings.models:
        if spec.name == name:
            return spec
    raise ModelNotFound(f"model {name!r} is not configured; send its table as `parameters.config`, e.g. "
                        '{"parameters": {"config": {"source": "torchvision:resnet18"}}}')


async def load_model(repository: ModelRepository, settings: Settings, name: str, params: Any) -> ServedModel:
    """Load (or reload) ``name`` from ``params["config"]`` or the table it is known by."""
    try:
        known: ServedModel | None = repository.find(name)
    except ModelNotFound:
        known = None
    spec = spec_for(name, params, settings, known)
    log.info("repository API: loading model %r from %s", name, spec.source)
    try:
        return await repository.load(spec)
    except ModelLoadError as exc:
        raise InvalidInput(str(exc)) from None  # the message already names the model


@router.post("/v2/repository/models/{name}/load")
async def load(name: str, request: Request, repository: RepositoryDep, settings: SettingsDep) -> dict[str, Any]:
    """Load a model (or reload it with a new table); the others keep serving meanwhile."""
    check_admin(request, settings)
    check_changeable(request)
    body = await _json_body(request, settings)
    return entry(await load_model(repository, settings, name, body.get("parameters")))


@router.post("/v2/repository/models/{name}/unload")
async def unload(name: str, request: Request, repository: RepositoryDep, settings: SettingsDep) -> dict[str, Any]:
    """Stop taking requests for the model, let its queued ones finish, free it."""
    check_admin(request, settings)
    check_changeable(request)
    await _json_body(request, settings)  # Triton's clients send `unload_dependents`; there are none here
    log.info("repository API: unloading model %r", name)
    return entry(await repository.unload(name))
