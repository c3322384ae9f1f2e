"""The built-in shapes model: its scenes follow the spec, and it is accurate and looks at the shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.cam import CamEngine, CamQuery
from service.models.scenes import SCENE_SIZE, SHAPE_CLASSES, make_scene, make_scenes
from service.models.shapes import DEFAULT_WEIGHTS, load_shapes, to_input
from service.preprocess import to_input_size

N_EVAL = 1000
SEED = 20261128  # not the training seed: fresh scenes


@pytest.fixture(scope="module")
def model():
    m, labels = load_shapes()
    assert labels == list(SHAPE_CLASSES)
    return m


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(N_EVAL, SEED)


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


def test_accuracy_on_fresh_scenes(model, scenes):
    images, labels, _ = scenes
    with torch.inference_mode():
        pred = torch.cat([model(to_input(images[i : i + 250])).argmax(1) for i in range(0, N_EVAL, 250)])
    accuracy = float((pred.numpy() == labels).mean())
    assert accuracy >= 0.97, f"accuracy {accuracy:.3f}"


def test_gradcam_pointing_game(model, scenes):
    """The arg-max of the true class's Grad-CAM, at the image's size, lies in the shape's box widened by 2 px."""
    images, labels, boxes = scenes
    hits = 0
    with CamEngine(model, to_input(images[:1])) as engine:
        for start in range(0, N_EVAL, 250):
            x = to_input(images[start : start + 250])
            queries = [CamQuery(classes=(int(c),)) for c in labels[start : start + 250]]
            out = engine.explain(x, queries)
            for cam, (x0, y0, x1, y1) in zip(out.cams, boxes[start : start + 250], strict=True):
                heat = to_input_size(cam.maps, (SCENE_SIZE, SCENE_SIZE))[0]
                y, x_ = divmod(int(heat.argmax()), SCENE_SIZE)
                hits += x0 - 2 <= x_ < x1 + 2 and y0 - 2 <= y < y1 + 2
    rate = hits / N_EVAL
    assert rate >= 0.90, f"pointing game {rate:.3f}"
