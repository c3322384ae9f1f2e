"""How a box target finds its detection: by IoU among the detections of its label.

A detector proposes the same region once per class, so a near-identical box of another class often
overlaps the client's box a little more. Matching over all classes (pytorch-grad-cam's
``FasterRCNNBoxScoreTarget``) then scores zero and explains nothing; camserve matches within the label."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from service.cam.tasks import Detection, Resolved, Summary, TaskTarget, _iou, _iou_host, get_task

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


def _random_detections(g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Four images: one without detections; the others with near-duplicate boxes of other labels (the label
    filter decides), exact duplicates of one label (ties: the first wins), and leaves that require grad."""
    out = []
    for k in (5, 0, 7, 3):
        corner = torch.rand(k, 2, generator=g) * 40
        boxes = torch.cat([corner, corner + 8 + torch.rand(k, 2, generator=g) * 20], dim=1)
        if k >= 5:
            boxes[1] = boxes[0] + 0.5  # another label's copy of the same region
            boxes[3] = boxes[2]  # a tie
        labels = torch.randint(0, 3, (k,), generator=g)
        if k >= 5:
            labels[3] = labels[2]
        out.append({"boxes": boxes.requires_grad_(True), "labels": labels,
                    "scores": torch.rand(k, generator=g).requires_grad_(True)})
    return out


def _random_targets(out, g: torch.Generator, iou: bool | None = None) -> list[tuple[Resolved, ...]]:
    """Per image two to six targets: detections' boxes jittered by up to a pixel with their label or another,
    boxes far from everything (lost); score+iou with ``iou``, else a mix of both; image 0 has none."""
    resolved = []
    for i, d in enumerate(out):
        targets = []
        for t in range(0 if i == 0 else int(torch.randint(2, 7, (), generator=g))):
            if d["boxes"].shape[0] and t % 4 != 3:
                j = int(torch.randint(0, d["boxes"].shape[0], (), generator=g))
                box = d["boxes"][j].detach() + (torch.rand(4, generator=g) - 0.5) * 2
                label = int(d["labels"][j]) if t % 3 else int(torch.randint(0, 3, (), generator=g))
            else:
                box, label = torch.tensor([200.0, 200.0, 230.0, 230.0]), t % 3
            targets.append(Resolved(label, box, iou=bool(t % 2) if iou is None else iou))
        resolved.append(tuple(targets))
    return resolved


@pytest.mark.parametrize("iou", [None, True, False])
@pytest.mark.parametrize("seed", range(4))
def test_detection_scores_are_the_objectives_one_by_one(seed, iou):
    """The score matrix of all images and targets at once: each entry is ``objective`` of that target, to the
    bit, padding zero, and its gradients are the objectives' gradients."""
    task = get_task("detection", ["a", "b", "c"])
    g = torch.Generator().manual_seed(seed)
    out = _random_detections(g)
    resolved = _random_targets(out, g, iou)
    got = task.scores(out, resolved)
    expected = torch.zeros(len(out), max(len(r) for r in resolved))
    for i, targets in enumerate(resolved):
        for t, target in enumerate(targets):
            expected[i, t] = task.objective(out, i, target)
    assert got.shape == expected.shape
    assert torch.equal(got.detach(), expected.detach()), (got, expected)
    assert (expected == 0).any()  # lost boxes occur
    assert (expected > 1).any() != (iou is False)  # and score+iou where asked
    weights = torch.randn(expected.shape, generator=g)
    leaves = [t for d in out if d["boxes"].shape[0] for t in (d["boxes"], d["scores"])]
    grads = torch.autograd.grad((got * weights).sum(), leaves, materialize_grads=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves, materialize_grads=True)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
    # Confidences (what metrics follow) are the same objectives.
    confidences = task.confidences(task.select(out, [2, 3, 3]), [resolved[2][0], resolved[3][0], resolved[3][-1]])
    assert torch.equal(confidences, torch.stack([expected[2, 0], expected[3, 0], expected[3, len(resolved[3]) - 1]]))


def test_detection_scores_are_zero_without_detections():
    task = get_task("detection", ["a"])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    got = task.scores([empty, empty], [(Resolved(0, torch.tensor(BOXES[0])),), ()])
    assert torch.equal(got, torch.zeros(2, 1))


