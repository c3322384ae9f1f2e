"""Shared by the parity tests: map comparison and the principal-component sign rule."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from service.cam.methods import principal_projection


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def upsampled(maps: torch.Tensor, size: int) -> np.ndarray:
    if maps.shape[-1] == size:
        return maps.numpy()
    return F.interpolate(maps[None], size=(size, size), mode="bilinear", align_corners=False)[0].numpy()


def activation_and_gradient(model, layer, x, c):
    """The layer's activation ``(1, C, h, w)`` and the gradient of logit ``c`` with respect to it, by plain autograd."""
    acts = {}

    def keep(m, i, o):
        o = o.detach().requires_grad_(True)
        acts["a"] = o
        return o.clone()  # the clone keeps `o` intact under in-place ops after the layer

    handle = dict(model.named_modules())[layer].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
            (g,) = torch.autograd.grad(logits[0, c], acts["a"])
    finally:
        handle.remove()
    return acts["a"].detach(), g


def check_principal_sign(name, size, ours, reference, basis):
    """``ours``: our normalised map; ``reference``: the reference's map; ``basis``: ``(1, C, h, w)`` the
    projected tensor. Ours is ReLU of the projection with the documented sign (docs/api.md: positive
    correlation with the channel mean of ``basis``); the reference is ReLU of the projection with either sign."""
    p = principal_projection(basis)
    mean_map = basis.mean(dim=1)
    assert pearson(p.numpy(), mean_map.numpy()) >= 0, f"{name}: projection sign is not the documented rule"
    ours_up = upsampled(ours[None], size)[0]
    assert pearson(ours_up, upsampled(p.clamp(min=0), size)[0]) >= 0.99
    if reference.max() > 0:
        r = max(pearson(upsampled(s.clamp(min=0), size)[0], reference) for s in (p, -p)
                if s.clamp(min=0).max() > 0)
        assert r >= 0.99, f"{name}: the reference is neither sign of our projection (r={r:.4f})"
