"""The Open Inference Protocol over the app's TestClient: JSON and binary framing, outputs, errors.

The same routes against a real server with tritonclient are in ``test_triton_client.py``."""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from service.api import binary
from service.models.scenes import SHAPE_CLASSES
from tests.api.conftest import b64, make_client, png_bytes, scene

K = len(SHAPE_CLASSES)
INFER = "/v2/models/shapes/infer"


@pytest.fixture(scope="module")
def ring_png() -> bytes:
    return png_bytes(scene("ring", seed=2)[0])


def image_input(*pngs: bytes, as_binary: bool = True, shape: list[int] | None = None) -> tuple[dict, bytes]:
    shape = shape or [len(pngs)]
    if as_binary:
        raw = binary.pack_bytes(pngs)
        return {"name": "image", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(raw)}}, raw
    return {"name": "image", "datatype": "BYTES", "shape": shape, "data": [b64(p) for p in pngs]}, b""


def post(client, header: dict, raw: bytes = b"", path: str = INFER, **headers: str):
    text = json.dumps(header).encode()
    if raw:
        headers["Inference-Header-Content-Length"] = str(len(text))
    return client.post(path, content=text + raw, headers=headers)


def outputs(r) -> dict[str, np.ndarray | list[bytes]]:
    """Decode a V2 reply: JSON data or binary blobs, BYTES as lists of bytes."""
    assert r.status_code == 200, r.text
    length = r.headers.get("inference-header-content-length")
    body = r.content
    header = json.loads(body[:int(length)] if length else body)
    rest = memoryview(body)[int(length):] if length else memoryview(b"")
    out: dict[str, np.ndarray | list[bytes]] = {}
    offset = 0
    for o in header["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw = bytes(rest[offset:offset + size])
            offset += size
            if o["datatype"] == "BYTES":
                out[o["name"]] = binary.unpack_bytes(raw, int(np.prod(o["shape"])), o["name"])
            else:
                out[o["name"]] = binary.unpack_numbers(raw, o["datatype"], o["shape"], o["name"])
        elif o["datatype"] == "BYTES":
            import base64
            out[o["name"]] = [base64.b64decode(t) for t in o["data"]]
        else:
            out[o["name"]] = np.asarray(o["data"], dtype=binary.NUMPY_TYPES[o["datatype"]]).reshape(o["shape"])
    assert offset == len(rest)
    return out


def test_server_metadata_and_health(client):
    meta = client.get("/v2").json()
    assert meta["name"] == "camserve" and "binary_tensor_data" in meta["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata(client):
    for path in ("/v2/models/shapes", "/v2/models/shapes/versions/1"):
        meta = client.get(path).json()
        assert meta["name"] == "shapes" and meta["platform"] == "pytorch" and meta["versions"] == ["1"]
        assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "pixels": "FP32"}
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
            "scores": [-1, K], "heatmap": [-1, -1, -1, -1], "heatmap_png": [-1, -1], "target_class": [-1, -1]}
    assert client.get("/v2/models/shapes/ready").json() == {"name": "shapes", "ready": True}
    assert client.get("/v2/models/shapes/versions/1/ready").status_code == 200
    for path in ("/v2/models/shapes/versions/2", "/v2/models/nope", "/v2/models/nope/ready",
                 "/v2/models/shapes/versions/2/ready"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"}


def test_all_outputs_by_default_json_and_binary_agree(client, circle_png, ring_png):
    tensor, _ = image_input(circle_png, ring_png, as_binary=False)
    as_json = outputs(post(client, {"id": "req-1", "inputs": [tensor]}))
    tensor, raw = image_input(circle_png, ring_png)
    r = post(client, {"inputs": [tensor], "parameters": {"binary_data_output": True}}, raw)
    assert r.headers["content-type"] == "application/octet-stream"
    as_bin = outputs(r)
    assert set(as_json) == set(as_bin) == {"scores", "heatmap", "heatmap_png", "target_class"}
    assert as_json["scores"].shape == (2, K)
    np.testing.assert_allclose(as_json["scores"], as_bin["scores"], atol=1e-6)
    assert as_json["heatmap"].shape == (2, 1, 64, 64)  # size `input` by default
    np.testing.assert_allclose(as_json["heatmap"], as_bin["heatmap"], atol=1e-6)
    assert as_bin["target_class"].tolist() == [[SHAPE_CLASSES.index("circle")], [SHAPE_CLASSES.index("ring")]]
    assert as_json["heatmap_png"] == as_bin["heatmap_png"]
    png = np.asarray(Image.open(io.BytesIO(as_bin["heatmap_png"][0])))
    assert png.shape == (64, 64)
    np.testing.assert_allclose(png / 255, as_bin["heatmap"][0, 0], atol=0.5 / 255 + 1e-6)


def test_id_version_and_echo(client, circle_png):
    tensor, raw = image_input(circle_png)
    r = post(client, {"id": "abc", "inputs": [tensor], "outputs": [{"name": "scores"}]}, raw,
             path="/v2/models/shapes/versions/1/infer")
    head = r.json()
    assert head["id"] == "abc" and head["model_name"] == "shapes" and head["model_version"] == "1"
    assert r.headers["content-type"] == "application/json"


def test_scores_equal_predict(client, circle_png):
    tensor, raw = image_input(circle_png, shape=[1, 1])
    scores = outputs(post(client, {"inputs": [tensor], "outputs": [{"name": "scores"}]}, raw))["scores"][0]
    native = client.post("/predict", json={"image": b64(circle_png), "top_k": K}).json()
    for p in native["results"][0]["predictions"]:
        assert scores[p["index"]] == pytest.approx(p["score"], abs=1e-6)


def test_mixed_binary_and_json_outputs(client, circle_png):
    tensor, raw = image_input(circle_png)
    r = post(client, {"inputs": [tensor], "outputs": [
        {"name": "heatmap", "parameters": {"binary_data": True, "size": "feature"}},
        {"name": "target_class"}, {"name": "scores", "parameters": {"binary_data": False}}]}, raw)
    head = json.loads(r.content[:int(r.headers["inference-header-content-length"])])
    assert [o["name"] for o in head["outputs"]] == ["heatmap", "target_class", "scores"]
    assert "data" not in head["outputs"][0] and "data" in head["outputs"][1] and "data" in head["outputs"][2]
    got = outputs(r)
    assert got["heatmap"].shape[:2] == (1, 1) and got["heatmap"].shape[2] < 64


def test_targets_top_k_and_method(client, circle_png):
    tensor, raw = image_input(circle_png)
    got = outputs(post(client, {"inputs": [tensor], "parameters": {"targets": ["ring", 0], "method": "layercam"},
                                "outputs": [{"name": "target_class"}, {"name": "heatmap"}]}, raw))
    assert got["target_class"].tolist() == [[SHAPE_CLASSES.index("ring"), 0]]
    assert got["heatmap"].shape == (1, 2, 64, 64)
    got = outputs(post(client, {"inputs": [tensor], "parameters": {"top_k": 3},
                                "outputs": [{"name": "target_class"}, {"name": "scores"}]}, raw))
    assert got["target_class"].tolist()[0] == np.argsort(-got["scores"][0])[:3].tolist()


def test_png_overlay_and_original_size(client, circle_png):
    big = png_bytes(np.asarray(Image.open(io.BytesIO(circle_png)).resize((96, 80))))
    tensor, raw = image_input(big, big)
    got = outputs(post(client, {"inputs": [tensor], "outputs": [
        {"name": "heatmap", "parameters": {"size": "original"}},
        {"name": "heatmap_png", "parameters": {"output": "overlay", "colormap": "turbo", "alpha": 0.3}}]}, raw))
    assert got["heatmap"].shape == (2, 1, 80, 96)
    overlay = np.asarray(Image.open(io.BytesIO(got["heatmap_png"][0])))
    assert overlay.shape == (64, 64, 3)


def test_original_size_needs_one_size(client, circle_png):
    other = png_bytes(np.zeros((70, 90, 3), np.uint8))
    tensor, raw = image_input(circle_png, other)
    r = post(client, {"inputs": [tensor], "outputs": [{"name": "heatmap", "parameters": {"size": "original"}}]}, raw)
    assert r.status_code == 400 and "same shape" in r.json()["error"]
    r = post(client, {"inputs": [tensor], "outputs": [{"name": "heatmap_png", "parameters": {"size": "original"}}]},
             raw)
    assert r.status_code == 200  # PNGs may differ in size


@pytest.mark.parametrize("dtype", ["UINT8", "FP32"])
def test_pixels_input(client, circle_png, dtype):
    pixels = np.asarray(Image.open(io.BytesIO(circle_png)).convert("RGB"))  # 64x64, the model's input size
    tensor_u8 = pixels.transpose(2, 0, 1)[None]
    if dtype == "UINT8":
        arr = tensor_u8.astype(np.uint8)
    else:
        from service.models.shapes import MEAN, STD  # the shapes model's normalisation

        mean = np.array(MEAN, np.float32)[:, None, None]
        std = np.array(STD, np.float32)[:, None, None]
        arr = ((tensor_u8 / np.float32(255) - mean) / std).astype(np.float32)
    raw = arr.tobytes()
    got = outputs(post(client, {"inputs": [{"name": "pixels", "datatype": dtype, "shape": list(arr.shape),
                                            "parameters": {"binary_data_size": len(raw)}}],
                                "outputs": [{"name": "scores"}]}, raw))
    tensor, raw = image_input(circle_png)
    ref = outputs(post(client, {"inputs": [tensor], "outputs": [{"name": "scores"}]}, raw))
    assert int(got["scores"][0].argmax()) == int(ref["scores"][0].argmax())
    if dtype == "UINT8":
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-5)
    json_body = {"inputs": [{"name": "pixels", "datatype": dtype, "shape": list(arr.shape), "data": arr.tolist()}],
                 "outputs": [{"name": "scores"}]}
    np.testing.assert_allclose(outputs(post(client, json_body))["scores"], got["scores"], atol=1e-6)


