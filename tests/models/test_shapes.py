"""The built-in shapes model: its scenes follow the spec, and it is accurate and looks at the shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.models.scenes import SCENE_SIZE, SHAPE_CLASSES, make_scene, make_scenes
from service.models.shapes import DEFAULT_WEIGHTS, ShapesNet, evaluate, load_shapes, pointing_game

N_EVAL = 1000
SEED = 20261128  # not the training seed: fresh scenes


@pytest.fixture(scope="module")
def model():
    m, labels = load_shapes()
    assert labels == list(SHAPE_CLASSES)
    return m


def test_weights_ship_small():
    assert DEFAULT_WEIGHTS.stat().st_size < 2 * 1024 * 1024


def test_scene_spec():
    rng = np.random.default_rng(5)
    for _ in range(200):
        s = make_scene(rng)
        x0, y0, x1, y1 = s.bbox
        assert s.image.shape == (SCENE_SIZE, SCENE_SIZE, 3)
        assert s.image.dtype == np.uint8
        assert 14 <= x1 - x0 <= 28
        assert x1 - x0 == y1 - y0
        assert x0 >= 0 and x1 <= SCENE_SIZE and y0 >= 0 and y1 <= SCENE_SIZE
        assert 0 <= s.label < len(SHAPE_CLASSES)


def test_scenes_are_deterministic():
    a, b = make_scenes(20, 3), make_scenes(20, 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_accuracy_on_fresh_scenes(model):
    accuracy = evaluate(model, N_EVAL, SEED)
    assert accuracy >= 0.97, f"accuracy {accuracy:.3f}"


def test_gradcam_pointing_game(model):
    """The arg-max of the true class's Grad-CAM lies in the shape's box widened by 2 px."""
    rate = pointing_game(model, N_EVAL, SEED)
    assert rate >= 0.90, f"pointing game {rate:.3f}"


def test_pointing_game_can_fail():
    """A model that ignores the image cannot point: the metric is not vacuous."""
    torch.manual_seed(0)
    blind = ShapesNet()
    with torch.no_grad():
        for p in blind.parameters():
            p.normal_()
    assert pointing_game(blind, 200, SEED) < 0.6
