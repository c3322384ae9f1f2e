"""The protocol-neutral data plane: every front-end (the native routes, KServe V1, the Open Inference
Protocol, the debugging page) turns its wire format into these calls and their results back.

It validates options against the model, resolves the model in the repository, bounds the request
(images, targets, time) and runs the model's pipeline through its batcher. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.cam import METHODS, CamQuery
from service.cam.engine import check_extra_forwards, check_time
from service.cam.metrics import DEFAULT_STEPS
from service.errors import InvalidArgument, NotReady, PayloadTooLarge, RequestTimeout
from service.labels import class_index
from service.pipeline import ImageInput
from service.rendering import HeatmapSpec, Output, Size
from service.repository import ModelRepository, ServedModel
from service.results import InferenceResult
from service.target_specs import read_targets
from service.task_results import RequestTarget

MAX_TARGETS = 16
# The most detections a detector's answer lists per image (``top_k``).
MAX_DETECTIONS = 100


def method_name(name: str) -> str:
    """The method table's name for ``name``. A name with ``+`` also goes by its spelling with ``p``
    (``gradcampp``), because a ``+`` in a URL query string is read as a space: ``?method=gradcam++``
    arrives as ``"gradcam  "``."""
    if name in METHODS:
        return name
    aliases = {m.replace("+", "p"): m for m in METHODS if "+" in m}
    if name in aliases:
        return aliases[name]
    known = ", ".join(f"{m} (or {m.replace('+', 'p')})" if "+" in m else m for m in METHODS)
    hint = ""
    if " " in name:
        hint = ("; a `+` in a URL query string means a space: write it `%2B` "
                f"(`method={name.replace(' ', '%2B')}`) or use the spelling with `p`")
    raise InvalidArgument("method", f"`method` must be one of {known}, got {name!r}{hint}")


@dataclass(frozen=True)
class ExplainOptions:
    """What to explain and how to render it; the defaults are the native API's."""

    method: str | None = None  # None: the model's first method (gradcam, or eigencam without gradients)
    layer: str | Sequence[str] | None = None  # several layers are fused with `fuse`
    # Classes (index or label); for other tasks also objects (service.target_specs)
    targets: Sequence[int | str | Mapping[str, Any]] = field(default_factory=tuple)
    objective: str = "score"  # how a detection target is scored: score, or score+iou
    fuse: str = "mean"
    smooth: str | None = None
    metrics: Sequence[str] = field(default_factory=tuple)
    metric_steps: int = DEFAULT_STEPS
    output: Output = "png"
    size: Size = "original"
    colormap: str = "jet"
    alpha: float = 0.5


@dataclass(frozen=True)
class Plan:
    """A validated request, ready to run: which model, how many predictions, what to explain."""

    served: ServedModel
    top_k: int
    query: CamQuery | None
    spec: HeatmapSpec | None
    targets: tuple[RequestTarget, ...] = ()  # a detector's, segmenter's or embedding model's targets

    @property
    def model_name(self) -> str:
        return self.served.name


@dataclass(frozen=True)
class Limits:
    max_images: int = 64
    max_image_pixels: int = 40_000_000
    max_render_pixels: int = 100_000_000
    timeout_s: float | None = 30.0
    max_extra_forwards: int = 524_288


