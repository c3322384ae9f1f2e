"""``camserve evaluate``: how faithful each CAM method is on a served model, offline.

For every method: the pointing game (where the object's box is known: the map's peak, at the input's
size, inside the box), the confidence metrics (average drop, increase) and the deletion and insertion
areas (``service.cam.metrics``), and the milliseconds per image the explanation took. Images come from
a folder (the explained class is then the model's top-1) or from the built-in shapes scene generator
(the true class, and its box).

A detector or segmenter trained on the shapes (``builtin:shapes-detect``, ``builtin:shapes-seg``) is
scored on scenes of one to three shapes (``service.models.multiscenes``): its quality (AP50, mIoU) and,
per method, where camserve's maps of its detections or classes point, with the hit rules of
``service.models.pointing``, and the confidence, deletion and insertion figures of those maps on the
one-to-three-shape scenes, re-scoring the task's own target (``Task.confidence``) on each perturbed image.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from service.cam import CamQuery
from service.cam.metrics import DEFAULT_STEPS, metrics_work, run, scored_metrics_work
from service.cam.tasks import Resolved, SegmentationTask, TaskTarget
from service.imaging import decode_image
from service.preprocess import to_input_size
from service.registry import LoadedModel

if TYPE_CHECKING:
    from service.models.multiscenes import MultiScene

_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_FIGURES = ("average_drop", "increase", "deletion", "insertion")


@dataclass(frozen=True)
class Sample:
    """An ``(H, W, 3)`` uint8 image at the model's input size, its class if known and its box
    ``(x0, y0, x1, y1)`` in input pixels if known."""

    image: np.ndarray
    label: int | None = None
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class MethodReport:
    method: str
    images: int
    pointing_game: float | None
    average_drop: float
    increase: float
    deletion: float
    insertion: float
    ms_per_image: float


def shapes_samples(n: int, seed: int) -> list[Sample]:
    from service.models.scenes import make_scenes

    images, labels, boxes = make_scenes(n, seed)
    out = []
    for i in range(n):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        out.append(Sample(images[i], int(labels[i]), (x0, y0, x1, y1)))
    return out


def folder_samples(folder: Path, model: LoadedModel, max_pixels: int = 40_000_000) -> list[Sample]:
    """Every image file of ``folder``, resized and cropped as the model's preprocessing does."""
    out = []
    pre = model.preprocess
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES):
        rgb = decode_image(path.read_bytes(), max_pixels)
        image = torch.from_numpy(np.ascontiguousarray(rgb))
        pixels = pre.resized_uint8(image, pre.geometry(rgb.shape[0], rgb.shape[1]))
        out.append(Sample(pixels.permute(1, 2, 0).numpy()))
    if not out:
        raise ValueError(f"no image files in {folder}")
    return out


def _batches(samples: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def evaluate(model: LoadedModel, samples: Sequence[Sample], methods: Sequence[str], *, steps: int = DEFAULT_STEPS,
             batch_size: int = 16, progress: Callable[[str, int, int], None] | None = None) -> list[MethodReport]:
    """One report per method over ``samples``."""
    engine, pre = model.engine, model.preprocess
    size = pre.input_size
    reports = []
    for method in methods:
        engine.check(CamQuery(method=method))
        sums = dict.fromkeys(_FIGURES, 0.0)
        hits = boxed = done = 0
        elapsed = 0.0
        for chunk in _batches(samples, batch_size):
            pixels = torch.stack([torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1) for s in chunk])
            x = pre.normalize(pixels.to(model.device))
            if any(s.label is None for s in chunk):
                top = engine.predict(x).argmax(dim=1).tolist()
            classes = [s.label if s.label is not None else top[i] for i, s in enumerate(chunk)]
            start = time.perf_counter()
            out = engine.explain(x, [CamQuery(method=method, classes=(c,)) for c in classes])
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            elapsed += time.perf_counter() - start
            maps = torch.stack([cam.maps[0] for cam in out.cams if cam is not None])
            target = torch.tensor(classes, device=x.device)
            figures = run(metrics_work(engine.predict, x, maps, target, ("confidence", "deletion", "insertion"),
                                       steps=steps, chunk_rows=engine.chunk_rows))
            for name in _FIGURES:
                sums[name] += float(figures[name].sum())
            for s, heat in zip(chunk, to_input_size(maps, size), strict=True):
                if s.box is not None:
                    y, xx = divmod(int(heat.argmax()), size[1])
                    x0, y0, x1, y1 = s.box
                    hits += x0 <= xx < x1 and y0 <= y < y1
                    boxed += 1
            done += len(chunk)
            if progress is not None:
                progress(method, done, len(samples))
        reports.append(MethodReport(method, done, hits / boxed if boxed else None, sums["average_drop"] / done,
                                    sums["increase"] / done, sums["deletion"] / done, sums["insertion"] / done,
                                    1000 * elapsed / done))
    return reports


