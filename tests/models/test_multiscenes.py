"""Multi-shape scenes: their ground truth is consistent and they are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from service.models.multiscenes import MAX_SHAPES, SEG_CLASSES, make_multi_scene, make_multi_scenes, stack_images
from service.models.scenes import SCENE_SIZE, SHAPE_CLASSES


def test_scene_spec():
    counts = set()
    for scene in make_multi_scenes(150, 5):
        k = len(scene.labels)
        counts.add(k)
        assert scene.image.shape == (SCENE_SIZE, SCENE_SIZE, 3) and scene.image.dtype == np.uint8
        assert scene.labels.dtype == np.int64 and scene.boxes.shape == (k, 4) and scene.masks.shape == (k, 64, 64)
        assert ((scene.labels >= 0) & (scene.labels < len(SHAPE_CLASSES))).all()
        union = np.zeros((64, 64), dtype=bool)
        for label, (x0, y0, x1, y1), mask in zip(scene.labels, scene.boxes, scene.masks, strict=True):
            assert 0 <= x0 < x1 <= SCENE_SIZE and 0 <= y0 < y1 <= SCENE_SIZE
            assert x1 - x0 == y1 - y0 and 14 <= x1 - x0 <= 24
            assert mask.any()
            ys, xs = np.nonzero(mask)
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            assert (scene.class_map[mask] == label + 1).all()
            assert not (union & mask).any()
            union |= mask
        assert (scene.class_map[~union] == 0).all()
        # Boxes keep a gap: no two shapes touch.
        for a in range(k):
            for b in range(a + 1, k):
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = scene.boxes[a], scene.boxes[b]
                assert ax1 + 2 <= bx0 or bx1 + 2 <= ax0 or ay1 + 2 <= by0 or by1 + 2 <= ay0
    assert counts == {1, 2, 3}
    assert ("background", *SHAPE_CLASSES) == SEG_CLASSES


def test_two_shape_scenes_on_request():
    scenes = make_multi_scenes(40, 9, n_shapes=2, distinct_labels=True)
    assert all(len(s.labels) == 2 and s.labels[0] != s.labels[1] for s in scenes)
    assert stack_images(scenes).shape == (40, 64, 64, 3)
    assert any(len(set(s.labels.tolist())) == 1 for s in make_multi_scenes(40, 9, n_shapes=2))


def test_scenes_are_deterministic():
    a, b = make_multi_scenes(20, 3), make_multi_scenes(20, 3)
    for x, y in zip(a, b, strict=True):
        for field in ("image", "labels", "boxes", "masks", "class_map"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    assert not np.array_equal(stack_images(a), stack_images(make_multi_scenes(20, 4)))


@pytest.mark.parametrize("n_shapes", [0, MAX_SHAPES + 1])
def test_shape_count_is_checked(n_shapes):
    with pytest.raises(ValueError, match=f"`n_shapes` must be between 1 and 3 or None, got {n_shapes}"):
        make_multi_scene(np.random.default_rng(0), n_shapes)
