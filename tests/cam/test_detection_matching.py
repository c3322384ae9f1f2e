"""How a box target finds its detection: by IoU among the detections of its label.

A detector proposes the same region once per class, so a near-identical box of another class often
overlaps the client's box a little more. Matching over all classes (pytorch-grad-cam's
``FasterRCNNBoxScoreTarget``) then scores zero and explains nothing; camserve matches within the label."""

from __future__ import annotations

import pytest
import torch

from service.cam.tasks import Detection, Summary, TaskTarget, get_task

# Detection 0 (class 2) is the client's box shifted by a pixel; detection 1 (class 1) is the same region,
# a little further off; detection 2 (class 1) is elsewhere.
BOXES = [(10.0, 10.0, 50.0, 50.0), (12.0, 12.0, 52.0, 52.0), (100.0, 100.0, 140.0, 140.0)]
LABELS = [2, 1, 1]
SCORES = [0.9, 0.6, 0.5]
CLIENT_BOX = (11.0, 11.0, 51.0, 51.0)


def _summary() -> Summary:
    return Summary(detections=tuple(Detection(j, lab, s, b)
                                    for j, (b, lab, s) in enumerate(zip(BOXES, LABELS, SCORES, strict=True))))


def _output() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor(BOXES), "labels": torch.tensor(LABELS), "scores": torch.tensor(SCORES)}]


def test_a_box_with_a_label_matches_that_labels_detection():
    task = get_task("detection", ["bg", "a", "b"])
    (resolved,) = task.resolve(_summary(), [TaskTarget(box=CLIENT_BOX, label=1)], 1, "score")
    assert resolved.detection == 1
    assert float(task.objective(_output(), 0, resolved)) == pytest.approx(0.6)


def test_a_box_without_a_label_takes_the_best_overlap_of_any_class():
    task = get_task("detection", ["bg", "a", "b"])
    (resolved,) = task.resolve(_summary(), [TaskTarget(box=CLIENT_BOX)], 1, "score")
    assert (resolved.detection, resolved.label) == (0, 2)
    assert float(task.objective(_output(), 0, resolved)) == pytest.approx(0.9)


def test_a_label_without_an_overlapping_detection_scores_zero():
    task = get_task("detection", ["bg", "a", "b"])
    (resolved,) = task.resolve(_summary(), [TaskTarget(box=(100.0, 100.0, 140.0, 140.0), label=2)], 1, "score")
    assert resolved.detection is None
    assert float(task.objective(_output(), 0, resolved)) == pytest.approx(0.0)
    # ...and with score+iou the overlap is added only where a detection of the label matched.
    (resolved,) = task.resolve(_summary(), [TaskTarget(box=BOXES[2], label=1)], 1, "score+iou")
    assert float(task.objective(_output(), 0, resolved)) == pytest.approx(1.5)