def _collect(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class DataPlane:
    def __init__(self, repository: ModelRepository, limits: Limits) -> None:
        self.repository = repository
        self.limits = limits

    def plan(self, model: str | None, n_images: int, *, top_k: int | None = None,
             explain: ExplainOptions | None = None) -> Plan:
        """Check everything that can be checked before any image is read; raises domain errors."""
        served = self.repository.get(model)
        loaded = served.model
        assert loaded is not None  # a ready model is loaded
        if n_images > self.limits.max_images:
            raise PayloadTooLarge(f"{n_images} images in one request, over the limit of {self.limits.max_images}")
        queue = self.repository.settings.max_queue
        if n_images > queue:  # could never be queued whole: a retry cannot help, so not a 503
            raise PayloadTooLarge(f"{n_images} images in one request, more than the model's queue holds ({queue}); "
                                  "send them in smaller requests")
        k = loaded.num_classes if loaded.task is None else MAX_DETECTIONS
        if top_k is None:
            top_k = min(5, k)  # for a detector: the detections listed
        elif not 1 <= top_k <= k:
            raise InvalidArgument("top_k", f"`top_k` must be between 1 and {k}, got {top_k}")
        if explain is None:
            return Plan(served, top_k, None, None)
        method = method_name(explain.method or (loaded.engine.methods or ["gradcam"])[0])
        if len(explain.targets) > MAX_TARGETS:
            raise InvalidArgument("targets", f"at most {MAX_TARGETS} targets per request, got {len(explain.targets)}")
        layer = explain.layer if explain.layer is None or isinstance(explain.layer, str) else tuple(explain.layer)
        if isinstance(layer, tuple) and len(layer) == 1:
            layer = layer[0]
        targets: tuple[RequestTarget, ...] = ()
        if loaded.task is None:
            classes = tuple(class_index(loaded.labels, t) for t in explain.targets)  # type: ignore[arg-type]
        else:
            classes = ()
            targets = read_targets(loaded.task.name, loaded.labels, explain.targets, self.limits.max_image_pixels)
            if loaded.task.name == "embedding" and not targets:
                raise InvalidArgument("targets", "an embedding model explains a similarity: give a target "
                                      "{\"reference\": [numbers]} or {\"similar_to\": <image index>}")
        query = loaded.engine.check(CamQuery(method=method, layer=layer, classes=classes, fuse=explain.fuse,
                                             smooth=explain.smooth, metrics=tuple(explain.metrics),
                                             metric_steps=explain.metric_steps, objective=explain.objective))
        check_extra_forwards(n_images * loaded.engine.extra_forwards(query), loaded.engine.forward_units,
                             self.limits.max_extra_forwards)
        if loaded.forward_s is not None and self.limits.timeout_s is not None:
            check_time(n_images * loaded.engine.extra_forwards(query, whole_only=True), loaded.forward_s,
                       self.limits.timeout_s)
        spec = HeatmapSpec(explain.output, explain.size, explain.colormap, explain.alpha)
        return Plan(served, top_k, query, spec, targets)

    async def run(self, plan: Plan, images: Sequence[ImageInput]) -> InferenceResult:
        """Run a planned request; the whole of it (decode, queue, compute, render) is bounded by the
        request timeout."""
        pipeline = plan.served.pipeline
        if pipeline is None:  # unloaded between plan and run
            raise NotReady(f"model {plan.model_name!r} is {plan.served.state.value}")
        work = asyncio.ensure_future(pipeline.run(
            images, top_k=plan.top_k, query=plan.query, spec=plan.spec, max_pixels=self.limits.max_image_pixels,
            submit=plan.served.submit, expect=plan.served.expect, alone=plan.served.alone,
            max_render_pixels=self.limits.max_render_pixels, targets=plan.targets))
        stopping = asyncio.ensure_future(self.repository.stopping.wait())
        timeout = self.limits.timeout_s
        try:
            await asyncio.wait((work, stopping), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not work.done():
                # Timed out, drained, or this caller was cancelled: stop the work (its images leave the
                # batch queue) and collect whatever it ends with, so nothing is logged as unretrieved.
                work.cancel()
                work.add_done_callback(_collect)
        if work.done():
            return InferenceResult(plan.model_name, work.result())
        if stopping.done():
            raise NotReady("the server is shutting down: its drain timeout passed before this request finished")
        raise RequestTimeout(f"request took longer than the {timeout:g} s timeout")

    async def infer(self, model: str | None, images: Sequence[ImageInput], *, top_k: int | None = None,
                    explain: ExplainOptions | None = None) -> InferenceResult:
        """Plan and run in one call."""
        return await self.run(self.plan(model, len(images), top_k=top_k, explain=explain), images)
