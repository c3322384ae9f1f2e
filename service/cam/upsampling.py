"""Bilinear resizing whose backward is two matrix products, and scores read before a segmenter's last resize.

A bilinear resize of ``(..., h, w)`` to ``(H, W)`` is linear and separable: ``A_h @ X @ A_w^T`` with ``A_h``
``(H, h)`` and ``A_w`` ``(W, w)`` holding PyTorch's interpolation weights. Its backward is then ``A_h^T @ G @ A_w``:
two matrix products, which batch over an explanation's targets (``is_grads_batched``), where
``upsample_bilinear2d_backward`` has no batching rule and runs once per target, then stacks
(torch.profiler on lraspp_mobilenet_v3_large at 224, 8 images x 5 targets: a quarter of the explanation).

While an explanation's forward runs (:func:`matrix_backward`), ``F.interpolate`` computes its bilinear
resizes as before, bit for bit, and keeps the matrices for the backward. It also remembers, on the result,
what was resized: a segmenter that ends with a resize (torchvision's) has a region's score
``sum(R * up(X)[c])`` equal to ``sum(up^T(R) * X[c])`` (:func:`region_weights`), so the score can be read off
the low-resolution logits and no gradient of the full-resolution ones is ever made.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.cam.patching import CountedPatch

_SOURCE = "_camserve_resized_from"


@lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int, align_corners: bool, scale: float | None) -> Tensor:
    """``(n_out, n_in)`` float64: PyTorch's 1-d linear interpolation weights (``area_pixel_compute_source_index``,
    ``scale`` the user's ``1 / scale_factor`` when one was given)."""
    out = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        src = out * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = ((out + 0.5) * (scale if scale is not None and scale > 0 else n_in / n_out) - 0.5).clamp(min=0)
    # PyTorch computes the source index in float32 (its accscalar for float inputs).
    src = src.float().double()
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((out.long(), lo), 1 - frac, accumulate=True)
    a.index_put_((out.long(), hi), frac, accumulate=True)
    return a


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool = False, scale_factor: float | None = None,
                         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """``(n_out, n_in)``: row ``i`` weighs the inputs of output ``i`` of a 1-d bilinear resize, as ``F.interpolate``
    does; ``scale_factor`` as given to it (used by PyTorch in place of the sizes' ratio)."""
    scale = None if align_corners or scale_factor is None else 1.0 / scale_factor
    return _weights(n_in, n_out, align_corners, scale).to(device, dtype)


class _Bilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, a_h: Tensor, a_w: Tensor, args: tuple[Any, ...]) -> Tensor:
        # PyTorch's own kernel, so the result is bit for bit the one it gives without this.
        ctx.save_for_backward(a_h, a_w)
        ctx.dtype = x.dtype
        out: Tensor = _interpolate(x, *args)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a_h, a_w = ctx.saved_tensors
        return (a_h.t() @ grad.to(a_h.dtype) @ a_w).to(ctx.dtype), None, None, None


def _resize_args(size: Any, scale_factor: Any, x: Tensor, recompute: bool | None
                 ) -> tuple[tuple[int, int], tuple[float | None, float | None]] | None:
    """The output size and the scales PyTorch uses for a 4-d input, or ``None`` where this does not follow it."""
    h, w = x.shape[-2:]
    if size is not None and scale_factor is None:
        out = (size, size) if isinstance(size, int) else tuple(size)
        if len(out) != 2:
            return None
        return (int(out[0]), int(out[1])), (None, None)
    if size is None and scale_factor is not None and not recompute:
        factors = (scale_factor, scale_factor) if isinstance(scale_factor, float | int) else tuple(scale_factor)
        if len(factors) != 2:
            return None
        sh, sw = float(factors[0]), float(factors[1])
        return (math.floor(h * sh), math.floor(w * sw)), (sh, sw)
    return None


_interpolate = F.interpolate


def interpolate(input: Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> Tensor:
    """``F.interpolate``, the same result; a bilinear resize of a 4-d float tensor that records a graph gets the
    matrix backward and remembers its input (:func:`resized_from`)."""
    call = (size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
    args = _resize_args(size, scale_factor, input, recompute_scale_factor)
    if mode != "bilinear" or antialias or input.dim() != 4 or not input.requires_grad \
            or not input.is_floating_point() or not torch.is_grad_enabled() or args is None:
        return _interpolate(input, *call)
    (oh, ow), (sh, sw) = args
    corners = bool(align_corners)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    a_h = interpolation_matrix(input.shape[-2], oh, corners, sh, dtype, input.device)
    a_w = interpolation_matrix(input.shape[-1], ow, corners, sw, dtype, input.device)
    resized: Tensor = _Bilinear.apply(input, a_h, a_w, call)
    setattr(resized, _SOURCE, (input, a_h, a_w))
    return resized


def resized_from(t: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(x, A_h, A_w)`` when ``t`` is a bilinear resize of ``x`` made under :func:`matrix_backward`, else ``None``."""
    source: tuple[Tensor, Tensor, Tensor] | None = getattr(t, _SOURCE, None)
    return source


def region_weights(regions: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    """``(..., H, W)`` weights on a resize's output -> ``(..., h, w)`` on its input: ``A_h^T @ R @ A_w``, so that
    ``sum(R * up(X)) == sum(region_weights(R) * X)``."""
    return a_h.t() @ regions.to(a_h.dtype) @ a_w


_RESIZE = CountedPatch((F, "interpolate", interpolate))


def matrix_backward() -> AbstractContextManager[None]:
    """``F.interpolate`` is :func:`interpolate` meanwhile (process-wide: models call it through the module;
    :mod:`service.cam.patching`)."""
    return _RESIZE.held()