def test_gzip_request(client, circle_png):
    tensor, raw = image_input(circle_png)
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "scores"}]}).encode()
    r = client.post(INFER, content=gzip.compress(header + raw), headers={
        "Content-Encoding": "gzip", "Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, K]


def test_gzip_limits():
    bomb = gzip.compress(b" " * 3_000_000)
    with make_client(max_body_bytes=1_000_000) as c:
        r = c.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and set(r.json()) == {"error"}
        for bad in (b"not gzip", gzip.compress(b"{}")[:-12]):
            r = c.post(INFER, content=bad, headers={"Content-Encoding": "gzip"})
            assert r.status_code == 400 and set(r.json()) == {"error"}
        r = c.post(INFER, content=b"{}", headers={"Content-Encoding": "br"})
        assert r.status_code == 400


def _bad_requests(png: bytes) -> list[tuple[str, dict | bytes, dict, int]]:
    """(what, header or raw body, extra headers, status): every one must be `{"error": str}`."""
    packed = binary.pack_bytes([png])
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(packed)}}
    j = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}
    return [
        ("malformed json", b"{nope", {}, 400),
        ("not an object", b"[1]", {}, 400),
        ("no inputs", {"inputs": []}, {}, 400),
        ("unknown input", {"inputs": [{**j, "name": "img"}]}, {}, 400),
        ("unknown output", {"inputs": [j], "outputs": [{"name": "logits"}]}, {}, 400),
        ("output twice", {"inputs": [j], "outputs": [{"name": "scores"}, {"name": "scores"}]}, {}, 400),
        ("per-output method", {"inputs": [j], "outputs": [{"name": "heatmap", "parameters": {"method": "x"}}]}, {},
         400),
        ("unknown parameter", {"inputs": [j], "parameters": {"colour": 1}}, {}, 400),
        ("bad method", {"inputs": [j], "parameters": {"method": "nope"}}, {}, 400),
        ("bad target", {"inputs": [j], "parameters": {"targets": ["unicorn"]}}, {}, 400),
        ("bool target", {"inputs": [j], "parameters": {"targets": [True]}}, {}, 400),
        ("top_k zero", {"inputs": [j], "parameters": {"top_k": 0}}, {}, 400),
        ("bad alpha", {"inputs": [j], "outputs": [{"name": "heatmap_png", "parameters": {"alpha": 3}}]}, {}, 400),
        ("array png", {"inputs": [j], "outputs": [{"name": "heatmap_png", "parameters": {"output": "array"}}]}, {},
         400),
        ("bad binary_data", {"inputs": [j], "outputs": [{"name": "scores", "parameters": {"binary_data": 1}}]}, {},
         400),
        ("wrong datatype", {"inputs": [{**j, "datatype": "FP32"}]}, {}, 400),
        ("wrong shape", {"inputs": [{**j, "shape": [1, 2]}]}, {}, 400),
        ("count mismatch", {"inputs": [{**j, "shape": [2]}]}, {}, 400),
        ("bad base64", {"inputs": [{**j, "data": ["!!!"]}]}, {}, 400),
        ("not an image", {"inputs": [{**j, "data": [b64(b"hello")]}]}, {}, 400),
        ("no data", {"inputs": [{k: v for k, v in j.items() if k != "data"}]}, {}, 400),
        ("both inputs", {"inputs": [j, {"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 64, 64],
                                        "data": [0] * (3 * 64 * 64)}]}, {}, 400),
        ("pixels wrong size", {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 8, 8],
                                           "data": [0] * 192}]}, {}, 400),
        ("pixels out of range", {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 1, 1],
                                             "data": [0, 1, 256]}]}, {}, 400),
        ("binary without header", {"inputs": [tensor]}, {}, 400),
        ("header longer than body", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400),
        ("header length not a number", b"{}", {"Inference-Header-Content-Length": "-1"}, 400),
        ("size past the end", ({"inputs": [{**tensor, "parameters": {"binary_data_size": len(packed) + 5}}]}, packed),
         {}, 400),
        ("bytes left over", ({"inputs": [tensor]}, packed + b"xx"), {}, 400),
        ("bad element length", ({"inputs": [{**tensor, "parameters": {"binary_data_size": 6}}]},
                                struct.pack("<I", 99) + b"ab"), {}, 400),
        ("more elements than shape", ({"inputs": [{**tensor, "parameters": {"binary_data_size": 2 * len(packed)}}]},
                                      packed * 2), {}, 400),
        ("negative size", ({"inputs": [{**tensor, "parameters": {"binary_data_size": -1}}]}, packed), {}, 400),
        ("data and binary", ({"inputs": [{**tensor, "data": ["x"]}]}, packed), {}, 400),
        ("pixels byte count", ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 64, 64],
                                            "parameters": {"binary_data_size": 10}}]}, b"0" * 10), {}, 400),
        # np.prod of this shape wraps around to 0 in int64
        ("overflowing shape", ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [4611686018427387904, 3,
                                                                                            4, 1],
                                            "parameters": {"binary_data_size": 0}}]}, b""), {}, 400),
        ("overflowing shape json", {"inputs": [{"name": "pixels", "datatype": "UINT8",
                                                "shape": [4611686018427387904, 3, 4, 1], "data": []}]}, {}, 400),
        # A request asking only for scores still has its explanation options checked.
        ("scores only, bad method", {"inputs": [j], "outputs": [{"name": "scores"}], "parameters": {"method": "x"}},
         {}, 400),
        ("scores only, bad layer", {"inputs": [j], "outputs": [{"name": "scores"}], "parameters": {"layer": "nope"}},
         {}, 400),
        ("scores only, bool target", {"inputs": [j], "outputs": [{"name": "scores"}],
                                      "parameters": {"targets": [True]}}, {}, 400),
        ("image twice", {"inputs": [j, j]}, {}, 400),
    ]