@dataclass(frozen=True)
class TaskMethodReport:
    """One method's pointing on a detector or segmenter.

    ``pointing``: share of maps that hit, on scenes of one to three shapes. Detection: each detection
    matched to a shape (same class, IoU >= 0.5) is explained, a hit is a peak inside that shape's box and
    no other. Segmentation: each class both present and predicted is explained over its predicted region,
    a hit is a peak on a true pixel of that class. ``two_shapes``: on scenes of two shapes, the share of
    maps on the shape explained rather than the other: detection, of all shapes (one the detector missed
    counts as a miss); segmentation, each shape's class over that shape's own mask (a client mask)."""

    method: str
    pointing: float
    two_shapes: float
    maps: int
    ms_per_image: float
    # Mean average drop, increase, deletion and insertion of the maps on the one-to-three-shape scenes.
    metrics: dict[str, float]


@dataclass(frozen=True)
class TaskEvaluation:
    """``quality``: AP50 (detection) or mIoU (segmentation) on the one-to-three-shape scenes."""

    task: str
    scenes: int
    seed: int
    quality_name: str
    quality: float
    reports: list[TaskMethodReport]


@dataclass(frozen=True)
class _Set:
    """Scenes, the targets explained on each and how a map's peak ``(x, y)`` is scored."""

    images: np.ndarray  # (N, H, W, 3) uint8
    targets: list[tuple[TaskTarget, ...]]
    hit: Callable[[int, int, np.ndarray], bool]  # (image, target, peak) -> hit
    unexplained: int  # ground truth with no map (a missed shape counts as a miss)


_FIGURES = ("average_drop", "increase", "deletion", "insertion")


def evaluate_task(model: LoadedModel, n: int, seed: int, methods: Sequence[str], *, batch_size: int = 16,
                  steps: int = DEFAULT_STEPS, progress: Callable[[str, int, int], None] | None = None
                  ) -> TaskEvaluation:
    """Quality and per-method pointing of a shapes detector or segmenter on ``n`` scenes of one to three
    shapes and ``n`` scenes of two, both from ``seed``."""
    from service.models.multiscenes import SEG_CLASSES, make_multi_scenes, stack_images
    from service.models.scenes import SCENE_SIZE, SHAPE_CLASSES

    task = model.task
    if task is None or task.name not in ("detection", "segmentation"):
        kind = "a classifier" if task is None else f"an {task.name} model"
        raise ValueError(f"the shapes scenes score detectors and segmenters, not {kind}")
    expected = list(SHAPE_CLASSES) if task.name == "detection" else list(SEG_CLASSES)
    if model.labels != expected or model.preprocess.input_size != (SCENE_SIZE, SCENE_SIZE):
        raise ValueError(f"the shapes scenes score a {task.name} model trained on them (labels {expected}, "
                         f"{SCENE_SIZE}x{SCENE_SIZE} input, as builtin:shapes-{task.name[:3]}); model "
                         f"{model.name!r} has labels {model.labels[:8]} and input {model.preprocess.input_size}")
    for method in methods:
        model.engine.check(CamQuery(method=method))
    mixed, pairs = make_multi_scenes(n, seed), make_multi_scenes(n, seed, n_shapes=2)
    output = _predict(model, stack_images(mixed), batch_size)
    if task.name == "detection":
        quality_name, quality, single, double = "AP50", *_detection_sets(mixed, pairs, output, model, batch_size)
    else:
        quality_name, quality, single, double = "mIoU", *_segmentation_sets(mixed, pairs, output)
    reports = []
    total = len(single.images) + len(double.images)
    for method in methods:
        done = 0

        def step(count: int, method: str = method) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(method, done, total)

        hits, maps, elapsed, figures = _pointing(model, single, method, batch_size, step, steps)
        pair_hits, pair_maps, _, _ = _pointing(model, double, method, batch_size, step)
        reports.append(TaskMethodReport(method, hits / maps if maps else 0.0,
                                        pair_hits / (pair_maps + double.unexplained) if pair_maps else 0.0,
                                        maps + pair_maps, 1000 * elapsed / max(1, len(single.images)),
                                        {k: v / max(1, maps) for k, v in figures.items()}))
    return TaskEvaluation(task.name, n, seed, quality_name, quality, reports)


