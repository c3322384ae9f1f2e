"""Synthetic multi-shape scenes for the built-in detector and segmenter.

The same world as `scenes.py` (64x64 RGB, noisy background colour, clutter lines, the five shape
classes) but with 1 to 3 non-overlapping shapes per scene, each with its box, its own mask and its
place in a per-pixel class map, so detection and segmentation (and where their explanations point)
can be scored against ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.models.scenes import (
    SCENE_SIZE,
    SHAPE_CLASSES,
    _background,
    _draw_clutter,
    _fill_colour,
    shape_mask,
)

SEG_CLASSES: tuple[str, ...] = ("background", *SHAPE_CLASSES)
MAX_SHAPES = 3

_MIN_SIDE = 14
_MAX_SIDE = 24
# Boxes are kept this many pixels apart, so no two shapes touch and their centres stay distinct at stride 4.
_GAP = 2
_MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class MultiScene:
    """One generated scene with K shapes.

    image: (64, 64, 3) uint8 RGB.
    labels: (K,) int64 indexes into SHAPE_CLASSES.
    boxes: (K, 4) int64 (x0, y0, x1, y1) in pixels, x1/y1 exclusive.
    masks: (K, 64, 64) bool, each shape's own pixels (a ring's hole is not part of it).
    class_map: (64, 64) uint8, 0 = background, label + 1 where a shape is (an index into SEG_CLASSES).
    """

    image: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    class_map: np.ndarray


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    """Whether `box` comes within _GAP pixels of any box in `placed`."""
    x0, y0, x1, y1 = box
    return any(
        x0 < px1 + _GAP and px0 < x1 + _GAP and y0 < py1 + _GAP and py0 < y1 + _GAP
        for px0, py0, px1, py1 in placed
    )


def _place(rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int]]:
    """`count` square boxes inside the scene, pairwise at least _GAP pixels apart, by rejection sampling."""
    for _ in range(_MAX_ATTEMPTS):
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            side = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
            x0 = int(rng.integers(0, SCENE_SIZE - side + 1))
            y0 = int(rng.integers(0, SCENE_SIZE - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if _overlaps(box, placed):
                break
            placed.append(box)
        if len(placed) == count:
            return placed
    raise RuntimeError(f"could not place {count} shapes in {_MAX_ATTEMPTS} attempts")  # pragma: no cover


def make_multi_scene(
    rng: np.random.Generator, n_shapes: int | None = None, *, distinct_labels: bool = False
) -> MultiScene:
    """Generate one scene with `n_shapes` shapes (1 to 3; None draws the count uniformly).

    `distinct_labels` gives every shape of the scene a different class.
    """
    if n_shapes is not None and not 1 <= n_shapes <= MAX_SHAPES:
        raise ValueError(f"`n_shapes` must be between 1 and {MAX_SHAPES} or None, got {n_shapes}")
    count = int(rng.integers(1, MAX_SHAPES + 1)) if n_shapes is None else n_shapes
    bg_colour = rng.integers(0, 256, size=3).astype(np.float64)
    canvas = _background(rng, bg_colour)
    _draw_clutter(rng, canvas)
    if distinct_labels:
        labels = rng.permutation(len(SHAPE_CLASSES))[:count].astype(np.int64)
    else:
        labels = rng.integers(0, len(SHAPE_CLASSES), size=count).astype(np.int64)
    boxes = np.asarray(_place(rng, count), dtype=np.int64).reshape(count, 4)
    masks = np.zeros((count, SCENE_SIZE, SCENE_SIZE), dtype=bool)
    class_map = np.zeros((SCENE_SIZE, SCENE_SIZE), dtype=np.uint8)
    for k, (label, (x0, y0, x1, _)) in enumerate(zip(labels, boxes, strict=True)):
        masks[k] = shape_mask(int(label), int(x0), int(y0), int(x1 - x0))
        canvas[masks[k]] = _fill_colour(rng, bg_colour)
        class_map[masks[k]] = label + 1
    image = np.round(canvas).astype(np.uint8)
    return MultiScene(image=image, labels=labels, boxes=boxes, masks=masks, class_map=class_map)


def make_multi_scenes(
    n: int, seed: int, n_shapes: int | None = None, *, distinct_labels: bool = False
) -> list[MultiScene]:
    """Generate `n` scenes deterministically from `seed` (see `make_multi_scene` for the options)."""
    rng = np.random.default_rng(seed)
    return [make_multi_scene(rng, n_shapes, distinct_labels=distinct_labels) for _ in range(n)]


def stack_images(scenes: list[MultiScene]) -> np.ndarray:
    """The scenes' images as one (N, 64, 64, 3) uint8 array."""
    return np.stack([s.image for s in scenes]) if scenes else np.empty((0, SCENE_SIZE, SCENE_SIZE, 3), np.uint8)
