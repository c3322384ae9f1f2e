"""The built-in shapes-detect detector: torchvision's output convention, differentiable, accurate, points right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from service.models.multiscenes import make_multi_scenes, stack_images
from service.models.pointing import detection_pointing, match
from service.models.scenes import SHAPE_CLASSES
from service.models.shapes import MEAN, STD, to_input
from service.models.shapes_detect import (
    DEFAULT_WEIGHTS,
    ShapesDetector,
    average_precision,
    average_precision_50,
    load_shapes_detect,
    predict,
    train_shapes_detect,
)

SEED = 20261204  # held out: training uses seed 0, its validation seed 7919


@pytest.fixture(scope="module")
def model():
    m, labels = load_shapes_detect()
    assert labels == list(SHAPE_CLASSES)
    return m


def test_weights_ship_small():
    assert DEFAULT_WEIGHTS.stat().st_size < 2 * 1024 * 1024
    checkpoint = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    assert (checkpoint["mean"], checkpoint["std"], checkpoint["input_size"]) == (MEAN, STD, 64)


def test_default_layer_names_a_submodule(model):
    assert ShapesDetector.camserve_default_layer == "head.hidden"
    assert model.get_submodule(ShapesDetector.camserve_default_layer) is model.head.hidden
    assert not model.training


def test_output_follows_torchvision_convention(model):
    out = model(to_input(stack_images(make_multi_scenes(8, SEED))))
    assert isinstance(out, list) and len(out) == 8
    for d in out:
        assert set(d) == {"boxes", "labels", "scores"}
        k = len(d["scores"])
        assert 1 <= k <= model.max_detections
        assert d["boxes"].shape == (k, 4) and d["boxes"].dtype == torch.float32
        assert d["labels"].shape == (k,) and d["labels"].dtype == torch.int64
        assert d["scores"].dtype == torch.float32
        assert ((d["labels"] >= 0) & (d["labels"] < len(SHAPE_CLASSES))).all()
        assert (d["scores"] >= model.score_thresh).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()  # best first
        assert (d["boxes"][:, 2:] > d["boxes"][:, :2]).all()
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 64).all()


def test_threshold_and_cap_are_constructor_arguments(model):
    loose = ShapesDetector(score_thresh=0.0, max_detections=7)
    loose.load_state_dict(model.state_dict())
    out = loose.eval()(to_input(stack_images(make_multi_scenes(3, SEED))))
    assert [len(d["scores"]) for d in out] == [7, 7, 7]
    with pytest.raises(ValueError, match="`max_detections` must be at least 1, got 0"):
        ShapesDetector(max_detections=0)


def test_scores_and_boxes_are_differentiable(model):
    """Gradients reach the input and the default layer, and image 0's detections leave image 1 alone."""
    captured = []
    handle = model.head.hidden.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        x = to_input(stack_images(make_multi_scenes(2, SEED))).requires_grad_(True)
        out = model(x)
    finally:
        handle.remove()
    for key in ("scores", "boxes"):
        grad_x, grad_h = torch.autograd.grad(out[0][key].sum(), [x, captured[0]], retain_graph=True)
        assert grad_x[0].abs().sum() > 0 and grad_h[0].abs().sum() > 0
        assert grad_x[1].abs().sum() == 0 and grad_h[1].abs().sum() == 0


def _decode_image_by_image(model, logits, size, offset, image_size):
    """decode as it was written first, one image at a time: the reference the batched one must equal."""
    heat = torch.sigmoid(logits)
    n, c, h, w = heat.shape
    peaks = heat * (heat == torch.nn.functional.max_pool2d(heat, 3, stride=1, padding=1))
    top_scores, top_index = peaks.flatten(1).topk(min(model.max_detections, c * h * w), dim=1)
    results = []
    for i in range(n):
        chosen = top_index[i][top_scores[i] >= model.score_thresh]
        labels, cell = chosen // (h * w), chosen % (h * w)
        off = offset[i].flatten(1)[:, cell]
        wh = size[i].flatten(1)[:, cell] * 16.0
        cx = ((cell % w).float() + off[0]) * 4
        cy = ((cell // w).float() + off[1]) * 4
        boxes = torch.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2], dim=1)
        results.append({"boxes": torchvision.ops.clip_boxes_to_image(boxes, image_size), "labels": labels,
                        "scores": heat[i].flatten(1)[labels, cell]})
    return results


