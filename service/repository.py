"""The served models and their lifecycle: one ``ServedModel`` per name, each with an explicit state.

States::

    loading --> ready --> draining --> unloaded
       |                                  ^
       +--> failed                        | (load again: loading)

A model owns everything it needs to serve: its spec, the loaded module and hook engine, the pipeline
and the batcher. ``load`` builds it off the event loop, warms it up (without the batcher, so the
warm-up is never counted as traffic), then starts its batcher and marks it ready. ``unload`` stops
admitting requests, lets the queued ones finish, stops the batcher and frees the hooks and memory.
Each name has its own lock, so loading one model never blocks requests to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from service.batching import Batcher, BatchStats
from service.cam import CamQuery
from service.cam.tasks import TaskTarget
from service.errors import ModelNotFound, NotReady
from service.imaging import encode_png
from service.modelspec import ModelSpec
from service.pipeline import Job, JobResult, Lone, Pipeline, is_oom
from service.registry import LoadedModel, ModelLoadError, load_model
from service.rendering import HeatmapSpec
from service.task_results import RequestTarget
from service.threads import confined_pool, model_thread

log = logging.getLogger("camserve")


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    policy: str = "adaptive"
    max_queue: int = 256
    max_image_pixels: int = 40_000_000


@dataclass
class ServedModel:
    """One name in the repository, whatever its state; ``model``/``pipeline``/``batcher`` exist while
    it is ready or draining."""

    name: str
    spec: ModelSpec | None
    state: ModelState = ModelState.LOADING
    model: LoadedModel | None = None
    pipeline: Pipeline | None = None
    batcher: Batcher[Job, JobResult] | None = None
    error: str | None = None
    # Named in the server's configuration (not loaded through the repository API): only these decide
    # whether the server is ready.
    configured: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    async def submit(self, jobs: list[Job]) -> list[JobResult]:
        if self.state is not ModelState.READY or self.batcher is None:
            raise NotReady(f"model {self.name!r} is {self.state.value}")
        return await self.batcher.submit(jobs)

    async def alone(self, work: Callable[[], Lone], images: int) -> Lone | None:
        """``work`` in the model thread at once if the model is ready and idle, else None (``Batcher.run_alone``)."""
        if self.state is not ModelState.READY or self.batcher is None:
            return None
        return await self.batcher.run_alone(work, images)

    def expect(self, images: int) -> AbstractContextManager[object]:
        """Announce images being decoded for this model, so a batch about to start may wait for them."""
        return self.batcher.expect(images) if self.batcher is not None else contextlib.nullcontext()


OnBatch = Callable[[str], Callable[[BatchStats], None] | None]


class ModelRepository:
    """Models by name, the default one, and the CPU pool their pipelines share."""

    def __init__(self, settings: BatchSettings, default: str | None = None, on_batch: OnBatch | None = None,
                 cpu_threads: int | None = None) -> None:
        self.settings = settings
        self.default = default
        self._on_batch = on_batch
        self._cpu_threads = cpu_threads
        self._models: dict[str, ServedModel] = {}
        self.cpu_pool: ThreadPoolExecutor | None = None
        self.render_pool: ThreadPoolExecutor | None = None
        self.draining = False
        self.withdrawn = False  # readiness off while requests are still served: the shutdown grace
        # Set when a drain's deadline passes: requests still in flight then answer 503 (the data plane
        # waits on it), before the server cancels their tasks into bare 500s.
        self.stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lookups ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def find(self, name: str | None = None) -> ServedModel:
        """The model of that name (or the default) in whatever state; 404 when there is none."""
        key = name or self.default
        entry = self._models.get(key) if key is not None else None
        if entry is None:
            raise ModelNotFound(f"unknown model {key!r}; available: {self._known()}")
        return entry

    def _known(self) -> str:
        return ", ".join(m.name for m in self if m.state is not ModelState.UNLOADED) or "none"

    def get(self, name: str | None = None) -> ServedModel:
        """The model of that name (or the default), ready to take requests; else 404 or 503."""
        if self.draining:
            raise NotReady("the server is shutting down")
        entry = self.find(name)
        if entry.state is ModelState.UNLOADED:
            raise ModelNotFound(f"model {entry.name!r} is unloaded; available: {self._known()}")
        if not entry.ready:
            # The reason a load failed can name server paths: it is for operators (the repository
            # index, the log), not for every key holder.
            detail = ("; the server log and the repository index say why" if entry.state is ModelState.FAILED
                      else "")
            raise NotReady(f"model {entry.name!r} is {entry.state.value}{detail}")
        return entry

    @property
    def ready(self) -> bool:
        """Every configured model (unless an operator unloaded it) is ready, some model is, and the
        server is not draining."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready, or None. A model loaded through the repository API has its own
        readiness (``/v2/models/{m}/ready``): its failure or its loading must not take the server
        out of a load balancer, nor get a Ray replica that serves every other model replaced."""
        if self.draining or self.withdrawn:
            return "the server is shutting down"
        waiting = [m for m in self._models.values() if m.configured and m.state is not ModelState.UNLOADED
                   and not m.ready]
        if waiting:
            return "models not ready: " + ", ".join(f"{m.name} ({m.state.value})" for m in waiting)
        if not any(m.ready for m in self._models.values()):
            return "models not ready: none loaded"
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.cpu_pool is None:
            # Decode and render threads, shared by all models. Sized to the machine: measured on 2 cores,
            # 2 threads served 10-20% more images/s than asyncio's default of 6, which queue on the GIL.
            threads = self._cpu_threads or max(2, os.cpu_count() or 2)
            self.cpu_pool = confined_pool(threads, "camserve-cpu")
        if self.render_pool is None:
            # Heavy renders (pipeline.HEAVY_RENDER_PIXELS), one at a time for the whole server: they
            # neither fill the CPU pool small requests need nor hold more than one render's memory.
            self.render_pool = confined_pool(1, "camserve-render")
        self.draining = False
        self.stopping.clear()
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # started outside a loop (a notebook): drains then have no deadline
            self._loop = None

    def declare(self, name: str, spec: ModelSpec | None) -> ServedModel:
        """Name a configured model that is about to load, so requests for it get 503 (loading), not 404,
        and the server is not ready until it is."""
        entry = self._entry(name, spec)
        entry.configured = True
        if self.default is None:
            self.default = name
        return entry

    def _entry(self, name: str, spec: ModelSpec | None) -> ServedModel:
        entry = self._models.get(name)
        if entry is None:
            entry = self._models[name] = ServedModel(name, spec)
        return entry

    async def load(self, source: ModelSpec | LoadedModel, *, replace: bool = True) -> ServedModel:
        """Load (or reload) a model and make it ready. A model given already built is served as is.

        A reload is atomic: the new model is built and warmed beside the old one, which serves until
        the swap; if the new one fails, the old one stays as it was and so does its table (a later
        bodyless load reloads that last good table). Raises :class:`ModelLoadError`; a model that
        was not serving is then ``failed`` with the reason."""
        name = source.name
        spec = source.spec if isinstance(source, LoadedModel) else source
        entry = self._entry(name, None)
        async with entry.lock:
            serving = entry.state is ModelState.READY
            if serving and not replace:
                return entry
            if not serving:
                entry.state, entry.error = ModelState.LOADING, None
            # Everything the model does, from its load to its unload, runs in this thread (service.threads).
            thread = model_thread(name)
            try:
                model, pipeline = await self._build(source, thread)
            except BaseException as exc:
                thread.shutdown(wait=False)
                if not isinstance(exc, ModelLoadError):
                    raise
                if serving:
                    log.error("model %r keeps serving its previous table: the reload failed: %s", name, exc)
                else:
                    entry.state, entry.error = ModelState.FAILED, str(exc)
                raise
            s = self.settings
            batcher: Batcher[Job, JobResult] = Batcher(
                pipeline.compute, max_batch_size=s.max_batch_size, max_wait_s=s.max_wait_s, max_queue=s.max_queue,
                name=name, policy=s.policy, on_batch=self._on_batch(name) if self._on_batch else None,
                executor=thread)
            batcher.start()
            old_model, old_batcher = entry.model, entry.batcher
            entry.model, entry.pipeline, entry.batcher = model, pipeline, batcher
            entry.spec, entry.state, entry.error = spec, ModelState.READY, None
            if serving:
                # New requests already go to the new batcher; the old one finishes what it queued.
                await self._retire(old_model, old_batcher)
            log.info("model %r ready on %s: %d classes, input %s, default layer %s", name, model.device,
                     model.num_classes, model.preprocess.input_size, model.engine.layers.default or "none")
            if self.default is None:
                self.default = name
            return entry

    async def _build(self, source: ModelSpec | LoadedModel, thread: ThreadPoolExecutor
                     ) -> tuple[LoadedModel, Pipeline]:
        """The model and its warmed pipeline, not yet serving, built in the model's ``thread``. Raises
        :class:`ModelLoadError`."""
        loop = asyncio.get_running_loop()
        model = source if isinstance(source, LoadedModel) else await loop.run_in_executor(thread, load_model, source)
        try:
            pipeline = Pipeline(model, self.cpu_pool, self.render_pool, model_pool=thread)
            plan = await loop.run_in_executor(thread, pipeline.plan_memory_format, self._format_sizes(model))
            log.info("model %r memory format: %s", source.name, plan.describe())
            await self._warm_up(pipeline)
        except Exception as exc:
            if not isinstance(source, LoadedModel):  # e.g. out of memory even for one image
                _evict(model)
            raise ModelLoadError(f"model {source.name!r} failed its warm-up: {exc}") from exc
        return model, pipeline

    async def _warm_up(self, pipeline: Pipeline) -> None:
        """Run the whole path once (decode, explain, render) so the first client pays nothing extra; on
        CUDA also at the largest batch size, which selects its kernels."""
        model = pipeline.model
        h, w = model.preprocess.input_size
        png = encode_png(np.full((h, w, 3), 127, dtype=np.uint8))
        # A batch that runs out of memory here is split like any other (Pipeline.compute); only an image
        # that does not fit alone fails the load.
        # An embedding model explains a similarity: the warm-up's is each image's to the first.
        targets = (RequestTarget(TaskTarget(), similar_to=0),) if model.task_name == "embedding" else ()
        for n in self._warm_up_sizes(model):
            query = CamQuery(method=model.engine.methods[0]) if model.explainable else None
            await pipeline.run([png] * n, top_k=1, query=query, spec=HeatmapSpec(),
                               max_pixels=self.settings.max_image_pixels, targets=targets)
        # The memory-format measurement has timed forwards already; a model it did not time is timed here.
        loop = asyncio.get_running_loop()
        model.forward_s = pipeline.formats.forward_s or await loop.run_in_executor(pipeline.model_pool,
                                                                                   _forward_seconds, model)
        await loop.run_in_executor(pipeline.model_pool, _check_input_dependence, model)

    def _format_sizes(self, model: LoadedModel) -> list[int]:
        """A lone request's batch and a loaded server's; on a CPU, time grows with the batch, and 8 images
        already show which format wins there."""
        largest = min(self.settings.max_batch_size, self.settings.max_queue)
        return [1, largest if model.device.type == "cuda" else min(largest, 8)]

    def _warm_up_sizes(self, model: LoadedModel) -> list[int]:
        if model.device.type == "cuda" and self.settings.max_batch_size > 1:
            return [1, min(self.settings.max_batch_size, self.settings.max_queue)]
        return [1]

    async def unload(self, name: str) -> ServedModel:
        """Stop admitting requests for ``name``, let its queued ones finish, free it."""
        entry = self.find(name)
        async with entry.lock:
            await self._unload_locked(entry)
        return entry

    async def _unload_locked(self, entry: ServedModel) -> None:
        if entry.state in (ModelState.READY, ModelState.DRAINING):
            entry.state = ModelState.DRAINING
        await self._retire(entry.model, entry.batcher)
        entry.model, entry.pipeline, entry.batcher = None, None, None
        entry.state = ModelState.UNLOADED
        log.info("model %r unloaded", entry.name)

    @staticmethod
    async def _retire(model: LoadedModel | None, batcher: Batcher[Job, JobResult] | None) -> None:
        """Let ``batcher`` finish what it queued, stop it, and free ``model``'s hooks and memory."""
        if batcher is not None:
            await batcher.drain()
            await batcher.stop()
        if model is not None:
            model.close()
        gc.collect()
        if model is not None and model.device.type == "cuda":
            torch.cuda.empty_cache()

    def begin_drain(self, timeout_s: float | None = None) -> None:
        """Readiness off for every model: a load balancer stops routing here while work finishes.

        With ``timeout_s`` (the server's drain timeout), requests still running shortly before it
        passes are answered 503 ``not_ready``: the server cancels whatever is left at the timeout, and
        a cancelled request gets a plain-text 500 and a traceback in the log. Safe to call from a
        signal handler."""
        self.draining = True
        if timeout_s is not None and self._loop is not None:
            delay = max(0.0, timeout_s - min(0.25, timeout_s / 2))
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, self.stopping.set)

    async def close(self, close_models: bool = True) -> None:
        """Stop every batcher (answering what is left with 503) and the CPU pool."""
        self.draining = True
        for entry in self:
            if entry.batcher is not None:
                await entry.batcher.stop()
            if close_models and entry.model is not None:
                entry.model.close()
        for attr in ("cpu_pool", "render_pool"):
            pool = getattr(self, attr)
            if pool is not None:
                setattr(self, attr, None)
                await asyncio.to_thread(pool.shutdown, True)


