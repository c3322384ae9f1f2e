"""Perturbation methods, guided backpropagation, faithfulness metrics and test-time augmentation for detectors
and segmenters, and the extra-forward budget in forward units.

The built-in detector and segmenter (trained, so the maps mean something): ScoreCAM and AblationCAM against
pytorch-grad-cam with ``FasterRCNNBoxScoreTarget`` / ``SemanticSegmentationTarget`` (its perturbation loops
re-score the target on each perturbed output, as ours do), the metrics against a hand-written re-scoring, and
``smooth="aug"`` against the mirror image.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget, SemanticSegmentationTarget

from service.cam import CamEngine, CamQuery
from service.cam.engine import UNIT_MACS, check_extra_forwards
from service.cam.tasks import TaskTarget, get_task
from service.errors import InvalidArgument
from service.models.multiscenes import make_multi_scenes, stack_images
from service.models.shapes import ShapesNet, to_input
from service.models.shapes_detect import load_shapes_detect
from service.models.shapes_seg import load_shapes_seg
from tests.cam.helpers import pearson, upsampled


@pytest.fixture(scope="module")
def scenes():
    found = make_multi_scenes(3, seed=2024, n_shapes=2, distinct_labels=True)
    return found, to_input(stack_images(found))


@pytest.fixture(scope="module")
def detector(scenes):
    model, labels = load_shapes_detect()
    with CamEngine(model, scenes[1][:1], task=get_task("detection", labels)) as engine:
        yield model, engine


@pytest.fixture(scope="module")
def segmenter(scenes):
    model, labels = load_shapes_seg()
    with CamEngine(model, scenes[1][:1], task=get_task("segmentation", labels)) as engine:
        yield model, engine


def _reference(ref_cls, model, layer, x, target):
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)  # the engine froze them; the references expect them live
    try:
        with ref_cls(model=model, target_layers=[dict(model.named_modules())[layer]]) as ref:
            return ref(input_tensor=x.clone(), targets=[target])[0]
    finally:
        for p in params:
            p.requires_grad_(False)


@pytest.mark.parametrize(("method", "ref_cls"), [("scorecam", ScoreCAM), ("ablationcam", AblationCAM)])
def test_detector_perturbation_methods_equal_pytorch_grad_cam(detector, scenes, method, ref_cls):
    model, engine = detector
    _, x = scenes
    for i in range(x.shape[0]):
        out = engine.explain(x[i : i + 1], [CamQuery(method=method, top=2, objective="score+iou")])
        cam = out.cams[0]
        assert cam is not None and len(cam.resolved) == 2
        for t, target in enumerate(cam.resolved):
            assert target.box is not None
            ref = _reference(ref_cls, model, cam.layer, x[i : i + 1],
                             FasterRCNNBoxScoreTarget(labels=torch.tensor([target.label]),
                                                      bounding_boxes=target.box[None]))
            assert ref.max() > 0
            r = pearson(upsampled(cam.maps[t][None], ref.shape[-1])[0], ref)
            assert r >= 0.99, f"{method} image {i} target {t}: r={r:.4f}"


@pytest.mark.parametrize(("method", "ref_cls"), [("scorecam", ScoreCAM), ("ablationcam", AblationCAM)])
def test_segmenter_perturbation_methods_equal_pytorch_grad_cam(segmenter, scenes, method, ref_cls):
    model, engine = segmenter
    _, x = scenes
    for i in range(x.shape[0]):
        out = engine.explain(x[i : i + 1], [CamQuery(method=method, top=2)])
        cam = out.cams[0]
        assert cam is not None and cam.resolved
        for t, target in enumerate(cam.resolved):
            ref = _reference(ref_cls, model, cam.layer, x[i : i + 1],
                             SemanticSegmentationTarget(target.label, target.region.numpy()))
            r = pearson(upsampled(cam.maps[t][None], ref.shape[-1])[0], ref)
            assert r >= 0.99, f"{method} image {i} target {t}: r={r:.4f}"


def _peak_inside(heat, box, size):
    up = upsampled(heat[None], size)[0]
    y, x = divmod(int(up.argmax()), size)
    x0, y0, x1, y1 = box.tolist()
    return x0 - 2 <= x <= x1 + 2 and y0 - 2 <= y <= y1 + 2


# Not ScoreCAM: it softmaxes the target's scores over the channels' masked inputs, and a detection score lies
# in [0, 1], so the weights come out nearly uniform and the map is about the channels' sum. pytorch-grad-cam's
# ScoreCAM gives the same maps (the parity test above); its peak lands in the box on 4 of these 16.
@pytest.mark.parametrize("method", ["ablationcam", "guided-gradcam"])
def test_detector_maps_point_at_their_box(detector, method):
    _, engine = detector
    found = make_multi_scenes(8, seed=77, n_shapes=2, distinct_labels=True)
    x = to_input(stack_images(found))
    out = engine.explain(x, [CamQuery(method=method, top=2)] * len(found))
    hits = total = 0
    for cam in out.cams:
        assert cam is not None
        for t, target in enumerate(cam.resolved):
            total += 1
            hits += _peak_inside(cam.maps[t], target.box, x.shape[-1])
    assert total >= 14
    assert hits / total >= 0.8, f"{method}: {hits} of {total} maps peak inside their box"


def _masked_score(model, task, x, heat, target):
    # As the metrics resize a map: bilinearly, corners not aligned (torchcam's convention).
    up = F.interpolate(heat[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    masked = x * up.to(x.dtype)
    with torch.no_grad():
        return float(task.confidence(model(masked), 0, target))


def test_metrics_rescore_the_tasks_own_target(detector, segmenter, scenes):
    _, x = scenes
    for (model, engine), objective in ((detector, "score"), (segmenter, "score")):
        out = engine.explain(x[:1], [CamQuery(top=2, metrics=("confidence", "deletion"), metric_steps=4,
                                              objective=objective)])
        cam = out.cams[0]
        assert cam is not None and cam.metrics is not None
        for t, target in enumerate(cam.resolved):
            with torch.no_grad():
                base = float(engine.task.confidence(model(x[:1]), 0, target))
            masked = _masked_score(model, engine.task, x[:1], cam.maps[t], target)
            assert cam.metrics["average_drop"][t] == pytest.approx(max(0.0, base - masked) / (base + 1e-7), abs=1e-4)
            assert 0 <= float(cam.metrics["deletion"][t]) <= base + 1e-6
    # A segment's confidence is its class's mean probability over the region, not a sum of logits.
    model, engine = segmenter
    target = engine.explain(x[:1], [CamQuery()]).cams[0].resolved[0]
    with torch.no_grad():
        probs = model(x[:1]).softmax(dim=1)[0, target.label]
    assert float(engine.task.confidence(model(x[:1]), 0, target)) == pytest.approx(
        float(probs[target.region.bool()].mean()), abs=1e-5)


def _mirrored(target, width):
    """The client's target for the mirror image of ``target``'s."""
    if target.box is not None:
        x0, y0, x1, y1 = target.box.tolist()
        return TaskTarget(box=(width - x1, y0, width - x0, y1), label=target.label)
    return TaskTarget(index=target.label, mask=F.interpolate(target.region.flip(-1)[None, None], size=(width, width),
                                                             mode="nearest")[0, 0].bool())


def test_augmentation_mirrors_the_target(detector, segmenter, scenes):
    """pytorch-grad-cam's aug_smooth averages flips and brightness changes, a set closed under the mirror: the
    mirror image's smoothed map must be the mirror of the image's. That holds only if a flipped copy explains
    the mirrored box (or region), matched again on the flipped copy's own detections."""
    _, x = scenes
    for _, engine in (detector, segmenter):
        out = engine.explain(x[:1], [CamQuery(top=2, smooth="aug")])
        cam = out.cams[0]
        assert cam is not None
        targets = tuple(_mirrored(t, x.shape[-1]) for t in cam.resolved)
        mirrored = engine.explain(x[:1].flip(-1), [CamQuery(targets=targets, smooth="aug")]).cams[0]
        assert mirrored is not None
        assert torch.allclose(mirrored.maps.flip(-1), cam.maps, atol=1e-4), \
            float((mirrored.maps.flip(-1) - cam.maps).abs().max())
        assert out.summaries is not None and len(out.summaries) == 1  # one summary per image, not per copy


