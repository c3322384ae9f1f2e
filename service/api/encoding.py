"""Results to camserve's native JSON: heatmap PNGs as base64, arrays as rows of rounded floats.

Encoding lives here, with the front-ends, not in the compute layers; other protocols encode the same
results their own way (binary tensors, KServe's instance lists)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from service.rendering import Heatmap
from service.results import Explanation, ImageResult, InferenceResult
from service.task_results import TaskResult

# Four decimals are 1/10000 of the map's peak, finer than any colormap shows. Rounding is done on
# float64 values so that what is serialised is the short decimal, not float32 noise
# (0.914 rather than 0.9139999747276306): a 224x224 array is then about 400 KB, not 950 KB.
ARRAY_DECIMALS = 4


def heatmap_json(h: Heatmap) -> dict[str, Any]:
    if isinstance(h.data, bytes):
        data: Any = base64.b64encode(h.data).decode()
    else:
        data = np.round(h.data.astype(np.float64), ARRAY_DECIMALS).tolist()
    return {"format": h.format, "width": h.width, "height": h.height, "data": data}


def explanation_json(e: Explanation) -> dict[str, Any]:
    out = {"index": e.index, "label": e.label, "score": e.score, "method": e.method, "layer": e.layer,
           "heatmap": heatmap_json(e.heatmap)}
    if e.metrics is not None:
        out["metrics"] = e.metrics
    if e.note is not None:
        out["note"] = e.note
    if e.target is not None:
        out["target"] = e.target
    return out


def image_json(r: ImageResult) -> dict[str, Any]:
    item: dict[str, Any] = {"predictions": [vars(p) for p in r.predictions]}
    if r.explanations is not None:
        item["explanations"] = [explanation_json(e) for e in r.explanations]
    if r.task is not None:
        item.update(task_json(r.task))
    return item


def task_json(t: TaskResult) -> dict[str, Any]:
    """A detector's, segmenter's or embedding model's prediction, as the native API and KServe V1 give it."""
    if t.detections is not None:
        return {"detections": [{"index": d.index, "class": d.class_index, "label": d.label, "score": d.score,
                                "box": list(d.box)} for d in t.detections]}
    if t.segments is not None:
        out: dict[str, Any] = {"segments": [vars(s) for s in t.segments]}
        if t.mask is not None:
            out["mask"] = base64.b64encode(mask_png(t.mask)).decode()
        return out
    return {"embedding": t.embedding}


def mask_png(mask: np.ndarray) -> bytes:
    """A ``(H, W)`` uint8 class map as a greyscale PNG whose values are the class indices."""
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def inference_json(result: InferenceResult) -> dict[str, Any]:
    return {"model": result.model, "results": [image_json(r) for r in result.results]}


def heavy(result: InferenceResult) -> bool:
    """Whether encoding this result is worth a thread hop (large arrays or many PNG bytes)."""
    size = 0
    for r in result.results:
        for e in r.explanations or ():
            data = e.heatmap.data
            size += len(data) if isinstance(data, bytes) else data.size * 8
    return size > 256 * 1024