def _forward_seconds(model: LoadedModel, rows: int = 8) -> float:
    """Per image, the faster of two timed forwards of ``rows`` images (the size perturbation methods
    forward in, at most their chunk): what one of their extra forwards costs, roughly."""
    h, w = model.preprocess.input_size
    rows = min(rows, model.engine.chunk_rows)
    while True:
        x = torch.zeros(rows, 3, h, w, device=model.device)
        best = math.inf
        try:
            for _ in range(2):
                started = time.perf_counter()
                model.engine.predict(x)
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                best = min(best, time.perf_counter() - started)
            return best / rows
        except RuntimeError as exc:  # out of memory: fewer rows (the warm-up has shown that one fits)
            if rows == 1 or not is_oom(exc):
                raise
            del x
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            rows //= 2


def _check_input_dependence(model: LoadedModel) -> None:
    """Warn about a model whose logits are the same for a grey image and for noise: a zero-initialised head
    (torchvision's ViT with weights = "none") or a broken model, whose every gradient map is zero. One image
    a forward: the warm-up has shown that one fits."""
    h, w = model.preprocess.input_size
    noise = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 4 - 2
    grey, noisy = (tree_leaves(model.engine.predict(x.to(model.device)))
                   for x in (torch.full((1, 3, h, w), 0.5), noise))
    # A detector that finds nothing in either image returns empty tensors for both: that says nothing.
    model.input_independent = len(grey) == len(noisy) and any(a.numel() for a in grey) and all(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(grey, noisy, strict=True))
    if model.input_independent:
        log.warning("model %r: its output does not depend on its input (the same logits for two different "
                    "images; a zero-initialised head, as torchvision's ViT has with weights = \"none\"?): every "
                    "gradient map will be zero", model.name)


def _evict(model: LoadedModel) -> None:
    """Remove the hooks of a model that failed to start and give its device memory back to the driver. The
    weights move to the CPU first: the failure's traceback still holds the model."""
    model.close()
    if model.device.type == "cuda":
        model.module.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
