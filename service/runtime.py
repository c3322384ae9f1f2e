"""One served model end to end, without HTTP: prepare images, batch them, render the results.

The three stages run in different places on purpose. Decoding and resizing (``prepare``) and PNG
encoding (``render``) run in the shared thread pool, one call per request, so they overlap with the
model; only the forward/backward runs in the model's single worker thread, fed by the batcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.batching import Batcher, BatchStats
from service.cam import CamMaps, CamQuery, get_method
from service.errors import CamserveError, InvalidArgument, OutOfMemory, PayloadTooLarge
from service.imaging import decode_image
from service.preprocess import Geometry
from service.registry import LoadedModel
from service.rendering import Heatmap, HeatmapSpec, render


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Explanation(Prediction):
    """A class's heatmap; ``score`` is its softmax probability, as in the predictions."""

    method: str
    layer: str
    heatmap: Heatmap


@dataclass(frozen=True)
class ImageResult:
    predictions: list[Prediction]
    explanations: list[Explanation] | None = None


@dataclass(frozen=True)
class PreparedImage:
    """``image``: ``(H, W, 3)`` uint8 original; ``pixels``: ``(3, h, w)`` uint8 model input; both on device."""

    image: Tensor
    pixels: Tensor
    geometry: Geometry


@dataclass(frozen=True)
class Job:
    pixels: Tensor
    query: CamQuery | None


@dataclass(frozen=True)
class JobResult:
    logits: Tensor  # (K,)
    cam: CamMaps | None


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    policy: str = "adaptive"
    max_queue: int = 256
    timeout_s: float | None = 30.0


MAX_TARGETS = 16
# Rendered heatmap pixels one request may ask for (images x targets x output size): each costs a few
# bytes of float work on the way to a PNG, so this bounds a request's memory at a few GB at worst.
MAX_OUTPUT_PIXELS = 200_000_000


