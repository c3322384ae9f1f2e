"""One model's work for one request, in three stages, with or without a batcher.

The stages run in different places on purpose. Decoding and resizing (``prepare``) and rendering
(``finish``) of large images run in the shared CPU pool, one call per image, so they overlap with the
model; only the forward/backward (``compute``) runs in the model's own thread, fed by a batcher when
there is one. Without one (the start-up warm-up, a notebook), ``run`` computes the request's images
as one batch.

A request that finds its model idle skips the hops (``run_alone``): it decodes and computes in the
model's thread in one call, as a plain model server would, and only finishes on the loop.

Small work stays on the event loop: a trip to the pool costs two thread switches, and on a busy
machine the wait for the pool thread to be scheduled, which is more than decoding a thumbnail or
encoding its heatmap (see docs/benchmarks.md, "Where the time goes"). Each request may do at most
``INLINE_PIXELS`` of such work on the loop, so no request can stall the others for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from service.cam import CamMaps, CamQuery, ExplainJob
from service.cam.tasks import Summary
from service.errors import CamserveError, InvalidInput, OutOfMemory, PayloadTooLarge
from service.imaging import decode_image, load_rgb, open_image
from service.memory_format import FormatPlan, measure
from service.preprocess import Geometry
from service.registry import LoadedModel
from service.rendering import Heatmap, HeatmapSpec, output_size, render
from service.results import Explanation, ImageResult, Prediction
from service.task_results import RequestTarget, describe, finish_task, label_name, localise, marks
from service.threads import one_thread

# Pixels of decoding plus rendering one request may do on the event loop (a 64x64 image decodes and
# preprocesses in about 0.4 ms, and renders a heatmap in about as much).
INLINE_PIXELS = 128 * 128
# Rendered heatmap pixels (images x targets x output size) one request may ask for, by default.
MAX_RENDER_PIXELS = 100_000_000
# A request rendering more pixels than this is heavy: its renders go to the render pool, one thread
# for the whole server, so heavy renders run one at a time and never fill the shared CPU pool that
# every small request needs for decoding and rendering. 4 M is a 2000x2000 upload with one target:
# about 0.1 s of rendering here.
HEAVY_RENDER_PIXELS = 4_000_000
# Uploads larger than this (by their header) decode on the render pool as well.
HEAVY_DECODE_PIXELS = 2_000_000

ImageInput = bytes | Tensor
_NO_PIXELS = torch.empty(0)
T = TypeVar("T")


@dataclass(frozen=True)
class PreparedImage:
    """``image``: ``(H, W, 3)`` uint8 original; ``pixels``: ``(3, h, w)`` model input, uint8 (or float32
    already normalised when ``normalized``); both on the model's device."""

    image: Tensor
    pixels: Tensor
    geometry: Geometry
    normalized: bool = False

    def input_image(self) -> Tensor:
        """The model-input pixels as ``(h, w, 3)`` uint8, for overlays at ``size=input``."""
        return self.image if self.normalized else self.pixels.permute(1, 2, 0)


@dataclass(frozen=True)
class Job:
    """One image's share of a batch, or (``resume``) the next chunk of an explanation already started."""

    pixels: Tensor
    query: CamQuery | None
    normalized: bool = False
    resume: ExplainJob | None = None


@dataclass(frozen=True)
class JobResult:
    """``pending``: an explanation with chunks left (ScoreCAM, AblationCAM, metrics); ``cam`` comes once it ends."""

    logits: Tensor  # (K,); for tasks beyond classification, (T,) the target scores
    cam: CamMaps | None
    pending: ExplainJob | None = None
    summary: Summary | None = None  # a detector's, segmenter's or embedding model's prediction


