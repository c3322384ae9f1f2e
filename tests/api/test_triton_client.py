"""NVIDIA's own client (``tritonclient[http]``) against a real camserve process."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.models.scenes import SHAPE_CLASSES
from tests.api.conftest import png_bytes, scene

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K = len(SHAPE_CLASSES)


@pytest.fixture(scope="module")
def triton(server):
    _, port = server
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def circle_file() -> bytes:
    return png_bytes(scene("circle")[0])


def png_input(png: bytes, as_binary: bool):
    tensor = httpclient.InferInput("image", [1], "BYTES")
    # In JSON a BYTES element is text, so the file travels as base64; in binary, as itself.
    data = png if as_binary else base64.b64encode(png)
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=as_binary)
    return tensor


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("shapes") and not triton.is_model_ready("nope")
    meta = triton.get_model_metadata("shapes")
    assert meta["name"] == "shapes" and meta["platform"] == "pytorch"
    assert [o["name"] for o in meta["outputs"]] == ["scores", "heatmap", "heatmap_png", "target_class"]
    assert triton.get_server_metadata()["name"] == "camserve"


def in_process_heatmap(png: bytes) -> np.ndarray:
    """The engine's unrounded array for the same image and options, computed in this process."""
    import asyncio

    from service.app import batch_settings, limits
    from service.config import Settings
    from service.dataplane import DataPlane, ExplainOptions
    from service.repository import ModelRepository

    settings = Settings()

    async def go() -> np.ndarray:
        repository = ModelRepository(batch_settings(settings))
        repository.start()
        await repository.load(settings.models[0])
        try:
            result = await DataPlane(repository, limits(settings)).infer(
                None, [png], explain=ExplainOptions(output="array", size="input"))
        finally:
            await repository.close()
        return result.results[0].explanations[0].heatmap.data  # type: ignore[index,return-value]

    return asyncio.run(go())


@pytest.mark.parametrize("as_binary", [True, False], ids=["binary", "json-base64"])
def test_infer_png_equals_predict_and_explain(triton, server, circle_file, as_binary):
    url, _ = server
    result = triton.infer("shapes", [png_input(circle_file, as_binary)])  # no outputs named: all of them, binary
    scores = result.as_numpy("scores")
    heatmap = result.as_numpy("heatmap")
    assert scores.shape == (1, K) and scores.dtype == np.float32
    assert heatmap.shape == (1, 1, 64, 64) and heatmap.dtype == np.float32
    assert result.as_numpy("target_class").tolist() == [[SHAPE_CLASSES.index("circle")]]
    assert result.as_numpy("heatmap_png")[0, 0].startswith(b"\x89PNG")

    native = httpx.post(f"{url}/predict", files={"image": ("c.png", circle_file, "image/png")},
                        params={"top_k": K}).json()
    for p in native["results"][0]["predictions"]:
        assert abs(scores[0, p["index"]] - p["score"]) <= 1e-5
    explained = httpx.post(f"{url}/explain", files={"image": ("c.png", circle_file, "image/png")},
                           params={"output": "array", "size": "input"}).json()
    rounded = np.asarray(explained["results"][0]["explanations"][0]["heatmap"]["data"], dtype=np.float32)
    np.testing.assert_allclose(heatmap[0, 0], rounded, atol=1e-4)  # /explain's JSON has four decimals
    np.testing.assert_allclose(heatmap[0, 0], in_process_heatmap(circle_file), atol=1e-5)


def test_requested_outputs_with_and_without_binary(triton, circle_file):
    outputs = [httpclient.InferRequestedOutput("scores", binary_data=False),
               httpclient.InferRequestedOutput("heatmap", binary_data=True),
               httpclient.InferRequestedOutput("target_class", binary_data=False)]
    result = triton.infer("shapes", [png_input(circle_file, True)], outputs=outputs, request_id="r-7")
    response = result.get_response()
    assert response["id"] == "r-7" and response["model_name"] == "shapes"
    by_name = {o["name"]: o for o in response["outputs"]}
    assert set(by_name) == {"scores", "heatmap", "target_class"}
    assert "data" in by_name["scores"] and "binary_data_size" in by_name["heatmap"]["parameters"]
    all_binary = triton.infer("shapes", [png_input(circle_file, False)])
    np.testing.assert_allclose(result.as_numpy("scores"), all_binary.as_numpy("scores"), atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("heatmap"), all_binary.as_numpy("heatmap"), atol=1e-5)
    only_png = triton.infer("shapes", [png_input(circle_file, True)],
                            outputs=[httpclient.InferRequestedOutput("heatmap_png", binary_data=True)],
                            parameters={"size": "original"})  # the PNG at the upload's size
    assert only_png.as_numpy("heatmap_png").shape == (1, 1) and only_png.as_numpy("scores") is None


def test_gzip_request(triton, circle_file):
    result = triton.infer("shapes", [png_input(circle_file, True)], request_compression_algorithm="gzip",
                          outputs=[httpclient.InferRequestedOutput("scores")])
    assert int(result.as_numpy("scores")[0].argmax()) == SHAPE_CLASSES.index("circle")


def test_unknown_model_is_404(triton, circle_file):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("nope", [png_input(circle_file, True)])
    assert str(info.value.status()) == "404" and "nope" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert str(info.value.status()) == "404"


def test_bad_input_is_400(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("shapes", [png_input(b"not an image", True)])
    assert str(info.value.status()) == "400" and "image" in info.value.message()


def test_readme_tritonclient_snippet(server, tmp_path, monkeypatch):
    """The README's ```python block that uses tritonclient, run as written (against this server)."""
    _, port = server
    text = (ROOT / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "tritonclient" in b]
    (tmp_path / "circle.png").write_bytes(png_bytes(scene("circle")[0]))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(snippet.replace("localhost:8000", f"localhost:{port}"), "README.md", "exec"), namespace)
    assert namespace["label"] == "circle"
    assert (tmp_path / "heatmap.png").read_bytes().startswith(b"\x89PNG")


def test_model_configuration_and_statistics_extensions(triton, circle_file):
    """tritonclient's get_model_config and get_inference_statistics read what camserve knows."""
    assert {"model_configuration", "statistics"} <= set(triton.get_server_metadata()["extensions"])
    config = triton.get_model_config("shapes")
    assert config["name"] == "shapes" and config["max_batch_size"] == 32
    assert [i["name"] for i in config["input"]] == ["image", "pixels"]
    assert config["input"][0]["data_type"] == "TYPE_STRING"
    assert config["output"][0] == {"name": "scores", "data_type": "TYPE_FP32", "dims": [K]}
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000

    def stats() -> dict:
        (entry,) = triton.get_inference_statistics("shapes")["model_stats"]
        return entry

    before = stats()
    triton.infer("shapes", [png_input(circle_file, True)],
                 outputs=[httpclient.InferRequestedOutput("scores", binary_data=True)])
    bad = httpclient.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException):
        triton.infer("shapes", [bad])
    after = stats()
    assert after["name"] == "shapes" and after["version"] == "1"
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert s1["success"]["count"] == s0["success"]["count"] + 1 and s1["success"]["ns"] > s0["success"]["ns"]
    assert s1["fail"]["count"] == s0["fail"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 1
    assert after["execution_count"] == before["execution_count"] + 1
    assert s1["compute_infer"]["ns"] > s0["compute_infer"]["ns"] and after["last_inference"] > 0
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    everything = triton.get_inference_statistics()["model_stats"]
    assert [m["name"] for m in everything] == ["shapes"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.get_model_config("nope")
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.get_inference_statistics("nope")
