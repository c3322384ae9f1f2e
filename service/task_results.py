"""Targets and results of the tasks beyond classification, in the uploaded image's pixels.

A client names a box, a mask or another image of its request in the pixels it uploaded; the engine works in
model-input pixels. :func:`localise` carries a request's targets into one image's model input (through the
resize and crop that image went through), and :func:`finish_task` carries the engine's detections, segments
and embeddings back, so every coordinate a client sees is in its own image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.cam.tasks import Resolved, Summary, TaskTarget, describe_target
from service.errors import InvalidInput
from service.preprocess import Geometry
from service.rendering import Marks, outline


@dataclass(frozen=True)
class RequestTarget:
    """One target of a request, in the uploaded image's pixels. ``image``: the request's image it is for
    (``None``: every image); ``similar_to``: an embedding target that is another image of the request."""

    target: TaskTarget
    mask: np.ndarray | None = None  # (H, W) bool over the upload, for a segmentation target
    image: int | None = None
    similar_to: int | None = None


@dataclass(frozen=True)
class DetectionResult:
    index: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # in the uploaded image's pixels
    class_index: int = -1


@dataclass(frozen=True)
class SegmentResult:
    index: int
    label: str
    area: int  # pixels of the uploaded image
    score: float  # mean probability over the region


@dataclass(frozen=True)
class TaskResult:
    """What a detector, segmenter or embedding model predicts for one image; ``mask`` ``(H, W)`` uint8 class
    indices over the uploaded image."""

    detections: list[DetectionResult] | None = None
    segments: list[SegmentResult] | None = None
    mask: np.ndarray | None = None
    embedding: list[float] | None = None


def label_name(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else f"class_{index}"


def _scale(geom: Geometry) -> tuple[float, float, float, float]:
    """``(sx, sy, left, top)``: upload pixel = (input pixel + crop offset) * scale. A letterbox's offsets are
    negative (the image starts past the padding), so the same sums undo it."""
    (oh, ow), (rh, rw), (top, left, _, _) = geom.original, geom.resized, geom.crop
    return ow / rw, oh / rh, float(left), float(top)


def box_to_input(box: Sequence[float], geom: Geometry) -> tuple[float, float, float, float]:
    sx, sy, left, top = _scale(geom)
    x0, y0, x1, y1 = box
    return (x0 / sx - left, y0 / sy - top, x1 / sx - left, y1 / sy - top)


def box_to_original(box: Sequence[float], geom: Geometry) -> tuple[float, float, float, float]:
    """A model-input box in the upload's pixels, clipped to the upload: a box reaching into a letterbox's
    padding ends at the image's edge, as torchvision clips its boxes to the image before its own padding."""
    sx, sy, left, top = _scale(geom)
    (oh, ow), (x0, y0, x1, y1) = geom.original, box

    def at(v: float, scale: float, extent: int) -> float:
        return round(min(max(v * scale, 0.0), float(extent)), 2)

    return at(x0 + left, sx, ow), at(y0 + top, sy, oh), at(x1 + left, sx, ow), at(y1 + top, sy, oh)


def mask_to_input(mask: np.ndarray, geom: Geometry, device: torch.device) -> Tensor:
    """``(H, W)`` bool over the upload -> ``(h, w)`` bool over the model input (nearest, then the crop)."""
    if mask.shape != geom.original:
        raise InvalidInput(f"a target mask must be the size of its image, {geom.original[1]}x{geom.original[0]}, "
                           f"got {mask.shape[1]}x{mask.shape[0]}")
    t = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    resized = F.interpolate(t[None, None].float(), size=geom.resized, mode="nearest")[0, 0]
    top, left, ch, cw = geom.crop
    canvas = torch.zeros(ch, cw, device=device)
    # A crop larger than the resized image pads (torchvision's center_crop): copy the overlap only.
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(geom.resized[0], top + ch), min(geom.resized[1], left + cw)
    if y1 > y0 and x1 > x0:
        canvas[y0 - top : y1 - top, x0 - left : x1 - left] = resized[y0:y1, x0:x1]
    return canvas.bool()


