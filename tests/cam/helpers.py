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


def nhwc_reshape(t):
    """pytorch-grad-cam's reshape_transform for (N, H, W, C) layers."""
    return t.permute(0, 3, 1, 2)


def token_reshape(prefix, grid, sequence_first=False):
    """pytorch-grad-cam's reshape_transform for ViT-style tokens (or CLIP's (L, N, D) with ``sequence_first``)."""

    def reshape(t):
        if sequence_first:
            t = t.permute(1, 0, 2)
        return t[:, prefix:, :].reshape(t.shape[0], grid[0], grid[1], t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def gradient_parity(model, layer, x, reshape, methods=("gradcam", "gradcam++", "layercam"), engine=None,
                    threshold=0.99):
    """Our maps of the two best classes of each image against pytorch-grad-cam with ``reshape`` at ``layer``.

    ``engine``: a ready CamEngine (from a served model); otherwise one is made here. Returns the maps
    compared per method; fails on any r below ``threshold``."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from service.cam import CamEngine, CamQuery

    reference = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}
    own = engine is None
    engine = engine or CamEngine(model, x[:1])
    compared = {}
    try:
        classes = tuple(engine.predict(x[:1])[0].topk(2).indices.tolist())
        outs = {m: engine.explain(x, [CamQuery(method=m, layer=layer, classes=classes)] * len(x)) for m in methods}
    finally:
        if own:
            engine.close()
    for p in model.parameters():
        p.requires_grad_(True)  # the engine froze them; the reference backpropagates into them
    try:
        module = dict(model.named_modules())[layer]
        size = x.shape[-1]
        for method in methods:
            with reference[method](model=model, target_layers=[module], reshape_transform=reshape) as ref:
                expected = ref(input_tensor=torch.cat([x, x]),
                               targets=[ClassifierOutputTarget(c) for c in classes for _ in x])
            compared[method] = 0
            for t, c in enumerate(classes):
                for i in range(len(x)):
                    ref_map, cam = expected[t * len(x) + i], outs[method].cams[i]
                    if ref_map.max() == 0:
                        assert cam.raw_max[t] == 0, f"{method}: reference map empty, ours is not"
                        continue
                    r = pearson(upsampled(cam.maps[t : t + 1], size)[0], ref_map)
                    assert r >= threshold, f"{layer}/{method} image {i} class {c}: r={r:.4f}"
                    compared[method] += 1
            assert compared[method] >= 1, f"{method}: no non-empty map to compare"
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    return compared


def reshape_for(layout):
    """pytorch-grad-cam's ``reshape_transform`` for a layer of this layout (None for NCHW)."""
    if layout.kind == "nhwc":
        return nhwc_reshape
    if layout.kind == "tokens":
        return token_reshape(layout.prefix, layout.grid)
    return None
