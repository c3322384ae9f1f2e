"""``export:`` archives: unflattened, they explain like eager PyTorch (gradients included); an archive that cannot
be unflattened explains from its flat graph's values with the gradient-free methods."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.export import Dim
from torchvision.models.vision_transformer import VisionTransformer

from service.cam import CamEngine, CamQuery
from service.registry import ModelLoadError, ModelSpec, load_model
from tests.cam.helpers import pearson


def _archive(model: nn.Module, path, size: int) -> str:
    x = torch.randn(2, 3, size, size)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("n", min=1, max=256)},))
    torch.export.save(program, str(path))
    return str(path)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    return model, _archive(model, tmp_path_factory.mktemp("export") / "r18.pt2", 64)


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _agree(ours, ref, what: str) -> None:
    for i, (a, b) in enumerate(zip(ours.cams, ref.cams, strict=True)):
        if b.raw_max.max() == 0:
            assert a.raw_max.max() == 0
            continue
        r = pearson(a.maps.numpy(), b.maps.numpy())
        assert r >= 0.99, f"{what} image {i}: r={r:.4f}"


def test_unflattened_archive_explains_like_eager(resnet):
    model, path = resnet
    served = load_model(ModelSpec("e", f"export:{path}", device="cpu"))
    x = _images(2, 64)
    try:
        assert served.preprocess.input_size == (64, 64) and served.explanations == "gradients"
        assert served.engine.layers.default == "layer4"
        with torch.no_grad():
            torch.testing.assert_close(served.engine.predict(x), model(x), atol=1e-4, rtol=1e-4)
        with CamEngine(model, x[:1]) as eager:
            for method in ("gradcam", "eigencam", "scorecam"):
                layer = "layer2" if method == "scorecam" else "layer4"  # fewer channels, fewer masked forwards
                ours = served.engine.explain(x, [CamQuery(method=method, layer=layer, top=2)] * 2)
                ref = eager.explain(x, [CamQuery(method=method, layer=layer, top=2)] * 2)
                _agree(ours, ref, method)
    finally:
        served.close()


def test_vit_archive(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)
    served = load_model(ModelSpec("v", f"export:{_archive(model, tmp_path / 'vit.pt2', 32)}", device="cpu"))
    x = _images(2, 32)
    try:
        layer = "encoder.layers.encoder_layer_1.mlp"
        assert served.engine.layers.layouts[layer].kind == "tokens"
        with torch.no_grad():
            torch.testing.assert_close(served.engine.predict(x), model(x), atol=1e-4, rtol=1e-4)
        with CamEngine(model, x[:1]) as eager:
            for method in ("eigencam", "gradcam"):
                ours = served.engine.explain(x, [CamQuery(method=method, layer=layer, classes=(0, 1))] * 2)
                ref = eager.explain(x, [CamQuery(method=method, layer=layer, classes=(0, 1))] * 2)
                _agree(ours, ref, method)
    finally:
        served.close()


def test_flat_graph_fallback_is_gradient_free(resnet, monkeypatch):
    model, path = resnet

    def refuse(program):
        raise RuntimeError("cannot unflatten")

    monkeypatch.setattr(torch.export, "unflatten", refuse)
    served = load_model(ModelSpec("e", f"export:{path}", device="cpu"))
    x = _images(2, 64)
    try:
        assert served.explanations == "gradient-free"
        assert served.engine.methods == ["eigencam", "scorecam", "ablationcam"]
        with torch.no_grad():
            torch.testing.assert_close(served.engine.predict(x), model(x), atol=1e-4, rtol=1e-4)
        ours = served.engine.explain(x, [CamQuery(method="eigencam")] * 2)  # the graph's last spatial value
        with CamEngine(model, x[:1]) as eager:
            ref = eager.explain(x, [CamQuery(method="eigencam", layer="layer4")] * 2)
        _agree(ours, ref, "eigencam")
    finally:
        served.close()


def test_weights_and_missing_archive_are_refused(resnet):
    with pytest.raises(ModelLoadError, match="archive not found"):
        load_model(ModelSpec("e", "export:/nowhere.pt2", device="cpu"))
    with pytest.raises(ModelLoadError, match="`weights` must be left out"):
        load_model(ModelSpec("e", f"export:{resnet[1]}", weights="w.pth", device="cpu"))
