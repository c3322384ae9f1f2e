"""/predict and /explain: both encodings, every option, every output format and size."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import b64, png_bytes, scene


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["models"] == ["shapes"]


def test_models_listing(client):
    body = client.get("/models").json()
    assert body["default"] == "shapes"
    (m,) = body["models"]
    assert m["name"] == "shapes" and m["num_classes"] == 5 and m["input_size"] == [64, 64]
    assert m["layers"][0] == "features" and "gradcam++" in m["methods"]
    detail = client.get("/models/shapes").json()
    assert detail["labels"] == ["circle", "square", "triangle", "cross", "ring"]


@pytest.mark.parametrize("label", ["circle", "square", "triangle", "cross", "ring"])
def test_predict_json_recognises_each_shape(client, label):
    r = client.post("/predict", json={"image": b64(png_bytes(scene(label, seed=3)[0])), "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "shapes" and "explanations" not in body["results"][0]
    preds = body["results"][0]["predictions"]
    assert len(preds) == 2 and preds[0]["label"] == label and preds[0]["score"] > preds[1]["score"]


def test_predict_several_images_keep_their_order(client):
    labels = ["ring", "circle", "cross"]
    images = [b64(png_bytes(scene(lbl, seed=5)[0])) for lbl in labels]
    images[1] = "data:image/png;base64," + images[1]
    body = client.post("/predict", json={"images": images}).json()
    assert [r["predictions"][0]["label"] for r in body["results"]] == labels
    assert len(body["results"][0]["predictions"]) == 5  # default top_k


def test_predict_multipart_with_query_options(client, circle_png):
    files = [("image", ("a.png", circle_png, "image/png")), ("image", ("b.png", circle_png, "image/png"))]
    r = client.post("/predict?top_k=1", files=files)
    assert r.status_code == 200, r.text
    assert [len(x["predictions"]) for x in r.json()["results"]] == [1, 1]


def test_explain_defaults_to_top1_png_at_original_size(client):
    pixels = np.asarray(Image.fromarray(scene("triangle")[0]).resize((200, 100)))
    r = client.post("/explain", files={"image": ("t.png", png_bytes(pixels), "image/png")})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    (e,) = result["explanations"]
    assert e["index"] == result["predictions"][0]["index"] and e["method"] == "gradcam" and e["layer"] == "features"
    heat = e["heatmap"]
    assert (heat["format"], heat["width"], heat["height"]) == ("png", 200, 100)
    img = _image(heat["data"])
    assert img.size == (200, 100) and img.mode == "L"
    arr = np.asarray(img)
    # shapes preprocessing: shorter side to 64, then a 64x64 center crop; 200x100 keeps x in [50, 150).
    assert arr[:, :49].max() == 0 and arr[:, 151:].max() == 0 and arr.max() == 255


@pytest.mark.parametrize(("size", "expected"), [("original", (90, 70)), ("input", (64, 64)), ("feature", (16, 16))])
def test_explain_array_sizes(client, size, expected):
    pixels = np.asarray(Image.fromarray(scene("square")[0]).resize(expected if size == "original" else (90, 70)))
    body = {"image": b64(png_bytes(pixels)), "output": "array", "size": size}
    e = client.post("/explain", json=body).json()["results"][0]["explanations"][0]
    data = np.array(e["heatmap"]["data"])
    assert data.shape == (expected[1], expected[0]) == (e["heatmap"]["height"], e["heatmap"]["width"])
    assert data.min() >= 0 and data.max() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("colormap", ["jet", "turbo", "viridis", "inferno"])
def test_explain_overlay_is_rgb_at_the_image_size(client, circle_png, colormap):
    r = client.post(f"/explain?output=overlay&colormap={colormap}&alpha=0.6", files={"image": ("c.png", circle_png)})
    heat = r.json()["results"][0]["explanations"][0]["heatmap"]
    img = _image(heat["data"])
    assert img.mode == "RGB" and img.size == (64, 64) and heat["format"] == "overlay"


def test_overlay_alpha_zero_is_the_image(client):
    pixels = scene("cross")[0]
    body = {"image": b64(png_bytes(pixels)), "output": "overlay", "alpha": 0}
    heat = client.post("/explain", json=body).json()["results"][0]["explanations"][0]["heatmap"]
    np.testing.assert_array_equal(np.asarray(_image(heat["data"])), pixels)


def test_explain_targets_by_index_and_label(client, circle_png):
    r = client.post("/explain", json={"image": b64(circle_png), "targets": [4, "square", "1"], "output": "array",
                                      "size": "feature"})
    exps = r.json()["results"][0]["explanations"]
    assert [(e["index"], e["label"]) for e in exps] == [(4, "ring"), (1, "square"), (1, "square")]
    files = {"image": ("c.png", circle_png)}
    r2 = client.post("/explain", files=files, data={"targets": "ring,square", "size": "feature", "output": "array"})
    assert [e["index"] for e in r2.json()["results"][0]["explanations"]] == [4, 1]
    assert r2.json()["results"][0]["explanations"][0]["heatmap"]["data"] == exps[0]["heatmap"]["data"]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"])
def test_every_method(client, circle_png, method):
    r = client.post("/explain", json={"image": b64(circle_png), "method": method})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["explanations"][0]["method"] == method


def test_explain_named_layer(client, circle_png):
    layers = client.get("/models/shapes").json()["layers"]
    other = next(name for name in layers if name != "features")
    r = client.post("/explain", json={"image": b64(circle_png), "layer": other, "size": "feature", "output": "array"})
    assert r.json()["results"][0]["explanations"][0]["layer"] == other


def test_accept_png_returns_the_image_itself(client, circle_png):
    r = client.post("/explain?output=overlay", files={"image": ("c.png", circle_png)}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-class-label"] == "circle" and r.headers["x-class-index"] == "0"
    assert 0 < float(r.headers["x-class-score"]) <= 1
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_image_formats_and_modes(client):
    rgb = scene("ring")[0]
    grey16 = (rgb.mean(axis=2) * 257).astype(np.uint16)
    cases = [
        png_bytes(rgb, "JPEG", quality=95), png_bytes(rgb, "WEBP", lossless=True), png_bytes(rgb, "GIF"),
        png_bytes(rgb, "BMP"), png_bytes(rgb, "TIFF"),
        png_bytes(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
        png_bytes(rgb.mean(axis=2).astype(np.uint8)), png_bytes(grey16),
    ]
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    cases.append(cmyk.getvalue())
    body = client.post("/predict", json={"images": [b64(c) for c in cases], "top_k": 1}).json()
    assert len(body["results"]) == len(cases)


def test_exif_orientation_is_applied(client):
    pixels = np.asarray(Image.fromarray(scene("square")[0]).resize((80, 40)))
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    heat = client.post("/explain", json={"image": b64(buf.getvalue())}).json()["results"][0]["explanations"][0]
    assert (heat["heatmap"]["width"], heat["heatmap"]["height"]) == (40, 80)


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
    r = client.post("/predict", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.headers["x-request-id"]


def test_openapi_documents_both_encodings(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/explain"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert client.get("/docs").status_code == 200


def test_model_detail_lists_each_layer_with_its_layout(client):
    detail = client.get("/models/shapes").json()
    rows = detail["layer_details"]
    assert [r["name"] for r in rows] == detail["layers"]
    assert rows[0] == {"name": "features", "layout": "nchw", "grid": [16, 16], "channels": 64, "prefix": 0,
                       "aliases": []}
