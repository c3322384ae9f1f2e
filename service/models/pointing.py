"""Where the built-in detector's and segmenter's explanations point, measured with pytorch-grad-cam.

The reference implementation (pytorch-grad-cam, the `dev` extra, imported when a function runs) computes
Grad-CAM with its own detection and segmentation targets (`FasterRCNNBoxScoreTarget`,
`SemanticSegmentationTarget`) on held-out multi-shape scenes; a hit is a map whose arg-max pixel lies
in the right place. These are model-level checks of the shipped weights, independent of camserve's engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torchvision
from torch import nn

from service.models.multiscenes import MultiScene, make_multi_scenes, stack_images
from service.models.shapes import to_input
from service.models.shapes_detect import Detections, ShapesDetector
from service.models.shapes_detect import predict as detect
from service.models.shapes_seg import predict as segment

_BATCH = 64

Target = Callable[[object], torch.Tensor]
# Grad-CAM averages gradients over the map, so same-class shapes light up alike; HiResCAM keeps them apart.
Method = Literal["gradcam", "hirescam"]


@dataclass(frozen=True)
class Pointing:
    """hits among `explained` maps; `unexplained` ground-truth shapes had nothing to explain (missed by the model)."""

    hits: int
    explained: int
    unexplained: int = 0

    @property
    def rate(self) -> float:
        """Share of explained maps that hit."""
        return self.hits / self.explained if self.explained else 0.0

    @property
    def strict_rate(self) -> float:
        """Share of all ground-truth shapes whose map hit (a shape the model missed counts as a miss)."""
        total = self.explained + self.unexplained
        return self.hits / total if total else 0.0


def _layer(model: nn.Module, layer: str | None) -> nn.Module:
    name = layer or getattr(type(model), "camserve_default_layer", None)
    if not isinstance(name, str):
        raise ValueError(f"{type(model).__name__} has no `camserve_default_layer`; pass `layer`")
    return model.get_submodule(name)


def _peaks(
    model: nn.Module, layer: nn.Module, images: np.ndarray, targets: Sequence[Target], method: Method
) -> np.ndarray:
    """Arg-max (x, y) (M, 2) of pytorch-grad-cam's map for image rows (M, 64, 64, 3), one target each."""
    from pytorch_grad_cam import GradCAM, HiResCAM

    peaks: list[np.ndarray] = []
    with {"gradcam": GradCAM, "hirescam": HiResCAM}[method](model=model, target_layers=[layer]) as cam:
        for start in range(0, len(images), _BATCH):
            chunk = slice(start, start + _BATCH)
            maps = cam(input_tensor=to_input(images[chunk]), targets=list(targets[chunk]))
            flat = maps.reshape(len(maps), -1).argmax(axis=1)
            peaks.append(np.stack([flat % maps.shape[-1], flat // maps.shape[-1]], axis=1))
    model.eval()
    return np.concatenate(peaks) if peaks else np.empty((0, 2), dtype=np.int64)


def _inside(point: np.ndarray, box: np.ndarray) -> bool:
    x, y = int(point[0]), int(point[1])
    return bool(box[0] <= x < box[2] and box[1] <= y < box[3])


def hits_shape(point: np.ndarray, scene: MultiScene, k: int) -> bool:
    """The point (x, y) lies in shape k's box and in no other shape's box."""
    return _inside(point, scene.boxes[k]) and not any(
        _inside(point, box) for j, box in enumerate(scene.boxes) if j != k
    )


def match(det: dict[str, torch.Tensor], scene: MultiScene, iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """(detection index, ground-truth index) pairs: greedy by score, same label, IoU >= `iou_threshold`."""
    gt = torch.as_tensor(scene.boxes, dtype=torch.float32)
    ious = torchvision.ops.box_iou(det["boxes"].detach(), gt)
    taken: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for j in det["scores"].detach().argsort(descending=True).tolist():
        same = torch.as_tensor(scene.labels) == int(det["labels"][j])
        candidates = ious[j].masked_fill(~same, -1.0)
        for k in taken:
            candidates[k] = -1.0
        if len(gt) and float(candidates.max()) >= iou_threshold:
            k = int(candidates.argmax())
            taken.add(k)
            pairs.append((j, k))
    return pairs


class _DetectionScore:
    """The live score of detection `index` (re-decoded identically for the same image in eval mode)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, output: object) -> torch.Tensor:
        assert isinstance(output, dict)
        score: torch.Tensor = output["scores"][self.index]
        return score


def detection_pointing(
    model: ShapesDetector,
    n: int,
    seed: int,
    *,
    n_shapes: int | None = None,
    distinct_labels: bool = False,
    objective: Literal["score", "score+iou"] = "score+iou",
    layer: str | None = None,
    method: Method = "gradcam",
) -> Pointing:
    """Grad-CAM (or HiResCAM) pointing of each detection matched to a ground truth, on `n` fresh scenes from `seed`.

    Each matched detection is explained alone (its own target: `FasterRCNNBoxScoreTarget` on its label and
    box for "score+iou", or its score); a hit is a peak inside that shape's box and in no other shape's box.
    """
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    scenes = make_multi_scenes(n, seed, n_shapes, distinct_labels=distinct_labels)
    images = stack_images(scenes)
    model.eval()
    detections: Detections = detect(model, images)
    rows: list[tuple[int, int]] = []
    targets: list[Target] = []
    for i, (det, scene) in enumerate(zip(detections, scenes, strict=True)):
        for j, k in match(det, scene):
            rows.append((i, k))
            if objective == "score":
                targets.append(_DetectionScore(j))
            else:
                box = det["boxes"][j : j + 1].numpy()
                targets.append(FasterRCNNBoxScoreTarget(labels=[int(det["labels"][j])], bounding_boxes=box))
    peaks = _peaks(model, _layer(model, layer), images[[i for i, _ in rows]], targets, method)
    hits = sum(hits_shape(p, scenes[i], k) for p, (i, k) in zip(peaks, rows, strict=True))
    return Pointing(hits=hits, explained=len(rows), unexplained=sum(len(s.labels) for s in scenes) - len(rows))


def segmentation_pointing(
    model: nn.Module,
    n: int,
    seed: int,
    *,
    region: Literal["predicted", "mask"] = "predicted",
    inside: Literal["region", "box"] = "region",
    n_shapes: int | None = None,
    distinct_labels: bool = False,
    layer: str | None = None,
    method: Method = "gradcam",
) -> Pointing:
    """Grad-CAM (or HiResCAM) pointing of `SemanticSegmentationTarget` on `n` fresh scenes from `seed`.

    region="predicted": one map per class both present and predicted, over its predicted pixels; a hit is a
    peak on a true pixel of that class (`inside="region"`) or in a box of a shape of that class ("box").
    region="mask": one map per shape, its class over that shape's own mask (what a client mask does); a hit
    is a peak inside that shape's box and in no other shape's box.
    """
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    scenes = make_multi_scenes(n, seed, n_shapes, distinct_labels=distinct_labels)
    images = stack_images(scenes)
    model.eval()
    predicted = segment(model, images) if region == "predicted" else None
    rows: list[tuple[int, int]] = []  # (scene, class) for "predicted", (scene, shape) for "mask"
    targets: list[Target] = []
    unexplained = 0
    for i, scene in enumerate(scenes):
        if predicted is None:
            for k, label in enumerate(scene.labels):
                rows.append((i, k))
                targets.append(SemanticSegmentationTarget(int(label) + 1, scene.masks[k].astype(np.float32)))
            continue
        for cls in sorted({int(c) + 1 for c in scene.labels}):
            mask = predicted[i] == cls
            if not mask.any():
                unexplained += 1
                continue
            rows.append((i, cls))
            targets.append(SemanticSegmentationTarget(cls, mask.astype(np.float32)))
    peaks = _peaks(model, _layer(model, layer), images[[i for i, _ in rows]], targets, method)
    hits = 0
    for p, (i, key) in zip(peaks, rows, strict=True):
        scene = scenes[i]
        if predicted is None:
            hits += hits_shape(p, scene, key)
        elif inside == "region":
            hits += int(scene.class_map[int(p[1]), int(p[0])]) == key
        else:
            hits += any(_inside(p, box) for box in scene.boxes[scene.labels + 1 == key])
    return Pointing(hits=hits, explained=len(rows), unexplained=unexplained)

