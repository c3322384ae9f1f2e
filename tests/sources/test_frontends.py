"""Every model source through every front-end: native, KServe V1, OIP V2, the repository load API and /models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision

from service.modelspec import ModelSpec
from tests.api.conftest import b64, make_client, png_bytes, scene

pytestmark = pytest.mark.slow  # every source loaded and served: seconds each

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

SMALL = {"resize": 64, "crop": 64}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path_factory.mktemp("onnx") / "r18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation warning
        torch.onnx.export(model, torch.randn(1, 3, 64, 64), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf")
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    transformers.ConvNextForImageClassification(config).save_pretrained(path)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path_factory.mktemp("export") / "r18.pt2"
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                  dynamic_shapes=({0: torch.export.Dim("n", min=1, max=256)},))
    torch.export.save(program, str(path))
    return str(path)


@pytest.fixture(scope="module")
def client(onnx_file, hf_dir, export_file):
    models = (ModelSpec("tm", "timm:test_convnext", device="cpu", preprocess=SMALL),
              ModelSpec("ox", f"onnx:{onnx_file}", device="cpu", preprocess=SMALL),
              ModelSpec("hf", f"hf:{hf_dir}", device="cpu"),
              ModelSpec("ex", f"export:{export_file}", device="cpu"))
    with make_client(models=models, enable_repository_api=True) as c:
        yield c


@pytest.fixture(scope="module")
def png():
    return png_bytes(scene("circle")[0])


# A method each model can run: timm models have gradients, ONNX graphs only the gradient-free methods.
METHOD = {"tm": "gradcam", "ox": "eigencam", "hf": "layercam", "ex": "gradcam++"}


def test_models_lists_each_source(client):
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert listed["tm"]["source"] == "timm:test_convnext" and listed["tm"]["explanations"] == "gradients"
    assert listed["ox"]["explanations"] == "gradient-free"
    assert listed["ox"]["source"] == "onnx:r18.onnx" and listed["ex"]["source"] == "export:r18.pt2"  # no server paths
    assert listed["ox"]["methods"] == ["eigencam", "scorecam", "ablationcam"]
    assert listed["hf"]["explanations"] == "gradients" and listed["hf"]["layers"][0] == "convnext.encoder.stages.3"
    assert client.get("/v2/models/ox").json()["platform"] == "onnxruntime_onnx"
    assert client.get("/v2/models/tm").json()["platform"] == "pytorch"
    detail = client.get("/models/ox").json()
    assert detail["layer_details"][0]["name"] == "/layer4/layer4.1/relu_1/Relu_output_0"
    assert detail["layer_details"][0]["layout"] == "nchw" and detail["layer_details"][0]["channels"] == 512


@pytest.mark.parametrize("name", ["tm", "ox", "hf", "ex"])
def test_native_kserve_and_v2(client, png, name):
    r = client.post(f"/explain?model={name}", json={"image": b64(png), "method": METHOD[name], "output": "array",
                                                    "size": "feature"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["explanations"][0]["method"] == METHOD[name]
    r = client.post(f"/v1/models/{name}:predict", json={"instances": [b64(png)], "parameters": {"top_k": 2}})
    assert r.status_code == 200, r.text
    r = client.post(f"/v1/models/{name}:explain", json={"instances": [b64(png)], "parameters": {
        "method": METHOD[name], "output": "array", "size": "feature"}})
    assert r.status_code == 200, r.text
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}],
            "parameters": {"method": METHOD[name]}, "outputs": [{"name": "scores"}, {"name": "heatmap"}]}
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    assert {o["name"] for o in r.json()["outputs"]} == {"scores", "heatmap"}


def test_a_gradient_method_on_an_onnx_model_is_refused(client, png):
    r = client.post("/explain?model=ox", json={"image": b64(png), "method": "gradcam"})
    assert r.status_code == 422 and "needs gradients" in r.text  # the native dialect of a bad argument


def test_repository_load_of_each_source(client, onnx_file, hf_dir, export_file, png):
    for name, table in (("tm2", {"source": "timm:test_vit", "device": "cpu"}),
                        ("ex2", {"source": f"export:{export_file}", "device": "cpu"}),
                        ("hf2", {"source": f"hf:{hf_dir}", "device": "cpu"}),
                        ("ox2", {"source": f"onnx:{onnx_file}", "device": "cpu", "preprocess": SMALL})):
        r = client.post(f"/v2/repository/models/{name}/load", json={"parameters": {"config": json.dumps(table)}})
        assert r.status_code == 200 and r.json()["state"] == "READY", r.text
        assert name in {m["name"] for m in client.get("/models").json()["models"]}
        assert client.post(f"/v2/repository/models/{name}/unload").status_code == 200


def test_the_config_check_knows_every_registered_source():
    """The config check's list is kept free of torch; it must name exactly the registered loaders."""
    from service.modelspec import SOURCE_KINDS
    from service.sources import SOURCES

    assert set(SOURCE_KINDS) == set(SOURCES)


def test_without_a_method_each_model_uses_its_first(client, png):
    """gradcam where gradients exist, eigencam for a model explained without them, in every dialect."""
    for name, method in (("tm", "gradcam"), ("ox", "eigencam")):
        r = client.post(f"/explain?model={name}", json={"image": b64(png), "output": "array", "size": "feature"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["explanations"][0]["method"] == method
        r = client.post(f"/v1/models/{name}:explain", json={"instances": [b64(png)], "parameters": {
            "output": "array", "size": "feature"}})
        assert r.status_code == 200, r.text
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}],
                "outputs": [{"name": "heatmap"}]}
        assert client.post(f"/v2/models/{name}/infer", json=body).status_code == 200


def test_options_reach_the_torchvision_builder():
    from service.registry import load_model

    served = load_model(ModelSpec("m", "torchvision:mobilenet_v3_small", device="cpu", options={"width_mult": 0.5},
                                  preprocess={"resize": 64, "crop": 64}))
    try:
        assert served.engine.layers.layouts["features"].channels == 288  # 576 at full width
    finally:
        served.close()
