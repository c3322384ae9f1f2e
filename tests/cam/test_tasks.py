"""Detection, segmentation and embedding targets: parity with pytorch-grad-cam's targets, one backward for
mixed targets, and the rules of target resolution.

torchvision's detectors (Faster R-CNN, RetinaNet) and segmenters (LR-ASPP, DeepLabV3) with fixed random weights
(no download): every gradient method's map
has Pearson r >= 0.99 against pytorch-grad-cam with ``FasterRCNNBoxScoreTarget`` /
``SemanticSegmentationTarget``, and the embedding similarity against a cosine target written as in
pytorch-grad-cam's similarity tutorial.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget, SemanticSegmentationTarget

from service.cam import CamEngine, CamQuery
from service.cam.tasks import TaskTarget, get_task
from service.errors import InvalidArgument
from service.models.shapes import ShapesNet
from tests.cam.helpers import pearson, upsampled

# torchvision's detector and segmenter take seconds per parity check on two cores: kept out of `make test-fast`.
pytestmark = pytest.mark.slow

GRADIENT_METHODS = [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("xgradcam", XGradCAM),
                    ("hirescam", HiResCAM), ("layercam", LayerCAM), ("gradcam-elementwise", GradCAMElementWise)]
DETECT_SIZE = 320
SEG_SIZE = 96
# RetinaNet's ResNet-50 at its usual 800 px takes tens of seconds per check on two cores.
RETINA_SIZE = 160


def _reference(ref_cls, model, layer, x, target):
    """pytorch-grad-cam's map, with the parameters it backpropagates into thawed for the call only."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)  # the engine froze them; the references backpropagate into them
    try:
        with ref_cls(model=model, target_layers=[dict(model.named_modules())[layer]]) as ref:
            return ref(input_tensor=x.clone(), targets=[target])[0]
    finally:
        for p in params:
            p.requires_grad_(False)


def _compare(ours, reference, size, what):
    assert reference.max() > 0, f"{what}: the reference map is empty"
    r = pearson(upsampled(ours[None], size)[0], reference)
    print(f"parity {what}: r={r:.4f}")
    assert r >= 0.99, f"{what}: r={r:.4f}"


def _calibrate(model, run, size=DETECT_SIZE):
    """Batch-norm statistics from random images: with torchvision's fresh statistics (mean 0, variance 1) the
    random backbone's features fade to a constant, every box scores about 1/6 and the gradients are about
    1e-12, which gradcam++'s cubes underflow to zero."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        run(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(5)))
    model.eval()


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=6, box_score_thresh=0.0).eval()
    _calibrate(model, lambda b: model.backbone(model.transform(list(b))[0].tensors))
    x = torch.rand(2, 3, DETECT_SIZE, DETECT_SIZE, generator=torch.Generator().manual_seed(1))
    engine = CamEngine(model, x[:1], task=get_task("detection", [f"c{i}" for i in range(6)]))
    yield model, engine, x
    engine.close()


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.rand(2, 3, SEG_SIZE, SEG_SIZE, generator=torch.Generator().manual_seed(2))
    engine = CamEngine(model, x[:1], task=get_task("segmentation", ["background", "a", "b", "c"]))
    yield model, engine, x
    engine.close()


class _Out(torch.nn.Module):
    """pytorch-grad-cam's segmentation tutorial wrapper: the ``out`` tensor of torchvision's dict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def test_default_layers_are_the_backbones_last_map(detector, segmenter):
    assert detector[1].layers.default.startswith("backbone.body.")
    assert segmenter[1].layers.default.startswith("backbone.")
    # The RPN head runs once per pyramid level: it has no one map and is not offered.
    assert not any(name.startswith("rpn.head") for name in detector[1].layers.candidates)


@pytest.mark.parametrize(("method", "ref_cls"), GRADIENT_METHODS, ids=[m for m, _ in GRADIENT_METHODS])
def test_detection_parity(detector, method, ref_cls):
    model, engine, x = detector
    box, label = (60.0, 70.0, 200.0, 230.0), None
    found = engine.explain(x[:1], [CamQuery(method=method, top=1)]).summaries[0].detections
    # Random weights score every box alike; a hand-made box near the first detection has a defined match.
    d = found[0]
    box = (d.box[0] - 2, d.box[1] - 2, d.box[2] + 2, d.box[3] + 1)
    label = d.label
    layer = engine.layers.default
    out = engine.explain(x[:1], [CamQuery(method=method, layer=layer, objective="score+iou",
                                          targets=(TaskTarget(box=box, label=label),))])
    cam = out.cams[0]
    assert cam is not None
    assert cam.resolved[0].label == label
    ref = _reference(ref_cls, model, layer, x[:1],
                     FasterRCNNBoxScoreTarget(labels=[label], bounding_boxes=[torch.tensor(box)]))
    _compare(cam.maps[0], ref, DETECT_SIZE, f"fasterrcnn/{method}")