@pytest.mark.parametrize(("thresh", "cap"), [(0.3, 20), (0.0, 7), (0.99, 20)])
def test_decode_equals_image_by_image(model, thresh, cap):
    """Random maps (rounded, so peaks tie), boxes reaching past the image: every field to the bit."""
    detector = ShapesDetector(score_thresh=thresh, max_detections=cap)
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 8):
        logits = (torch.randn(n, 5, 16, 16, generator=g) * 3).round()
        size, offset = torch.randn(n, 2, 16, 16, generator=g) + 1, torch.rand(n, 2, 16, 16, generator=g)
        got = detector.decode(logits, size, offset, (64, 64))
        want = _decode_image_by_image(detector, logits, size, offset, (64, 64))
        assert [len(d["scores"]) for d in got] == [len(d["scores"]) for d in want]
        for a, b in zip(got, want, strict=True):
            for key in ("boxes", "labels", "scores"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _graph_size(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_decode_graph_does_not_grow_with_the_batch(model):
    """What an explanation's backward walks: the same autograd graph for one image or eight (a loop over images
    put some 30 nodes per image in it)."""
    x = to_input(stack_images(make_multi_scenes(8, SEED)))
    sizes = []
    for n in (1, 8):
        with torch.enable_grad():
            raw = [t.detach().requires_grad_(True) for t in model.raw(x[:n])]
            out = model.decode(*raw, image_size=(64, 64))
            sizes.append(_graph_size(torch.cat([torch.cat([d["scores"], d["boxes"].flatten()]) for d in out])))
    assert sizes[0] == sizes[1] - 14  # the cat of 8 images' outputs over one image's: 7 more of each cat


def test_average_precision_scores_what_it_should():
    scenes = make_multi_scenes(20, SEED)
    perfect = [{"boxes": torch.as_tensor(s.boxes, dtype=torch.float32), "labels": torch.as_tensor(s.labels),
                "scores": torch.ones(len(s.labels))} for s in scenes]
    assert average_precision(perfect, scenes) == pytest.approx(1.0)
    wrong = [{**d, "labels": (d["labels"] + 1) % len(SHAPE_CLASSES)} for d in perfect]
    assert average_precision(wrong, scenes) == 0.0
    shifted = [{**d, "boxes": d["boxes"] + 12.0} for d in perfect]
    assert average_precision(shifted, scenes) < 0.2
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
             for _ in scenes]
    assert average_precision(empty, scenes) == 0.0


def test_ap50_on_held_out_scenes(model):
    ap50 = average_precision_50(model, 100, SEED)
    assert ap50 >= 0.8, f"AP50 {ap50:.3f}"


def test_matching_pairs_each_shape_once(model):
    scenes = make_multi_scenes(30, SEED)
    for det, scene in zip(predict(model, stack_images(scenes)), scenes, strict=True):
        pairs = match(det, scene)
        assert len({k for _, k in pairs}) == len(pairs) == len({j for j, _ in pairs})
        assert all(int(det["labels"][j]) == int(scene.labels[k]) for j, k in pairs)


def test_gradcam_points_inside_the_detected_box(model):
    """pytorch-grad-cam, FasterRCNNBoxScoreTarget, default layer: the peak lies in the shape's box."""
    result = detection_pointing(model, 60, SEED)
    assert result.explained >= 100
    assert result.rate >= 0.85, f"pointing {result}"


def test_gradcam_points_at_the_shape_explained_not_the_other(model):
    """Two shapes, classes drawn independently (same-class pairs included); a missed shape counts as a miss."""
    result = detection_pointing(model, 50, SEED, n_shapes=2)
    assert result.strict_rate >= 0.80, f"two-shape pointing {result}"


def test_hirescam_tells_same_class_shapes_apart(model):
    """Grad-CAM's averaged gradients light up every shape of the class; HiResCAM's stay at the detection."""
    gradcam = detection_pointing(model, 25, SEED, n_shapes=3, method="gradcam")
    hirescam = detection_pointing(model, 25, SEED, n_shapes=3, method="hirescam")
    assert hirescam.rate >= 0.95 and hirescam.rate > gradcam.rate, (gradcam, hirescam)


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for out in (a, b):
        train_shapes_detect(out, seed=3, n_train=64, epochs=1, log=lambda _s: None)
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert all(torch.equal(sa[key], sb[key]) for key in sa)
    model, _ = load_shapes_detect(a)
    assert isinstance(model(to_input(np.zeros((1, 64, 64, 3), np.uint8))), list)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a shapes-detect checkpoint"):
        load_shapes_detect(path)