def test_forward_units_count_the_models_work():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with CamEngine(ShapesNet().eval(), x) as shapes:
        assert shapes.forward_units == 1.0  # the unit is this model's forward
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=6, box_score_thresh=0.0)
    with CamEngine(model, torch.rand(1, 3, 320, 320), task=get_task("detection")) as det:
        # Its box head alone runs two linear layers over 150 proposals: 2.8 G multiply-accumulates in all.
        assert 60 < det.forward_units < 80
        images = det.extra_forwards(det.check(CamQuery(method="scorecam")))
        assert images == 960
        with pytest.raises(InvalidArgument, match=r"needs 960 extra forward images of 7\d\.\d forward units each "
                                                  r"\(\d+ units\), over the limit of 50000"):
            check_extra_forwards(images, det.forward_units, 50_000)
        check_extra_forwards(images, det.forward_units, 524_288)  # the default budget takes it
    assert UNIT_MACS == 39_518_528


def test_a_detectors_replay_counts_as_a_whole_forward(detector):
    _, engine = detector
    query = engine.check(CamQuery(method="ablationcam"))
    channels = engine.layers.channels[engine.layers.default]
    assert engine.extra_forwards(query, whole_only=True) == channels + 1


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "guided-gradcam"])
def test_images_with_different_target_counts_in_one_batch_equal_each_alone(detector, segmenter, scenes, method):
    _, x = scenes
    for _, engine in (detector, segmenter):
        queries = [CamQuery(method=method, top=2, metrics=("confidence",)), CamQuery(method=method, top=1),
                   CamQuery(method=method, top=2)]
        together = engine.explain(x, queries)
        for i, q in enumerate(queries):
            alone = engine.explain(x[i : i + 1], [q]).cams[0]
            cam = together.cams[i]
            assert cam is not None and alone is not None
            assert len(cam.resolved) == len(alone.resolved) == q.top
            assert torch.allclose(cam.maps, alone.maps, atol=1e-5), (method, i)
            if q.metrics:
                assert torch.allclose(cam.metrics["average_drop"], alone.metrics["average_drop"], atol=1e-5)
