"""RoI Align whose backward walks only the regions that carry a gradient.

A detector's explanation differentiates one detection's score, which reads one proposal's pooled
features; torchvision's CPU ``roi_align`` backward still walks every proposal (150 to 1000 of them),
zeros included. On fasterrcnn_mobilenet_v3_large_320_fpn that was 58% of an explanation at one target
(torch.profiler). These hand torchvision's own backward kernel the non-zero rows only: the same
gradient, exactly, for a fraction of the work. While a detector's explanation runs its forward,
torchvision's multi-scale pooler calls them in place of its own (:func:`service.cam.roi_heads.sparse_backward`).

The rows kept depend on the values, which vmap cannot batch; the engine's one backward for all targets
(``is_grads_batched``) runs under PyTorch's legacy vmap, so each backward here takes the targets' gradients
out of their batched wrapper, pools back every target's rows in one kernel call, and wraps the result again
(:func:`unbatched`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
import torchvision.ops.poolers as poolers
from torch import Tensor
from torch._C._functorch import is_legacy_batchedtensor
from torch.autograd.function import FunctionCtx
from torchvision.ops._utils import convert_boxes_to_roi_format


def unbatched(grad: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``grad`` with the targets' dimension in front, ``(T, ...)`` (``T = 1`` outside a batched backward), and
    the function that turns a ``(T, ...)`` result back into what autograd expects there.

    ``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward under the legacy vmap
    (``torch._vmap_internals``), which has no public extension point (``torch.library.register_vmap`` and
    ``autograd.Function.vmap`` serve ``torch.func.vmap`` only): its nesting level is read from its counter
    and the batch dimension moved with the same private functions it uses itself."""
    if not is_legacy_batchedtensor(grad):
        return grad[None], lambda out: out[0]
    level = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    # The batch size only matters for a tensor not batched at this level; grad is.
    plain = torch._remove_batch_dim(grad, level, 1, 0)
    return plain, lambda out: torch._add_batch_dim(out, 0, level)


def nonzero_rows(grad: Tensor) -> Tensor:
    """The indices of the rows of ``grad`` ``(N, ...)`` that hold a non-zero value."""
    return grad.flatten(1).any(dim=1).nonzero()[:, 0]


def pool_back(grad: Tensor, rows: Tensor, targets: int, rois: Tensor, scale: float, shape: tuple[int, ...],
              sampling_ratio: int, aligned: bool) -> Tensor:
    """The gradient ``(T, B, C, H, W)`` of a feature map of ``shape`` ``(B, C, H, W)`` from the non-zero rows
    ``grad`` ``(n, C, h, w)`` of the ``targets`` pooled gradients ``(T, R, C, h, w)``, at flat rows ``rows``
    (``t * R + r``): each target's rows pooled back into its own copy of the batch, in one call of torchvision's
    kernel."""
    r = rois.shape[0]
    b = shape[0]
    picked = rois[rows % r]
    picked = torch.cat([picked[:, :1] + (rows // r * b)[:, None].to(rois.dtype), picked[:, 1:]], dim=1)
    dx: Tensor = torch.ops.torchvision._roi_align_backward(
        grad.contiguous(), picked, scale, grad.shape[-2], grad.shape[-1], targets * b, *shape[1:], sampling_ratio,
        aligned)
    return dx.view(targets, b, *shape[1:])


class _SparseRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, rois: Tensor, scale: float, height: int, width: int,
                sampling_ratio: int, aligned: bool) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (scale, sampling_ratio, aligned, tuple(x.shape))  # type: ignore[attr-defined]
        out: Tensor = torch.ops.torchvision.roi_align(x, rois, scale, height, width, sampling_ratio, aligned)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        scale, sampling_ratio, aligned, shape = ctx.args
        g, wrap = unbatched(grad)
        flat = g.flatten(0, 1)
        rows = nonzero_rows(flat)
        if rows.numel() == 0:
            # No proposal of this pyramid level is explained: an undefined gradient lets autograd skip the
            # level's convolutions below, which a zero tensor would run.
            return None, None, None, None, None, None, None
        dx = wrap(pool_back(flat[rows], rows, g.shape[0], rois, scale, shape, sampling_ratio, aligned))
        return dx, None, None, None, None, None, None


def roi_align(x: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int] | list[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align``'s signature and result, with the sparse backward."""
    rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(boxes)
    height, width = (output_size, output_size) if isinstance(output_size, int) else output_size
    out: Tensor = _SparseRoIAlign.apply(x, rois, spatial_scale, height, width, sampling_ratio, aligned)
    return out


class _SparseMultiScale(torch.autograd.Function):
    """torchvision's ``_multiscale_roi_align`` as one function: its backward finds the non-zero rows once and
    pools each level's back, where autograd would gather each level's rows of the whole gradient first."""

    @staticmethod
    def forward(ctx: FunctionCtx, rois: Tensor, levels: Tensor, scales: tuple[float, ...], height: int, width: int,
                sampling_ratio: int, *features: Tensor) -> Tensor:
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], height, width))
        for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            idx = torch.where(levels == level)[0]
            result[idx] = torch.ops.torchvision.roi_align(feature, rois[idx], scale, height, width, sampling_ratio,
                                                          False)
        ctx.save_for_backward(rois, levels)
        ctx.args = (scales, sampling_ratio, [tuple(f.shape) for f in features])  # type: ignore[attr-defined]
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rois, levels = ctx.saved_tensors
        scales, sampling_ratio, shapes = ctx.args
        g, wrap = unbatched(grad)
        flat = g.flatten(0, 1)
        rows = nonzero_rows(flat)
        grads = pool_levels(flat[rows], rows, g.shape[0], rois, levels, scales, sampling_ratio, shapes)
        return None, None, None, None, None, None, *[None if d is None else wrap(d) for d in grads]


