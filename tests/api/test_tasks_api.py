"""Detectors, segmenters and embedding models through the native API (in process, seeded models) and the
Open Inference Protocol (tritonclient against a real server).

torchvision's fasterrcnn_mobilenet_v3_large_320_fpn and lraspp_mobilenet_v3_large with random weights, and
the built-in shapes network read as an embedding model."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.modelspec import ModelSpec
from service.preprocess import Preprocess
from service.registry import serve_module
from service.sources import _task_preprocess
from tests.api.conftest import b64, check_similarity, png_bytes
from tests.api.server import free_port, start_server

pytestmark = pytest.mark.slow

UPLOAD = (200, 300)  # height, width: not the detector's 320x320, so every box is mapped back


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*UPLOAD, 3), dtype=np.uint8)


def _detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=6, box_score_thresh=0.0)


def _segmenter() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=3)


# The letterboxed segmenter's input: a 200x300 upload fits 96 wide, so 64 rows high, centred: 16 rows above.
SEG_PRE = Preprocess(resize=(96, 96), crop=None, letterbox="center", fill=(114, 114, 114))


@pytest.fixture(scope="module")
def client():
    det_spec = ModelSpec.from_table("det", {"source": "python:x:y", "task": "detection"})
    model = _detector()
    pre = _task_preprocess(det_spec, model)  # letterboxed, as a torchvision: detector is
    det = serve_module(model, det_spec, [f"c{i}" for i in range(6)], pre)
    stretch_spec = ModelSpec.from_table("det-stretch", {"source": "python:x:y", "task": "detection"})
    stretch = serve_module(_detector(), stretch_spec, [f"c{i}" for i in range(6)],
                           replace(pre, letterbox=None, fill=(0, 0, 0)))
    seg_spec = ModelSpec.from_table("seg", {"source": "python:x:y", "task": "segmentation",
                                            "preprocess": {"resize": [96, 96]}})
    seg = serve_module(_segmenter(), seg_spec, ["background", "a", "b"], Preprocess(resize=(96, 96), crop=None))
    seg_lb_spec = ModelSpec.from_table("seg-lb", {"source": "python:x:y", "task": "segmentation"})
    seg_model = _segmenter()
    seg_lb = serve_module(seg_model, seg_lb_spec, ["background", "a", "b"], SEG_PRE)
    models = [det, stretch, seg, seg_lb]
    app = create_app(Settings(models=tuple(m.spec for m in models)), models=models)
    with TestClient(app) as c:
        yield c, model, seg_model


def test_models_say_the_task_and_only_its_methods(client):
    c, _, _ = client
    models = {m["name"]: m for m in c.get("/models").json()["models"]}
    assert models["det"]["task"] == "detection"
    assert models["seg"]["task"] == "segmentation"
    for m in models.values():
        assert {"gradcam", "scorecam", "ablationcam", "guided-gradcam"} <= set(m["methods"])


def _torchvision_boxes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out: dict[str, torch.Tensor] = model.eval()(x.round().clamp(0, 255) / 255)[0]
    return out


def _check_boxes(got: list[dict], ref: dict[str, torch.Tensor], sx: float, sy: float) -> None:
    for j, d in enumerate(got):
        expected = ref["boxes"][j] * torch.tensor([sx, sy, sx, sy])
        # Clipped to the upload: a box reaching into the padding ends at the image's edge.
        expected = torch.minimum(expected.clamp(min=0), torch.tensor([UPLOAD[1], UPLOAD[0]] * 2))
        assert np.allclose(d["box"], expected.tolist(), atol=0.05), (d, expected)
        assert d["class"] == int(ref["labels"][j])
        assert d["score"] == pytest.approx(float(ref["scores"][j]), abs=1e-5)


def _resized(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=size,
                                           mode="bilinear", antialias=True, align_corners=False)


def test_detections_are_torchvisions_in_the_uploads_pixels(client):
    c, model, _ = client
    img = _image()
    r = c.post("/predict", json={"model": "det", "image": b64(png_bytes(img)), "top_k": 5})
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]["detections"]
    assert len(got) == 5
    # torchvision's picture: the upload scaled by one factor to fit 320x320 (300 -> 320 wide, 200 -> 213 high),
    # at the top-left of a canvas of the pixel the model's transform normalises to zero (124, 116, 104).
    x = torch.tensor([124.0, 116.0, 104.0]).view(1, 3, 1, 1).repeat(1, 1, 320, 320)
    x[..., :213, :] = _resized(img, (213, 320))
    ref = _torchvision_boxes(model, x)
    assert float(ref["boxes"][:5, 3].max()) > 213  # some box reaches into the padding: the clip is tested
    _check_boxes(got, ref, UPLOAD[1] / 320, UPLOAD[0] / 213)


def test_without_the_letterbox_detections_are_torchvisions_on_the_squashed_upload(client):
    c, model, _ = client
    img = _image()
    r = c.post("/predict", json={"model": "det-stretch", "image": b64(png_bytes(img)), "top_k": 5})
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]["detections"]
    assert len(got) == 5
    # The same model on the upload resized to 320x320, aspect ratio lost.
    _check_boxes(got, _torchvision_boxes(model, _resized(img, (320, 320))), UPLOAD[1] / 320, UPLOAD[0] / 320)


def test_a_letterboxed_heatmap_is_the_input_map_cut_to_the_image_and_resized(client):
    c, _, _ = client
    img = b64(png_bytes(_image(2)))
    ask = {"model": "det", "image": img, "targets": [0, 1], "output": "array"}
    maps = {}
    for size in ("input", "original"):
        r = c.post("/explain", json={**ask, "size": size})
        assert r.status_code == 200, r.text
        maps[size] = [np.asarray(e["heatmap"]["data"]) for e in r.json()["results"][0]["explanations"]]
    for inp, orig in zip(maps["input"], maps["original"], strict=True):
        assert inp.shape == (320, 320) and orig.shape == UPLOAD
        assert orig.max() == pytest.approx(1.0, abs=1e-4)  # its own peak, in the image: none from the padding
        cut = torch.from_numpy(inp[:213]).float()[None, None]  # the image's rows; below them, padding
        expected = torch.nn.functional.interpolate(cut, size=UPLOAD, mode="bilinear", align_corners=False)[0, 0]
        expected = (expected / expected.max()).numpy()
        whole = torch.nn.functional.interpolate(torch.from_numpy(inp).float()[None, None], size=UPLOAD,
                                                mode="bilinear", align_corners=False)[0, 0].numpy()
        err = np.abs(orig - expected).max()
        assert err < 0.03, err  # resampled once here, twice there
        assert np.abs(orig - whole / whole.max()).max() > 3 * err  # the whole input, padding and all, squashed


def test_a_letterboxed_segmenter_mask_is_its_class_map_cut_to_the_image(client):
    c, _, seg_model = client
    img = _image(1)
    left = np.zeros(UPLOAD, dtype=np.uint8)
    left[:, : UPLOAD[1] // 2] = 255
    r = c.post("/explain", json={"model": "seg-lb", "image": b64(png_bytes(img)), "output": "array",
                                 "size": "original", "targets": [{"class": "a", "mask": b64(png_bytes(left))}, "b"]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["mask"]))))
    # The model on its padded input: rows 16..80 of 96 are the image, the rest fill 114.
    x = torch.full((1, 3, 96, 96), 114.0)
    x[..., 16:80, :] = _resized(img, (64, 96)).round().clamp(0, 255)
    mean = torch.tensor(SEG_PRE.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(SEG_PRE.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        classes = seg_model.eval()((x - mean) / std)["out"].argmax(1)[0]
    expected = torch.nn.functional.interpolate(classes[16:80].float()[None, None], size=UPLOAD,
                                               mode="nearest-exact")[0, 0].numpy()
    assert (mask == expected).mean() > 0.995
    assert sum(s["area"] for s in res["segments"]) == UPLOAD[0] * UPLOAD[1]
    assert res["explanations"][0]["target"]["region"] == "mask"
    assert [e["heatmap"]["height"] for e in res["explanations"]] == [UPLOAD[0]] * 2


def test_explain_a_box_and_a_detection(client):
    c, _, _ = client
    img = png_bytes(_image())
    found = c.post("/predict", json={"model": "det", "image": b64(img), "top_k": 2}).json()["results"][0]
    d = found["detections"][1]
    box = [d["box"][0] - 2, d["box"][1] - 2, d["box"][2] + 2, d["box"][3] + 2]
    r = c.post("/explain", json={"model": "det", "image": b64(img), "objective": "score+iou",
                                 "targets": [{"box": box, "label": d["label"]}, 0]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    first, second = res["explanations"]
    assert first["target"]["kind"] == "detection"
    assert first["target"]["detection"] == 1
    assert first["target"]["objective"] == "score+iou"
    assert second["target"]["detection"] == 0
    assert (first["heatmap"]["width"], first["heatmap"]["height"]) == (UPLOAD[1], UPLOAD[0])
    assert res["detections"]


def test_task_errors_are_clear(client):
    c, _, _ = client
    img = b64(png_bytes(_image()))
    r = c.post("/explain", json={"model": "det", "images": [img] * 16, "method": "scorecam"})
    assert r.status_code == 422  # 16 x 960 masked forwards at 71 units each: over the default budget
    assert "needs 15360 extra forward images of 7" in r.json()["error"]["message"]
    assert "SERVICE_MAX_EXTRA_FORWARDS, in forward units" in r.json()["error"]["message"]
    r = c.post("/explain", json={"model": "det", "image": img, "targets": [{"box": [5, 5, 1, 1]}]})
    assert r.status_code == 422
    assert "x1 > x0" in r.json()["error"]["message"]
    r = c.post("/explain", json={"model": "det", "image": img, "targets": [{"class": 1}]})
    assert r.status_code == 422
    assert "takes box, detection, image, label" in r.json()["error"]["message"]
    r = c.post("/explain", json={"model": "seg", "image": img, "targets": [{"class": "a", "mask": b64(b"nope")}]})
    assert r.status_code == 422
    mask = png_bytes(np.zeros((10, 10), dtype=np.uint8))
    r = c.post("/explain", json={"model": "seg", "image": img, "targets": [{"class": "a", "mask": b64(mask)}]})
    assert r.status_code == 400
    assert "the size of its image" in r.json()["error"]["message"]


def test_segments_and_a_client_mask(client):
    c, _, _ = client
    img = png_bytes(_image(1))
    r = c.post("/explain", json={"model": "seg", "image": b64(img), "targets": ["a"]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["mask"]))))
    assert mask.shape == UPLOAD
    assert sum(s["area"] for s in res["segments"]) == UPLOAD[0] * UPLOAD[1]
    for s in res["segments"]:
        assert (mask == s["index"]).sum() == s["area"]
    assert res["explanations"][0]["target"] == {"label": "a", "index": 1, "kind": "segment", "region": "predicted"}
    left = np.zeros(UPLOAD, dtype=np.uint8)
    left[:, : UPLOAD[1] // 2] = 255
    r = c.post("/explain", json={"model": "seg", "image": b64(img), "output": "array", "size": "input",
                                 "targets": [{"class": "a", "mask": b64(png_bytes(left))}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["explanations"][0]["target"]["region"] == "mask"


CONFIG = """
[models.det]
source = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
task = "detection"
options = { num_classes = 6, box_score_thresh = 0.0 }

