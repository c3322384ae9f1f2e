"""One model's work for one request, in three stages, with or without a batcher.

The stages run in different places on purpose. Decoding and resizing (``prepare``) and rendering
(``finish``) run in the shared CPU pool, one call per image, so they overlap with the model; only the
forward/backward (``compute``) runs in the model's own thread, fed by a batcher when there is one.
Without one (the start-up warm-up, a notebook), ``run`` computes the request's images as one batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.cam import CamMaps, CamQuery
from service.errors import CamserveError, InvalidInput, OutOfMemory, PayloadTooLarge
from service.imaging import decode_image
from service.preprocess import Geometry
from service.registry import LoadedModel
from service.rendering import HeatmapSpec, render
from service.results import Explanation, ImageResult, Prediction

# Rendered heatmap pixels one request may ask for (images x targets x output size) at `size=original`.
MAX_OUTPUT_PIXELS = 200_000_000

ImageInput = bytes | Tensor


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
    """One image's share of a batch."""

    pixels: Tensor
    query: CamQuery | None
    normalized: bool = False


@dataclass(frozen=True)
class JobResult:
    logits: Tensor  # (K,)
    cam: CamMaps | None


Submit = Callable[[list[Job]], Awaitable[list[JobResult]]]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


class Pipeline:
    """``prepare`` -> ``compute`` -> ``finish`` for one loaded model."""

    def __init__(self, model: LoadedModel, cpu_pool: Executor | None = None) -> None:
        """``cpu_pool`` runs decoding and rendering; ``None`` uses the event loop's default executor."""
        self.model = model
        self.cpu_pool = cpu_pool

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

    def _prepare_nth(self, index: int, data: ImageInput, max_pixels: int) -> PreparedImage:
        try:
            return self.prepare(data, max_pixels)
        except CamserveError as exc:
            exc.message = f"image {index}: {exc.message}"  # which of several images was bad
            raise

    # -- stage 2: the model thread ---------------------------------------------------------------
    def compute(self, jobs: list[Job]) -> list[JobResult | BaseException]:
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
            return [*self.compute(jobs[:half]), *self.compute(jobs[half:])]

    def _compute(self, jobs: list[Job]) -> list[JobResult | BaseException]:
        m = self.model
        pre = m.preprocess
        if any(j.normalized for j in jobs):
            x = torch.stack([j.pixels if j.normalized else pre.normalize(j.pixels) for j in jobs])
        else:
            x = pre.normalize(torch.stack([j.pixels for j in jobs]))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(m.device.type, dtype=m.precision or torch.float32, enabled=m.precision is not None):
            out = m.engine.explain(x, [j.query for j in jobs])
        return [JobResult(out.logits[i], out.cams[i]) for i in range(len(jobs))]

    # -- stage 3: CPU pool -----------------------------------------------------------------------
    def finish(self, prepared: PreparedImage, result: JobResult, top_k: int, spec: HeatmapSpec | None) -> ImageResult:
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
        explanations = [Explanation(c, labels[c], all_scores[c], cam.method, cam.layer, h)
                        for c, h in zip(cam.classes, heatmaps, strict=True)]
        return ImageResult(preds, all_scores, explanations)

    # -- the whole request -----------------------------------------------------------------------
    async def run(self, images: Sequence[ImageInput], *, top_k: int, query: CamQuery | None,
                  spec: HeatmapSpec | None, max_pixels: int, submit: Submit | None = None) -> list[ImageResult]:
        """Predict (``query`` None) or explain every image of one request, in order.

        ``submit`` hands the jobs to a batcher; without it they are computed here as one batch."""
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(*(loop.run_in_executor(self.cpu_pool, self._prepare_nth, i, d, max_pixels)
                                          for i, d in enumerate(images)))
        if query is not None and spec is not None and spec.size == "original":
            per_image = max(len(query.classes), query.top)
            total = per_image * sum(p.geometry.original[0] * p.geometry.original[1] for p in prepared)
            if total > MAX_OUTPUT_PIXELS:
                raise PayloadTooLarge(f"{total} heatmap pixels asked for, over the limit of {MAX_OUTPUT_PIXELS}; "
                                      "ask for fewer targets or images, or `size=input`")
        jobs = [Job(p.pixels, query, p.normalized) for p in prepared]
        if submit is not None:
            results = await submit(jobs)
        else:
            computed = await loop.run_in_executor(None, self.compute, jobs)
            for r in computed:
                if isinstance(r, BaseException):
                    raise r
            results = [r for r in computed if isinstance(r, JobResult)]
        return await asyncio.gather(*(loop.run_in_executor(self.cpu_pool, self.finish, p, r, top_k, spec)
                                      for p, r in zip(prepared, results, strict=True)))