def is_index(text: str) -> bool:
    """A class index written as text: ASCII digits only ("²".isdigit() is true), and short enough
    that ``int()`` cannot hit Python's digit limit."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


class ModelRuntime:
    """A loaded model with its batcher; ``predict`` and ``explain`` are the whole public surface."""

    def __init__(self, model: LoadedModel, settings: BatchSettings,
                 on_batch: Callable[[BatchStats], None] | None = None, cpu_pool: Executor | None = None) -> None:
        """``cpu_pool`` runs decoding and rendering; ``None`` uses the event loop's default executor.
        A pool about the size of the machine is best: more threads only queue on the GIL."""
        self.model = model
        self.settings = settings
        self.cpu_pool = cpu_pool
        self.batcher: Batcher[Job, JobResult] = Batcher(
            self.run_batch, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_s,
            max_queue=settings.max_queue, name=model.name, policy=settings.policy, on_batch=on_batch)

    # -- validation, before any work -------------------------------------------------------------
    def class_index(self, target: int | str) -> int:
        labels, k = self.model.labels, self.model.num_classes
        if isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target < k:
                raise InvalidArgument("targets", f"target class index must be in 0..{k - 1}, got {target}")
            return target
        if isinstance(target, str):
            if target in labels:
                return labels.index(target)
            if is_index(target):
                return self.class_index(int(target))
        raise InvalidArgument("targets", f"unknown target class {target!r}; use an index in 0..{k - 1} or a label")

    def check_top_k(self, top_k: int | None) -> int:
        k = self.model.num_classes
        if top_k is None:
            return min(5, k)
        if not 1 <= top_k <= k:
            raise InvalidArgument("top_k", f"`top_k` must be between 1 and {k}, got {top_k}")
        return top_k

    def make_query(self, method: str, layer: str | None, targets: Sequence[int | str] | None) -> CamQuery:
        get_method(method)
        if targets and len(targets) > MAX_TARGETS:
            raise InvalidArgument("targets", f"at most {MAX_TARGETS} targets per request, got {len(targets)}")
        resolved_layer = self.model.engine.layers.resolve(layer)
        classes = tuple(self.class_index(t) for t in targets) if targets else ()
        return CamQuery(method=method, layer=resolved_layer, classes=classes)

    # -- stage 1: thread pool --------------------------------------------------------------------
    def prepare(self, data: bytes, max_pixels: int) -> PreparedImage:
        """Decode and resize one image; runs in the shared thread pool."""
        rgb = decode_image(data, max_pixels)
        pre, dev = self.model.preprocess, self.model.device
        image = torch.from_numpy(np.ascontiguousarray(rgb))
        if dev.type == "cuda":
            image = image.pin_memory().to(dev, non_blocking=True)
        geom = pre.geometry(rgb.shape[0], rgb.shape[1])
        rh, rw = geom.resized
        if rh * rw > max_pixels:  # a 1x1000000 strip resized to "short side 256" would be 65 G pixels
            raise PayloadTooLarge(f"image of {rgb.shape[1]}x{rgb.shape[0]} would be resized to {rw}x{rh}, over "
                                  f"the limit of {max_pixels} pixels")
        return PreparedImage(image, pre.resized_uint8(image, geom), geom)

    def _prepare_nth(self, index: int, data: bytes, max_pixels: int) -> PreparedImage:
        try:
            return self.prepare(data, max_pixels)
        except CamserveError as exc:
            exc.message = f"image {index}: {exc.message}"  # which of several images was bad
            raise

    # -- stage 2: the model thread ---------------------------------------------------------------
    def run_batch(self, jobs: list[Job]) -> list[JobResult | BaseException]:
        """Run one batch through the engine; on CUDA out-of-memory, split it and retry the halves."""
        try:
            return self._compute(jobs)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                return [OutOfMemory(f"one image does not fit in {self.model.device} memory for model "
                                    f"{self.model.name!r}", retry_after=5.0)]
            half = len(jobs) // 2
            return [*self.run_batch(jobs[:half]), *self.run_batch(jobs[half:])]

    def _compute(self, jobs: list[Job]) -> list[JobResult | BaseException]:
        m = self.model
        x = m.preprocess.normalize(torch.stack([j.pixels for j in jobs])).contiguous(memory_format=torch.channels_last)
        with torch.autocast(m.device.type, dtype=m.precision or torch.float32, enabled=m.precision is not None):
            out = m.engine.explain(x, [j.query for j in jobs])
        return [JobResult(out.logits[i], out.cams[i]) for i in range(len(jobs))]

    # -- stage 3: thread pool --------------------------------------------------------------------
    def _predictions(self, logits: Tensor, top_k: int) -> tuple[list[Prediction], Tensor]:
        probs = logits.float().softmax(dim=0)
        scores, idx = probs.topk(top_k)
        preds = [Prediction(int(i), self.model.labels[int(i)], round(float(s), 6))
                 for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]
        return preds, probs

    def finish(self, prepared: PreparedImage, result: JobResult, top_k: int,
               spec: HeatmapSpec | None) -> ImageResult:
        preds, probs = self._predictions(result.logits, top_k)
        if result.cam is None or spec is None:
            return ImageResult(preds)
        cam = result.cam
        base = None
        if spec.output == "overlay":
            base = prepared.image if spec.size == "original" else prepared.pixels.permute(1, 2, 0)
        heatmaps = render(cam.maps, spec, prepared.geometry, self.model.preprocess.input_size, base)
        labels = self.model.labels
        explanations = [Explanation(c, labels[c], round(float(probs[c]), 6), cam.method, cam.layer, h)
                        for c, h in zip(cam.classes, heatmaps, strict=True)]
        return ImageResult(preds, explanations)

    # -- the whole request -----------------------------------------------------------------------
    async def infer(self, images: Sequence[bytes], *, top_k: int, query: CamQuery | None,
                    spec: HeatmapSpec | None, max_pixels: int, bounded: bool = True) -> list[ImageResult]:
        """Predict (``query`` None) or explain every image of one request, in order.

        ``bounded=False`` waits as long as it takes (the start-up warm-up of a slow model)."""
        loop = asyncio.get_running_loop()
        with self.batcher.expect(len(images)):  # a batch about to start may wait for these
            prepared = await asyncio.gather(*(loop.run_in_executor(self.cpu_pool, self._prepare_nth, i, d, max_pixels)
                                              for i, d in enumerate(images)))
        if query is not None and spec is not None and spec.size == "original":
            per_image = max(len(query.classes), query.top)
            total = per_image * sum(p.geometry.original[0] * p.geometry.original[1] for p in prepared)
            if total > MAX_OUTPUT_PIXELS:
                raise PayloadTooLarge(f"{total} heatmap pixels asked for, over the limit of {MAX_OUTPUT_PIXELS}; "
                                      "ask for fewer targets or images, or `size=input`")
        jobs = [Job(p.pixels, query) for p in prepared]
        results = await self.batcher.submit(jobs, self.settings.timeout_s if bounded else None)
        return await asyncio.gather(*(loop.run_in_executor(self.cpu_pool, self.finish, p, r, top_k, spec)
                                      for p, r in zip(prepared, results, strict=True)))
