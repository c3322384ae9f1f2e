"""``create_app(settings)``: the FastAPI application, its middleware, and the lifespan that loads the
models into the repository. Nothing is loaded at import time.

The application state holds exactly three long-lived objects: ``settings``, ``repository`` (the
models and their lifecycle) and ``dataplane`` (what every front-end calls), plus ``metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Scope

from service import __version__
from service.api import errors as api_errors
from service.api import openapi as api_openapi
from service.api import ui
from service.api.kserve_v1 import router as kserve_v1_router
from service.api.middleware import ApiKeyAuth, BodyLimit, HttpEdges, RequestContext, request_notes
from service.api.oip_model_info import router as oip_model_info_router
from service.api.oip_repository import router as oip_repository_router
from service.api.oip_v2 import router as oip_v2_router
from service.api.routes import router
from service.config import ConfigError, Settings
from service.dataplane import DataPlane, Limits
from service.metrics import Metrics
from service.modelspec import ModelSpec
from service.registry import LoadedModel, ModelLoadError
from service.repository import BatchSettings, ModelRepository

log = logging.getLogger("camserve")
# The routes whose requests count as inferences in a model's statistics (native, V1, V2).
_INFERENCE_ROUTES = ("/predict", "/explain", ":predict", ":explain", "/infer")


def batch_settings(settings: Settings) -> BatchSettings:
    return BatchSettings(max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
                         policy=settings.batch_policy, max_queue=settings.max_queue,
                         max_image_pixels=settings.max_image_pixels)


def limits(settings: Settings) -> Limits:
    return Limits(max_images=settings.max_images_per_request, max_image_pixels=settings.max_image_pixels,
                  max_render_pixels=settings.max_render_pixels, timeout_s=settings.request_timeout_s or None,
                  max_extra_forwards=settings.max_extra_forwards)


def _grpc() -> tuple[Any, Any]:
    """The gRPC server's start and stop, imported only when a gRPC port is set: grpcio is an optional
    extra, and its generated ``inference`` messages must not meet another copy (tritonclient's) in a
    process that never serves gRPC."""
    try:
        from service.api.grpc_server import start_grpc, stop_grpc
    except ImportError as exc:
        raise ConfigError(f"setting `grpc_port` needs grpcio: pip install 'camserve[grpc]' ({exc})") from None
    return start_grpc, stop_grpc


def create_app(settings: Settings | None = None, models: Sequence[LoadedModel] | None = None) -> FastAPI:
    """Build the app. ``models`` short-cuts loading with already-built models (tests, notebooks, the
    command line, which loads before it binds the port so that a bad model is one clear line)."""
    settings = settings or Settings()
    metrics = Metrics()
    repository = ModelRepository(batch_settings(settings), settings.default_model,
                                 on_batch=lambda name: partial(metrics.on_batch, name),
                                 cpu_threads=settings.cpu_threads)
    dataplane = DataPlane(repository, limits(settings))
    sources: Sequence[LoadedModel | ModelSpec] = models if models is not None else settings.models
    for source in sources:
        repository.declare(source.name, source.spec if isinstance(source, LoadedModel) else source)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repository.start()
        grpc_server = None
        try:
            for source in sources:
                try:
                    await repository.load(source)
                except ModelLoadError as exc:
                    log.error("camserve: %s", exc)
                    raise
            if settings.grpc_port is not None:
                start_grpc, stop_grpc = _grpc()
                grpc_server, app.state.grpc_port = await start_grpc(settings, dataplane, metrics)
            yield
        finally:
            if grpc_server is not None:
                # uvicorn has drained HTTP by now; calls still in flight get the drain timeout too.
                await stop_grpc(grpc_server, settings.drain_timeout_s)
            await repository.close(close_models=models is None)

    app = FastAPI(
        title="camserve",
        summary="Image classification with Grad-CAM explanations over HTTP.",
        version=__version__,
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served offline by service.api.ui
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = repository
    app.state.dataplane = dataplane
    app.include_router(router)
    app.include_router(kserve_v1_router)
    app.include_router(oip_model_info_router)  # before oip_v2's /v2/models/{name}/... routes
    app.include_router(oip_v2_router)
    app.include_router(oip_repository_router)
    ui.install(app, settings.enable_ui)
    api_errors.install(app)
    keys = settings.all_api_keys()
    api_openapi.install(app, api_keys=bool(keys), open_paths=settings.open_paths)
    # HttpEdges serves `/predict/` as `/predict`; the router must never answer with a bodyless 307.
    app.router.redirect_slashes = False

    def on_response(scope: Scope, status: int, seconds: float) -> None:
        # The matched route's template ("/models/{name}"), so label values stay few whatever the paths.
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        model = str(request_notes(scope).get("model", ""))
        metrics.requests.labels(endpoint, model, str(status)).inc()
        metrics.latency.labels(endpoint, model).observe(seconds)
        if model and endpoint.endswith(_INFERENCE_ROUTES):
            metrics.model_stats(model).on_request(status < 400, seconds)

    # Added innermost first: the request id wraps everything, so even a 401 or 413 carries one.
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys + settings.admin_api_keys, open_paths=settings.open_paths)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=[
                               "X-Request-ID", "X-Class-Index", "X-Class-Label", "X-Class-Label*", "X-Class-Score",
                               "Retry-After"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpEdges)
    app.add_middleware(RequestContext, on_response=on_response)
    return app
