"""HTTP edges: Accept negotiation, HEAD, trailing slashes, method aliases, ignored keys, the OpenAPI
document and docs behind keys, what /models reveals, the class-label headers, PIL's debug lines."""

from __future__ import annotations

import io
import logging
from urllib.parse import unquote

import pytest
import torch
import torchvision
from PIL import Image

from service.api.negotiation import choose
from service.api.routes import class_headers
from service.app import create_app
from service.config import Settings
from service.imaging import decode_image
from service.logs import setup_logging
from service.registry import ModelSpec, load_model
from tests.api.conftest import b64
from tests.api.hardening_helpers import tiny_client
from tests.api.models import Tiny

JSON, PNG = "application/json", "image/png"


@pytest.mark.parametrize(("accept", "offers", "chosen"), [
    (None, [JSON, PNG], JSON),
    ("", [JSON, PNG], JSON),
    ("*/*", [JSON, PNG], JSON),
    ("image/*", [JSON, PNG], PNG),
    ("image/png", [JSON, PNG], PNG),
    ("image/png, application/json;q=0", [JSON, PNG], PNG),
    ("image/png;q=0.5, application/json", [JSON, PNG], JSON),
    ("application/json;q=0.2, image/*;q=0.9", [JSON, PNG], PNG),
    ("image/pngx", [JSON, PNG], None),
    ("text/html", [JSON, PNG], None),
    ("image/*, image/png;q=0", [JSON, PNG], None),  # the specific range wins over the wildcard
    ("*/*;q=0.1, image/png;q=0", [JSON, PNG], JSON),
    ("image/png", [JSON], None),
    ("application/*", [JSON, PNG], JSON),
    ("IMAGE/PNG; Q=1", [JSON, PNG], PNG),
    ("garbage", [JSON, PNG], JSON),  # nothing parseable is no preference
    ("image/png;q=abc, application/json", [JSON, PNG], JSON),
])
def test_accept_negotiation(accept, offers, chosen):
    assert choose(accept, offers) == chosen


@pytest.mark.parametrize(("accept", "status", "ctype"), [
    ("image/png, application/json;q=0", 200, PNG),
    ("image/*", 200, PNG),
    ("*/*", 200, JSON),
    ("image/pngx", 406, JSON),
    ("text/html", 406, JSON),
])
def test_explain_negotiates_accept(client, circle_png, accept, status, ctype):
    r = client.post("/explain", files={"image": ("c.png", circle_png)}, headers={"Accept": accept})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(ctype)
    if status == 406:
        assert r.json()["error"]["code"] == "not_acceptable"


def test_accept_falls_back_to_json_when_png_cannot_be_produced(client, circle_png):
    r = client.post("/explain", json={"image": b64(circle_png), "targets": [0, 1]},
                    headers={"Accept": "image/png, application/json;q=0.5"})
    assert r.status_code == 200 and len(r.json()["results"][0]["explanations"]) == 2


