"""Every error row of the contract: status, machine-readable code, and a message naming the value."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import errors
from tests.api.conftest import b64, make_client, png_bytes


def _err(r, status: int, code: str, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert needle in body["error"]["message"], body
    assert r.headers["x-request-id"]
    return body


def test_bad_base64(client):
    _err(client.post("/predict", json={"image": "not base64!!"}), 400, "invalid_image", "base64")


def test_not_an_image(client):
    _err(client.post("/predict", json={"image": b64(b"hello world, not a picture")}), 400, "invalid_image",
         "not an image")
    _err(client.post("/predict", files={"image": ("x.txt", b"plain text", "text/plain")}), 400, "invalid_image")


def test_truncated_image(client, circle_png):
    _err(client.post("/predict", json={"image": b64(circle_png[: len(circle_png) // 2])}), 400, "invalid_image",
         "truncated")


def test_empty_image(client):
    _err(client.post("/predict", files={"image": ("e.png", b"")}), 400, "invalid_image", "empty")


def test_no_image(client):
    _err(client.post("/predict", json={"top_k": 1}), 400, "invalid_input", "no image")


def test_unknown_model(client, circle_png):
    _err(client.post("/predict", json={"image": b64(circle_png), "model": "nope"}), 404, "model_not_found", "'nope'")
    _err(client.get("/models/nope"), 404, "model_not_found", "shapes")


def test_unsupported_media_type(client):
    _err(client.post("/predict", content=b"abc", headers={"content-type": "text/plain"}), 415,
         "unsupported_media_type", "text/plain")


def test_malformed_json(client):
    _err(client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}), 422,
         "invalid_argument", "malformed JSON")
    _err(client.post("/predict", json=[1, 2]), 422, "invalid_argument", "object")


@pytest.mark.parametrize(("body", "needle"), [
    ({"image": 5}, "`image` must be a base64 string"),
    ({"images": "abc"}, "`images`"),
    ({"top_k": "many"}, "top_k"),
    ({"top_k": 9}, "`top_k` must be between 1 and 5, got 9"),
    ({"top_k": 0}, "top_k"),
    ({"method": "magic"}, "method"),
    ({"layer": "nope"}, "'nope'"),
    ({"targets": [7]}, "got 7"),
    ({"targets": ["dog"]}, "'dog'"),
    ({"output": "jpeg"}, "output"),
    ({"size": "huge"}, "size"),
    ({"alpha": 2}, "alpha"),
    ({"colormap": "rainbow"}, "colormap"),
    ({"extra": 1}, "extra"),
])
def test_bad_options(client, circle_png, body, needle):
    _err(client.post("/explain", json={"image": b64(circle_png), **body}), 422, "invalid_argument", needle)


def test_bad_query_option(client, circle_png):
    _err(client.post("/explain?top_k=abc", files={"image": ("c.png", circle_png)}), 422, "invalid_argument", "top_k")


def test_accept_png_needs_one_heatmap(client, circle_png):
    r = client.post("/explain", json={"image": b64(circle_png), "targets": [0, 1]}, headers={"Accept": "image/png"})
    _err(r, 406, "not_acceptable", "2 target(s)")


def test_limits():
    big = png_bytes(np.zeros((100, 100, 3), np.uint8))
    with make_client(max_body_bytes=2000, max_image_pixels=5000, max_images_per_request=2) as c:
        _err(c.post("/predict", json={"image": b64(big) + " " * 3000}), 413, "payload_too_large", "2000 bytes")
        _err(c.post("/predict", json={"image": b64(big)}), 413, "payload_too_large", "100x100")
        small = b64(png_bytes(np.zeros((10, 10, 3), np.uint8)))
        _err(c.post("/predict", json={"images": [small] * 3}), 413, "payload_too_large", "3 images")


def test_decompression_bomb_is_refused_from_the_header(client):
    # A 20000 x 20000 PNG compresses to a few hundred kB; decoding it would take 1.2 GB.
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG", compress_level=9)
    _err(client.post("/predict", files={"image": ("bomb.png", buf.getvalue())}), 413, "payload_too_large",
         "400000000 pixels")


def test_not_ready_before_start():
    c = make_client()  # no `with`: the lifespan has not run, so no model is loaded
    _err(c.get("/readyz"), 503, "not_ready")
    _err(c.post("/predict", json={"image": "AAAA"}), 503, "not_ready")


def test_unknown_route_and_method(client):
    _err(client.get("/nope"), 404, "not_found")
    _err(client.get("/predict"), 405, "method_not_allowed")


@pytest.mark.parametrize("target", ["9" * 5000, "²", "-1", "", " "])
def test_odd_target_strings_are_clean_422s(client, circle_png, target):
    _err(client.post("/explain", json={"image": b64(circle_png), "targets": [target]}), 422, "invalid_argument")
    files = {"image": ("c.png", circle_png)}
    r = client.post("/explain", files=files, data={"targets": target})
    if target.strip():
        _err(r, 422, "invalid_argument")
    else:  # an empty form value means "no targets": the default, the top class
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["explanations"][0]["index"] == result["predictions"][0]["index"]


def test_array_output_of_a_huge_original_is_refused(client):
    big = png_bytes(np.zeros((1100, 1000, 3), np.uint8))
    _err(client.post("/explain", json={"image": b64(big), "output": "array"}), 413, "payload_too_large", "size=input")
    r = client.post("/explain", json={"image": b64(big), "output": "array", "size": "input"})
    assert r.status_code == 200


@pytest.mark.parametrize("raw", [
    b'{"image": "AAAA", "top_k": ' + b"1" * 5000 + b"}",
    b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
])
def test_hostile_json_is_a_422(client, raw):
    _err(client.post("/predict", content=raw, headers={"content-type": "application/json"}), 422,
         "invalid_argument")


@pytest.mark.parametrize("query", ["[" + "1" * 5000 + "]", "[" * 3000])
def test_hostile_targets_query_is_a_422(client, circle_png, query):
    r = client.post("/explain", params={"targets": query}, files={"image": ("c.png", circle_png)})
    _err(r, 422, "invalid_argument")


@pytest.mark.parametrize("body", [{"targets": [True]}, {"top_k": True}])
def test_booleans_are_not_numbers(client, circle_png, body):
    _err(client.post("/explain", json={"image": b64(circle_png), **body}), 422, "invalid_argument", "boolean")


def test_too_many_targets(client, circle_png):
    _err(client.post("/explain", json={"image": b64(circle_png), "targets": [0] * 17}), 422, "invalid_argument",
         "at most 16")


def test_a_strip_that_would_resize_to_giga_pixels_is_refused(client):
    strip = png_bytes(np.zeros((1, 20000, 3), np.uint8))  # shorter side 1 -> 64: 64 x 1,280,000
    _err(client.post("/predict", files={"image": ("s.png", strip)}), 413, "payload_too_large", "resized")


def test_multipart_limits_are_413():
    small = png_bytes(np.zeros((8, 8, 3), np.uint8))
    with make_client(max_images_per_request=2, max_body_bytes=5000) as c:
        files = [("image", (f"{i}.png", small)) for i in range(5)]
        _err(c.post("/predict", files=files), 413, "payload_too_large")

        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
            for _ in range(10):
                yield b"\0" * 1000
            yield b"\r\n--b--\r\n"

        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        _err(r, 413, "payload_too_large")


def test_an_exception_is_described_by_class_and_text_without_paths():
    from service.errors import describe

    exc = RuntimeError('File "/srv/app/model.py", line 3: BFloat16 did not match Float (C:\\w\\m.py, ./a/b.py)\n  x')
    assert describe(exc) == 'RuntimeError: File "<path>", line 3: BFloat16 did not match Float (<path>, <path>) x'
    assert describe(ValueError()) == "ValueError"
    assert len(describe(RuntimeError("y" * 5000))) < 320


@pytest.mark.parametrize(("error", "code"), [
    (errors.InvalidInput("x"), "INVALID_ARGUMENT"),
    (errors.InvalidImage("x"), "INVALID_ARGUMENT"),
    (errors.InvalidArgument("top_k", "x"), "INVALID_ARGUMENT"),
    (errors.ModelNotFound("x"), "NOT_FOUND"),
    (errors.Unauthorized("x"), "UNAUTHENTICATED"),
    (errors.Forbidden("x"), "PERMISSION_DENIED"),
    (errors.Overloaded("x"), "RESOURCE_EXHAUSTED"),
    (errors.OutOfMemory("x"), "RESOURCE_EXHAUSTED"),
    (errors.PayloadTooLarge("x"), "RESOURCE_EXHAUSTED"),
    (errors.NotReady("x"), "UNAVAILABLE"),
    (errors.RequestTimeout("x"), "DEADLINE_EXCEEDED"),
    (errors.ModelError("x"), "INTERNAL"),
])
def test_grpc_status_codes_follow_the_class_tree(error, code):
    from service.api.errors import grpc_code_of

    assert grpc_code_of(error) == code
    grpc = pytest.importorskip("grpc")
    assert grpc.StatusCode[code]  # a name grpcio knows
