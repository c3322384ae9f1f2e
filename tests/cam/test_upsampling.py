"""The matrix-backward bilinear resize: PyTorch's result bit for bit, its gradient, its adjoint, and in use only
while a segmenter explains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.cam.tasks import Resolved, get_task
from service.cam.upsampling import (
    interpolate,
    interpolation_matrix,
    matrix_backward,
    region_weights,
    resized_from,
)

# (input h, w) and F.interpolate's sizing arguments: up, down, odd sizes, one pixel, scale factors.
CASES = [
    ((7, 5), {"size": (224, 160)}),
    ((28, 28), {"size": (224, 224)}),
    ((14, 9), {"size": (5, 4)}),
    ((9, 13), {"size": (9, 13)}),
    ((1, 3), {"size": (6, 1)}),
    ((16, 16), {"scale_factor": 2.0}),
    ((11, 7), {"scale_factor": 1.7}),
    ((12, 10), {"scale_factor": (0.5, 3.0)}),
]


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # Sums of up to a few hundred terms in another order: relative to the largest value.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("shape", "sizing"), CASES)
def test_matrices_result_and_gradient_equal_pytorchs(shape, sizing, align_corners):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=g, requires_grad=True)
    expected = F.interpolate(x, mode="bilinear", align_corners=align_corners, **sizing)
    got = interpolate(x, mode="bilinear", align_corners=align_corners, **sizing)
    assert torch.equal(got, expected)  # PyTorch's own kernel computes the result
    source = resized_from(got)
    assert source is not None
    assert source[0] is x
    _, a_h, a_w = source
    factors = sizing.get("scale_factor")
    sh, sw = (None, None) if factors is None else (factors, factors) if isinstance(factors, float) else factors
    assert torch.equal(a_h, interpolation_matrix(shape[0], expected.shape[-2], align_corners, sh))
    assert torch.equal(a_w, interpolation_matrix(shape[1], expected.shape[-1], align_corners, sw))
    _close(a_h @ x.detach() @ a_w.T, expected.detach())
    weight = torch.randn(expected.shape, generator=g)
    (grad,) = torch.autograd.grad((got * weight).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), x)
    _close(grad, expected_grad)
    region = (torch.rand(expected.shape[-2:], generator=g) > 0.5).float()
    _close((region_weights(region, a_h, a_w) * x.detach()).sum(dim=(-2, -1)), (region * expected.detach()).sum(
        dim=(-2, -1)))


def test_gradients_batch_over_targets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 9, generator=g, requires_grad=True)
    out = interpolate(torch.tanh(x), size=(30, 20), mode="bilinear", align_corners=False)
    grads = torch.randn(3, *out.shape, generator=g)
    (batched,) = torch.autograd.grad(out, x, grads, is_grads_batched=True, retain_graph=True)
    one_by_one = torch.stack([torch.autograd.grad(out, x, grads[t], retain_graph=True)[0] for t in range(3)])
    _close(batched, one_by_one)


@pytest.mark.parametrize("call", [
    {"size": (9, 9), "mode": "nearest"},
    {"size": (9, 9), "mode": "bicubic", "align_corners": False},
    {"size": (3, 3), "mode": "bilinear", "antialias": True},
    {"scale_factor": 1.5, "mode": "bilinear", "recompute_scale_factor": True},
])
def test_other_resizes_are_pytorchs_own(call):
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    out = interpolate(x, **call)
    assert resized_from(out) is None
    assert torch.equal(out, F.interpolate(x, **call))
    assert out.grad_fn is not None
    assert type(out.grad_fn).__name__ != "_BilinearBackward"  # not the matrix backward


def test_resizes_without_a_graph_are_pytorchs_own():
    x = torch.randn(1, 2, 6, 6)
    assert resized_from(interpolate(x, size=(9, 9), mode="bilinear")) is None
    with torch.no_grad():
        assert resized_from(interpolate(x.requires_grad_(True), size=(9, 9), mode="bilinear")) is None
    assert resized_from(interpolate(torch.randn(2, 6, 6, requires_grad=True), size=9, mode="linear")) is None


def test_f_interpolate_is_patched_only_meanwhile():
    original = F.interpolate
    with matrix_backward():
        assert F.interpolate is interpolate
        with matrix_backward():  # two models' explanations overlapping
            pass
        assert F.interpolate is interpolate
    assert F.interpolate is original
    with pytest.raises(RuntimeError), matrix_backward():
        raise RuntimeError
    assert F.interpolate is original


class _Head(torch.nn.Module):
    """Logits at a quarter of the input's size, resized to it as torchvision's segmenters do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": F.interpolate(self.conv(x), size=x.shape[-2:], mode="bilinear", align_corners=False)}


def test_segmentation_scores_are_read_before_the_last_resize():
    torch.manual_seed(0)
    task = get_task("segmentation", ["background", "a", "b", "c"])
    model = _Head()
    x = torch.randn(2, 3, 30, 22)
    regions = [(torch.rand(30, 22) > 0.5).float() for _ in range(3)]
    resolved = [(Resolved(1, region=regions[0]), Resolved(3, region=regions[1])), (Resolved(2, region=regions[2]),)]
    plain = model(x)
    with task.explaining():
        out = model(x)
    assert torch.equal(out["out"], plain["out"])  # the summary reads the same logits
    assert resized_from(out["out"]) is not None
    got, expected = task.scores(out, resolved), task.scores(plain, resolved)
    _close(got, expected)
    weights = torch.randn(2, 2)
    (grad,) = torch.autograd.grad((got * weights).sum(), model.conv.weight)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), model.conv.weight)
    _close(grad, expected_grad)
    # The full-resolution logits are not on the gradient's path: their node is never reached.
    assert got.grad_fn is not None
    seen, stack = set(), [got.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    assert out["out"].grad_fn not in seen