def pool_levels(grad: Tensor, rows: Tensor, targets: int, rois: Tensor, levels: Tensor, scales: tuple[float, ...],
                sampling_ratio: int, shapes: list[tuple[int, ...]]) -> list[Tensor | None]:
    """:func:`pool_back` for each level of a feature pyramid, whose rois are at ``levels``; a level no row
    reaches gets no gradient, so that autograd skips the convolutions under it."""
    at = levels[rows % rois.shape[0]]
    grads: list[Tensor | None] = []
    for level, (scale, shape) in enumerate(zip(scales, shapes, strict=True)):
        mine = at == level
        grads.append(pool_back(grad[mine], rows[mine], targets, rois, scale, shape, sampling_ratio, False)
                     if bool(mine.any()) else None)
    return grads


_torchvision_multiscale = poolers._multiscale_roi_align


def multiscale_roi_align(x_filtered: list[Tensor], boxes: list[Tensor], output_size: list[int], sampling_ratio: int,
                         scales: list[float] | None, mapper: poolers.LevelMapper | None) -> Tensor:
    """torchvision's ``poolers._multiscale_roi_align``, with the sparse backward where nothing needs its own path
    (one level, which calls :func:`roi_align`; tracing; levels of different dtypes under autocast)."""
    if (scales is None or mapper is None or len(x_filtered) == 1 or torchvision._is_tracing()
            or not any(f.requires_grad for f in x_filtered) or len({f.dtype for f in x_filtered}) > 1):
        result: Tensor = _torchvision_multiscale(x_filtered, boxes, output_size, sampling_ratio, scales, mapper)
        return result
    rois = poolers._convert_to_roi_format(boxes)
    levels = mapper(boxes)
    out: Tensor = _SparseMultiScale.apply(rois, levels, tuple(scales), output_size[0], output_size[1],
                                          sampling_ratio, *x_filtered)
    # Where the pooled features go straight into torchvision's box head, the head pools back from its own
    # non-zero rows (service.cam.roi_heads), skipping the dense pooled gradient in between.
    out.camserve_pooled = Pooled(rois, levels, tuple(scales), sampling_ratio, tuple(x_filtered))  # type: ignore[attr-defined]
    return out


@dataclass(frozen=True)
class Pooled:
    """How a multi-scale pooler's output was pooled: the arguments of :func:`pool_levels`."""

    rois: Tensor
    levels: Tensor
    scales: tuple[float, ...]
    sampling_ratio: int
    features: tuple[Tensor, ...]
