"""``onnx:`` models: predictions through ONNX Runtime equal eager PyTorch, and the gradient-free methods
(EigenCAM, ScoreCAM, AblationCAM), computed from the session's own outputs, match them on the same layer."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from service.cam import CamEngine, CamQuery
from service.cam.layers import Layout
from service.errors import InvalidArgument
from service.registry import ModelLoadError, ModelSpec, load_model
from tests.cam.helpers import pearson

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SIZE = 64


def _export(model: nn.Module, path, size: int, dynamic: bool = True) -> str:
    x = torch.randn(1, 3, size, size)
    axes = {"input": {0: "n"}, "logits": {0: "n"}} if dynamic else None
    with warnings.catch_warnings():
        # The TorchScript-based exporter names tensors after the module path; the newer one is deprecated-free
        # but needs onnxscript, which the suite does not install.
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(model, x, str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes=axes)
    return str(path)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "r18.onnx", SIZE)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "vit.onnx", 32)


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _served(path: str, size: int):
    return load_model(ModelSpec("o", f"onnx:{path}", device="cpu", preprocess={"resize": size, "crop": size}))


def _agree(onnx_out, eager_out, what: str) -> None:
    for i, (ours, ref) in enumerate(zip(onnx_out.cams, eager_out.cams, strict=True)):
        if ref.raw_max.max() == 0:
            assert ours.raw_max.max() == 0
            continue
        r = pearson(ours.maps.numpy(), ref.maps.numpy())
        assert r >= 0.99, f"{what} image {i}: r={r:.4f}"


def test_resnet_predictions_and_gradient_free_maps(resnet):
    model, path = resnet
    served = _served(path, SIZE)
    x = _images(2, SIZE)
    try:
        engine = served.engine
        layer = engine.layers.default
        assert layer == "/layer4/layer4.1/relu_1/Relu_output_0"  # resnet's layer4, as PyTorch's exporter names it
        assert engine.layers.layouts[layer].channels == 512
        # PyTorch's module paths name the last tensor each module made.
        assert engine.layers.resolve("layer4") == layer and engine.layers.resolve("layer4.1") == layer
        assert engine.layers.resolve("layer2") == "/layer2/layer2.1/relu_1/Relu_output_0"
        with torch.no_grad():
            torch.testing.assert_close(engine.predict(x), model(x), atol=1e-4, rtol=1e-4)
        assert engine.methods == ["eigencam", "scorecam", "ablationcam"] and served.explanations == "gradient-free"
        # ScoreCAM at layer2 (128 channels on an 8x8 grid) keeps its masked forwards few.
        pairs = [("eigencam", layer, "layer4"), ("ablationcam", layer, "layer4"),
                 ("scorecam", "/layer2/layer2.1/relu_1/Relu_output_0", "layer2")]
        with CamEngine(model, x[:1]) as eager:
            for method, onnx_layer, eager_layer in pairs:
                ours = engine.explain(x, [CamQuery(method=method, layer=onnx_layer, top=2)] * 2)
                ref = eager.explain(x, [CamQuery(method=method, layer=eager_layer, top=2)] * 2)
                assert ours.cams[0].classes == ref.cams[0].classes
                _agree(ours, ref, method)
        with pytest.raises(InvalidArgument, match=r"`method` 'gradcam' needs gradients.*use one of eigencam"):
            engine.check(CamQuery(method="gradcam"))
    finally:
        served.close()


def test_vit_tokens_through_onnx(vit):
    model, path = vit
    served = _served(path, 32)
    x = _images(2, 32)
    try:
        engine = served.engine
        # The last block's MLP output. (Its input norm centres every token over the channels, which leaves
        # EigenCAM's sign rule, the correlation with the channel mean, nothing to go by at random weights.)
        layer = "/encoder/layers/encoder_layer_1/mlp/mlp.3/Add_output_0"
        assert engine.layers.layouts[layer].kind == "tokens" and engine.layers.layouts[layer].prefix == 1
        with torch.no_grad():
            torch.testing.assert_close(engine.predict(x), model(x), atol=1e-4, rtol=1e-4)
        eager_layer = "encoder.layers.encoder_layer_1.mlp"
        with CamEngine(model, x[:1]) as eager:
            for method in ("eigencam", "scorecam"):
                ours = engine.explain(x, [CamQuery(method=method, layer=layer, classes=(0, 1))] * 2)
                ref = eager.explain(x, [CamQuery(method=method, layer=eager_layer, classes=(0, 1))] * 2)
                _agree(ours, ref, method)
        with pytest.raises(InvalidArgument, match="returns tokens"):
            engine.explain(x, [CamQuery(method="ablationcam", layer=layer)] * 2)
    finally:
        served.close()


def test_target_layer_by_module_path(resnet):
    served = load_model(ModelSpec("o", f"onnx:{resnet[1]}", device="cpu", target_layer="layer3",
                                  preprocess={"resize": SIZE, "crop": SIZE}))
    try:
        assert served.engine.layers.default == "/layer3/layer3.1/relu_1/Relu_output_0"
        row = served.engine.layers.describe()[0]
        assert {"layer3", "layer3.1"} <= set(row["aliases"]) and row["channels"] == 256
    finally:
        served.close()


def test_a_graph_with_a_fixed_batch_runs_image_by_image(resnet, tmp_path):
    model, _ = resnet
    path = _export(model, tmp_path / "fixed.onnx", SIZE, dynamic=False)
    served = _served(path, SIZE)
    try:
        x = _images(3, SIZE)
        with torch.no_grad():
            torch.testing.assert_close(served.engine.predict(x), model(x), atol=1e-4, rtol=1e-4)
        assert served.engine.explain(x, [CamQuery(method="eigencam")] * 3).cams[2].maps.shape == (1, 2, 2)
    finally:
        served.close()


def test_missing_file_and_package(resnet, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"ONNX file not found: /nowhere\.onnx"):
        load_model(ModelSpec("o", "onnx:/nowhere.onnx", device="cpu"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError, match=r"needs the 'onnxruntime' package: pip install 'camserve\[onnx\]'"):
        load_model(ModelSpec("o", f"onnx:{resnet[1]}", device="cpu"))


def test_operators_settle_layouts_the_shape_leaves_open(tmp_path):
    """At 256 px resnet's layer1 is (N, 64, 64, 64): NCHW and NHWC both fit the shape; the Conv, BatchNorm and
    Relu that made it say NCHW. A channels-last block after a Transpose reads as NHWC."""
    torch.manual_seed(0)
    path = _export(torchvision.models.resnet18(num_classes=3).eval(), tmp_path / "r18.onnx", 256)
    served = _served(path, 256)
    try:
        layouts = served.engine.layers.layouts
        assert layouts["/layer1/layer1.1/relu_1/Relu_output_0"] == Layout("nchw", (64, 64), 64)
        assert served.engine.layers.resolve("layer1") == "/layer1/layer1.1/relu_1/Relu_output_0"
    finally:
        served.close()
    model = _ChannelsLast().eval()
    served = _served(_export(model, tmp_path / "cl.onnx", 32), 32)
    try:
        kinds = {lay.kind for name, lay in served.engine.layers.layouts.items() if name.startswith("/norm/")}
        assert kinds == {"nhwc"}
    finally:
        served.close()


class _ChannelsLast(nn.Module):
    """A conv, then a LayerNorm over channels-last (N, 8, 8, 8): a shape that fits both layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.head(t.mean(dim=(1, 2)))
