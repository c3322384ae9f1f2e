"""camserve's native HTTP endpoints. Handlers parse the wire format, hand the request to the data
plane and encode its results; validation and scheduling live below."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path, PurePath
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import errors
from service.api.deps import DataPlaneDep, MetricsDep, RepositoryDep, SettingsDep
from service.api.encoding import heavy, inference_json
from service.api.errors import ClientGone, openapi_responses
from service.api.middleware import note_request
from service.api.negotiation import choose, parse_accept, quality
from service.api.openapi import query_parameters
from service.api.parsing import parse_request
from service.api.schemas import (
    ExplainBody,
    ExplainOptions,
    InferenceResponse,
    ModelDetail,
    ModelList,
    PredictBody,
    PredictOptions,
)
from service.cam import METHODS
from service.errors import InvalidArgument, NotAcceptable, NotReady
from service.repository import ServedModel

router = APIRouter()
T = TypeVar("T")
JSON, PNG = "application/json", "image/png"

_INFERENCE_ERRORS = openapi_responses(
    errors.InvalidInput, errors.Unauthorized, errors.ModelNotFound, errors.PayloadTooLarge,
    errors.UnsupportedMediaType, errors.InvalidArgument, errors.NotReady, errors.RequestTimeout)

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        **{name: {"type": "string"} for name in ("model", "method", "layer", "output", "size", "colormap")},
        "top_k": {"type": "integer"},
        "targets": {"type": "string", "description": "Comma-separated class indices or labels"},
        "alpha": {"type": "number"},
    },
}


def _body_doc(body: type[PredictBody] | type[ExplainBody], options: type[PredictOptions]) -> dict[str, Any]:
    schema = {**body.model_json_schema(), "anyOf": [{"required": ["image"]}, {"required": ["images"]}]}
    return {"parameters": query_parameters(options), "requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    }}}


def public_source(served: ServedModel) -> str:
    """The source kind and name, never a server path: ``torchscript:/srv/m.pt`` shows as ``torchscript:m.pt``
    (and so does any source whose target is a file or folder: ``onnx:``, ``export:``, ``hf:./dir``)."""
    if served.spec is None:
        return "unknown"
    kind, _, target = served.spec.source.partition(":")
    file_kinds = ("torchscript", "onnx", "export")
    # An `hf:` target is a hub id ("org/model") unless it names a folder that exists here.
    if kind in file_kinds or ("/" in target and (target.startswith(("/", ".", "~")) or Path(target).exists())):
        return f"{kind}:{PurePath(target).name}"
    return served.spec.source


def _summary(served: ServedModel) -> dict[str, Any]:
    m = served.model
    assert m is not None
    return {
        "name": m.name, "source": public_source(served), "state": served.state.value, "device": str(m.device),
        "task": m.task_name, "num_classes": m.num_classes, "input_size": list(m.preprocess.input_size),
        "layers": list(m.engine.layers.candidates), "methods": m.engine.methods,
        "method_costs": {n: METHODS[n].cost.value for n in m.engine.methods},
        "explanations": m.explanations, "explanations_note": m.explanations_note,
        "precision": m.spec.precision, "output": m.spec.output,
    }


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses=openapi_responses(errors.NotReady))
async def readyz(repository: RepositoryDep) -> dict[str, Any]:
    """200 when every configured model is loaded and warm and the server is not draining; the body
    lists the ready models. A model loaded through the repository API has its own readiness."""
    reason = repository.not_ready_reason()
    if reason is not None:
        raise NotReady(reason)
    return {"status": "ready", "models": [m.name for m in repository if m.ready]}


@router.get("/models", tags=["models"], response_model=ModelList)
async def list_models(repository: RepositoryDep) -> dict[str, Any]:
    """The served models; ``layers`` lists the default target layer first."""
    served = [m for m in repository if m.model is not None]
    return {"default": repository.default, "models": [_summary(m) for m in served]}


@router.get("/models/{name}", tags=["models"], response_model=ModelDetail,
            responses=openapi_responses(errors.ModelNotFound, errors.NotReady))
async def get_model(name: str, repository: RepositoryDep) -> dict[str, Any]:
    """One model, with its labels."""
    served = repository.get(name)
    assert served.model is not None
    return {**_summary(served), "labels": served.model.labels,
            "layer_details": served.model.engine.layers.describe()}


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
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


def _answer_as(request: Request, n_images: int, n_targets: int, output: str) -> str:
    """``application/json`` or ``image/png`` (the heatmap itself), as the ``Accept`` header prefers
    among what this request can produce; 406 when it allows neither."""
    single = n_images == 1 and n_targets <= 1 and output != "array"
    accept = request.headers.get("accept")
    chosen = choose(accept, [JSON, PNG] if single else [JSON])
    if chosen is not None:
        return chosen
    if quality(parse_accept(accept or ""), PNG) > 0:
        raise NotAcceptable("`Accept: image/png` needs exactly one image, one target and output png or overlay; "
                            f"got {n_images} image(s), {max(1, n_targets)} target(s), output {output!r}")
    raise NotAcceptable(f"`Accept` allows neither {JSON} nor {PNG}, got {accept!r}")


def class_headers(index: int, label: str, score: float) -> dict[str, str]:
    """The class of a PNG answer. Header values are ASCII, so ``X-Class-Label`` is the label itself
    when it is printable ASCII and its percent-encoded UTF-8 otherwise; ``X-Class-Label*`` always
    carries it in RFC 8187 form (``UTF-8''<percent-encoded>``), which clients can decode unambiguously."""
    encoded = quote(label, safe="")
    plain = label if label.isascii() and label.isprintable() else encoded
    return {"X-Class-Index": str(index), "X-Class-Label": plain, "X-Class-Label*": f"UTF-8''{encoded}",
            "X-Class-Score": f"{score:.6f}"}


@router.post("/predict", tags=["inference"], response_model=InferenceResponse, response_model_exclude_none=True,
             responses=_INFERENCE_ERRORS, openapi_extra=_body_doc(PredictBody, PredictOptions))
async def predict(request: Request, dataplane: DataPlaneDep, settings: SettingsDep) -> dict[str, Any]:
    """Class scores for one or more images (JSON base64 or multipart ``image`` parts)."""
    images, opts = await parse_request(request, PredictOptions, settings.max_images_per_request)
    plan = dataplane.plan(opts.model, len(images), top_k=opts.top_k)
    note_request(request.scope, model=plan.model_name, images=len(images))
    result = await unless_disconnected(request, dataplane.run(plan, images))
    return inference_json(result)


@router.post("/explain", tags=["inference"], response_model=InferenceResponse, responses={
    **_INFERENCE_ERRORS, **openapi_responses(errors.NotAcceptable),
    200: {"content": {"image/png": {}}, "description": "JSON results, or with `Accept: image/png` the "
          "PNG itself, with X-Class-Index, X-Class-Label (and RFC 8187 X-Class-Label*) and X-Class-Score "
          "headers."}},
             openapi_extra=_body_doc(ExplainBody, ExplainOptions))
async def explain(request: Request, dataplane: DataPlaneDep, settings: SettingsDep) -> Any:
    """Class scores plus a Grad-CAM (or other CAM) heatmap per image and target class."""
    images, opts = await parse_request(request, ExplainOptions, settings.max_images_per_request)
    plan = dataplane.plan(opts.model, len(images), top_k=opts.top_k, explain=opts.request())
    note_request(request.scope, model=plan.model_name, images=len(images))
    assert plan.query is not None
    png = _answer_as(request, len(images), len(plan.query.classes) or len(plan.targets), opts.output) == PNG
    result = await unless_disconnected(request, dataplane.run(plan, images))
    if png:
        if not result.results[0].explanations:
            raise InvalidArgument("targets", "the image has nothing to explain (no detection); ask for JSON to see "
                                  "what the model found")
        e = result.results[0].explanations[0]
        assert isinstance(e.heatmap.data, bytes)
        return Response(e.heatmap.data, media_type=PNG, headers=class_headers(e.index, e.label, e.score))
    if heavy(result):
        # Megabytes of base64 or floats: encoding them on the loop would stall every other request.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(dataplane.repository.cpu_pool, lambda: JSONResponse(inference_json(result)))
    return JSONResponse(inference_json(result))


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(metrics: MetricsDep, repository: RepositoryDep) -> Response:
    """Prometheus text format."""
    metrics.refresh(repository)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
