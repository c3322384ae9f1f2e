"""The Open Inference Protocol over gRPC, spoken by NVIDIA's own client (``tritonclient[grpc]``) to a real
camserve process serving it beside HTTP, with API keys and an admin key.

No gRPC server runs in this process: camserve's generated ``inference`` messages and tritonclient's
would collide in protobuf's default descriptor pool.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import struct
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service.models.scenes import SHAPE_CLASSES
from tests.api.conftest import b64, check_similarity, png_bytes, scene
from tests.api.server import ROOT, free_port, start_server

grpcclient = pytest.importorskip("tritonclient.grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.grpc.aio import InferenceServerClient as AioClient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

USER, ADMIN = "user-key", "admin-key"
AUTH = {"authorization": f"Bearer {USER}"}
K = len(SHAPE_CLASSES)
MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(http url, grpc address) of a server with shapes, a slow model (1 s a batch) and a tiny one."""
    cfg = tmp_path_factory.mktemp("grpc") / "models.toml"
    cfg.write_text('[models.shapes]\nsource = "builtin:shapes"\n' + "".join(
        f'[models.{m}]\nsource = "python:tests.api.models:{m}"\n[models.{m}.preprocess]\nresize = [32, 32]\n'
        for m in ("slow", "tiny")))
    port, grpc_port = free_port(), free_port()
    env = {"SERVICE_GRPC_PORT": str(grpc_port), "SERVICE_API_KEYS": USER, "SERVICE_ADMIN_API_KEYS": ADMIN,
           "SERVICE_MAX_BODY_BYTES": str(MAX_BODY), "SLOW_MODEL_S": "1", "SERVICE_LOG_LEVEL": "warning"}
    proc = start_server(port, env, cfg, ready_timeout_s=300)
    yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(served):
    c = grpcclient.InferenceServerClient(served[1])
    yield c
    c.close()


def png_input(png: bytes, count: int = 1):
    tensor = grpcclient.InferInput("image", [count], "BYTES")
    tensor.set_data_from_numpy(np.array([png] * count, dtype=np.object_))
    return tensor


