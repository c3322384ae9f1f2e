"""``camserve evaluate``: the report's figures, from scenes with boxes and from a folder without."""

from __future__ import annotations

import numpy as np
import pytest

from service.cli import main
from service.config import DEFAULT_MODELS
from service.evaluation import Sample, evaluate, evaluate_task, shapes_samples, table, task_table
from service.imaging import encode_png
from service.registry import ModelSpec, load_model, serve_module
from tests.api.models import TINY_PRE, Tiny


def test_shapes_report_has_every_figure():
    loaded = load_model(DEFAULT_MODELS[0])
    (report,) = evaluate(loaded, shapes_samples(8, seed=3), ["gradcam"], steps=4)
    assert report.images == 8 and report.pointing_game is not None and 0 <= report.pointing_game <= 1
    assert 0 <= report.deletion <= 1 and 0 <= report.insertion <= 1 and report.ms_per_image > 0
    assert "| gradcam |" in table([report])


def test_images_without_labels_have_no_pointing_game():
    loaded = serve_module(Tiny(), ModelSpec(name="t", source="python:x:y"), ["a", "b", "c", "d"], TINY_PRE)
    samples = [Sample(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(3)]
    (report,) = evaluate(loaded, samples, ["eigencam"], steps=4, batch_size=2)
    assert report.pointing_game is None and report.images == 3


def test_cli_prints_a_table(tmp_path, capsys):
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(encode_png(np.full((64, 64, 3), 40 * i, dtype=np.uint8)))
    assert main(["evaluate", "--images", str(tmp_path), "--methods", "gradcam", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "| gradcam | n/a |" in out


@pytest.fixture(scope="module")
def detector():
    return load_model(ModelSpec(name="d", source="builtin:shapes-detect"))


@pytest.fixture(scope="module")
def segmenter():
    return load_model(ModelSpec(name="s", source="builtin:shapes-seg"))


def test_detector_report_has_ap50_and_pointing(detector):
    result = evaluate_task(detector, 6, seed=3, methods=["gradcam", "hirescam"])
    assert result.task == "detection" and result.quality_name == "AP50" and result.quality > 0.8
    assert [r.method for r in result.reports] == ["gradcam", "hirescam"]
    for r in result.reports:
        assert r.maps >= 6 + 2 * 6 - 2 and 0 <= r.pointing <= 1 and 0 <= r.two_shapes <= 1
    # HiResCAM keeps to the detection explained (docs/tasks.md): on these scenes every map hits.
    assert result.reports[1].pointing == 1.0 and result.reports[1].two_shapes >= 0.9
    assert "| hirescam | 1.000 |" in task_table(result)
    for r in result.reports:
        assert set(r.metrics) == {"average_drop", "increase", "deletion", "insertion"}
        assert all(0 <= v <= 1 for v in r.metrics.values()), r.metrics
        # The detection's score falls faster as its salient pixels go than it rises as they come back.
        assert r.metrics["deletion"] < r.metrics["insertion"], r.metrics


def test_detector_pointing_agrees_with_pytorch_grad_cam(detector):
    """camserve's Grad-CAM of each matched detection hits where pytorch-grad-cam's FasterRCNNBoxScoreTarget
    map does (service.models.pointing), on the same scenes and matches."""
    from service.models.pointing import detection_pointing
    from service.models.shapes_detect import load_shapes_detect

    ours = evaluate_task(detector, 12, seed=5, methods=["gradcam"]).reports[0]
    model, _ = load_shapes_detect()  # the served module's parameters are frozen; the reference backpropagates
    reference = detection_pointing(model, 12, 5, method="gradcam")
    pair = detection_pointing(model, 12, 5, n_shapes=2, method="gradcam")
    assert abs(ours.pointing - reference.rate) <= 1 / reference.explained
    assert abs(ours.two_shapes - pair.strict_rate) <= 1 / (pair.explained + pair.unexplained)


def test_segmenter_report_has_miou_and_client_mask_pointing(segmenter):
    result = evaluate_task(segmenter, 6, seed=3, methods=["hirescam"])
    (r,) = result.reports
    assert result.quality_name == "mIoU" and result.quality > 0.8
    # One map per class present in the mixed scenes, one per shape (its own mask) in the two-shape ones.
    assert r.maps >= 6 + 2 * 6 and r.pointing >= 0.9 and r.two_shapes >= 0.9
    assert "two shapes, client mask" in task_table(result)


def test_segmenter_pointing_agrees_with_pytorch_grad_cam(segmenter):
    from service.models.pointing import segmentation_pointing
    from service.models.shapes_seg import load_shapes_seg

    ours = evaluate_task(segmenter, 12, seed=5, methods=["gradcam"]).reports[0]
    model, _ = load_shapes_seg()
    reference = segmentation_pointing(model, 12, 5, method="gradcam")
    mask = segmentation_pointing(model, 12, 5, region="mask", n_shapes=2, method="gradcam")
    assert abs(ours.pointing - reference.rate) <= 1 / reference.explained
    assert abs(ours.two_shapes - mask.rate) <= 1 / mask.explained


def test_task_scenes_refuse_other_models():
    with pytest.raises(ValueError, match="not a classifier"):
        evaluate_task(load_model(DEFAULT_MODELS[0]), 2, seed=0, methods=["gradcam"])


def test_cli_evaluates_a_builtin_segmenter_by_source(capsys):
    assert main(["evaluate", "--model", "builtin:shapes-seg", "--shapes", "3", "--methods", "hirescam"]) == 0
    out = capsys.readouterr().out
    assert "(segmentation): mIoU " in out and "| hirescam |" in out
    assert "| average drop | increase | deletion | insertion |" in out
    assert "re-scoring each map's own target" in out


def test_cli_refuses_a_folder_for_a_detector(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((64, 64, 3), dtype=np.uint8)))
    assert main(["evaluate", "--model", "builtin:shapes-detect", "--images", str(tmp_path)]) == 2
    assert "--images: a detection model is scored on shapes scenes" in capsys.readouterr().err
