"""Parity with pytorch-grad-cam on torchvision architectures with seeded random weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from service.cam import CamEngine, CamQuery
from tests.cam.helpers import activation_and_gradient, check_principal_sign, pearson, upsampled

# Small inputs keep the suite fast; maps are still 5x5 on the 32-stride networks.
SIZE = 160

REFERENCE = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
}

ARCHS = [
    ("resnet18", "layer4"),
    ("densenet121", "features.denseblock4"),
    ("mobilenet_v3_small", "features.12"),
    ("vgg11", "features.20"),
    ("efficientnet_b0", "features.8"),
    ("convnext_tiny", "features.7"),
]


@pytest.fixture(scope="module", params=ARCHS, ids=[a for a, _ in ARCHS])
def arch(request):
    name, layer = request.param
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return name, layer, model, x


@pytest.mark.parametrize("method", list(REFERENCE))
def test_gradient_methods_match_pytorch_grad_cam(arch, method):
    name, layer, model, x = arch
    with CamEngine(model, x[:1]) as engine:
        # The two best classes of the first image: with random weights, far-down classes often
        # have all-negative maps that ReLU empties, which would make the comparison vacuous.
        classes = tuple(engine.predict(x[:1])[0].topk(2).indices.tolist())
        out = engine.explain(x, [CamQuery(method=method, layer=layer, classes=classes)] * len(x))
    for p in model.parameters():
        p.requires_grad_(True)  # the engine froze them; the reference backpropagates into them
    module = dict(model.named_modules())[layer]
    # One reference call: image i with class t sits at row t * len(x) + i.
    with REFERENCE[method](model=model, target_layers=[module]) as ref:
        expected = ref(input_tensor=torch.cat([x, x]), targets=[ClassifierOutputTarget(c) for c in classes for _ in x])
    compared = 0
    for t, c in enumerate(classes):
        for i in range(len(x)):
            ref_map, cam = expected[t * len(x) + i], out.cams[i]
            if ref_map.max() == 0:
                assert cam.raw_max[t] == 0, f"{name}/{method}: reference map empty, ours is not"
                continue
            r = pearson(upsampled(cam.maps[t : t + 1], SIZE)[0], ref_map)
            assert r >= 0.99, f"{name}/{method} image {i} class {c}: r={r:.4f}"
            compared += 1
    assert compared >= 1, f"{name}/{method}: too few non-empty maps to compare"


def test_eigencam_follows_readme_sign_rule(arch):
    """Ours is ReLU of the projection whose sign correlates positively with the mean activation (docs/api.md);
    the reference's SVD picks either sign, so it must equal ReLU of one of the two."""
    name, layer, model, x = arch
    with CamEngine(model, x[:1]) as engine:
        out = engine.explain(x, [CamQuery(method="eigencam", layer=layer, classes=(0,))] * len(x))
    for p in model.parameters():
        p.requires_grad_(True)
    module = dict(model.named_modules())[layer]
    with EigenCAM(model=model, target_layers=[module]) as ref:
        expected = ref(input_tensor=x.clone(), targets=None)
    for i in range(len(x)):
        a, _ = activation_and_gradient(model, layer, x[i : i + 1], 0)
        check_principal_sign(f"{name} image {i}", SIZE, out.cams[i].maps[0], expected[i], a)
