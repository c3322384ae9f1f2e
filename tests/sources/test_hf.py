"""``hf:`` models: ViT, ConvNeXt and Swin classifiers from random configs, saved with ``save_pretrained`` and
served from the directory: predictions equal the model's own softmax, maps match pytorch-grad-cam under the
layout's reshape, and ``id2label`` names the classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.modelspec import ModelSpec
from service.registry import ModelLoadError, load_model
from tests.api.conftest import b64, make_client, png_bytes, scene
from tests.cam.helpers import gradient_parity, reshape_for

transformers = pytest.importorskip("transformers")

LABELS = {0: "cat", 1: "dog", 2: "fox"}


def _vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    return (transformers.ViTForImageClassification(config),
            transformers.ViTImageProcessor(size={"height": 32, "width": 32}))


def _convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    return (transformers.ConvNextForImageClassification(config),
            transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875))


def _swin():
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=4)
    return (transformers.SwinForImageClassification(config),
            transformers.ViTImageProcessor(size={"height": 32, "width": 32}))


# builder, input size, default layer, its layout
MODELS = [
    (_vit, 32, "vit.layers.1.layernorm_before", "tokens"),
    (_convnext, 64, "convnext.encoder.stages.3", "nchw"),
    (_swin, 32, "swin.layernorm", "tokens"),
]


def _save(build, path):
    torch.manual_seed(0)
    model, processor = build()
    model.config.id2label, model.config.label2id = LABELS, {v: k for k, v in LABELS.items()}
    model.config.num_labels = 3
    model.classifier = nn.Linear(model.classifier.in_features, 3)  # the config built it for two labels
    model.eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100)  # away from GradCAM++'s epsilon, which differs between the libraries
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


@pytest.mark.parametrize(("build", "size", "layer", "kind"), MODELS, ids=["vit", "convnext", "swin"])
def test_saved_classifier_predicts_and_explains(tmp_path, build, size, layer, kind):
    model = _save(build, tmp_path)
    served = load_model(ModelSpec("h", f"hf:{tmp_path}", device="cpu"))
    try:
        assert served.labels == ["cat", "dog", "fox"]
        assert served.preprocess.input_size == (size, size)
        layers = served.engine.layers
        assert layers.default == layer and layers.layouts[layer].kind == kind
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(pixel_values=x).logits.softmax(dim=-1)
        torch.testing.assert_close(served.scores(served.engine.predict(x)), expected, atol=1e-5, rtol=0)
        gradient_parity(served.module, layer, x, reshape_for(layers.layouts[layer]), engine=served.engine)
    finally:
        served.close()


def test_labels_appear_in_responses(tmp_path):
    _save(_convnext, tmp_path)
    with make_client(models=(ModelSpec("h", f"hf:{tmp_path}", device="cpu"),)) as client:
        png = png_bytes(scene("circle")[0])
        r = client.post("/predict", json={"image": b64(png), "top_k": 3})
        assert r.status_code == 200, r.text
        assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"cat", "dog", "fox"}
        r = client.post("/v1/models/h:predict", json={"instances": [b64(png)]})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in {"cat", "dog", "fox"}


def test_a_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot fetch 'someone/no-such-model' from the Hugging Face hub: the "
                                             "machine is offline"):
        load_model(ModelSpec("h", "hf:someone/no-such-model", device="cpu"))


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelLoadError, match=r"needs the 'transformers' package: pip install 'camserve\[hf\]'"):
        load_model(ModelSpec("h", f"hf:{tmp_path}", device="cpu"))
