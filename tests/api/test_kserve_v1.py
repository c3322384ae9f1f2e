"""KServe V1 with plain httpx (through the app's TestClient): every instance shape, options, errors."""

from __future__ import annotations

import pytest

from service.models.scenes import SHAPE_CLASSES
from tests.api.conftest import b64, png_bytes, scene


@pytest.fixture(scope="module")
def ring_png() -> bytes:
    return png_bytes(scene("ring", seed=2)[0])


def test_models_and_status(client):
    assert client.get("/v1/models").json() == {"models": ["shapes"]}
    assert client.get("/v1/models/shapes").json() == {"name": "shapes", "ready": True}
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


@pytest.mark.parametrize("shape", ["image_bytes", "image_obj", "image_str", "b64", "bare", "data_uri"])
def test_every_instance_shape(client, circle_png, shape):
    text = b64(circle_png)
    instance = {"image_bytes": {"b64": text}, "image_obj": {"image": {"b64": text}}, "image_str": {"image": text},
                "b64": {"b64": text}, "bare": text, "data_uri": f"data:image/png;base64,{text}"}[shape]
    r = client.post("/v1/models/shapes:predict", json={"instances": [instance]})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert pred["label"] == "circle" and pred["index"] == SHAPE_CLASSES.index("circle")
    assert len(pred["scores"]) == len(SHAPE_CLASSES) and abs(sum(pred["scores"]) - 1) < 1e-4
    assert "key" not in pred


def test_scores_equal_predict_and_keys_echo(client, circle_png, ring_png):
    body = {"inputs": [{"b64": b64(circle_png), "key": "c-1"}, {"image_bytes": {"b64": b64(ring_png)}, "key": 7}]}
    r = client.post("/v1/models/shapes:predict", json=body)
    preds = r.json()["predictions"]
    assert [p["key"] for p in preds] == ["c-1", 7]
    assert [p["label"] for p in preds] == ["circle", "ring"]
    native = client.post("/predict", json={"images": [b64(circle_png), b64(ring_png)], "top_k": len(SHAPE_CLASSES)})
    for pred, res in zip(preds, native.json()["results"], strict=True):
        for p in res["predictions"]:
            assert pred["scores"][p["index"]] == pytest.approx(p["score"], abs=1e-6)


def test_top_k_from_parameters_or_query(client, circle_png):
    body = {"instances": [b64(circle_png)], "parameters": {"top_k": 2}}
    top = client.post("/v1/models/shapes:predict", json=body).json()["predictions"][0]["top"]
    assert len(top) == 2 and top[0]["label"] == "circle"
    top = client.post("/v1/models/shapes:predict?top_k=3", json={"instances": [b64(circle_png)]})
    assert len(top.json()["predictions"][0]["top"]) == 3


def test_explain_shaped_as_explain(client, circle_png, ring_png):
    body = {"instances": [b64(circle_png), {"b64": b64(ring_png), "key": "r"}],
            "parameters": {"targets": "circle,ring", "output": "array", "size": "feature", "method": "gradcam++"}}
    r = client.post("/v1/models/shapes:explain", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["predictions"]) == 2 and data["predictions"][1]["key"] == "r"
    assert [[e["label"] for e in per] for per in data["explanations"]] == [["circle", "ring"]] * 2
    native = client.post("/explain", json={"image": b64(circle_png), "targets": ["circle", "ring"],
                                           "output": "array", "size": "feature", "method": "gradcam++"})
    assert data["explanations"][0] == native.json()["results"][0]["explanations"]


def test_explain_options_in_query(client, circle_png):
    r = client.post("/v1/models/shapes:explain?output=overlay&size=input&colormap=turbo",
                    json={"instances": [b64(circle_png)]})
    (e,) = r.json()["explanations"][0]
    assert e["heatmap"]["format"] == "overlay" and e["label"] == "circle"


def test_explain_passes_every_option_through(client, circle_png):
    """smooth, metrics, fuse and metric_steps reach the data plane: the V1 answer equals /explain's."""
    params = {"smooth": "aug", "metrics": "deletion", "metric_steps": 4, "layer": "features.2,features.3",
              "fuse": "max", "output": "array", "size": "feature"}
    r = client.post("/v1/models/shapes:explain", json={"instances": [b64(circle_png)], "parameters": params})
    assert r.status_code == 200, r.text
    (e,) = r.json()["explanations"][0]
    assert "deletion" in e["metrics"] and e["metrics"]["steps"] == 4
    native = client.post("/explain", json={"image": b64(circle_png), **params, "metrics": ["deletion"],
                                           "layer": ["features.2", "features.3"]})
    assert native.status_code == 200, native.text
    assert [e] == native.json()["results"][0]["explanations"]
    plain = client.post("/v1/models/shapes:explain", json={"instances": [b64(circle_png)], "parameters": {
        "output": "array", "size": "feature"}}).json()["explanations"][0][0]
    assert plain["heatmap"] != e["heatmap"] and "metrics" not in plain


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/models/shapes:predict", {"instances": ["not base64!"]}, 400),
    ("/v1/models/shapes:predict", {"instances": [b64(b"not an image")]}, 400),
    ("/v1/models/shapes:predict", {"instances": []}, 400),
    ("/v1/models/shapes:predict", {"images": ["x"]}, 400),
    ("/v1/models/shapes:predict", {"instances": [{"picture": "x"}]}, 400),
    ("/v1/models/shapes:predict", {"instances": [{"image": {"bytes": "x"}}]}, 400),
    ("/v1/models/shapes:predict", {"instances": [12]}, 400),
    ("/v1/models/shapes:predict", [1, 2], 400),
    ("/v1/models/shapes:predict", {"instances": ["CIRCLE"], "parameters": {"top_k": 0}}, 400),
    ("/v1/models/shapes:predict", {"instances": ["CIRCLE"], "parameters": {"top_k": True}}, 400),
    ("/v1/models/shapes:predict", {"instances": ["CIRCLE"], "parameters": {"method": "gradcam"}}, 400),
    ("/v1/models/shapes:predict", {"instances": ["CIRCLE"], "parameters": "x"}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"method": "nope"}}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"targets": ["unicorn"]}}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"alpha": 2}}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"colour": "red"}}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"smooth": "bogus"}}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"metrics": ["bogus"]}}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"fuse": "bogus"}}, 400),
    ("/v1/models/shapes:explain", {"instances": ["CIRCLE"], "parameters": {"metric_steps": 1}}, 400),
    ("/v1/models/nope:predict", {"instances": ["CIRCLE"]}, 404),
    ("/v1/models/nope:explain", {"instances": ["CIRCLE"]}, 404),
])
def test_errors_are_plain(client, circle_png, path, body, status):
    if isinstance(body, dict):
        body = {k: ([b64(circle_png) if i == "CIRCLE" else i for i in v] if isinstance(v, list) else v)
                for k, v in body.items()}
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


def test_malformed_bodies_and_methods_are_plain(client):
    for r, status in [(client.post("/v1/models/shapes:predict", content=b"{nope"), 400),
                      (client.get("/v1/models/shapes:predict"), 404),  # "shapes:predict" is not a model
                      (client.put("/v1/models/shapes:explain"), 405),
                      (client.get("/v1/nothing"), 404)]:
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


def test_too_many_instances_is_413(circle_png):
    from tests.api.conftest import make_client

    with make_client(max_images_per_request=2) as c:
        r = c.post("/v1/models/shapes:predict", json={"instances": [b64(circle_png)] * 3})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