def test_error_messages_name_the_problem(client, circle_png):
    j = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(circle_png)]}
    r = post(client, {"inputs": [j, j]})
    assert r.json()["error"] == "input 'image' is given twice"
    huge = {"name": "pixels", "datatype": "FP32", "shape": [4611686018427387904, 3, 4, 1], "data": []}
    assert "elements, more than any request may" in post(client, {"inputs": [huge]}).json()["error"]


@pytest.mark.parametrize("index", range(40))
def test_bad_requests_are_400_with_plain_errors(client, circle_png, index):
    cases = _bad_requests(circle_png)
    assert len(cases) == 40
    what, body, headers, status = cases[index]
    if isinstance(body, tuple):
        r = post(client, body[0], body[1], **headers)
    elif isinstance(body, dict):
        r = post(client, body, **headers)
    else:
        r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == status, (what, r.text)
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), what


def test_unknown_model_and_version_are_404(client, circle_png):
    tensor, raw = image_input(circle_png)
    for path in ("/v2/models/nope/infer", "/v2/models/shapes/versions/3/infer"):
        r = post(client, {"inputs": [tensor]}, raw, path=path)
        assert r.status_code == 404 and set(r.json()) == {"error"}


def test_not_ready_is_503_with_retry_after(circle_png):
    with make_client() as c:
        c.app.state.repository.begin_drain()
        for r in (c.get("/v2/health/ready"), c.get("/v2/models/shapes/ready"), c.get("/v1/models/shapes"),
                  post(c, {"inputs": [image_input(circle_png, as_binary=False)[0]]})):
            assert r.status_code == 503 and set(r.json()) == {"error"} and r.headers["retry-after"] == "1"
        assert c.get("/v2/health/live").status_code == 200


def test_health_is_open_and_inference_needs_a_key(circle_png):
    with make_client(api_keys=("k",)) as c:
        assert c.get("/v2/health/ready").status_code == 200
        r = c.get("/v2/models/shapes")
        assert r.status_code == 401 and set(r.json()) == {"error"}
        assert c.get("/v2/models/shapes", headers={"X-API-Key": "k"}).status_code == 200


def test_metrics_label_routes(client, circle_png):
    tensor, raw = image_input(circle_png)
    post(client, {"inputs": [tensor], "outputs": [{"name": "scores"}]}, raw)
    client.post("/v1/models/shapes:predict", json={"instances": [b64(circle_png)]})
    text = client.get("/metrics").text
    assert 'endpoint="/v2/models/{name}/infer",model="shapes",status="200"' in text
    assert 'endpoint="/v1/models/{name}:predict",model="shapes",status="200"' in text