def localise(targets: Sequence[RequestTarget], image: int, geom: Geometry, device: torch.device,
             embeddings: dict[int, Tensor]) -> tuple[TaskTarget, ...]:
    """Image ``image``'s targets in its model-input pixels; ``embeddings``: the request's images' embeddings
    that targets refer to, by image index."""
    out = []
    for t in targets:
        if t.image is not None and t.image != image:
            continue
        target = t.target
        if target.box is not None:
            target = replace(target, box=box_to_input(target.box, geom))
        if t.mask is not None:
            target = replace(target, mask=mask_to_input(t.mask, geom, device))
        if t.similar_to is not None:
            target = replace(target, reference=embeddings[t.similar_to])
        out.append(target)
    return tuple(out)


def finish_task(summary: Summary, geom: Geometry, labels: Sequence[str], top_k: int | None) -> TaskResult:
    """One image's summary in its upload's pixels; ``top_k`` bounds the detections listed (``None``: all)."""
    if summary.embedding is not None:
        return TaskResult(embedding=[round(float(v), 6) for v in summary.embedding.tolist()])
    if summary.mask is not None:
        mask = summary.mask
        # The class map over the upload: nearest from the output grid through the model input's geometry.
        full = _mask_to_original(mask, geom)
        counts = np.bincount(full.ravel(), minlength=len(labels))
        segments = [SegmentResult(s.label, label_name(labels, s.label), int(counts[s.label]), round(s.score, 6))
                    for s in summary.segments if counts[s.label] > 0]
        segments.sort(key=lambda s: -s.area)
        return TaskResult(segments=segments, mask=full.astype(np.uint8))
    found = summary.detections if top_k is None else summary.detections[:top_k]
    return TaskResult(detections=[DetectionResult(d.index, label_name(labels, d.label), round(d.score, 6),
                                                  box_to_original(d.box, geom), d.label) for d in found])


def _mask_to_original(mask: Tensor, geom: Geometry) -> np.ndarray:
    (oh, ow), (rh, rw), (top, left, ch, cw) = geom.original, geom.resized, geom.crop
    h, w = mask.shape
    # Each upload pixel's centre, through the resize and crop, onto the output grid (nearest).
    ys = ((np.arange(oh) + 0.5) * rh / oh - top) * h / ch
    xs = ((np.arange(ow) + 0.5) * rw / ow - left) * w / cw
    inside_y, inside_x = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
    yi, xi = np.clip(ys.astype(np.int64), 0, h - 1), np.clip(xs.astype(np.int64), 0, w - 1)
    m = mask.cpu().numpy()[yi][:, xi]
    return np.where(inside_y[:, None] & inside_x[None, :], m, 0)


def describe(target: Resolved, geom: Geometry, labels: Sequence[str]) -> dict[str, object]:
    """What one map explains, with a detection's box in the upload's pixels."""
    out = describe_target(target, labels)
    if target.box is not None:
        out["box"] = list(box_to_original(target.box.tolist(), geom))
    return out


def marks(target: Resolved, geom: Geometry, labels: Sequence[str], size: str,
          input_size: tuple[int, int]) -> Marks:
    """What an overlay of ``target``'s map draws, in the overlay's pixels (the upload's for ``size=original``,
    the model input's for ``size=input``): the detection's box and label, or the region's outline."""
    if target.box is not None:
        box = target.box.tolist()
        x0, y0, x1, y1 = box_to_original(box, geom) if size == "original" else box
        return Marks(box=(x0, y0, x1, y1), label=label_name(labels, target.label) if target.label >= 0 else None)
    if target.region is not None:
        # The same nearest mapping as the predicted mask's; at size=input the "upload" is the model input.
        into = geom if size == "original" else Geometry(input_size, input_size, (0, 0, *input_size))
        return Marks(outline=outline(_mask_to_original(target.region > 0.5, into).astype(bool)))
    return Marks()
