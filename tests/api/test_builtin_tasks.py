"""The built-in detector and segmenter served end to end: what they find and where their maps point, through
the native API, at an upload four times the model's size (so every box and map is mapped back)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torchvision.ops import box_iou

from service.app import create_app
from service.config import Settings
from service.models.multiscenes import make_multi_scenes
from service.models.scenes import SHAPE_CLASSES
from service.modelspec import ModelSpec
from tests.api.conftest import b64, png_bytes

SCALE = 4


@pytest.fixture(scope="module")
def client():
    specs = (ModelSpec.from_table("shapes-detect", {"source": "builtin:shapes-detect"}),
             ModelSpec.from_table("shapes-seg", {"source": "builtin:shapes-seg"}),
             ModelSpec.from_table("shapes-detect-lb", {"source": "builtin:shapes-detect",
                                                       "preprocess": {"letterbox": "center", "fill": 114}}))
    # No request timeout: the perturbation methods' time check prices them at the forward time measured at load,
    # which a loaded CI machine inflates (the check itself is tested in tests/api/test_hardening.py).
    with TestClient(create_app(Settings(models=specs, request_timeout_s=0))) as c:
        yield c


def _upload(image: np.ndarray, size: tuple[int, int] = (64 * SCALE, 64 * SCALE)) -> str:
    big = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return b64(png_bytes(big))


def test_detector_finds_the_shapes_and_each_map_points_inside_its_box(client):
    scenes = make_multi_scenes(6, seed=4321, n_shapes=2, distinct_labels=True)
    inside = total = 0
    for s in scenes:
        r = client.post("/explain", json={"model": "shapes-detect", "image": _upload(s.image), "top_k": 5,
                                          "method": "hirescam", "output": "array", "size": "original"})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        found = {d["label"] for d in res["detections"] if d["score"] > 0.5}
        assert found >= {SHAPE_CLASSES[int(lab)] for lab in s.labels}
        for e in res["explanations"]:
            heat = np.asarray(e["heatmap"]["data"])
            y, x = np.unravel_index(heat.argmax(), heat.shape)
            x0, y0, x1, y1 = e["target"]["box"]
            total += 1
            inside += x0 - 2 <= x <= x1 + 2 and y0 - 2 <= y <= y1 + 2
    assert inside / total >= 0.85, f"{inside} of {total} maps peak inside their box"


def test_segmenter_mask_and_a_class_map(client):
    s = make_multi_scenes(1, seed=99, n_shapes=2, distinct_labels=True)[0]
    r = client.post("/explain", json={"model": "shapes-seg", "image": _upload(s.image), "output": "array",
                                      "size": "original", "targets": [int(s.labels[0]) + 1]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["mask"]))))
    truth = np.kron(s.class_map, np.ones((SCALE, SCALE), dtype=np.uint8))
    assert (mask == truth).mean() > 0.95
    heat = np.asarray(res["explanations"][0]["heatmap"]["data"])
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert truth[y, x] == s.labels[0] + 1


MAGENTA = np.array([255, 0, 255])


def _overlay(res: dict, k: int = 0) -> np.ndarray:
    data = base64.b64decode(res["explanations"][k]["heatmap"]["data"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.mark.parametrize("size", ["original", "input"])
def test_detection_overlay_draws_the_explained_box(client, size):
    s = make_multi_scenes(1, seed=4321, n_shapes=2, distinct_labels=True)[0]
    body = {"model": "shapes-detect", "image": _upload(s.image), "top_k": 2, "method": "hirescam", "size": size}
    r = client.post("/explain", json={**body, "output": "overlay"})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    over = _overlay(res)
    magenta = (over == MAGENTA).all(axis=-1)
    x0, y0, x1, y1 = res["explanations"][0]["target"]["box"]  # upload pixels
    if size == "input":
        x0, y0, x1, y1 = (v / SCALE for v in (x0, y0, x1, y1))
    left, top, right, bottom = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)) - 1, int(np.ceil(y1)) - 1
    # The box's four edges are drawn whole...
    for edge in (magenta[top:bottom + 1, left], magenta[top:bottom + 1, right], magenta[top, left:right + 1],
                 magenta[bottom, left:right + 1]):
        assert edge.all()
    # ...and nothing outside it or inside it, but for the label (above its top-left corner, at size original).
    elsewhere = np.ones_like(magenta)
    elsewhere[max(top - 2, 0) : bottom + 3, max(left - 2, 0) : right + 3] = False
    elsewhere[max(top - 16, 0) : top, left:] = False
    assert not magenta[elsewhere].any()
    assert not magenta[top + 3 : bottom - 2, left + 3 : right - 2].any()
    assert magenta[max(top - 16, 0) : top, left:].any() == (size == "original")
    # The png map stays data: no box in it.
    png = client.post("/explain", json={**body, "output": "png"}).json()["results"][0]
    grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["explanations"][0]["heatmap"]["data"]))))
    assert grey.ndim == 2


def _edges(magenta: np.ndarray, box: list[float], bare_inside: bool) -> None:
    """The box's four edges are drawn whole where ``box`` says, in the overlay's pixels."""
    x0, y0, x1, y1 = box
    left, top, right, bottom = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)) - 1, int(np.ceil(y1)) - 1
    for edge in (magenta[top:bottom + 1, left], magenta[top:bottom + 1, right], magenta[top, left:right + 1],
                 magenta[bottom, left:right + 1]):
        assert edge.all()
    if bare_inside:  # (a label goes inside a box at the top of a large overlay)
        assert not magenta[top + 3 : bottom - 2, left + 3 : right - 2].any()


def test_letterboxed_overlays_draw_the_box_on_the_shape(client):
    """A 16:17 upload (a scene and a strip of another, four times the model's size) letterboxed into 64x64: 272
    wide fits 64, so 256 high becomes 60 rows (60.2), below 2 rows of padding. The box is drawn on the shape in
    the upload's pixels, and past the padding in the model input's. (Wider strips shrink the shapes below the
    sizes this detector was trained on, and it finds less: the built-in detector does not letterbox by default.)"""
    a, b = make_multi_scenes(2, seed=4321, n_shapes=2, distinct_labels=True)
    scene = np.concatenate([a.image, b.image[:, :4]], axis=1)
    upload = _upload(scene, (64 * SCALE, 68 * SCALE))
    body = {"model": "shapes-detect-lb", "image": upload, "top_k": 1, "method": "hirescam", "output": "overlay"}
    r = client.post("/explain", json={**body, "size": "original"})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    box = res["explanations"][0]["target"]["box"]
    assert box == res["detections"][0]["box"]
    truth = np.concatenate([a.boxes, b.boxes[b.boxes[:, 2] <= 4] + [64, 0, 64, 0]]) * SCALE
    iou = box_iou(torch.tensor([box]), torch.as_tensor(truth, dtype=torch.float32))
    assert float(iou.max()) > 0.5, (box, truth)
    over = _overlay(res)
    assert over.shape == (64 * SCALE, 68 * SCALE, 3)
    _edges((over == MAGENTA).all(axis=-1), box, bare_inside=False)
    r = client.post("/explain", json={**body, "size": "input"})
    assert r.status_code == 200, r.text
    over = _overlay(r.json()["results"][0])
    assert over.shape == (64, 64, 3)
    x0, y0, x1, y1 = box
    sx, sy, pad = 64 / 272, 60 / 256, 2
    _edges((over == MAGENTA).all(axis=-1), [x0 * sx, y0 * sy + pad, x1 * sx, y1 * sy + pad], bare_inside=True)


def test_segment_overlay_outlines_the_explained_region(client):
    s = make_multi_scenes(1, seed=99, n_shapes=2, distinct_labels=True)[0]
    cls = int(s.labels[0]) + 1
    r = client.post("/explain", json={"model": "shapes-seg", "image": _upload(s.image), "output": "overlay",
                                      "size": "original", "targets": [cls]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    magenta = (_overlay(res) == MAGENTA).all(axis=-1)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["mask"])))) == cls
    padded = np.pad(mask, 1)
    edge = mask & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    assert edge.sum() > 20
    # The outline is the predicted region's boundary: every edge pixel drawn, nothing else.
    assert magenta[edge].mean() > 0.95
    assert magenta[~edge].mean() < 0.01


def test_v2_overlay_draws_the_box_too(client):
    from tests.api.test_oip_v2 import image_input, outputs, post

    s = make_multi_scenes(1, seed=4321, n_shapes=2, distinct_labels=True)[0]
    tensor, raw = image_input(base64.b64decode(_upload(s.image)))
    got = outputs(post(client, {"inputs": [tensor], "parameters": {"top_k": 1}, "outputs": [
        {"name": "heatmap_png", "parameters": {"output": "overlay"}}]}, raw, path="/v2/models/shapes-detect/infer"))
    over = np.asarray(Image.open(io.BytesIO(got["heatmap_png"][0])).convert("RGB")).astype(int)
    assert (over == MAGENTA).all(axis=-1).sum() > 20


@pytest.mark.parametrize("model", ["shapes-detect", "shapes-seg"])
def test_perturbation_methods_metrics_and_augmentation_through_the_api(client, model):
    """ScoreCAM, AblationCAM and Guided Grad-CAM, metrics and smooth=aug on a detector and a segmenter: served, the
    maps point at what they explain (AblationCAM and Guided Grad-CAM; ScoreCAM's weights are flat on scores in
    [0, 1], see tests/cam/test_task_perturbation.py) and every explanation carries its metrics."""
    s = make_multi_scenes(1, seed=4321, n_shapes=2, distinct_labels=True)[0]
    truth = np.kron(s.class_map, np.ones((SCALE, SCALE), dtype=np.uint8))
    for method, smooth in (("scorecam", None), ("ablationcam", None), ("guided-gradcam", None), ("hirescam", "aug")):
        r = client.post("/explain", json={"model": model, "image": _upload(s.image), "method": method,
                                          "smooth": smooth, "metrics": ["confidence", "deletion", "insertion"],
                                          "metric_steps": 4, "output": "array", "size": "original"})
        assert r.status_code == 200, r.text
        explanations = r.json()["results"][0]["explanations"]
        assert explanations
        for e in explanations:
            assert set(e["metrics"]) == {"average_drop", "increase", "deletion", "insertion", "steps"}
            assert 0 <= e["metrics"]["average_drop"] <= 1
            if method == "scorecam":
                continue
            heat = np.asarray(e["heatmap"]["data"])
            y, x = np.unravel_index(heat.argmax(), heat.shape)
            if model == "shapes-detect":
                x0, y0, x1, y1 = e["target"]["box"]
                assert x0 - 2 <= x <= x1 + 2 and y0 - 2 <= y <= y1 + 2, (method, e["target"], (x, y))
            else:
                assert truth[y, x] == e["index"], (method, e["label"])


def test_v1_explains_a_detector_with_perturbations_like_the_native_api(client):
    s = make_multi_scenes(1, seed=4321, n_shapes=2, distinct_labels=True)[0]
    params = {"method": "ablationcam", "smooth": "aug", "metrics": "confidence", "output": "array", "size": "input"}
    r = client.post("/v1/models/shapes-detect:explain", json={"instances": [_upload(s.image)], "parameters": params})
    assert r.status_code == 200, r.text
    v1 = r.json()["explanations"][0]
    assert v1 and all("average_drop" in e["metrics"] for e in v1)
    native = client.post("/explain", json={"model": "shapes-detect", "image": _upload(s.image), **params,
                                           "metrics": ["confidence"]})
    assert native.status_code == 200, native.text
    assert v1 == native.json()["results"][0]["explanations"]
