"""CAM methods: each one turns a layer's activations (and their gradients) into a saliency map.

Every gradient method is written as one weighting function ``weights(A, G)`` that returns weights
broadcastable to ``A``; the map is then ``ReLU(sum_k weights_k * A_k)``, as in Selvaraju et al. (2017).
EigenCAM needs no gradients and is written as its projection directly.

Shapes: ``A`` and ``G`` are ``(B, C, h, w)``; a map is ``(B, h, w)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import InvalidArgument

# Keeps the GradCAM++ and XGradCAM denominators away from zero where a channel is silent.
_EPS = 1e-7


def _gradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    return g.mean(dim=(2, 3), keepdim=True)


def _gradcam_pp_weights(a: Tensor, g: Tensor) -> Tensor:
    # Chattopadhyay et al. (2018), eq. 19, with the exponential of the score folded into the
    # gradient powers, the closed form used by the reference implementations.
    g2 = g.pow(2)
    g3 = g2 * g
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    alpha = g2 / (denom + _EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (alpha * g.clamp(min=0)).sum(dim=(2, 3), keepdim=True)


def _xgradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    # Fu et al. (2020): gradients weighted by the activation's share of its channel total.
    total = a.sum(dim=(2, 3), keepdim=True)
    return (g * a / (total + _EPS)).sum(dim=(2, 3), keepdim=True)


def _hirescam_weights(a: Tensor, g: Tensor) -> Tensor:
    # Draelos & Carin (2020): no spatial averaging, so the map is faithful to the logit.
    return g


def _layercam_weights(a: Tensor, g: Tensor) -> Tensor:
    # Jiang et al. (2021): only positive gradients, per location.
    return g.clamp(min=0)


def principal_projection(a: Tensor) -> Tensor:
    """Project each location's activation vector on the first principal component.

    ``a``: ``(B, C, h, w)`` -> ``(B, h, w)``. Sign convention: SVD leaves the sign of the component
    arbitrary, so it is chosen to make the projection correlate positively with the channel-mean
    activation map; a map that shows where the layer fires strongly, not where it is quiet.
    """
    b, c, h, w = a.shape
    x = a.reshape(b, c, h * w).transpose(1, 2).float()  # (B, hw, C): one row per location
    x = x - x.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:, 0, :, None]  # (B, hw, 1)
    proj = proj.squeeze(-1)
    mean_map = a.reshape(b, c, h * w).float().mean(dim=1)
    mean_map = mean_map - mean_map.mean(dim=1, keepdim=True)
    sign = torch.where((proj * mean_map).sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    out: Tensor = (proj * sign).reshape(b, h, w)
    return out


WeightFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CamMethod:
    """A named CAM method. ``saliency`` returns the map before the final ReLU."""

    name: str
    needs_gradients: bool
    weights: WeightFn | None = None

    def saliency(self, a: Tensor, g: Tensor | None) -> Tensor:
        """``a``, ``g``: ``(B, C, h, w)`` -> ``(B, h, w)``, before ReLU."""
        if self.weights is None:
            return principal_projection(a)
        if g is None:
            raise ValueError(f"method {self.name!r} needs gradients")
        return (self.weights(a, g) * a).sum(dim=1)


METHODS: dict[str, CamMethod] = {
    m.name: m
    for m in (
        CamMethod("gradcam", True, _gradcam_weights),
        CamMethod("gradcam++", True, _gradcam_pp_weights),
        CamMethod("xgradcam", True, _xgradcam_weights),
        CamMethod("hirescam", True, _hirescam_weights),
        CamMethod("layercam", True, _layercam_weights),
        CamMethod("eigencam", False, None),
    )
}


def get_method(name: str) -> CamMethod:
    """Look a method up by name, with the list of known names in the error."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidArgument(
            "method", f"`method` must be one of {', '.join(METHODS)}, got {name!r}"
        ) from None
