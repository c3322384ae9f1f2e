"""Detectors, segmenters and embedding models over the Open Inference Protocol (REST and gRPC alike).

Outputs, padded to fixed shapes as Triton's and TensorRT's detection ensembles give them:

- detection: ``detection_boxes`` FP32 ``[N, D, 4]`` (upload pixels), ``detection_scores`` FP32 ``[N, D]``,
  ``detection_classes`` INT64 ``[N, D]`` (``-1`` past the count), ``num_detections`` INT32 ``[N]``, and with
  an explanation ``target_detection`` INT64 ``[N, T]``, the detection each map explains (``-1``: none).
  ``D`` is the request's ``top_k`` (the detections listed), 5 when not given;
- segmentation: ``mask_png`` BYTES ``[N]``, each image's class map as a PNG whose values are class indices;
- embedding: ``embedding`` FP32 ``[N, E]`` and, given ``reference``, ``similarity`` FP32 ``[N, R]``.

Target inputs, beside ``image``: ``target_boxes`` FP32 ``[N, T, 4]`` with ``target_labels`` INT64 ``[N, T]``
(``-1``: any label) for a detector; ``target_mask`` BYTES ``[N]`` (one PNG per image) with the class in the
``targets`` parameter for a segmenter; ``reference`` FP32 ``[R, E]`` for an embedding model (each row is a
target, and a column of ``similarity``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.api import binary
from service.api.encoding import mask_png
from service.errors import InvalidInput
from service.results import ImageResult

INPUTS = {"detection": ("target_boxes", "target_labels"), "segmentation": ("target_mask",),
          "embedding": ("reference",)}
OUTPUTS = {
    "detection": ("detection_boxes", "detection_scores", "detection_classes", "num_detections", "target_detection"),
    "segmentation": ("mask_png",),
    "embedding": ("embedding", "similarity"),
}
DATATYPES = {"detection_boxes": "FP32", "detection_scores": "FP32", "detection_classes": "INT64",
             "num_detections": "INT32", "target_detection": "INT64", "mask_png": "BYTES", "embedding": "FP32",
             "similarity": "FP32"}
EXPLAINED = ("target_detection",)  # outputs that need an explanation pass
_INPUT_TYPES = {"target_boxes": ("FP32",), "target_labels": ("INT64", "INT32"), "target_mask": ("BYTES",),
                "reference": ("FP32",)}


def metadata(task: str, width: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The task's extra inputs and its outputs, as model metadata lists them."""
    shapes = {"target_boxes": [-1, -1, 4], "target_labels": [-1, -1], "target_mask": [-1],
              "reference": [-1, width], "detection_boxes": [-1, -1, 4], "detection_scores": [-1, -1],
              "detection_classes": [-1, -1], "num_detections": [-1], "target_detection": [-1, -1],
              "mask_png": [-1], "embedding": [-1, width], "similarity": [-1, -1]}
    inputs = [{"name": n, "datatype": _INPUT_TYPES[n][0], "shape": shapes[n]} for n in INPUTS[task]]
    outputs = [{"name": n, "datatype": DATATYPES[n], "shape": shapes[n]} for n in OUTPUTS[task]]
    return inputs, outputs


def _numbers(tensor: Any, shape_rank: int) -> np.ndarray:
    """A numeric input as an array of its shape; ``tensor`` is an ``oip.InputTensor``."""
    name, datatype, shape = tensor.name, tensor.datatype, tensor.shape
    if datatype not in _INPUT_TYPES[name]:
        raise InvalidInput(f"input {name!r} must have datatype {' or '.join(_INPUT_TYPES[name])}, got {datatype!r}")
    if len(shape) != shape_rank:
        raise InvalidInput(f"input {name!r} must have {shape_rank} dimensions, got shape {shape}")
    count = int(np.prod(shape))
    if tensor.raw is not None:
        return binary.unpack_numbers(tensor.raw, datatype, shape, name)
    data = tensor.data
    values = np.asarray(data if data is not None else (), dtype=np.float64).ravel()
    if values.size != count:
        raise InvalidInput(f"input {name!r}: {values.size} elements, its shape {shape} says {count}")
    if not np.isfinite(values).all():
        raise InvalidInput(f"input {name!r} holds NaN or infinite values")
    return values.reshape(shape)