def rest_v2(url: str, png: bytes, model: str = "shapes", **params: object) -> dict[str, np.ndarray]:
    """The REST V2 route's outputs for the same image, in the binary extension."""
    raw = struct.pack("<I", len(png)) + png
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True, **params}}).encode()
    r = httpx.post(f"{url}/v2/models/{model}/infer", content=header + raw, timeout=60,
                   headers={**AUTH, "Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    reply, offset, out = json.loads(r.content[:n]), n, {}
    for o in reply["outputs"]:
        size = o["parameters"]["binary_data_size"]
        chunk = r.content[offset:offset + size]
        offset += size
        if o["datatype"] != "BYTES":
            dtype = {"FP32": np.float32, "INT64": np.int64}[o["datatype"]]
            out[o["name"]] = np.frombuffer(chunk, dtype=dtype).reshape(o["shape"])
    return out


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def status_of(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


@pytest.fixture(scope="module")
def circle() -> bytes:
    return png_bytes(scene("circle")[0])


def test_health_metadata_and_grpc_health(client, served):
    assert client.is_server_live() and client.is_server_ready()  # open, as /v2/health is
    assert client.is_model_ready("shapes", headers=AUTH) and not client.is_model_ready("nope", headers=AUTH)
    meta = client.get_model_metadata("shapes", headers=AUTH, as_json=True)
    assert meta["name"] == "shapes" and meta["platform"] == "pytorch"
    assert [o["name"] for o in meta["outputs"]] == ["scores", "heatmap", "heatmap_png", "target_class"]
    assert client.get_server_metadata(headers=AUTH).name == "camserve"
    with grpc.insecure_channel(served[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "shapes"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_infer_png_equals_the_rest_v2_route(client, served, circle):
    result = client.infer("shapes", [png_input(circle)], headers=AUTH, request_id="g-1")  # no outputs named: all
    assert result.get_response().id == "g-1" and result.get_response().model_name == "shapes"
    scores, heatmap = result.as_numpy("scores"), result.as_numpy("heatmap")
    assert scores.shape == (1, K) and scores.dtype == np.float32
    assert heatmap.shape == (1, 1, 64, 64) and heatmap.dtype == np.float32
    assert result.as_numpy("target_class").tolist() == [[SHAPE_CLASSES.index("circle")]]
    assert result.as_numpy("heatmap_png")[0, 0].startswith(b"\x89PNG")
    rest = rest_v2(served[0], circle)
    np.testing.assert_allclose(scores, rest["scores"], atol=1e-5)
    np.testing.assert_allclose(heatmap, rest["heatmap"], atol=1e-5)


def test_requested_outputs_and_explanation_parameters(client, served, circle):
    outputs = [grpcclient.InferRequestedOutput("target_class"), grpcclient.InferRequestedOutput("heatmap")]
    result = client.infer("shapes", [png_input(circle, 2)], outputs=outputs, headers=AUTH,
                          parameters={"targets": "square,0", "method": "layercam", "size": "feature"})
    assert [o.name for o in result.get_response().outputs] == ["target_class", "heatmap"]
    assert result.as_numpy("scores") is None
    assert result.as_numpy("target_class").tolist() == [[SHAPE_CLASSES.index("square"), 0]] * 2
    rest = rest_v2(served[0], circle, targets="square,0", method="layercam", size="feature")
    np.testing.assert_allclose(result.as_numpy("heatmap")[:1], rest["heatmap"], atol=1e-5)
    top = client.infer("shapes", [png_input(circle)], headers=AUTH, parameters={"top_k": 3},
                       outputs=[grpcclient.InferRequestedOutput("target_class")])
    assert top.as_numpy("target_class").shape == (1, 3)


def test_typed_contents_instead_of_raw(client, served):
    """A request whose tensor travels as typed `contents` (UINT8 pixels) rather than raw bytes."""
    pixels = np.ascontiguousarray(scene("circle")[0].transpose(2, 0, 1)[None])  # (1, 3, 64, 64) uint8
    request = service_pb2.ModelInferRequest(model_name="shapes", outputs=[
        service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="scores")])
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape)).contents.uint_contents.extend(
        pixels.ravel().tolist())
    reply = client._client_stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    scores = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(1, K)
    assert int(scores.argmax()) == SHAPE_CLASSES.index("circle")


@pytest.mark.parametrize(("model", "png", "params", "code", "needle"), [
    ("nope", None, {}, "NOT_FOUND", "nope"),
    ("shapes", b"not an image", {}, "INVALID_ARGUMENT", "image"),
    ("shapes", None, {"colour": "red"}, "INVALID_ARGUMENT", "colour"),
    ("shapes", None, {"top_k": 99}, "INVALID_ARGUMENT", "top_k"),
    ("shapes", b"\x89PNG" + bytes(MAX_BODY), {}, "RESOURCE_EXHAUSTED", ""),
])
def test_errors_are_status_codes_with_the_rest_messages(client, circle, model, png, params, code, needle):
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [png_input(png or circle)], headers=AUTH, parameters=params)
    assert status_of(info) == f"StatusCode.{code}" and needle in info.value.message()


def test_keys_from_call_metadata(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("shapes")
    assert status_of(info) == "StatusCode.UNAUTHENTICATED" and "API key" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("shapes", headers={"x-api-key": "wrong"})
    assert status_of(info) == "StatusCode.UNAUTHENTICATED"
    assert client.get_model_metadata("shapes", headers={"x-api-key": USER}).name == "shapes"


def test_repository_rpcs_need_the_admin_key(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index()
    assert status_of(info) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("tiny", headers=AUTH)
    assert status_of(info) == "StatusCode.PERMISSION_DENIED" and "admin key" in info.value.message()
    admin = {"authorization": f"Bearer {ADMIN}"}
    index = client.get_model_repository_index(headers=admin, as_json=True)
    assert {m["name"]: m["state"] for m in index["models"]} == {"shapes": "READY", "slow": "READY", "tiny": "READY"}
    client.unload_model("tiny", headers=admin)
    assert not client.is_model_ready("tiny", headers=admin)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("tiny", headers=admin, config=json.dumps({"source": "python:nowhere:nothing"}))
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT" and "tiny" in info.value.message()
    client.load_model("tiny", headers=admin, config=json.dumps({"source": "python:tests.api.models:tiny",
                                                                "preprocess": {"resize": [32, 32]}}))
    assert client.is_model_ready("tiny", headers=admin)


def test_a_deadline_shorter_than_the_work_takes_the_image_out_of_the_queue(client, served, circle):
    url = served[0]
    before = metric(url, 'camserve_images_total{model="slow"}')
    answers: list[httpx.Response] = []
    busy = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{url}/predict?model=slow", json={"image": b64(circle)}, headers=AUTH, timeout=30)))
    busy.start()  # holds the slow model for 1 s
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [png_input(circle)], headers=AUTH, client_timeout=0.3)
    assert status_of(info) == "StatusCode.DEADLINE_EXCEEDED" and time.monotonic() - started < 0.9
    busy.join(30)
    assert answers[0].json()["model"] == "slow"
    time.sleep(1.5)  # had the image stayed queued, the next batch would have run by now
    assert metric(url, 'camserve_images_total{model="slow"}') == before + 1
    assert metric(url, 'camserve_queue_depth{model="slow"}') == 0
    assert client.is_model_ready("slow", headers=AUTH)


def test_concurrent_grpc_and_rest_calls_share_batches(served):
    url, address = served
    images = [png_bytes(scene(label, seed)[0]) for seed, label in enumerate(("circle", "square", "triangle", "circle"))]
    reference = [rest_v2(url, png)["scores"] for png in images]
    batches = metric(url, 'camserve_batch_size_count{model="shapes"}')
    batched = metric(url, 'camserve_batch_size_sum{model="shapes"}')

    async def go() -> tuple[list[np.ndarray], list[np.ndarray]]:
        client = AioClient(address)
        outputs = [grpcclient.InferRequestedOutput("scores")]
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as http:
            async def by_grpc(k: int) -> np.ndarray:
                result = await client.infer("shapes", [png_input(images[k % 4])], outputs=outputs, headers=AUTH)
                return result.as_numpy("scores")

            async def by_rest(k: int) -> np.ndarray:
                r = await http.post(f"{url}/v2/models/shapes/infer", json={
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(images[k % 4])]}],
                    "outputs": [{"name": "scores"}]})
                assert r.status_code == 200, r.text
                return np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, K)

            try:
                got = await asyncio.gather(*(by_grpc(k) for k in range(64)), *(by_rest(k) for k in range(16)))
            finally:
                await client.close()
        return list(got[:64]), list(got[64:])

    grpc_scores, rest_scores = asyncio.run(go())
    for k, scores in enumerate(grpc_scores):
        np.testing.assert_allclose(scores, reference[k % 4], atol=1e-5)
    for k, scores in enumerate(rest_scores):
        np.testing.assert_allclose(scores, reference[k % 4], atol=1e-5)
    count = metric(url, 'camserve_batch_size_count{model="shapes"}') - batches
    images_run = metric(url, 'camserve_batch_size_sum{model="shapes"}') - batched
    assert images_run == 80 and count < 80 / 2  # batched, several requests to a batch on average


