"""KServe's own Python client (``kserve`` on PyPI) drives camserve's V1 and V2 routes.

Each test runs twice: in process through ``httpx.ASGITransport`` (how KServe's own tests drive a server;
the app's lifespan loads the model first) and against a real uvicorn. The client pins python-dateutil<3
and protobuf<7, older than the project's environment holds, so it is installed only in ``.venv-kserve``
by ``make test-kserve``; elsewhere this module is skipped.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.config import Settings
from service.dataplane import ExplainOptions
from service.models.scenes import SHAPE_CLASSES
from tests.api.conftest import b64, png_bytes, scene

pytest.importorskip("kserve", reason="KServe's client lives in its own environment: run `make test-kserve`")
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

K = len(SHAPE_CLASSES)


@dataclass
class Target:
    """One way to reach camserve: a base URL, and the transport that carries requests there (None: TCP)."""

    base: str
    transport: httpx.AsyncBaseTransport | None


@dataclass
class Clients:
    run: Any  # asyncio.Runner.run: every call below runs on the module's one event loop
    base: str
    v1: InferenceRESTClient
    v2: InferenceRESTClient
    native: httpx.AsyncClient  # camserve's own /predict and /explain, to compare with


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    # One loop for the in-process app's lifespan (its batchers live on it) and for every client call.
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="module")
def app(runner):
    """The app in this process, its models loaded by its own lifespan, as a server would start it."""
    application = create_app(Settings())
    lifespan = application.router.lifespan_context(application)
    runner.run(lifespan.__aenter__())
    yield application
    runner.run(lifespan.__aexit__(None, None, None))


@pytest.fixture(scope="module", params=["asgi", "uvicorn"])
def target(request, app) -> Target:
    if request.param == "asgi":
        return Target("http://camserve", httpx.ASGITransport(app=app))
    url, _ = request.getfixturevalue("server")
    return Target(url, None)


@pytest.fixture(scope="module")
def clients(runner, target) -> Iterator[Clients]:
    v1 = InferenceRESTClient(RESTConfig(transport=target.transport, protocol="v1"))
    v2 = InferenceRESTClient(RESTConfig(transport=target.transport, protocol="v2"))
    native = httpx.AsyncClient(transport=target.transport, base_url=target.base, timeout=60)
    yield Clients(runner.run, target.base, v1, v2, native)
    for client in (v1, v2):
        runner.run(client.close())
    runner.run(native.aclose())


@pytest.fixture(scope="module")
def circle_file() -> bytes:
    return png_bytes(scene("circle")[0])


@pytest.fixture(scope="module")
def unrounded_heatmap(runner, app, circle_file) -> np.ndarray:
    """The engine's own array for the circle at the input size (the JSON routes round to four decimals)."""
    result = runner.run(app.state.dataplane.infer(None, [circle_file],
                                                  explain=ExplainOptions(output="array", size="input")))
    return result.results[0].explanations[0].heatmap.data


def image_input(png: bytes, as_binary: bool) -> InferInput:
    tensor = InferInput("image", [1], "BYTES")
    # JSON carries a BYTES element as UTF-8 text (the client refuses anything else), so the file goes as
    # base64; the binary extension carries the file itself.
    data = png if as_binary else base64.b64encode(png)
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=as_binary)
    return tensor


def native_scores(c: Clients, png: bytes) -> list[float]:
    reply = c.run(c.native.post("/predict", files={"image": ("c.png", png, "image/png")}, params={"top_k": K}))
    assert reply.status_code == 200, reply.text
    scores = [0.0] * K
    for p in reply.json()["results"][0]["predictions"]:
        scores[p["index"]] = p["score"]
    return scores


def native_heatmap(c: Clients, png: bytes) -> np.ndarray:
    reply = c.run(c.native.post("/explain", files={"image": ("c.png", png, "image/png")},
                                params={"output": "array", "size": "input"}))
    assert reply.status_code == 200, reply.text
    return np.asarray(reply.json()["results"][0]["explanations"][0]["heatmap"]["data"], dtype=np.float32)


def test_v2_health(clients):
    c = clients
    assert c.run(c.v2.is_server_live(c.base)) is True
    assert c.run(c.v2.is_server_ready(c.base)) is True
    assert c.run(c.v2.is_model_ready(c.base, "shapes")) is True
    assert c.run(c.v2.is_model_ready(c.base, "nope")) is False