def test_detection_scores_take_one_batched_backward():
    """Rows of grad outputs in one vmapped backward (is_grads_batched) give each row's own gradients, without
    vmap's slow per-row fallback (its performance warning is an error here)."""
    task = get_task("detection", ["a", "b", "c"])
    g = torch.Generator().manual_seed(3)
    out = _random_detections(g)
    resolved = _random_targets(out, g)
    got = task.scores(out, resolved)
    leaves = [out[2]["boxes"], out[2]["scores"], out[3]["boxes"]]
    onehot = torch.eye(got.numel()).reshape(-1, *got.shape)
    batched = torch.autograd.grad(got, leaves, grad_outputs=onehot, is_grads_batched=True, retain_graph=True)
    for row in range(onehot.shape[0]):
        one = torch.autograd.grad(got, leaves, grad_outputs=onehot[row], retain_graph=True)
        for a, b in zip(batched, one, strict=True):
            torch.testing.assert_close(a[row], b)


def test_iou_is_torchvisions_to_the_bit():
    g = torch.Generator().manual_seed(0)
    corner = torch.rand(30, 2, generator=g) * 50
    boxes = torch.cat([corner, corner + torch.rand(30, 2, generator=g) * 30], dim=1)
    boxes[5] = boxes[4]
    boxes[6, 2:] = boxes[6, :2]  # empty
    boxes[7] = boxes[6]  # empty on empty: 0 / 0
    others = boxes.flip(0) + (torch.rand(30, 4, generator=g) - 0.5) * 4
    full = _iou(boxes[:, None], others)
    torch.testing.assert_close(full, box_iou(boxes, others), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(_iou(boxes, others), box_iou(boxes, others).diagonal(), rtol=0, atol=0,
                               equal_nan=True)
    host = _iou_host(boxes.numpy()[:, None], others.numpy())
    assert host.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(host), full, rtol=0, atol=0, equal_nan=True)


def _resolve_one_by_one(found, target):
    """The match of one box target, as resolve made it before it matched an image's targets together."""
    box = torch.tensor(target.box, dtype=torch.float32)
    candidates = [d for d in found if target.label is None or d.label == target.label]
    if candidates:
        overlaps = box_iou(box[None], torch.tensor([d.box for d in candidates]))[0]
        best = int(overlaps.argmax())
        if float(overlaps[best]) > 0.5:
            return candidates[best].label, candidates[best].index
    return target.label, None


@pytest.mark.parametrize("seed", range(4))
def test_resolve_matches_each_box_as_alone(seed):
    task = get_task("detection", ["a", "b", "c"])
    g = torch.Generator().manual_seed(seed)
    (d,) = _random_detections(g)[:1]
    (summary,) = task.summarize([d])
    found = summary.detections
    targets = []
    for j in range(len(found)):
        box = tuple((torch.tensor(found[j].box) + (torch.rand(4, generator=g) - 0.5) * 8).tolist())
        targets += [TaskTarget(box=box), TaskTarget(box=box, label=found[j].label), TaskTarget(index=j),
                    TaskTarget(box=box, label=(found[j].label + 1) % 3)]
    targets = [t for t in targets if t.box is None or _resolve_one_by_one(found, t)[0] is not None]
    resolved = task.resolve(summary, targets, 1, "score")
    for t, r in zip(targets, resolved, strict=True):
        if t.box is not None:
            assert (r.label, r.detection) == _resolve_one_by_one(found, t)
            assert r.box is not None and r.box.tolist() == torch.tensor(t.box, dtype=torch.float32).tolist()
    assert any(r.detection is None for r in resolved) and any(r.detection is not None for r in resolved)


def test_summaries_read_every_detection():
    task = get_task("detection", ["a", "b", "c"])
    out = _random_detections(torch.Generator().manual_seed(1))
    summaries = task.summarize(out)
    for d, s in zip(out, summaries, strict=True):
        assert [x.index for x in s.detections] == list(range(d["boxes"].shape[0]))
        assert [x.label for x in s.detections] == d["labels"].tolist()
        assert [x.score for x in s.detections] == d["scores"].tolist()
        assert [list(x.box) for x in s.detections] == d["boxes"].tolist()