[models.emb]
source = "builtin:shapes"
task = "embedding"

[models.bseg]
source = "builtin:shapes-seg"
"""


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    httpclient = pytest.importorskip("tritonclient.http")
    config = tmp_path_factory.mktemp("tasks") / "camserve.toml"
    config.write_text(CONFIG)
    port = free_port()
    proc = start_server(port, config=config)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        yield httpclient, client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def _png_input(httpclient, images):
    t = httpclient.InferInput("image", [len(images)], "BYTES")
    t.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    return t


def test_v2_detection_tensors_through_tritonclient(triton):
    httpclient, client = triton
    meta = client.get_model_metadata("det")
    assert {o["name"] for o in meta["outputs"]} >= {"detection_boxes", "detection_scores", "detection_classes",
                                                    "num_detections", "target_detection", "heatmap"}
    assert {i["name"] for i in meta["inputs"]} >= {"target_boxes", "target_labels"}
    images = [png_bytes(_image(0)), png_bytes(_image(1))]
    out = client.infer("det", [_png_input(httpclient, images)], parameters={"max_detections": 7}, outputs=[
        httpclient.InferRequestedOutput(n, binary_data=True)
        for n in ("detection_boxes", "detection_scores", "detection_classes", "num_detections")])
    boxes, scores = out.as_numpy("detection_boxes"), out.as_numpy("detection_scores")
    assert boxes.shape == (2, 7, 4)
    assert scores.shape == (2, 7)
    assert out.as_numpy("detection_classes").shape == (2, 7)
    assert out.as_numpy("num_detections").tolist() == [7, 7]
    # A box per image as target tensors: the explanation names the detection it matched.
    targets = boxes[:, 2:3].copy()
    targets[..., :2] -= 1
    targets[..., 2:] += 1
    tb = httpclient.InferInput("target_boxes", list(targets.shape), "FP32")
    tb.set_data_from_numpy(targets.astype(np.float32), binary_data=True)
    tl = httpclient.InferInput("target_labels", [2, 1], "INT64")
    tl.set_data_from_numpy(out.as_numpy("detection_classes")[:, 2:3].astype(np.int64), binary_data=True)
    out = client.infer("det", [_png_input(httpclient, images), tb, tl], parameters={"objective": "score+iou"},
                       outputs=[httpclient.InferRequestedOutput(n, binary_data=True)
                                for n in ("target_detection", "heatmap", "target_class")])
    assert out.as_numpy("target_detection").tolist() == [[2], [2]]
    assert out.as_numpy("heatmap").shape[:2] == (2, 1)


def test_v2_embedding_similarity_through_tritonclient(triton):
    httpclient, client = triton
    images = [png_bytes(_image(0)), png_bytes(_image(1))]
    out = client.infer("emb", [_png_input(httpclient, images)],
                       outputs=[httpclient.InferRequestedOutput("embedding", binary_data=True)])
    emb = out.as_numpy("embedding")
    assert emb.shape == (2, 5)
    ref = httpclient.InferInput("reference", [1, 5], "FP32")
    ref.set_data_from_numpy(emb[1:2].astype(np.float32), binary_data=True)
    out = client.infer("emb", [_png_input(httpclient, images), ref], outputs=[
        httpclient.InferRequestedOutput(n, binary_data=True) for n in ("similarity", "heatmap")])
    check_similarity(emb, out.as_numpy("similarity"), out.as_numpy("heatmap"))


@pytest.mark.parametrize("seed", [1, 32])
def test_v2_client_masks_move_the_built_in_segmenters_map_through_tritonclient(triton, seed):
    """Two shapes of one class: a `target_mask` PNG over either one explains that shape. With the mask ignored
    both answers would be the class's whole predicted region, and the two maps the same."""
    from service.models.multiscenes import SEG_CLASSES, make_multi_scenes

    httpclient, client = triton
    (scene,) = make_multi_scenes(1, seed=seed, n_shapes=2)
    assert scene.labels[0] == scene.labels[1]
    out = client.infer("bseg", [_png_input(httpclient, [png_bytes(scene.image)])],
                       outputs=[httpclient.InferRequestedOutput("mask_png", binary_data=True)])
    (mask_png,) = out.as_numpy("mask_png")
    assert (np.asarray(Image.open(io.BytesIO(mask_png))) == scene.class_map).mean() > 0.95
    for k in range(2):
        mask = httpclient.InferInput("target_mask", [1], "BYTES")
        mask.set_data_from_numpy(np.array([png_bytes(scene.masks[k].astype(np.uint8) * 255)], dtype=np.object_))
        out = client.infer("bseg", [_png_input(httpclient, [png_bytes(scene.image)]), mask],
                           parameters={"targets": SEG_CLASSES[int(scene.labels[k]) + 1], "method": "hirescam"},
                           outputs=[httpclient.InferRequestedOutput("heatmap", binary_data=True)])
        heat = out.as_numpy("heatmap")[0, 0]
        h, w = heat.shape
        y, x = divmod(int(heat.argmax()), w)
        x0, y0, x1, y1 = scene.boxes[k] * np.array([w, h, w, h]) / 64
        assert x0 - 1 <= x <= x1 and y0 - 1 <= y <= y1, (k, (x, y), scene.boxes[k].tolist())