def test_head_is_answered_like_get_without_a_body(client):
    for path in ("/healthz", "/readyz", "/models", "/metrics", "/openapi.json"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
    assert client.head("/predict").status_code == 405


@pytest.mark.parametrize("path", ["/predict/", "/predict//"])
def test_trailing_slash_is_served_not_redirected(client, circle_png, path):
    r = client.post(path, files={"image": ("c.png", circle_png)}, follow_redirects=False)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["predictions"]
    assert client.get("/models/shapes/", follow_redirects=False).json()["name"] == "shapes"


def test_head_and_slash_keep_metrics_labels(client):
    client.head("/healthz/")
    text = client.get("/metrics").text
    assert 'camserve_requests_total{endpoint="/healthz",model="",status="200"}' in text


def test_gradcampp_alias_and_the_plus_hint(client, circle_png):
    files = {"image": ("c.png", circle_png)}
    r = client.post("/explain?method=gradcampp&output=array&size=feature", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["explanations"][0]["method"] == "gradcam++"
    r = client.post("/explain?method=gradcam++", files=files)  # what a browser or curl sends unescaped
    assert r.status_code == 422
    assert "%2B" in r.json()["error"]["message"] and r.json()["error"]["field"] == "method"
    assert client.post("/explain?method=gradcam%2B%2B", files=files).status_code == 200


def test_cache_busters_and_request_ids_are_ignored(client, circle_png):
    files = {"image": ("c.png", circle_png)}
    assert client.post("/predict?_=1700000000", files=files).status_code == 200
    assert client.post("/explain?_ts=1&output=png", files=files).status_code == 200
    r = client.post("/predict", json={"image": b64(circle_png), "request_id": "abc-1", "_trace": True})
    assert r.status_code == 200, r.text
    assert client.post("/predict", files=files, data={"request_id": "7"}).status_code == 200
    # A misspelled option is still reported, wherever it comes from.
    for r in (client.post("/explain?ouput=overlay", files=files),
              client.post("/explain", json={"image": b64(circle_png), "ouput": "overlay"})):
        assert r.status_code == 422 and "ouput" in r.json()["error"]["message"]


def test_form_and_body_win_over_the_query(client, circle_png):
    r = client.post("/predict?top_k=1", files={"image": ("c.png", circle_png)}, data={"top_k": "3"})
    assert len(r.json()["results"][0]["predictions"]) == 3
    r = client.post("/predict?top_k=1", json={"image": b64(circle_png), "top_k": 2})
    assert len(r.json()["results"][0]["predictions"]) == 2


def test_openapi_lists_query_options():
    with tiny_client() as c:
        doc = c.get("/openapi.json").json()
    ops = doc["paths"]
    explain = {p["name"] for p in ops["/explain"]["post"]["parameters"] if p["in"] == "query"}
    assert {"model", "top_k", "targets", "method", "layer", "output", "size", "colormap", "alpha"} <= explain
    predict = {p["name"] for p in ops["/predict"]["post"]["parameters"] if p["in"] == "query"}
    assert predict == {"model", "top_k"}
    assert "securitySchemes" not in doc.get("components", {})


def test_docs_are_open_and_the_security_scheme_is_listed_when_keys_are_set():
    with tiny_client(api_keys=("k",)) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert c.get("/models").status_code == 401
        doc = c.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert doc["paths"]["/predict"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []


def test_docs_follow_open_paths():
    with tiny_client(api_keys=("k",), open_paths=("/healthz",)) as c:
        assert c.get("/docs").status_code == 401
        assert c.get("/docs", headers={"X-API-Key": "k"}).status_code == 200


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_models_show_source_names_not_server_paths(tmp_path):
    torch.manual_seed(0)
    secret = tmp_path / "secret-dir"
    secret.mkdir()
    torch.jit.save(torch.jit.trace(Tiny().eval(), torch.randn(1, 3, 32, 32)), str(secret / "tiny.pt"))
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), secret / "m.pth")
    labels = secret / "labels.txt"
    labels.write_text("x\ny\nz\n")
    models = [
        load_model(ModelSpec("ts", f"torchscript:{secret / 'tiny.pt'}", preprocess={"resize": [32, 32]})),
        load_model(ModelSpec("mv", "torchvision:mobilenet_v3_small", weights=str(secret / "m.pth"),
                             labels=str(labels), preprocess={"resize": 64, "crop": 64})),
    ]
    with tiny_client(models=models) as c:
        listing = c.get("/models")
        details = [c.get(f"/models/{n}") for n in ("ts", "mv")]
    texts = [listing.text] + [d.text for d in details]
    assert all(str(tmp_path) not in t and "secret-dir" not in t for t in texts)
    sources = {m["name"]: m["source"] for m in listing.json()["models"]}
    assert sources == {"ts": "torchscript:tiny.pt", "mv": "torchvision:mobilenet_v3_small"}


def test_class_label_headers_follow_rfc_8187():
    h = class_headers(3, "chat tigré", 0.5)
    assert h["X-Class-Label*"] == "UTF-8''chat%20tigr%C3%A9"
    assert h["X-Class-Label"].isascii()
    charset, _, value = h["X-Class-Label*"].partition("''")
    assert charset == "UTF-8" and unquote(value, encoding="utf-8") == "chat tigré"
    plain = class_headers(0, "tabby cat", 0.5)
    assert plain["X-Class-Label"] == "tabby cat" and plain["X-Class-Label*"] == "UTF-8''tabby%20cat"


def test_png_answer_carries_both_label_headers(client, circle_png):
    r = client.post("/explain", files={"image": ("c.png", circle_png)}, headers={"Accept": "image/png"})
    assert r.headers["x-class-label"] == "circle" and r.headers["x-class-label*"] == "UTF-8''circle"


def test_debug_logging_leaves_out_pil_chunk_lines():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("PIL").level
    try:
        setup_logging("text", "debug")
        root.addHandler(Keep())
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        decode_image(buf.getvalue(), 1000)
        logging.getLogger("camserve").debug("a batch line")
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("PIL").setLevel(saved[2])
    names = [r.name for r in records]
    assert "camserve" in names
    assert not [n for n in names if n.startswith("PIL")], names


def test_default_open_paths_include_the_docs():
    assert {"/docs", "/redoc", "/openapi.json"} <= set(Settings().open_paths)
    create_app(Settings())  # builds with them


def test_no_path_is_answered_with_a_bodyless_redirect(client):
    for path in ("/ui/static/", "/docs-assets/", "/nope/", "/models/"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code != 307, path
        if r.status_code >= 400:
            assert r.headers["content-type"] == "application/json", path


@pytest.mark.parametrize(("source", "shown"), [
    ("torchscript:/srv/models/m.pt", "torchscript:m.pt"),
    ("onnx:/srv/models/r50.onnx", "onnx:r50.onnx"),
    ("export:./exported/vit.pt2", "export:vit.pt2"),
    ("hf:/srv/hf/vit-small", "hf:vit-small"),
    ("hf:google/vit-base-patch16-224", "hf:google/vit-base-patch16-224"),  # a hub id, not a path
    ("torchvision:resnet18", "torchvision:resnet18"),
    ("python:tests.api.models:tiny", "python:tests.api.models:tiny"),
])
def test_public_source_never_shows_a_server_path(source, shown):
    from service.api.routes import public_source
    from service.modelspec import ModelSpec
    from service.repository import ServedModel

    assert public_source(ServedModel("m", ModelSpec(name="m", source=source))) == shown
