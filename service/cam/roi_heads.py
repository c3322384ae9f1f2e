"""torchvision's two-stage box head with a backward that walks only the proposals a gradient reaches.

A detection's score and box read one row of the box head's output, its own proposal's: torchvision's RPN
detaches the proposals, so nothing else links a detection to the features. Autograd's backward through
``TwoMLPHead`` still multiplies the whole ``(proposals, 1024)`` gradient by both weight matrices, zero rows
included: at one target on fasterrcnn_mobilenet_v3_large_320_fpn that was 77% of an explanation
(torch.profiler, ``aten::mm`` of the fc6/fc7 input gradients). Here the backward multiplies the non-zero rows
only, and the RoI Align under it pools back only those rows (:mod:`service.cam.roi_align`): the same gradient,
exactly, for a fraction of the work. While a detector explains, torchvision's modules call these in place of
their own (:func:`sparse_backward`); a head that is not torchvision's own, or carries hooks, keeps its path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.ops.poolers as poolers
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from service.cam.patching import CountedPatch
from service.cam.roi_align import Pooled, multiscale_roi_align, nonzero_rows, pool_levels, roi_align, unbatched


def _head(x: Tensor, w6: Tensor, b6: Tensor | None, w7: Tensor, b7: Tensor | None) -> tuple[Tensor, Tensor]:
    """``TwoMLPHead``'s two activations, ``relu(fc6(x.flatten(1)))`` and ``relu(fc7(...))``."""
    h6 = F.relu(F.linear(x.flatten(1), w6, b6))
    return h6, F.relu(F.linear(h6, w7, b7))


def _rows_back(ctx: Any, grad: Tensor) -> tuple[int, Callable[[Tensor], Tensor], Tensor, Tensor]:
    """The head's backward on the non-zero rows of ``grad`` only, all targets' rows in one product (under the
    engine's batched backward; see :func:`unbatched`): the number of targets, the function that wraps a
    ``(T, ...)`` result for autograd, the flat rows (``t * proposals + p``) and their fc6 input gradients."""
    h6, h7, w6, w7 = ctx.saved_tensors
    g, wrap = unbatched(grad)  # (T, proposals, 1024)
    flat = g.flatten(0, 1)
    rows = nonzero_rows(flat)
    proposal = rows % g.shape[1]
    g7 = flat[rows] * (h7[proposal] > 0)
    g6 = (g7 @ w7) * (h6[proposal] > 0)
    return g.shape[0], wrap, rows, g6 @ w6


class _SparseTwoMLP(torch.autograd.Function):
    """``TwoMLPHead`` whose backward multiplies the non-zero rows of the gradient only (:func:`_rows_back`)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w6: Tensor, b6: Tensor | None, w7: Tensor, b7: Tensor | None) -> Tensor:
        h6, h7 = _head(x, w6, b6, w7, b7)
        ctx.save_for_backward(h6, h7, w6, w7)
        ctx.shape = tuple(x.shape)  # type: ignore[attr-defined]
        return h7

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        targets, wrap, rows, dx_rows = _rows_back(ctx, grad)
        dx = dx_rows.new_zeros(targets * ctx.shape[0], dx_rows.shape[1])
        dx[rows] = dx_rows
        return wrap(dx.view(targets, *ctx.shape)), None, None, None, None


class _SparsePooledTwoMLP(torch.autograd.Function):
    """:class:`_SparseTwoMLP` on a multi-scale pooler's output, differentiated w.r.t. the pooled feature maps:
    the head's non-zero rows are pooled back directly, without the dense ``(T, proposals, 256 * 7 * 7)`` gradient
    that autograd would fill, hand to the pooler and scan again."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, pooled: Pooled, w6: Tensor, b6: Tensor | None, w7: Tensor,
                b7: Tensor | None, *features: Tensor) -> Tensor:
        h6, h7 = _head(x, w6, b6, w7, b7)
        ctx.save_for_backward(h6, h7, w6, w7)
        ctx.args = (pooled, tuple(x.shape[1:]), [tuple(f.shape) for f in features])  # type: ignore[attr-defined]
        return h7

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        pooled, each, shapes = ctx.args
        targets, wrap, rows, dx_rows = _rows_back(ctx, grad)
        grads = pool_levels(dx_rows.view(-1, *each), rows, targets, pooled.rois, pooled.levels, pooled.scales,
                            pooled.sampling_ratio, shapes)
        return None, None, None, None, None, None, *[None if d is None else wrap(d) for d in grads]


def _stock_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) and not m.weight.requires_grad


_torchvision_two_mlp_forward: Callable[[TwoMLPHead, Tensor], Tensor] = TwoMLPHead.forward


def _two_mlp_forward(self: TwoMLPHead, x: Tensor) -> Tensor:
    """``TwoMLPHead.forward``, with the sparse backward where the head is torchvision's own and nothing else
    (autocast, hooks on its layers, weights that want gradients) needs its path."""
    if not (x.requires_grad and _stock_linear(self.fc6) and _stock_linear(self.fc7)
            and not torch.is_autocast_enabled(x.device.type)):
        return _torchvision_two_mlp_forward(self, x)
    weights = (self.fc6.weight, self.fc6.bias, self.fc7.weight, self.fc7.bias)
    pooled: Pooled | None = getattr(x, "camserve_pooled", None)
    out: Tensor = (_SparseTwoMLP.apply(x, *weights) if pooled is None
                   else _SparsePooledTwoMLP.apply(x.detach(), pooled, *weights, *pooled.features))
    return out


_SPARSE = CountedPatch((poolers, "roi_align", roi_align), (poolers, "_multiscale_roi_align", multiscale_roi_align),
                       (TwoMLPHead, "forward", _two_mlp_forward))


def sparse_backward() -> AbstractContextManager[None]:
    """torchvision's poolers use :func:`roi_align` and :func:`multiscale_roi_align`, and its ``TwoMLPHead`` the
    sparse backward, meanwhile (process-wide: the pooler reads a module global and the head its class;
    :mod:`service.cam.patching`)."""
    return _SPARSE.held()
