"""Synthetic "shapes" scenes: one filled shape on a noisy, cluttered background.

Pure numpy so the generator can be used without torch (tests, data tooling).
Every scene is 64x64 RGB with exactly one labelled shape whose bounding box is known,
which makes Grad-CAM localisation checkable against ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
SCENE_SIZE = 64

_NOISE_SIGMA = 12.0
_MIN_SIDE = 14
_MAX_SIDE = 28
_MIN_COLOUR_DISTANCE = 150
_MAX_CLUTTER = 3

# Pixel-centre coordinates, shared by every rasteriser: _YY[i, j] = i + 0.5, _XX[i, j] = j + 0.5.
_YY, _XX = np.mgrid[0:SCENE_SIZE, 0:SCENE_SIZE].astype(np.float64) + 0.5


@dataclass(frozen=True)
class Scene:
    """One generated scene.

    image: (64, 64, 3) uint8 RGB.
    label: class index into SHAPE_CLASSES.
    bbox: (x0, y0, x1, y1) of the shape's box in pixels, x1/y1 exclusive.
    """

    image: np.ndarray
    label: int
    bbox: tuple[int, int, int, int]


def _disc_mask(cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean (64, 64) mask of pixel centres within `radius` of (cx, cy)."""
    return np.asarray((_XX - cx) ** 2 + (_YY - cy) ** 2 <= radius**2)


def _box_mask(x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean (64, 64) mask of the square box [x0, x0+side) x [y0, y0+side)."""
    half = side / 2.0
    # On the pixel-centre grid, |centre - box centre| < side/2 selects exactly columns/rows x0 .. x0+side-1.
    return np.asarray((np.abs(_XX - (x0 + half)) < half) & (np.abs(_YY - (y0 + half)) < half))


def _triangle_mask(x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean (64, 64) mask of a triangle with apex at the box's top centre and base on its bottom edge."""
    cx = x0 + side / 2.0
    depth = _YY - y0
    # The half-width grows linearly from 0 at the apex to side/2 at the base.
    inside_rows = (depth >= 0) & (depth < side)
    return np.asarray(inside_rows & (np.abs(_XX - cx) <= depth / 2.0))


def _cross_mask(x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean (64, 64) mask of a centred plus sign whose bars span the box."""
    thickness = max(3, round(side / 3))
    cx = x0 + side / 2.0
    cy = y0 + side / 2.0
    box = _box_mask(x0, y0, side)
    horizontal = np.abs(_YY - cy) < thickness / 2.0
    vertical = np.abs(_XX - cx) < thickness / 2.0
    return np.asarray(box & (horizontal | vertical))


def _ring_mask(x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean (64, 64) mask of a disc of diameter `side` minus a centred hole of diameter side/2."""
    cx = x0 + side / 2.0
    cy = y0 + side / 2.0
    return np.asarray(_disc_mask(cx, cy, side / 2.0) & ~_disc_mask(cx, cy, side / 4.0))


def shape_mask(label: int, x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean (64, 64) mask of shape `label` (index into SHAPE_CLASSES) inside box (x0, y0, side)."""
    name = SHAPE_CLASSES[label]
    if name == "circle":
        return _disc_mask(x0 + side / 2.0, y0 + side / 2.0, side / 2.0)
    if name == "square":
        return _box_mask(x0, y0, side)
    if name == "triangle":
        return _triangle_mask(x0, y0, side)
    if name == "cross":
        return _cross_mask(x0, y0, side)
    return _ring_mask(x0, y0, side)


def _segment_mask(p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
    """Boolean (64, 64) mask of pixel centres within width/2 of the segment p0-p1 (points are (x, y))."""
    direction = p1 - p0
    length_sq = float(direction @ direction)
    px = _XX - p0[0]
    py = _YY - p0[1]
    if length_sq == 0.0:
        t = np.zeros_like(px)
    else:
        t = np.clip((px * direction[0] + py * direction[1]) / length_sq, 0.0, 1.0)
    dx = px - t * direction[0]
    dy = py - t * direction[1]
    return np.asarray(dx**2 + dy**2 <= (width / 2.0) ** 2)


def _background(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """Float (64, 64, 3) plain `colour` plus clipped Gaussian pixel noise."""
    noise = rng.normal(0.0, _NOISE_SIGMA, size=(SCENE_SIZE, SCENE_SIZE, 3))
    return np.asarray(np.clip(colour[None, None, :] + noise, 0.0, 255.0))


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Draw 0-3 random line segments (width 1-2 px) onto the float (64, 64, 3) canvas in place."""
    for _ in range(int(rng.integers(0, _MAX_CLUTTER + 1))):
        p0 = rng.uniform(0.0, SCENE_SIZE, size=2)
        p1 = rng.uniform(0.0, SCENE_SIZE, size=2)
        width = float(rng.integers(1, 3))
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        canvas[_segment_mask(p0, p1, width)] = colour


def _fill_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """Random (3,) RGB colour at L1 distance >= 150 from `background`, by rejection sampling."""
    while True:
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        if float(np.abs(colour - background).sum()) >= _MIN_COLOUR_DISTANCE:
            return colour


def make_scene(rng: np.random.Generator) -> Scene:
    """Generate one scene: (64, 64, 3) uint8 image, its shape's class index and bounding box."""
    bg_colour = rng.integers(0, 256, size=3).astype(np.float64)
    canvas = _background(rng, bg_colour)
    _draw_clutter(rng, canvas)
    label = int(rng.integers(0, len(SHAPE_CLASSES)))
    side = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    x0 = int(rng.integers(0, SCENE_SIZE - side + 1))
    y0 = int(rng.integers(0, SCENE_SIZE - side + 1))
    # The ring's hole is simply left unpainted, so it shows the underlying scene
    # (background colour with its noise, plus any clutter) like a real hole would.
    canvas[shape_mask(label, x0, y0, side)] = _fill_colour(rng, bg_colour)
    image = np.round(canvas).astype(np.uint8)
    return Scene(image=image, label=label, bbox=(x0, y0, x0 + side, y0 + side))


def make_scenes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate `n` scenes deterministically from `seed`.

    Returns images (N, 64, 64, 3) uint8, labels (N,) int64 and bboxes (N, 4) int64 as (x0, y0, x1, y1).
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, SCENE_SIZE, SCENE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    bboxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        scene = make_scene(rng)
        images[i] = scene.image
        labels[i] = scene.label
        bboxes[i] = scene.bbox
    return images, labels, bboxes
