"""The HTTP endpoints. Handlers only parse, delegate to a ``ModelRuntime`` and shape the response."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import MetricsDep, RegistryDep, RuntimesDep, SettingsDep
from service.api.errors import ClientGone
from service.api.parsing import parse_request
from service.api.schemas import (
    ErrorResponse,
    ExplainBody,
    ExplainOptions,
    InferenceResponse,
    ModelDetail,
    ModelList,
    PredictBody,
    PredictOptions,
)
from service.cam import METHODS
from service.errors import NotAcceptable, NotReady
from service.registry import LoadedModel
from service.rendering import HeatmapSpec
from service.runtime import ImageResult, ModelRuntime

router = APIRouter()
T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Undecodable base64, or not an image", 401: "Missing or wrong API key", 404: "Unknown model",
        406: "`Accept: image/png` for more than one heatmap", 413: "Body, image pixels or image count over the limits",
        415: "Neither JSON nor multipart", 422: "Bad option value", 503: "Not ready, or overloaded (see Retry-After)",
        504: "Timed out",
    }.items()
}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "model": {"type": "string"},
        "top_k": {"type": "integer"},
        "targets": {"type": "string", "description": "Comma-separated class indices or labels"},
        "method": {"type": "string"},
        "layer": {"type": "string"},
        "output": {"type": "string"},
        "size": {"type": "string"},
        "colormap": {"type": "string"},
        "alpha": {"type": "number"},
    },
}


def _body_doc(body: type[PredictBody] | type[ExplainBody]) -> dict[str, Any]:
    schema = {**body.model_json_schema(), "anyOf": [{"required": ["image"]}, {"required": ["images"]}]}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    }}}


def _summary(m: LoadedModel) -> dict[str, Any]:
    return {
        "name": m.name, "source": m.spec.source, "device": str(m.device), "num_classes": m.num_classes,
        "input_size": list(m.preprocess.input_size), "layers": list(m.engine.layers.candidates),
        "methods": list(METHODS) if m.engine.layers.candidates else [], "precision": m.spec.precision,
    }


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: _ERRORS[503]})
async def readyz(request: Request) -> dict[str, Any]:
    """200 when every model is loaded and warm and the server is not draining."""
    registry = getattr(request.app.state, "registry", None)
    if registry is None or not registry.ready:
        raise NotReady("models are still loading")
    if getattr(request.app.state, "draining", False):
        raise NotReady("the server is shutting down")
    return {"status": "ready", "models": [m.name for m in registry]}


@router.get("/models", tags=["models"], response_model=ModelList)
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    """The served models; ``layers`` lists the default target layer first."""
    return {"default": registry.default, "models": [_summary(m) for m in registry]}


@router.get("/models/{name}", tags=["models"], response_model=ModelDetail, responses={404: _ERRORS[404]})
async def get_model(name: str, registry: RegistryDep) -> dict[str, Any]:
    """One model, with its labels."""
    m = registry.get(name)
    return {**_summary(m), "labels": m.labels}


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, cancelling it if the client goes away, so its images leave the batch queue.

    After the body is read, the next ASGI message is ``http.disconnect``, sent only if the connection
    closes (or once the response is done); a watcher waits for it beside the work.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not watcher.cancelled() and watcher.done():
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


def _response(model: str, results: list[ImageResult]) -> dict[str, Any]:
    out = []
    for r in results:
        item: dict[str, Any] = {"predictions": [vars(p) for p in r.predictions]}
        if r.explanations is not None:
            item["explanations"] = [
                {"index": e.index, "label": e.label, "score": e.score, "method": e.method, "layer": e.layer,
                 "heatmap": {"format": e.heatmap.format, "width": e.heatmap.width, "height": e.heatmap.height,
                             "data": e.heatmap.wire_data}}
                for e in r.explanations
            ]
        out.append(item)
    return {"model": model, "results": out}


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "image/png" in accept and "application/json" not in accept


@router.post("/predict", tags=["inference"], response_model=InferenceResponse, response_model_exclude_none=True,
             responses=_ERRORS, openapi_extra=_body_doc(PredictBody))
async def predict(request: Request, runtimes: RuntimesDep, settings: SettingsDep) -> dict[str, Any]:
    """Class scores for one or more images (JSON base64 or multipart ``image`` parts)."""
    images, opts = await parse_request(request, PredictOptions, settings.max_images_per_request)
    runtime = runtimes.get(opts.model)
    _note(request, runtime, len(images))
    results = await _unless_disconnected(request, runtime.infer(
        images, top_k=runtime.check_top_k(opts.top_k), query=None, spec=None, max_pixels=settings.max_image_pixels))
    return _response(runtime.model.name, results)


@router.post("/explain", tags=["inference"], response_model=InferenceResponse, responses={
    **_ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON results, or with `Accept: image/png` the "
                     "PNG itself, with X-Class-Index, X-Class-Label and X-Class-Score headers."}},
             openapi_extra=_body_doc(ExplainBody))
async def explain(request: Request, runtimes: RuntimesDep, settings: SettingsDep) -> Any:
    """Class scores plus a Grad-CAM (or other CAM) heatmap per image and target class."""
    images, opts = await parse_request(request, ExplainOptions, settings.max_images_per_request)
    runtime = runtimes.get(opts.model)
    _note(request, runtime, len(images))
    top_k = runtime.check_top_k(opts.top_k)
    query = runtime.make_query(opts.method, opts.layer, opts.targets)
    spec = HeatmapSpec(opts.output, opts.size, opts.colormap, opts.alpha)
    png = _wants_png(request)
    if png and (len(images) != 1 or len(query.classes) > 1 or opts.output == "array"):
        raise NotAcceptable("`Accept: image/png` needs exactly one image, one target and output png or overlay; "
                            f"got {len(images)} image(s), {max(1, len(query.classes))} target(s), output "
                            f"{opts.output!r}")
    results = await _unless_disconnected(request, runtime.infer(
        images, top_k=top_k, query=query, spec=spec, max_pixels=settings.max_image_pixels))
    if png:
        e = results[0].explanations[0]  # type: ignore[index]
        assert isinstance(e.heatmap.data, bytes)
        return Response(e.heatmap.data, media_type="image/png", headers={
            "X-Class-Index": str(e.index), "X-Class-Label": quote(e.label), "X-Class-Score": f"{e.score:.6f}"})
    body = _response(runtime.model.name, results)
    if opts.output == "array":
        # Up to millions of floats: serialising them would stall every other request on the loop.
        return await asyncio.get_running_loop().run_in_executor(runtime.cpu_pool, JSONResponse, body)
    return JSONResponse(body)


def _note(request: Request, runtime: ModelRuntime, n_images: int) -> None:
    request.state.log_extra = {"model": runtime.model.name, "images": n_images}


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(metrics: MetricsDep, runtimes: RuntimesDep) -> Response:
    """Prometheus text format."""
    metrics.refresh(runtimes)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