@pytest.mark.parametrize(("method", "ref_cls"), GRADIENT_METHODS, ids=[m for m, _ in GRADIENT_METHODS])
def test_segmentation_parity(segmenter, method, ref_cls):
    model, engine, x = segmenter
    layer = engine.layers.default
    out = engine.explain(x[:1], [CamQuery(method=method, layer=layer, targets=(TaskTarget(index=1),))])
    cam = out.cams[0]
    assert cam is not None
    region = cam.resolved[0].region
    assert region is not None
    mask = out.summaries[0].mask
    assert torch.equal(region.bool(), mask == 1)  # the predicted region is the argmax mask
    ref = _reference(ref_cls, _Out(model), f"model.{layer}", x[:1], SemanticSegmentationTarget(1, region.numpy()))
    _compare(cam.maps[0], ref, SEG_SIZE, f"lraspp/{method}")


class _Similarity:
    """The cosine-similarity target of pytorch-grad-cam's "similarity to a concept" tutorial."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        cos = torch.nn.CosineSimilarity(dim=0)
        return cos(model_output, self.features)


@pytest.mark.parametrize(("method", "ref_cls"), GRADIENT_METHODS[:3], ids=[m for m, _ in GRADIENT_METHODS[:3]])
def test_embedding_parity(method, ref_cls):
    torch.manual_seed(0)
    model = ShapesNet()
    model.classifier = torch.nn.Identity()
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with CamEngine(model, x[:1], task=get_task("embedding")) as engine:
        reference = engine.predict(x[1:2])[0]
        out = engine.explain(x[:1], [CamQuery(method=method, layer="features",
                                              targets=(TaskTarget(reference=reference),))])
    cam = out.cams[0]
    assert cam is not None
    e = out.summaries[0].embedding
    assert torch.allclose(out.logits[0, 0], F.cosine_similarity(e, reference, dim=0), atol=1e-5)
    ref = _reference(ref_cls, model, "features", x[:1], _Similarity(reference))
    _compare(cam.maps[0], ref, 64, f"embedding/{method}")


def test_mixed_targets_in_one_batch_equal_one_at_a_time(detector):
    """Two images, different targets and target counts, one forward and one backward: the same maps as alone."""
    _, engine, x = detector
    found = [engine.explain(x[i : i + 1], [CamQuery(top=3)]).summaries[0].detections for i in range(2)]
    q0 = CamQuery(method="hirescam", targets=tuple(TaskTarget(index=j) for j in (0, 2)))
    # A box off the detection's by a few pixels: at the detection's own box the IoU sits on the kink of
    # its min/max, where the gradient's side flips with rounding noise.
    b = found[1][1].box
    q1 = CamQuery(method="gradcam", objective="score+iou",
                  targets=(TaskTarget(box=(b[0] - 3, b[1] + 2, b[2] + 2, b[3] - 3), label=found[1][1].label),))
    together = engine.explain(x, [q0, q1])
    alone = [engine.explain(x[:1], [q0]), engine.explain(x[1:], [q1])]
    for i in range(2):
        a, b = together.cams[i], alone[i].cams[0]
        assert a is not None
        assert b is not None
        assert a.maps.shape == b.maps.shape
        assert torch.allclose(a.maps, b.maps, atol=1e-5)
        assert torch.allclose(together.logits[i, : len(a.resolved)], alone[i].logits[0, : len(a.resolved)],
                              atol=1e-5)


def test_segmentation_mask_moves_the_target(segmenter):
    _, engine, x = segmenter
    left = torch.zeros(SEG_SIZE, SEG_SIZE, dtype=torch.bool)
    left[:, : SEG_SIZE // 2] = True
    out = engine.explain(x[:1], [CamQuery(targets=(TaskTarget(index=2, mask=left),))])
    cam = out.cams[0]
    assert cam is not None
    assert cam.resolved[0].region_kind == "mask"
    assert torch.equal(cam.resolved[0].region.bool(), F.interpolate(left[None, None].float(),
                       size=out.summaries[0].mask.shape, mode="nearest")[0, 0].bool())


def test_target_errors_are_clear(detector, segmenter):
    _, det, x = detector
    with pytest.raises(InvalidArgument, match=r"detection index in 0\.\.") as info:
        det.explain(x[:1], [CamQuery(targets=(TaskTarget(index=10_000),))])
    assert info.value.field == "targets"
    with pytest.raises(InvalidArgument, match="not class indices alone"):
        det.check(CamQuery(classes=(1,)))
    assert {"gradcam", "eigencam", "scorecam", "ablationcam", "guided-gradcam"} <= set(det.methods)
    _, seg, xs = segmenter
    with pytest.raises(InvalidArgument, match=r"class in 0\.\.3"):
        seg.explain(xs[:1], [CamQuery(targets=(TaskTarget(index=7),))])
    with pytest.raises(InvalidArgument, match="`metrics` must be among"):
        seg.check(CamQuery(metrics=("nope",)))


def test_embedding_needs_a_reference_of_the_right_size():
    torch.manual_seed(0)
    model = ShapesNet()
    model.classifier = torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with CamEngine(model, x, task=get_task("embedding")) as engine:
        with pytest.raises(InvalidArgument, match="give a `reference`"):
            engine.explain(x, [CamQuery()])
        with pytest.raises(InvalidArgument, match="must have 64 numbers"):
            engine.explain(x, [CamQuery(targets=(TaskTarget(reference=torch.ones(3)),))])


def test_an_image_without_detections_gets_no_maps():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=6, box_score_thresh=0.99).eval()
    x = torch.rand(1, 3, DETECT_SIZE, DETECT_SIZE)
    with CamEngine(model, x, task=get_task("detection")) as engine:
        out = engine.explain(x, [CamQuery(top=2)])
    assert out.summaries[0].detections == ()
    cam = out.cams[0]
    assert cam is not None
    assert cam.maps.shape[0] == 0


@pytest.fixture(scope="module")
def retinanet():
    torch.manual_seed(0)
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=6, score_thresh=0.0, min_size=RETINA_SIZE,
        max_size=RETINA_SIZE).eval()
    _calibrate(model, lambda b: model.backbone(model.transform(list(b))[0].tensors), RETINA_SIZE)
    x = torch.rand(1, 3, RETINA_SIZE, RETINA_SIZE, generator=torch.Generator().manual_seed(1))
    engine = CamEngine(model, x, task=get_task("detection", [f"c{i}" for i in range(6)]))
    yield model, engine, x
    engine.close()


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4, aux_loss=False).eval()
    x = torch.rand(1, 3, SEG_SIZE, SEG_SIZE, generator=torch.Generator().manual_seed(2))
    engine = CamEngine(model, x, task=get_task("segmentation", ["background", "a", "b", "c"]))
    yield model, engine, x
    engine.close()


@pytest.mark.parametrize(("method", "ref_cls"), GRADIENT_METHODS, ids=[m for m, _ in GRADIENT_METHODS])
def test_retinanet_parity(retinanet, method, ref_cls):
    model, engine, x = retinanet
    found = engine.explain(x, [CamQuery(method=method, top=1)]).summaries[0].detections
    d = found[0]
    # A hand-made box near the best detection: RetinaNet's outputs have boxes, labels and scores too.
    box = (d.box[0] - 2, d.box[1] - 2, d.box[2] + 2, d.box[3] + 1)
    layer = engine.layers.default
    out = engine.explain(x, [CamQuery(method=method, layer=layer, objective="score+iou",
                                      targets=(TaskTarget(box=box, label=d.label),))])
    cam = out.cams[0]
    assert cam is not None
    assert cam.resolved[0].label == d.label
    ref = _reference(ref_cls, model, layer, x, FasterRCNNBoxScoreTarget(labels=[d.label],
                                                                    bounding_boxes=[torch.tensor(box)]))
    _compare(cam.maps[0], ref, RETINA_SIZE, f"retinanet/{method}")


@pytest.mark.parametrize(("method", "ref_cls"), GRADIENT_METHODS, ids=[m for m, _ in GRADIENT_METHODS])
def test_deeplabv3_parity(deeplab, method, ref_cls):
    model, engine, x = deeplab
    layer = engine.layers.default
    # Random weights predict whichever classes they like: explain the largest one predicted.
    cls = engine.explain(x, [None]).summaries[0].segments[0].label
    out = engine.explain(x, [CamQuery(method=method, layer=layer, targets=(TaskTarget(index=cls),))])
    cam = out.cams[0]
    assert cam is not None
    region = cam.resolved[0].region
    assert region is not None and region.any()
    ref = _reference(ref_cls, _Out(model), f"model.{layer}", x, SemanticSegmentationTarget(cls, region.numpy()))
    _compare(cam.maps[0], ref, SEG_SIZE, f"deeplabv3/{method}")