def test_grpc_calls_are_counted_in_the_metrics(client, served, circle):
    client.infer("shapes", [png_input(circle)], headers=AUTH, outputs=[grpcclient.InferRequestedOutput("scores")])
    with pytest.raises(InferenceServerException):
        client.infer("no-such-model-7", [png_input(circle)], headers=AUTH)
    endpoint = 'camserve_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer"'
    assert metric(served[0], f'{endpoint},model="shapes",status="OK"}}') >= 1
    assert metric(served[0], f'{endpoint},model="",status="NOT_FOUND"}}') >= 1
    assert "no-such-model-7" not in httpx.get(f"{served[0]}/metrics").text  # labels stay the known models


@pytest.mark.slow
def test_sigterm_lets_the_calls_in_flight_finish(tmp_path, circle):
    cfg = tmp_path / "slow.toml"
    cfg.write_text('[models.slow]\nsource = "python:tests.api.models:slow"\n'
                   '[models.slow.preprocess]\nresize = [32, 32]\n')
    port, grpc_port = free_port(), free_port()
    log = tmp_path / "server.log"
    env = {"SERVICE_GRPC_PORT": str(grpc_port), "SLOW_MODEL_S": "1.5", "SERVICE_SHUTDOWN_GRACE_S": "0"}
    proc = start_server(port, env, cfg, ready_timeout_s=300, log=log)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    results: list[object] = []

    def call() -> None:
        try:
            outputs = [grpcclient.InferRequestedOutput("scores")]
            results.append(client.infer("slow", [png_input(circle)], outputs=outputs,
                                        client_timeout=30).as_numpy("scores"))
        except InferenceServerException as exc:
            results.append(exc)

    try:
        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.5)  # in the model now
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(InferenceServerException) as info:  # a new call while draining
            client.infer("slow", [png_input(circle)], client_timeout=10)
        assert status_of(info) == "StatusCode.UNAVAILABLE"
        thread.join(30)
        assert proc.wait(timeout=60) == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(results) == 1 and isinstance(results[0], np.ndarray), results
    assert "Traceback" not in log.read_text()


