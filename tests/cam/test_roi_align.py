"""The sparse RoI Align: torchvision's result and gradient."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from service.cam.roi_align import roi_align


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("rows", ["none", "one", "some", "all"])
def test_result_and_gradient_equal_torchvisions(aligned, rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 20, 24, generator=g, requires_grad=True)
    xy = torch.rand(12, 2, generator=g) * 15
    size = 4 + torch.rand(12, 2, generator=g) * 6
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).float(), xy, xy + size], dim=1)
    ours = roi_align(x, rois, (5, 4), spatial_scale=0.5, sampling_ratio=2, aligned=aligned)
    theirs = torchvision_roi_align(x, rois, (5, 4), spatial_scale=0.5, sampling_ratio=2, aligned=aligned)
    torch.testing.assert_close(ours, theirs)
    weight = torch.randn(theirs.shape, generator=g)
    keep = {"none": [], "one": [3], "some": [0, 5, 11], "all": list(range(12))}[rows]
    mask = torch.zeros(12, 1, 1, 1)
    mask[keep] = 1
    # No row to pool back: no gradient at all, so that autograd skips what lies below.
    (got,) = torch.autograd.grad((ours * weight * mask).sum(), x, materialize_grads=True, retain_graph=True)
    (expected,) = torch.autograd.grad((theirs * weight * mask).sum(), x)
    if not keep:
        assert torch.autograd.grad((ours * weight * mask).sum(), x, allow_unused=True) == (None,)
    torch.testing.assert_close(got, expected)
