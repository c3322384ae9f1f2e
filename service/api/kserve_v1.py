"""KServe's V1 data plane: ``{"instances": [...]}`` in, ``{"predictions": [...]}`` out.

An instance is one image in any shape KServe's samples use: ``{"image_bytes": {"b64": ...}}`` (TF
Serving's convention), ``{"image": {"b64": ...}}``, ``{"image": "<base64>"}``, ``{"b64": ...}`` or a
bare base64 string (plain or a data URI); a ``"key"`` beside it is echoed in its prediction. Options
come from the top-level ``"parameters"`` or the query string, with ``/explain``'s meaning and checks.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service.api.deps import DataPlaneDep, RepositoryDep, SettingsDep
from service.api.encoding import explanation_json, heavy, task_json
from service.api.middleware import note_request
from service.api.oip_v2 import read_body
from service.api.parsing import decode_base64, json_object, query_options, validation_message
from service.api.routes import unless_disconnected
from service.api.schemas import ExplainOptions
from service.dataplane import DataPlane
from service.errors import InvalidArgument, InvalidInput, PayloadTooLarge
from service.repository import ModelState
from service.results import ImageResult, InferenceResult

router = APIRouter(tags=["kserve v1"], include_in_schema=False)


@router.get("/v1/models")
async def list_models(repository: RepositoryDep) -> dict[str, list[str]]:
    return {"models": [m.name for m in repository if m.state is not ModelState.UNLOADED]}


@router.get("/v1/models/{name}")
async def model_status(name: str, repository: RepositoryDep) -> dict[str, Any]:
    served = repository.get(name)  # 404 unknown, 503 (with Retry-After) while not ready
    return {"name": served.name, "ready": True}


def _instance_image(instance: Any, index: int) -> tuple[bytes, Any]:
    """(image bytes, key or None) of one instance."""
    key = None
    value = instance
    if isinstance(instance, dict):
        key = instance.get("key")
        for name in ("image_bytes", "image", "b64"):
            if name in instance:
                value = instance[name]
                break
        else:
            raise InvalidInput(f"instance {index}: no image; send `image_bytes`, `image` or `b64`, or a base64 "
                               "string as the instance")
        if isinstance(value, dict):
            if "b64" not in value:
                raise InvalidInput(f"instance {index}: an image object must hold `b64`")
            value = value["b64"]
    if not isinstance(value, str):
        raise InvalidInput(f"instance {index}: the image must be base64 text, got {type(value).__name__}")
    return decode_base64(value, index), key


def parse_body(raw: bytes, max_images: int) -> tuple[list[bytes], list[Any], dict[str, Any]]:
    body = json_object(raw, "the body (with `instances`)")
    instances = body.get("instances", body.get("inputs"))
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("`instances` (or `inputs`) must be a non-empty list of images")
    if len(instances) > max_images:
        raise PayloadTooLarge(f"{len(instances)} instances in one request, over the limit of {max_images}")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"`parameters` must be a JSON object, got {type(params).__name__}")
    decoded = [_instance_image(inst, i) for i, inst in enumerate(instances)]
    return [d for d, _ in decoded], [k for _, k in decoded], params


def _options(request: Request, params: dict[str, Any], explain: bool) -> tuple[ExplainOptions, bool]:
    """Query string, then ``parameters``; checked by ``/explain``'s schema. Also whether ``top_k`` was given."""
    merged = {**query_options(request), **params}
    for key in ("targets", "metrics", "layer"):  # "3,ring", as in a query string
        value = merged.get(key)
        if isinstance(value, str) and (key != "layer" or "," in value):
            merged[key] = [t.strip() for t in value.split(",") if t.strip()]
    if not explain:
        extra = sorted(set(merged) - {"top_k"})
        if extra:
            raise InvalidArgument(extra[0], f"`:predict` takes only `top_k`, got {', '.join(extra)}")
    merged.pop("model", None)
    try:
        return ExplainOptions.model_validate(merged), "top_k" in merged
    except ValidationError as exc:
        field, message = validation_message(exc)
        raise InvalidArgument(field, message) from None


def _prediction(r: ImageResult, key: Any, with_top: bool) -> dict[str, Any]:
    if r.task is not None:  # a detector's boxes, a segmenter's mask, an embedding
        item = task_json(r.task)
    else:
        best = r.predictions[0]
        item = {"scores": r.scores, "index": best.index, "label": best.label}
        if with_top:
            item["top"] = [vars(p) for p in r.predictions]
    if key is not None:
        item["key"] = key
    return item


def _reply(result: InferenceResult, keys: list[Any], with_top: bool, explain: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"predictions": [_prediction(r, k, with_top) for r, k in zip(result.results, keys,
                                                                                         strict=True)]}
    if explain:
        out["explanations"] = [[explanation_json(e) for e in r.explanations or ()] for r in result.results]
    return out


async def _serve(request: Request, name: str, dataplane: DataPlane, max_images: int, limit: int,
                 explain: bool) -> Response:
    raw = await read_body(request, limit)
    images, keys, params = parse_body(raw, max_images)
    opts, with_top = _options(request, params, explain)
    plan = dataplane.plan(name, len(images), top_k=opts.top_k, explain=opts.request() if explain else None)
    note_request(request.scope, model=plan.model_name, images=len(images))
    result = await unless_disconnected(request, dataplane.run(plan, images))
    if heavy(result):  # megabytes of base64 or floats: not on the event loop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(dataplane.repository.cpu_pool,
                                          lambda: JSONResponse(_reply(result, keys, with_top, explain)))
    return JSONResponse(_reply(result, keys, with_top, explain))


@router.post("/v1/models/{name}:predict")
async def predict(name: str, request: Request, dataplane: DataPlaneDep, settings: SettingsDep) -> Response:
    return await _serve(request, name, dataplane, settings.max_images_per_request, settings.max_body_bytes, False)


@router.post("/v1/models/{name}:explain")
async def explain(name: str, request: Request, dataplane: DataPlaneDep, settings: SettingsDep) -> Response:
    return await _serve(request, name, dataplane, settings.max_images_per_request, settings.max_body_bytes, True)