def _input(model: LoadedModel, images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return model.preprocess.normalize(pixels.to(model.device))


def _predict(model: LoadedModel, images: np.ndarray, batch_size: int) -> list[object]:
    """The served model's output per image: a detection dict (on the CPU), or ``(h, w)`` class map."""
    out: list[object] = []
    for start in range(0, len(images), batch_size):
        raw = model.engine.predict(_input(model, images[start : start + batch_size]))
        if isinstance(raw, list | tuple):
            out.extend({key: value.cpu() for key, value in d.items()} for d in raw)
        else:
            out.extend(SegmentationTask.class_map(raw).cpu().numpy())
    return out


def _detection_sets(mixed: list[MultiScene], pairs: list[MultiScene], detections: list[object],
                    model: LoadedModel, batch_size: int) -> tuple[float, _Set, _Set]:
    from service.models.multiscenes import stack_images
    from service.models.pointing import hits_shape, match
    from service.models.shapes_detect import average_precision

    def targets(scenes: list[MultiScene], found: list[dict[str, torch.Tensor]]) -> _Set:
        per_image: list[tuple[TaskTarget, ...]] = []
        shapes: list[list[int]] = []  # the ground-truth shape each target of an image was matched to
        for det, scene in zip(found, scenes, strict=True):
            pairs_ = match(det, scene)
            per_image.append(tuple(TaskTarget(box=_box(det["boxes"][j]), label=int(det["labels"][j]))
                                   for j, _ in pairs_))
            shapes.append([k for _, k in pairs_])
        explained = sum(len(t) for t in per_image)
        return _Set(stack_images(scenes), per_image,
                    lambda i, t, peak: hits_shape(peak, scenes[i], shapes[i][t]),
                    sum(len(s.labels) for s in scenes) - explained)

    found = [d for d in detections if isinstance(d, dict)]
    pair_found = [d for d in _predict(model, stack_images(pairs), batch_size) if isinstance(d, dict)]
    return average_precision(found, mixed), targets(mixed, found), targets(pairs, pair_found)


def _box(box: torch.Tensor) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1, y1


def _segmentation_sets(mixed: list[MultiScene], pairs: list[MultiScene], predicted: list[object]
                       ) -> tuple[float, _Set, _Set]:
    from service.models.multiscenes import stack_images
    from service.models.pointing import hits_shape
    from service.models.shapes_seg import iou_per_class

    maps = np.stack([p for p in predicted if isinstance(p, np.ndarray)])
    truth = np.stack([s.class_map for s in mixed])
    miou = float(np.nanmean(iou_per_class(maps, truth)))
    per_image: list[tuple[TaskTarget, ...]] = []
    classes: list[list[int]] = []
    unexplained = 0
    for i, scene in enumerate(mixed):
        present = sorted({int(c) + 1 for c in scene.labels})
        shown = [c for c in present if (maps[i] == c).any()]
        unexplained += len(present) - len(shown)
        # A class without a mask is explained over its predicted region, found again in the explaining pass.
        per_image.append(tuple(TaskTarget(index=c) for c in shown))
        classes.append(shown)
    single = _Set(stack_images(mixed), per_image,
                  lambda i, t, peak: int(mixed[i].class_map[int(peak[1]), int(peak[0])]) == classes[i][t],
                  unexplained)
    masks = [tuple(TaskTarget(index=int(label) + 1, mask=torch.from_numpy(scene.masks[k]))
                   for k, label in enumerate(scene.labels)) for scene in pairs]
    double = _Set(stack_images(pairs), masks, lambda i, t, peak: hits_shape(peak, pairs[i], t), 0)
    return miou, single, double


def _pointing(model: LoadedModel, scenes: _Set, method: str, batch_size: int, step: Callable[[int], None],
              steps: int | None = None) -> tuple[int, int, float, dict[str, float]]:
    """Hits, maps, the seconds the explanations took for ``method`` on ``scenes`` and, with ``steps``, the sums
    of the maps' metrics (untimed)."""
    engine, size = model.engine, model.preprocess.input_size
    hits = maps = 0
    elapsed = 0.0
    sums = dict.fromkeys(_FIGURES, 0.0)
    for start in range(0, len(scenes.images), batch_size):
        rows = range(start, min(start + batch_size, len(scenes.images)))
        x = _input(model, scenes.images[rows.start : rows.stop])
        # score+iou is pytorch-grad-cam's FasterRCNNBoxScoreTarget, as in `camserve eval-shapes-detect`.
        queries = [CamQuery(method=method, targets=scenes.targets[i], objective="score+iou")
                   if scenes.targets[i] else None for i in rows]
        begun = time.perf_counter()
        out = engine.explain(x, queries)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        elapsed += time.perf_counter() - begun
        for i, cam in zip(rows, out.cams, strict=True):
            if cam is None:
                continue
            heat = to_input_size(cam.maps, size).flatten(1).argmax(dim=1).cpu().numpy()
            for t, flat in enumerate(heat):
                y, xx = divmod(int(flat), size[1])
                hits += scenes.hit(i, t, np.array([xx, y]))
                maps += 1
            if steps is not None and cam.resolved:
                for name, values in _task_metrics(model, x[i - rows.start], cam.maps, cam.resolved, steps).items():
                    sums[name] += float(values.sum())
        step(len(rows))
    return hits, maps, elapsed, sums


def _task_metrics(model: LoadedModel, x: torch.Tensor, maps: torch.Tensor, targets: Sequence[Resolved],
                  steps: int) -> dict[str, torch.Tensor]:
    """The metrics of one image's maps, each re-scoring its own target as the server's ``metrics`` do."""
    task = model.task
    assert task is not None
    # The maps explain score+iou; the curves follow the detection's score alone, a probability like a classifier's.
    targets = [replace(t, iou=False) for t in targets]

    def score(xb: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        return task.confidences(model.engine.predict(xb), [targets[j] for j in which.tolist()])

    copies = x[None].expand(len(targets), *x.shape)
    return run(scored_metrics_work(score, copies, maps, ("confidence", "deletion", "insertion"), steps=steps,
                                   chunk_rows=model.engine.chunk_rows))


def task_table(result: TaskEvaluation) -> str:
    """A Markdown table, one row per method."""
    two = "two shapes, client mask" if result.task == "segmentation" else "two shapes"
    rows = [f"| method | pointing | {two} | average drop | increase | deletion | insertion | ms / image |",
            "|---|---|---|---|---|---|---|---|"]
    for r in result.reports:
        figures = " | ".join(f"{r.metrics[k]:.3f}" for k in _FIGURES)
        rows.append(f"| {r.method} | {r.pointing:.3f} | {r.two_shapes:.3f} | {figures} | {r.ms_per_image:.1f} |")
    return "\n".join(rows)


def table(reports: Sequence[MethodReport]) -> str:
    """A Markdown table, one row per method."""
    rows = ["| method | pointing game | average drop | increase | deletion | insertion | ms / image |",
            "|---|---|---|---|---|---|---|"]
    for r in reports:
        pointing = "n/a" if r.pointing_game is None else f"{r.pointing_game:.3f}"
        rows.append(f"| {r.method} | {pointing} | {r.average_drop:.3f} | {r.increase:.3f} | {r.deletion:.3f} "
                    f"| {r.insertion:.3f} | {r.ms_per_image:.1f} |")
    return "\n".join(rows)


def progress_bar(method: str, done: int, total: int) -> None:
    """A one-line bar on stderr, redrawn in place."""
    width = 30
    filled = width * done // max(1, total)
    end = "\n" if done >= total else ""
    print(f"\r{method:>20} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr,
          flush=True)
