"""The sparse box head: torchvision's ``TwoMLPHead`` result and input gradient, its own path where the head is not
torchvision's own, and in use only while a detector explains."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision
import torchvision.ops.poolers as poolers
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from service.cam.engine import _gradients
from service.cam.roi_align import multiscale_roi_align, roi_align
from service.cam.roi_heads import sparse_backward


def _head() -> TwoMLPHead:
    torch.manual_seed(0)
    head = TwoMLPHead(8 * 3 * 3, 32).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def _rows_grad(head: TwoMLPHead, x: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = head(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    weight[[r for r in range(out.shape[0]) if r not in keep]] = 0
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("rows", ["none", "one", "some", "all"])
def test_result_and_gradient_equal_torchvisions(rows):
    head = _head()
    x = torch.randn(10, 8, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    keep = {"none": [], "one": [4], "some": [0, 3, 9], "all": list(range(10))}[rows]
    expected = _rows_grad(head, x, keep)
    with sparse_backward():
        out = head(x)
        assert type(out.grad_fn).__name__ == "_SparseTwoMLPBackward"
        got = _rows_grad(head, x, keep)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert bool(got[1][[r for r in range(10) if r not in keep]].eq(0).all())


def test_a_head_not_torchvisions_own_keeps_its_path():
    head = _head()
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    seen = []
    head.fc6.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with sparse_backward():
        out = head(x)
    assert seen == [torch.Size([4, 32])]  # the hook ran: torchvision's path, not the fused one
    assert type(out.grad_fn).__name__ != "_SparseTwoMLPBackward"
    head = _head()
    head.fc7 = torch.nn.Sequential(head.fc7)
    with sparse_backward():
        out = head(x)
    assert type(out.grad_fn).__name__ != "_SparseTwoMLPBackward"
    with sparse_backward():  # nothing to differentiate: the stock forward
        assert _head()(x.detach()).grad_fn is None


def test_torchvisions_functions_only_meanwhile():
    original_pool, original_head = poolers.roi_align, TwoMLPHead.forward
    with sparse_backward():
        assert poolers.roi_align is roi_align
        assert poolers._multiscale_roi_align is multiscale_roi_align
        assert TwoMLPHead.forward is not original_head
        with sparse_backward():  # two models' explanations overlapping
            pass
        assert poolers.roi_align is roi_align
        assert TwoMLPHead.forward is not original_head
    assert poolers.roi_align is original_pool
    assert TwoMLPHead.forward is original_head
    with pytest.raises(RuntimeError), sparse_backward():
        raise RuntimeError
    assert poolers.roi_align is original_pool
    assert TwoMLPHead.forward is original_head


def _detector_scores(model, x, layer, sparse):
    """The body's last map (a leaf) and the scores ``(N, 3)`` of each image's first three detections plus the
    first one's box coordinates, so that both of the box head's outputs carry gradients."""
    captured = {}

    def hook(module, args, out):
        captured["leaf"] = out.detach().requires_grad_(True)
        return captured["leaf"]

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad(), sparse_backward() if sparse else contextlib.nullcontext():
            out = model(x)
    finally:
        handle.remove()
    scores = torch.stack([torch.cat([d["scores"][:3], d["boxes"][0, :1] / 100]) for d in out])
    return captured["leaf"], scores


def _graph(out: torch.Tensor) -> set[str]:
    """The names of the backward nodes under ``out``."""
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.slow
@pytest.mark.parametrize("head", ["torchvision's", "hooked"])
def test_the_batched_backward_equals_torchvisions_target_by_target(head):
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4, box_score_thresh=0.0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if head == "hooked":  # the box head keeps torchvision's path; the pooler under it is still the sparse one
        model.roi_heads.box_head.fc6.register_forward_hook(lambda m, a, o: None)
    x = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(3))
    layer = "backbone.body.16"
    leaf, scores = _detector_scores(model, x, layer, sparse=True)
    assert scores.shape == (2, 4)
    nodes = _graph(scores)
    assert ("_SparsePooledTwoMLPBackward" in nodes) == (head != "hooked")
    assert ("_SparseMultiScaleBackward" in nodes) == (head == "hooked")
    targets = [(0, 1, 2, 3), (2, 0, 3)]
    (batched,) = _gradients(scores, [leaf], targets)
    ref_leaf, ref_scores = _detector_scores(model, x, layer, sparse=False)
    torch.testing.assert_close(scores, ref_scores)
    for t in range(4):
        onehot = torch.zeros_like(ref_scores)
        for i, cols in enumerate(targets):
            if t < len(cols):
                onehot[i, cols[t]] = 1
        (expected,) = torch.autograd.grad(ref_scores, ref_leaf, onehot, retain_graph=True)
        assert expected.abs().amax() > 0
        torch.testing.assert_close(batched[t], expected, atol=1e-5, rtol=1e-4)
