"""``create_app(settings)``: the FastAPI application, its middleware, and the lifespan that owns
the models and their batchers. Nothing is loaded at import time."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

import numpy as np
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Scope

from service.api import errors as api_errors
from service.api.middleware import ApiKeyAuth, BodyLimit, RequestContext
from service.api.routes import router
from service.cam import CamQuery
from service.config import Settings
from service.imaging import encode_png
from service.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry, load_model
from service.rendering import HeatmapSpec
from service.runtime import BatchSettings, ModelRuntime

log = logging.getLogger("camserve")

_ENDPOINTS = {"/predict", "/explain", "/models", "/healthz", "/readyz", "/metrics"}


def batch_settings(settings: Settings) -> BatchSettings:
    return BatchSettings(max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
                         max_queue=settings.max_queue, timeout_s=settings.request_timeout_s)


async def _warm_up(runtime: ModelRuntime, settings: Settings) -> None:
    """Run the whole path once (decode, batch, explain, render) so the first client pays nothing extra;
    on CUDA also at the largest batch size, which selects its kernels."""
    h, w = runtime.model.preprocess.input_size
    png = encode_png(np.full((h, w, 3), 127, dtype=np.uint8))
    sizes = [1]
    if runtime.model.device.type == "cuda" and settings.max_batch_size > 1:
        sizes.append(min(settings.max_batch_size, settings.max_queue))
    for n in sizes:
        explainable = bool(runtime.model.engine.layers.candidates)
        await runtime.infer([png] * n, top_k=1, query=CamQuery() if explainable else None, spec=HeatmapSpec(),
                            max_pixels=settings.max_image_pixels, bounded=False)


def create_app(settings: Settings | None = None, models: Sequence[LoadedModel] | None = None) -> FastAPI:
    """Build the app. ``models`` short-cuts loading with already-built models (tests, notebooks)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.draining = False  # an app may be started again after a shutdown (tests)
        loaded = list(models) if models is not None else [
            await asyncio.to_thread(load_model, spec) for spec in settings.models]
        registry = ModelRegistry(loaded, settings.default_model)
        # Decode and render threads, shared by all models. Sized to the machine: measured on 2 cores,
        # 2 threads served 10-20% more images/s than asyncio's default of 6, which queue on the GIL.
        threads = settings.cpu_threads or max(2, os.cpu_count() or 2)
        cpu_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camserve-cpu")
        runtimes = {m.name: ModelRuntime(m, batch_settings(settings), partial(metrics.on_batch, m.name), cpu_pool)
                    for m in registry}
        for rt in runtimes.values():
            rt.batcher.start()
        try:
            for rt in runtimes.values():
                await _warm_up(rt, settings)
                rt.model.ready = True
                log.info("model %r ready on %s: %d classes, input %s, default layer %s", rt.model.name,
                         rt.model.device, rt.model.num_classes, rt.model.preprocess.input_size,
                         rt.model.engine.layers.default)
            app.state.registry, app.state.runtimes = registry, runtimes
            yield
        finally:
            app.state.draining = True
            for rt in runtimes.values():
                await rt.batcher.stop()
            await asyncio.to_thread(cpu_pool.shutdown, True)
            if models is None:
                registry.close()

    app = FastAPI(
        title="camserve",
        summary="Image classification with Grad-CAM explanations over HTTP.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False
    app.include_router(router)
    api_errors.install(app)

    def on_response(scope: Scope, status: int, seconds: float) -> None:
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "/models/{name}" if path.startswith("/models/") else "other"
        model = scope.get("state", {}).get("log_extra", {}).get("model", "")
        metrics.requests.labels(endpoint, model, str(status)).inc()
        metrics.latency.labels(endpoint, model).observe(seconds)

    # Added innermost first: the request id wraps everything, so even a 401 or 413 carries one.
    keys = settings.all_api_keys()
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys, open_paths=settings.open_paths)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "X-Class-Index", "X-Class-Label",
                                                                "X-Class-Score", "Retry-After"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, on_response=on_response)
    return app
