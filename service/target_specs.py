"""A request's targets for detectors, segmenters and embedding models, read from what every front-end
passes the data plane: integers, labels and small objects.

- detection: a detection's index (``2`` or ``{"detection": 2}``), or ``{"box": [x0, y0, x1, y1], "label": ...}``
  in the uploaded image's pixels, matched to a detection by IoU;
- segmentation: a class (index or label) over its predicted region, or ``{"class": ..., "mask": "<base64
  PNG>"}`` over the region a mask the size of the upload marks (non-zero pixels);
- embedding: ``{"reference": [numbers]}`` or ``{"similar_to": j}``, image ``j`` of the same request.

Any object may carry ``"image": i``: the target is then for image ``i`` of the request only.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from service.cam.tasks import TaskTarget
from service.errors import InvalidArgument, InvalidImage
from service.imaging import open_image
from service.labels import class_index
from service.task_results import RequestTarget

_KEYS = {
    "detection": {"detection", "box", "label", "image"},
    "segmentation": {"class", "mask", "image"},
    "embedding": {"reference", "similar_to", "image"},
}
# A target mask is an image too: the same bound as an upload's pixels.
_MAX_MASK_PIXELS = 40_000_000


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise InvalidArgument("targets", f"{what} must be an integer, got {value!r}")
    return value


def _box(value: object) -> tuple[float, float, float, float]:
    if not (isinstance(value, list | tuple) and len(value) == 4 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise InvalidArgument("targets", f"a `box` must be [x0, y0, x1, y1], four finite numbers, got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (x1 > x0 and y1 > y0):
        raise InvalidArgument("targets", f"a `box` must have x1 > x0 and y1 > y0, got {list(value)}")
    return (x0, y0, x1, y1)


def _mask(value: object, max_pixels: int) -> np.ndarray:
    """A JSON body's base64 text, or the PNG's own bytes (an Open Inference Protocol ``target_mask`` element,
    decoded from its binary or JSON form by the front-end)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value.partition(",")[2] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("targets", "a `mask` must be base64 (a PNG the size of its image)") from None
    else:
        raise InvalidArgument("targets", "a `mask` must be a base64 PNG the size of its image")
    try:
        im = open_image(data, max_pixels)
        return np.asarray(im.convert("L")) > 0
    except InvalidImage as exc:
        raise InvalidArgument("targets", f"a `mask`: {exc.message}") from None


def _reference(value: object) -> torch.Tensor:
    if not (isinstance(value, list) and value and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise InvalidArgument("targets", "a `reference` must be a non-empty list of finite numbers")
    return torch.tensor(value, dtype=torch.float32)


def read_targets(task: str, labels: Sequence[str], items: Sequence[Any],
                 max_pixels: int = _MAX_MASK_PIXELS) -> tuple[RequestTarget, ...]:
    """The request's ``targets`` for a model of ``task``; raises :class:`InvalidArgument` naming the bad one."""
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            if task == "detection":
                out.append(RequestTarget(TaskTarget(index=_int(item, "a detection target"))))
            elif task == "segmentation":
                out.append(RequestTarget(TaskTarget(index=class_index(labels, item))))
            else:
                raise InvalidArgument("targets", "an embedding model's target is {\"reference\": [numbers]} or "
                                      f"{{\"similar_to\": <image index>}}, got {item!r}")
            continue
        unknown = sorted(set(item) - _KEYS[task])
        if unknown:
            raise InvalidArgument("targets", f"a {task} target takes {', '.join(sorted(_KEYS[task]))}; got "
                                  f"`{unknown[0]}`")
        image = _int(item["image"], "`image`") if "image" in item else None
        if task == "detection":
            if "box" in item:
                label = class_index(labels, item["label"]) if "label" in item else None
                out.append(RequestTarget(TaskTarget(box=_box(item["box"]), label=label), image=image))
            elif "detection" in item:
                out.append(RequestTarget(TaskTarget(index=_int(item["detection"], "`detection`")), image=image))
            else:
                raise InvalidArgument("targets", "a detection target needs `box` or `detection`")
        elif task == "segmentation":
            if "class" not in item:
                raise InvalidArgument("targets", "a segmentation target needs `class`")
            mask = _mask(item["mask"], max_pixels) if "mask" in item else None
            out.append(RequestTarget(TaskTarget(index=class_index(labels, item["class"])), mask=mask, image=image))
        elif "reference" in item:
            out.append(RequestTarget(TaskTarget(reference=_reference(item["reference"])), image=image))
        elif "similar_to" in item:
            out.append(RequestTarget(TaskTarget(), image=image, similar_to=_int(item["similar_to"], "`similar_to`")))
        else:
            raise InvalidArgument("targets", "an embedding target needs `reference` or `similar_to`")
    return tuple(out)