def test_kserve_v1_and_png_answers(client):
    c, _, _ = client
    img = b64(png_bytes(_image()))
    r = c.post("/v1/models/det:predict", json={"instances": [{"image": {"b64": img}}]})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert len(pred["detections"]) == 5
    assert set(pred["detections"][0]) == {"index", "class", "label", "score", "box"}
    r = c.post("/v1/models/seg:explain", json={"instances": [{"image": {"b64": img}}],
                                                "parameters": {"targets": "a"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "mask" in body["predictions"][0]
    assert body["explanations"][0][0]["target"]["region"] == "predicted"
    r = c.post("/explain", json={"model": "det", "image": img, "targets": [1]}, headers={"Accept": "image/png"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["X-Class-Label"].startswith("c")


def test_uploads_of_different_sizes_in_one_batch_equal_each_alone(client):
    """Two uploads of different sizes and aspect ratios share one detector batch: every box and every map
    equals the one the image gets alone (each is resized to the model's input, then mapped back on its own)."""
    c, _, _ = client
    small = np.random.default_rng(7).integers(0, 255, (120, 170, 3), dtype=np.uint8)
    uploads = [b64(png_bytes(_image(3))), b64(png_bytes(small))]
    ask = {"model": "det", "top_k": 3, "targets": [0, 1, 2], "output": "array", "size": "original"}
    r = c.post("/explain", json={**ask, "images": uploads})
    assert r.status_code == 200, r.text
    together = r.json()["results"]
    assert len(together) == 2
    for upload, got in zip(uploads, together, strict=True):
        r = c.post("/explain", json={**ask, "image": upload})
        assert r.status_code == 200, r.text
        alone = r.json()["results"][0]
        np.testing.assert_allclose([d["box"] for d in got["detections"]], [d["box"] for d in alone["detections"]],
                                   atol=1e-2)  # boxes travel rounded to 2 decimals
        assert len(got["explanations"]) == len(alone["explanations"]) == 3
        for a, b in zip(got["explanations"], alone["explanations"], strict=True):
            assert a["target"] == b["target"]
            # Array heatmaps travel rounded to 4 decimals: one unit of the last digit apart at most.
            np.testing.assert_allclose(np.asarray(a["heatmap"]["data"]), np.asarray(b["heatmap"]["data"]),
                                       atol=1.01e-4, rtol=0)
    assert np.asarray(together[1]["explanations"][0]["heatmap"]["data"]).shape == (120, 170)