Submit = Callable[[list[Job]], Awaitable[list[JobResult]]]
Expect = Callable[[int], AbstractContextManager[object]]
# A lone request's prepared images and computed results (a result may be an error).
Lone = tuple[list["PreparedImage"], list["JobResult | BaseException"]]
# Runs a lone request's work (for so many images) in the model thread if the model is idle, else None.
RunAlone = Callable[[Callable[[], Lone], int], Awaitable[Lone | None]]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (CUDA's, or one that says so)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


class Pipeline:
    """``prepare`` -> ``compute`` -> ``finish`` for one loaded model."""

    def __init__(self, model: LoadedModel, cpu_pool: Executor | None = None,
                 render_pool: Executor | None = None, model_pool: Executor | None = None) -> None:
        """``cpu_pool`` runs decoding and rendering; ``None`` uses the event loop's default executor.
        ``render_pool`` renders heavy requests (see ``HEAVY_RENDER_PIXELS``); ``None``: the CPU pool.
        ``model_pool`` computes when no batcher submits (the warm-up); ``None``: the default executor."""
        self.model = model
        self.cpu_pool = cpu_pool
        self.render_pool = render_pool or cpu_pool
        self.model_pool = model_pool
        # channels_last until measured (see plan_memory_format): the format the registry loads models in.
        self.formats = FormatPlan()

    def plan_memory_format(self, sizes: Sequence[int], reps: int = 3) -> FormatPlan:
        """Measure which memory format runs batches of ``sizes`` fastest, at the model's precision, and use it."""
        m = self.model
        h, w = m.preprocess.input_size
        example = torch.randn(1, 3, h, w, device=m.device)

        def sync() -> None:
            if m.device.type == "cuda":
                torch.cuda.synchronize(m.device)

        try:
            with self._autocast():
                self.formats = measure(m.module, m.engine.predict, example, sizes, reps, sync)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            if m.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(sizes) > 1:  # the larger batch does not fit: measure for a lone image only
                return self.plan_memory_format(sorted(sizes)[:1], reps)
            m.module.to(memory_format=torch.channels_last)  # nothing fits: as loaded, for the warm-up to report
            self.formats = FormatPlan()
        return self.formats

    def _autocast(self) -> torch.autocast:
        m = self.model
        return torch.autocast(m.device.type, dtype=m.precision or torch.float32, enabled=m.precision is not None)

    # -- stage 1: CPU pool -----------------------------------------------------------------------
    def prepare(self, data: ImageInput, max_pixels: int) -> PreparedImage:
        """An encoded image file, or a ``(3, h, w)`` tensor at the model's input size."""
        if isinstance(data, Tensor):
            return self.prepare_tensor(data)
        return self.prepare_array(decode_image(data, max_pixels), max_pixels)

    def prepare_array(self, rgb: np.ndarray, max_pixels: int) -> PreparedImage:
        """``(H, W, 3)`` uint8 -> resized and cropped model input, on the device."""
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

    def prepare_tensor(self, pixels: Tensor) -> PreparedImage:
        """A client-preprocessed ``(3, h, w)`` input: uint8 pixels, or float32 already normalised."""
        h, w = self.model.preprocess.input_size
        if pixels.dim() != 3 or tuple(pixels.shape) != (3, h, w):
            raise InvalidInput(f"a pixel tensor must have shape [3, {h}, {w}] for this model, got "
                               f"{list(pixels.shape)}")
        pixels = pixels.to(self.model.device)
        geom = Geometry((h, w), (h, w), (0, 0, h, w))
        if pixels.dtype == torch.uint8:
            return PreparedImage(pixels.permute(1, 2, 0), pixels, geom)
        pixels = pixels.float()
        if not bool(torch.isfinite(pixels).all()):
            raise InvalidInput("a pixel tensor holds NaN or infinite values")
        image = self.model.preprocess.denormalize(pixels).permute(1, 2, 0)
        return PreparedImage(image, pixels, geom, normalized=True)

    # -- stage 2: the model thread ---------------------------------------------------------------
    def compute(self, jobs: list[Job]) -> list[JobResult | BaseException]:
        """Run one batch through the engine; on CUDA out-of-memory, split it and retry the halves."""
        try:
            return self._compute(jobs)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                return [OutOfMemory(f"one image does not fit in {self.model.device} memory for model "
                                    f"{self.model.name!r}", retry_after=5.0)]
            half = len(jobs) // 2
            return [*self.compute(jobs[:half]), *self.compute(jobs[half:])]

    def _compute(self, jobs: list[Job]) -> list[JobResult | BaseException]:
        """The batch's new images share one forward and backward; an image whose explanation needs more
        (perturbations, metrics) gets its own job, returned pending, and each ``resume`` job runs one
        chunk. Between chunks the batcher serves other batches, so nothing waits behind more than one."""
        m = self.model
        engine = m.engine
        results: list[JobResult | BaseException | None] = [None] * len(jobs)
        fresh = [i for i, j in enumerate(jobs) if j.resume is None]
        deferred = {i for i in fresh if jobs[i].query is not None and engine.deferred(jobs[i].query)}  # type: ignore[arg-type]
        with self._autocast():
            for i, job in enumerate(jobs):
                if job.resume is not None:
                    results[i] = self._advance(job.resume)
            now = [i for i in fresh if i not in deferred]
            if now:
                x = self._inputs([jobs[i] for i in now])
                out = engine.explain(x, [jobs[i].query for i in now])
                for k, i in enumerate(now):
                    results[i] = JobResult(out.logits[k], out.cams[k],
                                           summary=out.summaries[k] if out.summaries else None)
            for i in sorted(deferred):
                results[i] = self._advance(engine.begin(self._inputs([jobs[i]]), [jobs[i].query]), step=False)
        return [r for r in results if r is not None]

    def _inputs(self, jobs: list[Job]) -> Tensor:
        pre = self.model.preprocess
        fmt = self.formats.input_format(len(jobs))
        if any(j.normalized for j in jobs):
            x = torch.stack([j.pixels if j.normalized else pre.normalize(j.pixels) for j in jobs])
            return x.contiguous(memory_format=fmt)
        # The uint8 batch changes format (a quarter of the float bytes); normalising keeps it.
        return pre.normalize(torch.stack([j.pixels for j in jobs]).contiguous(memory_format=fmt))

    @staticmethod
    def _advance(job: ExplainJob, step: bool = True) -> JobResult:
        if step:
            job.step()
        if job.done:
            out = job.result()
            return JobResult(out.logits[0], out.cams[0], summary=out.summaries[0] if out.summaries else None)
        return JobResult(job.logits[0], None, pending=job)

    # -- stage 3: CPU pool -----------------------------------------------------------------------
    def finish(self, prepared: PreparedImage, result: JobResult, top_k: int, spec: HeatmapSpec | None) -> ImageResult:
        if result.summary is not None:
            return self._finish_task(prepared, result, top_k, spec)
        scores = self.model.scores(result.logits)
        top, idx = scores.topk(top_k)
        labels = self.model.labels
        preds = [Prediction(int(i), labels[int(i)], round(float(s), 6))
                 for s, i in zip(top.tolist(), idx.tolist(), strict=True)]
        all_scores = [round(s, 6) for s in scores.tolist()]
        if result.cam is None or spec is None:
            return ImageResult(preds, all_scores)
        cam = result.cam
        base = None
        if spec.output == "overlay":
            base = prepared.image if spec.size == "original" else prepared.input_image()
        heatmaps = render(cam.maps, spec, prepared.geometry, self.model.preprocess.input_size, base)
        explanations = [Explanation(c, labels[c], all_scores[c], cam.method, cam.layer, h, self._metrics(cam, t),
                                    self._note(cam, t))
                        for t, (c, h) in enumerate(zip(cam.classes, heatmaps, strict=True))]
        return ImageResult(preds, all_scores, explanations)

    def _finish_task(self, prepared: PreparedImage, result: JobResult, top_k: int,
                     spec: HeatmapSpec | None) -> ImageResult:
        assert result.summary is not None
        labels, geom = self.model.labels, prepared.geometry
        found = finish_task(result.summary, geom, labels, top_k)
        if result.cam is None or spec is None:
            return ImageResult([], [], task=found)
        cam = result.cam
        heatmaps: list[Heatmap] = []
        if cam.classes:
            base, drawn = None, None
            if spec.output == "overlay":
                base = prepared.image if spec.size == "original" else prepared.input_image()
                drawn = [marks(t, geom, labels, spec.size, self.model.preprocess.input_size) for t in cam.resolved]
            heatmaps = render(cam.maps, spec, geom, self.model.preprocess.input_size, base, drawn)
        explanations = [Explanation(t.label, label_name(labels, t.label) if t.label >= 0 else "similarity",
                                    round(float(result.logits[k]), 6), cam.method, cam.layer, h, self._metrics(cam, k),
                                    self._note(cam, k), describe(t, geom, labels))
                        for k, (t, h) in enumerate(zip(cam.resolved, heatmaps, strict=True))]
        return ImageResult([], [], explanations, task=found)

    def _note(self, cam: CamMaps, target: int) -> str | None:
        if float(cam.raw_max[target]) > 0:
            return None
        if self.model.input_independent:
            return ("the map is all zero: this model's output does not depend on its input (a zero-initialised "
                    "head, as with weights = \"none\"?), so every gradient is zero")
        return (f"the map is all zero: nothing in layer {cam.layer!r} raises this class's score under "
                f"{cam.method} (try another layer or method)")

    @staticmethod
    def _metrics(cam: CamMaps, target: int) -> dict[str, float] | None:
        if cam.metrics is None:
            return None
        out = {name: round(float(values[target]), 6) for name, values in cam.metrics.items()}
        if cam.metric_steps is not None:
            out["steps"] = cam.metric_steps  # the curves' resolution, named so replies can be compared
        return out

    # -- the whole request -----------------------------------------------------------------------
    def render_pixels(self, prepared: Sequence[PreparedImage], query: CamQuery | None,
                      spec: HeatmapSpec | None) -> int:
        """Heatmap pixels this request renders (images x targets x output size); 0 when it only predicts.
        ``size=feature`` counts as the model input, an upper bound of the layer's grid."""
        if query is None or spec is None:
            return 0
        per_image = max(len(query.classes), query.top)
        input_size = self.model.preprocess.input_size
        total = 0
        for p in prepared:
            h, w = output_size(spec, p.geometry, input_size, input_size)
            total += h * w
        return per_image * total

    async def _submit(self, jobs: list[Job], submit: Submit | None) -> list[JobResult]:
        if submit is not None:
            return await submit(jobs)
        return _raise_first(await asyncio.get_running_loop().run_in_executor(self.model_pool, self.compute, jobs))

    def _check_render(self, prepared: Sequence[PreparedImage], query: CamQuery | None, spec: HeatmapSpec | None,
                      max_render_pixels: int) -> int:
        total = self.render_pixels(prepared, query, spec)
        if total > max_render_pixels:
            raise PayloadTooLarge(f"{total} heatmap pixels asked for, over the limit of {max_render_pixels}; "
                                  "ask for fewer targets or images, or `size=input`")
        return total

    def _alone(self, images: Sequence[ImageInput], query: CamQuery | None, spec: HeatmapSpec | None,
               max_pixels: int, max_render_pixels: int) -> Lone:
        """A lone request's decoding and compute, in the model thread."""
        prepared = [self._nth(i, self.prepare, data, max_pixels) for i, data in enumerate(images)]
        self._check_render(prepared, query, spec, max_render_pixels)
        return prepared, self.compute([Job(p.pixels, query, p.normalized) for p in prepared])

    async def run(self, images: Sequence[ImageInput], *, top_k: int, query: CamQuery | None,
                  spec: HeatmapSpec | None, max_pixels: int, submit: Submit | None = None,
                  expect: Expect | None = None, max_render_pixels: int = MAX_RENDER_PIXELS,
                  alone: RunAlone | None = None, targets: Sequence[RequestTarget] = ()) -> list[ImageResult]:
        """Predict (``query`` None) or explain every image of one request, in order.

        ``submit`` hands the jobs to a batcher; without it they are computed here as one batch.
        ``expect`` (the batcher's) announces the images while they are decoded. ``alone`` (the batcher's
        ``run_alone``) decodes and computes a single image in the model thread in one hop when the model is
        idle (several images decode faster side by side in the CPU pool).
        ``max_render_pixels`` bounds the heatmap pixels one request renders (the memory its answer takes).
        ``targets``: a detector's, segmenter's or embedding model's targets, in the uploads' pixels (they are
        localised per image after decoding, so such a request takes the batched path)."""
        lone = None
        if alone is not None and len(images) == 1 and not targets:
            lone = await alone(partial(self._alone, images, query, spec, max_pixels, max_render_pixels), len(images))
        if lone is not None:
            prepared, computed = lone
            total = self.render_pixels(prepared, query, spec)
            results = _raise_first(computed)
        else:
            with expect(len(images)) if expect is not None else nullcontext():
                prepared = await self._prepare_all(images, max_pixels)
            total = self._check_render(prepared, query, spec, max_render_pixels)
            if query is not None and targets:
                queries = await self._localised(prepared, query, targets, submit)
                jobs = [Job(p.pixels, q, p.normalized) for p, q in zip(prepared, queries, strict=True)]
            else:
                jobs = [Job(p.pixels, query, p.normalized) for p in prepared]
            results = await self._submit(jobs, submit)
        for i, r in enumerate(results):
            # One chunk per submission: other requests' batches queue between our chunks. A cancelled
            # request stops here, and its remaining chunks are never run.
            while r.pending is not None:
                (r,) = await self._submit([Job(_NO_PIXELS, None, resume=r.pending)], submit)
            results[i] = r
        if total > HEAVY_RENDER_PIXELS:  # one heavy render at a time, in its own pool
            loop = asyncio.get_running_loop()
            return await asyncio.gather(*(loop.run_in_executor(self.render_pool, self.finish, p, r, top_k, spec)
                                          for p, r in zip(prepared, results, strict=True)))
        return await self._finish_all(prepared, results, top_k, spec)

    async def _localised(self, prepared: list[PreparedImage], query: CamQuery, targets: Sequence[RequestTarget],
                         submit: Submit | None) -> list[CamQuery]:
        """Each image's query with its targets in its model-input pixels. Images that other images' targets
        name as their reference (``similar_to``) are embedded first, through the batcher like any image."""
        for t in targets:
            if t.image is not None and not 0 <= t.image < len(prepared):
                raise InvalidInput(f"a target is for image {t.image}, but the request has {len(prepared)} images")
            if t.similar_to is not None and not 0 <= t.similar_to < len(prepared):
                raise InvalidInput(f"a target refers to image {t.similar_to}, but the request has {len(prepared)} "
                                   "images")
        named = sorted({t.similar_to for t in targets if t.similar_to is not None})
        embeddings: dict[int, Tensor] = {}
        if named:
            done = await self._submit([Job(prepared[i].pixels, None, prepared[i].normalized) for i in named], submit)
            for i, r in zip(named, done, strict=True):
                if r.summary is None or r.summary.embedding is None:
                    raise InvalidInput("an image can be a target only for an embedding model")
                embeddings[i] = r.summary.embedding
        return [replace(query, targets=localise(targets, i, p.geometry, self.model.device, embeddings))
                for i, p in enumerate(prepared)]

    async def _prepare_all(self, images: Sequence[ImageInput], max_pixels: int) -> list[PreparedImage]:
        """Headers are read here (no pixel decoded); small images are decoded here too, the rest in the
        pool, concurrently."""
        loop = asyncio.get_running_loop()
        budget = INLINE_PIXELS
        out: list[PreparedImage | asyncio.Future[PreparedImage]] = []
        for i, data in enumerate(images):
            if isinstance(data, Tensor):
                with one_thread():  # on the event loop: no OpenMP team of its own (service.threads)
                    out.append(self._nth(i, self.prepare_tensor, data))
                continue
            im = self._nth(i, open_image, data, max_pixels)
            w, h = im.size
            rh, rw = self.model.preprocess.geometry(h, w).resized
            work = max(w * h, rh * rw)
            if work <= budget:
                budget -= work
                with one_thread():
                    out.append(self._nth(i, self._prepare_opened, im, max_pixels))
            else:
                # (Reopened there: reading a header again costs microseconds.)
                # Large uploads decode on the render pool: two of them decoding at once would otherwise
                # hold both threads of the shared pool for a second, and small requests would wait.
                pool = self.render_pool if w * h > HEAVY_DECODE_PIXELS else self.cpu_pool
                out.append(loop.run_in_executor(pool, self._nth, i, self.prepare, data, max_pixels))
        futures = [p for p in out if isinstance(p, asyncio.Future)]
        if futures:
            await asyncio.gather(*futures)
        return [p.result() if isinstance(p, asyncio.Future) else p for p in out]

    def _prepare_opened(self, im: Image.Image, max_pixels: int) -> PreparedImage:
        return self.prepare_array(load_rgb(im), max_pixels)

    async def _finish_all(self, prepared: list[PreparedImage], results: list[JobResult], top_k: int,
                          spec: HeatmapSpec | None) -> list[ImageResult]:
        """Predictions and small heatmaps are finished here; larger heatmaps in the pool, concurrently."""
        loop = asyncio.get_running_loop()
        budget = INLINE_PIXELS
        out: list[ImageResult | asyncio.Future[ImageResult]] = []
        for p, r in zip(prepared, results, strict=True):
            work = 0 if spec is None or r.cam is None else self._render_pixels(p, r.cam, spec)
            if work <= budget:
                budget -= work
                with one_thread():  # on the event loop, as in _prepare_all
                    out.append(self.finish(p, r, top_k, spec))
            else:
                out.append(loop.run_in_executor(self.cpu_pool, self.finish, p, r, top_k, spec))
        futures = [f for f in out if isinstance(f, asyncio.Future)]
        if futures:
            await asyncio.gather(*futures)
        return [f.result() if isinstance(f, asyncio.Future) else f for f in out]

    def _render_pixels(self, prepared: PreparedImage, cam: CamMaps, spec: HeatmapSpec) -> int:
        h, w = {"original": prepared.geometry.original, "input": self.model.preprocess.input_size}.get(
            spec.size, tuple(cam.maps.shape[-2:]))
        per_map = h * w * (3 if spec.output == "overlay" else 1)  # overlays blend three channels
        return len(cam.classes) * per_map

    @staticmethod
    def _nth(index: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, naming which of several images was bad in its error."""
        try:
            return fn(*args)
        except CamserveError as exc:
            exc.message = f"image {index}: {exc.message}"
            raise


def _raise_first(computed: Sequence[JobResult | BaseException]) -> list[JobResult]:
    for r in computed:
        if isinstance(r, BaseException):
            raise r
    return [r for r in computed if isinstance(r, JobResult)]
