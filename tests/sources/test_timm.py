"""``timm:`` models, one per family, with random or locally saved weights: they load, their default layer gives
maps with structure, and the maps match pytorch-grad-cam with the reshape their layout needs."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from service.cam import CamQuery
from service.registry import ModelLoadError, ModelSpec, load_model
from tests.cam.helpers import gradient_parity, reshape_for

timm = pytest.importorskip("timm")

# name, builder options (small variants of the same classes), input size, default layer, its layout
FAMILIES = [
    ("resnet10t", {}, 96, "layer4", "nchw"),
    ("test_efficientnet", {}, 128, "blocks.4", "nchw"),
    ("test_convnext", {}, 128, "stages.3", "nchw"),
    ("regnetx_002", {}, 96, "s4", "nchw"),
    ("mobilenetv3_small_050", {}, 96, "blocks.5", "nchw"),
    ("test_vit", {"img_size": 64}, 64, "blocks.5.norm1", "tokens"),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, 64, "blocks.1.norm1", "tokens"),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "depths": [1, 1, 1, 1], "embed_dim": 16,
                                      "num_heads": [1, 1, 2, 2]}, 64, "layers.3", "nhwc"),
    ("beit_base_patch16_224", {"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2}, 64, "blocks.1.norm1",
     "tokens"),
]


def _loud(model: nn.Module) -> None:
    """Random heads give gradients near GradCAM++'s epsilon (1e-7 here, 1e-6 in pytorch-grad-cam); a louder
    head keeps that convention out of the comparison."""
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        for m in head.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                with torch.no_grad():
                    m.weight.mul_(100)


@pytest.mark.parametrize(("name", "options", "size", "layer", "kind"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_loads_explains_and_matches_the_reference(name, options, size, layer, kind):
    torch.manual_seed(0)
    served = load_model(ModelSpec(name, f"timm:{name}", device="cpu", options=options,
                                  preprocess={"resize": size, "crop": size}))
    try:
        layers = served.engine.layers
        assert layers.default == layer
        assert layers.layouts[layer].kind == kind
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        _loud(served.module)
        out = served.engine.explain(x, [CamQuery(top=1)] * 2)
        maps = out.cams[0].maps
        assert maps.shape[-2:] == layers.layouts[layer].grid
        assert float(maps.std()) > 0, "the default layer's map is constant"
        gradient_parity(served.module, layer, x, reshape_for(layers.layouts[layer]), engine=served.engine)
    finally:
        served.close()


def test_preprocessing_comes_from_the_pretrained_cfg():
    served = load_model(ModelSpec("v", "timm:test_vit", device="cpu"))
    try:
        pre = served.preprocess
        # test_vit: 160 px, crop_pct 0.95, bicubic, mean and std 0.5.
        assert (pre.crop, pre.resize, pre.interpolation, pre.mean, pre.std) == ((160, 160), 168, "bicubic",
                                                                                (0.5,) * 3, (0.5,) * 3)
    finally:
        served.close()
    over = load_model(ModelSpec("v", "timm:test_vit", device="cpu", preprocess={"interpolation": "bilinear"}))
    try:
        assert over.preprocess.interpolation == "bilinear" and over.preprocess.crop == (160, 160)
    finally:
        over.close()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file_size_the_head(tmp_path, suffix):
    torch.manual_seed(3)
    reference = timm.create_model("test_convnext", num_classes=3).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:  # a timm training checkpoint: the weights sit under "state_dict"
        torch.save({"epoch": 3, "state_dict": reference.state_dict()}, path)
    served = load_model(ModelSpec("c", "timm:test_convnext", weights=str(path), device="cpu"))
    try:
        assert served.num_classes == 3
        x = torch.randn(2, 3, 160, 160)
        with torch.no_grad():
            torch.testing.assert_close(served.engine.predict(x), reference(x), atol=1e-4, rtol=1e-4)
    finally:
        served.close()


def test_unknown_name_and_missing_package(monkeypatch):
    with pytest.raises(ModelLoadError, match="unknown timm model 'resnet_nope'"):
        load_model(ModelSpec("x", "timm:resnet_nope", device="cpu"))
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without the package sees
    with pytest.raises(ModelLoadError, match=r"needs the 'timm' package: pip install 'camserve\[timm\]'"):
        load_model(ModelSpec("x", "timm:resnet10t", device="cpu"))


@pytest.mark.parametrize(("table", "message"), [
    ({"source": "timm:resnet10t", "options": "img_size=64"}, "`options` must be a table of the builder's keyword"),
    ({"source": "timm:resnet10t", "preprocess": {"interpolation": "lanczos"}},
     "`preprocess.interpolation` must be bilinear, bicubic or nearest, got 'lanczos'"),
])
def test_table_problems_name_the_key(table, message):
    from service.modelspec import SpecError

    with pytest.raises(SpecError, match=message):
        ModelSpec.from_table("m", table)