def test_docs_grpc_snippet(served, tmp_path, monkeypatch):
    """docs/grpc.md's ```python block, run as written against this server."""
    text = (ROOT / "docs" / "grpc.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (tmp_path / "circle.png").write_bytes(png_bytes(scene("circle")[0]))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(snippet.replace("localhost:8001", served[1]).replace("<key>", USER), "grpc.md", "exec"), namespace)
    scores, heatmap = namespace["scores"], namespace["heatmap"]
    assert scores.shape == (1, K) and int(scores.argmax()) == SHAPE_CLASSES.index("circle")  # type: ignore[union-attr]
    assert heatmap.shape == (1, 2, 64, 64)  # type: ignore[union-attr]


TASKS_CONFIG = """
[models.det]
source = "builtin:shapes-detect"

[models.seg]
source = "builtin:shapes-seg"

[models.emb]
source = "builtin:shapes"
task = "embedding"
"""


@pytest.fixture(scope="module")
def task_client(tmp_path_factory):
    """tritonclient.grpc against a server of the built-in detector and segmenter and an embedding model."""
    cfg = tmp_path_factory.mktemp("grpc-tasks") / "models.toml"
    cfg.write_text(TASKS_CONFIG)
    port, grpc_port = free_port(), free_port()
    proc = start_server(port, {"SERVICE_GRPC_PORT": str(grpc_port), "SERVICE_LOG_LEVEL": "warning"}, cfg,
                        ready_timeout_s=300)
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        yield c
    finally:
        c.close()
        proc.terminate()
        proc.wait(timeout=30)


def _scenes():
    from service.models.multiscenes import make_multi_scenes

    return make_multi_scenes(2, seed=11, n_shapes=2)


def test_detection_tensors_and_box_targets_over_grpc(task_client):
    scenes = _scenes()
    pngs = [png_bytes(s.image) for s in scenes]
    outputs = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")
    out = task_client.infer("det", [_images(pngs)],
                            parameters={"max_detections": 7},
                            outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    boxes, scores, classes = (out.as_numpy(n) for n in outputs[:3])
    count = out.as_numpy("num_detections")
    assert boxes.shape == (2, 7, 4) and scores.shape == (2, 7) and classes.shape == (2, 7)
    assert count.tolist() == [2, 2]  # the built-in detector finds both shapes of each scene
    for i, multi in enumerate(scenes):
        assert sorted(classes[i, :2].tolist()) == sorted(multi.labels.tolist())
        assert (classes[i, 2:] == -1).all() and (scores[i, 2:] == 0).all()  # padded past the count
    # The second detection of each image as a box target, a pixel off: it names the detection it matched.
    targets = boxes[:, 1:2].copy()
    targets[..., :2] -= 1
    targets[..., 2:] += 1
    tb = grpcclient.InferInput("target_boxes", list(targets.shape), "FP32")
    tb.set_data_from_numpy(targets.astype(np.float32))
    tl = grpcclient.InferInput("target_labels", [2, 1], "INT64")
    tl.set_data_from_numpy(classes[:, 1:2].astype(np.int64))
    out = task_client.infer("det", [_images(pngs), tb, tl], parameters={"method": "hirescam"},
                            outputs=[grpcclient.InferRequestedOutput(n) for n in ("target_detection", "heatmap")])
    assert out.as_numpy("target_detection").tolist() == [[1], [1]]
    heat = out.as_numpy("heatmap")
    assert heat.shape[:2] == (2, 1)
    # HiResCAM's map of a detection peaks inside that detection's box (on the map's grid).
    for i in range(2):
        h, w = heat.shape[2:]
        y, x = divmod(int(heat[i, 0].argmax()), w)
        x0, y0, x1, y1 = boxes[i, 1] * np.array([w, h, w, h]) / 64
        assert x0 - 1 <= x <= x1 and y0 - 1 <= y <= y1


def test_embedding_similarity_over_grpc(task_client):
    pngs = [png_bytes(s.image) for s in _scenes()]
    emb = task_client.infer("emb", [_images(pngs)], outputs=[grpcclient.InferRequestedOutput("embedding")]
                            ).as_numpy("embedding")
    ref = grpcclient.InferInput("reference", [1, emb.shape[1]], "FP32")
    ref.set_data_from_numpy(emb[1:2].astype(np.float32))
    out = task_client.infer("emb", [_images(pngs), ref],
                            outputs=[grpcclient.InferRequestedOutput(n) for n in ("similarity", "heatmap")])
    check_similarity(emb, out.as_numpy("similarity"), out.as_numpy("heatmap"))


def test_segmentation_mask_over_grpc(task_client):
    first = _scenes()[0]
    out = task_client.infer("seg", [_images([png_bytes(first.image)])],
                            outputs=[grpcclient.InferRequestedOutput("mask_png")])
    (mask_png,) = out.as_numpy("mask_png")
    mask = np.asarray(Image.open(io.BytesIO(mask_png)))
    assert mask.shape == first.class_map.shape
    assert (mask == first.class_map).mean() > 0.95  # the class indices of the built-in segmenter's answer


def _images(pngs):
    tensor = grpcclient.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    return tensor