def read_targets(task: str, tensors: Mapping[str, Any], n: int, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The target inputs of a request with ``n`` images, as the data plane's target objects."""
    allowed = INPUTS.get(task, ())
    for name in tensors:
        if name not in allowed:
            raise InvalidInput(f"input {name!r} is not taken by a {task} model" +
                               (f"; its target inputs: {', '.join(allowed)}" if allowed else ""))
    out: list[dict[str, Any]] = []
    if "target_boxes" in tensors:
        boxes = _numbers(tensors["target_boxes"], 3)
        if boxes.shape[0] != n or boxes.shape[2] != 4:
            raise InvalidInput(f"input 'target_boxes' must have shape [{n}, T, 4], got {list(boxes.shape)}")
        labels = None
        if "target_labels" in tensors:
            labels = _numbers(tensors["target_labels"], 2)
            if labels.shape != boxes.shape[:2]:
                raise InvalidInput(f"input 'target_labels' must have shape {list(boxes.shape[:2])} (one per box), "
                                   f"got {list(labels.shape)}")
        for i in range(n):
            for t in range(boxes.shape[1]):
                item: dict[str, Any] = {"box": [float(v) for v in boxes[i, t]], "image": i}
                if labels is not None and labels[i, t] >= 0:
                    item["label"] = int(labels[i, t])
                out.append(item)
    elif "target_labels" in tensors:
        raise InvalidInput("input 'target_labels' needs 'target_boxes'")
    if "target_mask" in tensors:
        tensor = tensors["target_mask"]
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1 or tensor.shape[0] != n:
            raise InvalidInput(f"input 'target_mask' must be BYTES of shape [{n}] (one PNG per image), got "
                               f"{tensor.datatype} {tensor.shape}")
        masks = (list(binary.unpack_bytes(tensor.raw, n, "target_mask")) if tensor.raw is not None
                 else list(tensor.data or ()))
        classes = params.get("targets")
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        elif isinstance(classes, int) and not isinstance(classes, bool):
            classes = [classes]
        if not isinstance(classes, list) or len(classes) != 1:
            raise InvalidInput("input 'target_mask' explains one class: give it in the `targets` parameter")
        out += [{"class": classes[0], "mask": m, "image": i} for i, m in enumerate(masks)]
    if "reference" in tensors:
        refs = _numbers(tensors["reference"], 2)
        out += [{"reference": [float(v) for v in row]} for row in refs]
    return out


def references(tensors: Mapping[str, Any]) -> np.ndarray | None:
    return _numbers(tensors["reference"], 2).astype(np.float32) if "reference" in tensors else None


def output(name: str, results: Sequence[ImageResult], top: int, refs: np.ndarray | None
           ) -> tuple[list[int], np.ndarray | list[bytes]]:
    """One task output's shape and data."""
    n = len(results)
    tasks = [r.task for r in results]
    if name in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
        found = [(t.detections or [])[:top] if t is not None else [] for t in tasks]
        if name == "num_detections":
            return [n], np.asarray([len(f) for f in found], dtype=np.int32)
        if name == "detection_boxes":
            boxes = np.zeros((n, top, 4), dtype=np.float32)
            for i, f in enumerate(found):
                for j, d in enumerate(f):
                    boxes[i, j] = d.box
            return [n, top, 4], boxes
        if name == "detection_scores":
            scores = np.zeros((n, top), dtype=np.float32)
            for i, f in enumerate(found):
                scores[i, : len(f)] = [d.score for d in f]
            return [n, top], scores
        classes = np.full((n, top), -1, dtype=np.int64)
        for i, f in enumerate(found):
            classes[i, : len(f)] = [d.class_index for d in f]
        return [n, top], classes
    if name == "target_detection":
        rows = [[_detection(e.target) for e in r.explanations or ()] for r in results]
        width = max((len(r) for r in rows), default=0)
        data = np.full((n, width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            data[i, : len(r)] = r
        return [n, width], data
    if name == "mask_png":
        return [n], [mask_png(t.mask) if t is not None and t.mask is not None else b"" for t in tasks]
    embeddings = np.asarray([t.embedding if t is not None and t.embedding is not None else [] for t in tasks],
                            dtype=np.float32)
    if name == "embedding":
        return list(embeddings.shape), embeddings
    if refs is None:
        raise InvalidInput("output 'similarity' needs the input 'reference' [R, E]")
    a = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    b = refs / np.maximum(np.linalg.norm(refs, axis=1, keepdims=True), 1e-12)
    sim = (a @ b.T).astype(np.float32)
    return list(sim.shape), sim


def _detection(target: Mapping[str, Any] | None) -> int:
    value = (target or {}).get("detection")
    return int(value) if isinstance(value, int) else -1