@pytest.mark.parametrize("as_binary", [True, False], ids=["binary", "json-base64"])
def test_v2_infer_equals_predict_and_explain(clients, circle_file, unrounded_heatmap, as_binary):
    c = clients
    request = InferRequest("shapes", [image_input(circle_file, as_binary)], request_id="kserve-1")
    response = c.run(c.v2.infer(c.base, request, model_name="shapes"))  # no outputs named: all four, in JSON
    assert response.id == "kserve-1" and response.model_name == "shapes"
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name) == ["scores", "heatmap", "heatmap_png", "target_class"]
    scores = by_name["scores"].as_numpy()
    heatmap = by_name["heatmap"].as_numpy()
    assert scores.shape == (1, K) and scores.dtype == np.float32
    assert heatmap.shape == (1, 1, 64, 64) and heatmap.dtype == np.float32
    assert by_name["target_class"].as_numpy().tolist() == [[SHAPE_CLASSES.index("circle")]]
    (png_text,) = by_name["heatmap_png"].as_numpy().ravel()
    assert base64.b64decode(png_text).startswith(b"\x89PNG")

    np.testing.assert_allclose(scores[0], native_scores(c, circle_file), atol=1e-5)
    np.testing.assert_allclose(heatmap[0, 0], native_heatmap(c, circle_file), atol=1e-4)  # four decimals
    np.testing.assert_allclose(heatmap[0, 0], unrounded_heatmap, atol=1e-5)


def test_v2_requested_binary_outputs(clients, circle_file, unrounded_heatmap):
    c = clients
    outputs = [RequestedOutput("heatmap", {"binary_data": True}), RequestedOutput("scores")]
    request = InferRequest("shapes", [image_input(circle_file, True)], request_outputs=outputs)
    response = c.run(c.v2.infer(c.base, request, model_name="shapes"))
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name) == ["heatmap", "scores"]  # the ones asked for, in that order
    np.testing.assert_allclose(by_name["heatmap"].as_numpy()[0, 0], unrounded_heatmap, atol=1e-5)
    np.testing.assert_allclose(by_name["scores"].as_numpy()[0], native_scores(c, circle_file), atol=1e-5)


def test_v1_predict(clients, circle_file):
    c = clients
    body = {"instances": [{"image_bytes": {"b64": b64(circle_file)}, "key": "c-1"}]}
    reply = c.run(c.v1.infer(c.base, body, model_name="shapes"))
    assert set(reply) == {"predictions"}
    (pred,) = reply["predictions"]
    assert pred["key"] == "c-1" and pred["label"] == "circle" and pred["index"] == SHAPE_CLASSES.index("circle")
    np.testing.assert_allclose(pred["scores"], native_scores(c, circle_file), atol=1e-5)
    assert c.run(c.v1.is_model_ready(c.base, "shapes")) is True
    assert c.run(c.v1.is_server_live(c.base)) is True  # GET / answers non-browsers as KServe's server does


def test_v1_explain(clients, circle_file, unrounded_heatmap):
    c = clients
    body = {"instances": [{"image_bytes": {"b64": b64(circle_file)}}],
            "parameters": {"output": "array", "size": "input"}}
    reply = c.run(c.v1.explain(c.base, "shapes", body))
    assert set(reply) == {"predictions", "explanations"}
    (pred,) = reply["predictions"]
    assert pred["label"] == "circle"
    ((explanation,),) = reply["explanations"]  # one instance, one target (the top class)
    assert explanation["label"] == "circle" and explanation["method"] == "gradcam"
    heatmap = np.asarray(explanation["heatmap"]["data"], dtype=np.float32)
    np.testing.assert_array_equal(heatmap, native_heatmap(c, circle_file))  # the same rounding as /explain's
    np.testing.assert_allclose(heatmap, unrounded_heatmap, atol=1e-4)


@pytest.mark.parametrize("call", ["v2-infer", "v1-predict", "v1-explain", "v1-ready"])
def test_unknown_model_is_404(clients, circle_file, call):
    c = clients
    instances = {"instances": [b64(circle_file)]}
    calls = {
        "v2-infer": lambda: c.v2.infer(c.base, InferRequest("nope", [image_input(circle_file, True)]),
                                       model_name="nope"),
        "v1-predict": lambda: c.v1.infer(c.base, instances, model_name="nope"),
        "v1-explain": lambda: c.v1.explain(c.base, "nope", instances),
        "v1-ready": lambda: c.v1.is_model_ready(c.base, "nope"),
    }
    with pytest.raises(httpx.HTTPStatusError) as info:
        c.run(calls[call]())
    assert info.value.response.status_code == 404
    # The client quotes the `error` field of a JSON error body in its message.
    assert "unknown model 'nope'" in str(info.value)


def test_v2_bad_image_is_400(clients):
    c = clients
    with pytest.raises(httpx.HTTPStatusError) as info:
        c.run(c.v2.infer(c.base, InferRequest("shapes", [image_input(b"not an image", True)]), model_name="shapes"))
    assert info.value.response.status_code == 400 and "image" in str(info.value)
