"""A task's score matrix equals its objectives one by one, padding included, values and gradients."""

from __future__ import annotations

import torch

from service.cam.tasks import Resolved, get_task


def test_segmentation_scores_are_the_objectives_one_by_one():
    task = get_task("segmentation", ["background", "a", "b", "c"])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 12, 10, generator=g, requires_grad=True)
    regions = [(torch.rand(12, 10, generator=g) > 0.5).float() for _ in range(4)]
    # Three images with 2, 0 and 1 targets: the columns past an image's targets are padding.
    resolved = [(Resolved(1, region=regions[0]), Resolved(3, region=regions[1])), (),
                (Resolved(2, region=regions[2]),)]
    got = task.scores({"out": logits}, resolved)
    assert got.shape == (3, 2)
    expected = torch.zeros(3, 2)
    for i, targets in enumerate(resolved):
        for t, target in enumerate(targets):
            expected[i, t] = task.objective({"out": logits}, i, target)
    torch.testing.assert_close(got, expected)
    weights = torch.randn(3, 2, generator=g)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_segment_summaries_are_each_class_region_and_its_mean_probability():
    """Areas, ordering and scores as the definition reads them: per class present, its pixels and the mean of
    its softmax probability over them; the same for an image alone as in a batch."""
    task = get_task("segmentation", ["background", "a", "b", "c", "d"])
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 9, 7, generator=g) * 3
    logits[1, 4] = -50.0  # a class absent from image 1
    summaries = task.summarize(logits)
    probs = logits.softmax(dim=1)
    for i, summary in enumerate(summaries):
        mask = logits[i].max(dim=0).indices
        assert summary.mask is not None and torch.equal(summary.mask, mask)
        present = [c for c in range(5) if (mask == c).any()]
        expected = sorted(((c, int((mask == c).sum()), float(probs[i, c][mask == c].mean())) for c in present),
                          key=lambda s: -s[1])
        assert [(s.label, s.area) for s in summary.segments] == [(c, a) for c, a, _ in expected]
        for s, (_, _, score) in zip(summary.segments, expected, strict=True):
            assert abs(s.score - score) < 1e-6
        (alone,) = task.summarize(logits[i : i + 1])
        assert alone.segments == summary.segments
    assert 4 not in [s.label for s in summaries[1].segments]


def test_segmentation_masks_take_the_first_maximum():
    task = get_task("segmentation", ["background", "a", "b"])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = logits[0, 2, 0, 0] = 5.0  # a tie: the first class wins, as argmax's would
    logits[0, 2, 1, 1] = 1.0
    (summary,) = task.summarize(logits)
    assert summary.mask is not None
    assert summary.mask.tolist() == [[1, 0], [0, 2]]
