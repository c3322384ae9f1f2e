"""Where to look: the default target layer and the candidates a user may name.

Found by tracing one forward pass on a dummy input rather than by a table of architectures, so any
CNN gets a sensible default: the outermost module that produces the last spatial feature map
(resnet ``layer4``, densenet/vgg/mobilenet/efficientnet/convnext ``features``). torchvision vision
transformers are special: after the last block only the class token reaches the head, so the
gradient on the patch tokens there is zero; the input norm of the last block is used instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from service.errors import InvalidArgument

# Adaptive pools only resample the map they receive; the map before them is the one to explain.
_SKIP = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class LayerInfo:
    """The layers of a model that CAM can target, default first."""

    default: str
    candidates: tuple[str, ...]
    channels: Mapping[str, int] = field(default_factory=dict, compare=False)  # layer -> channels of its map

    def with_default(self, name: str) -> LayerInfo:
        return LayerInfo(default=name, candidates=(name, *[c for c in self.candidates if c != name]),
                         channels=self.channels)

    def resolve(self, name: str | None) -> str:
        if not self.candidates:
            raise InvalidArgument("layer", "this model cannot be explained: it is TorchScript, which runs no Python "
                                  "forward hooks; serve it from a python: or torchvision: source to use /explain")
        if name is None:
            return self.default
        if name in self.candidates:
            return name
        shown = ", ".join(self.candidates[:25])
        more = f" (and {len(self.candidates) - 25} more)" if len(self.candidates) > 25 else ""
        raise InvalidArgument("layer", f"`layer` must name a spatial layer of the model, got {name!r}; "
                              f"valid layers: {shown}{more}")


def token_grid(n_tokens: int) -> tuple[int, int] | None:
    """The (prefix, side) of a token sequence laid on a square patch grid after ``prefix`` extra tokens."""
    for prefix in (1, 0):
        side = math.isqrt(n_tokens - prefix)
        if side > 1 and side * side == n_tokens - prefix:
            return prefix, side
    return None


def as_spatial(t: Tensor) -> Tensor:
    """Bring a layer output to ``(N, C, h, w)``.

    Token outputs ``(N, L, D)`` of a vision transformer drop the class token and fold the patch tokens
    back onto their grid, so the transformer's maps are computed like a CNN's.
    """
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        grid = token_grid(t.shape[1])
        if grid is not None:
            prefix, side = grid
            return t[:, prefix:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
    raise ValueError(f"layer output of shape {tuple(t.shape)} has no spatial grid")


def _is_spatial(out: object) -> bool:
    if not isinstance(out, Tensor):
        return False
    if out.dim() == 4:
        return out.shape[2] * out.shape[3] > 1
    return out.dim() == 3 and token_grid(out.shape[1]) is not None


def find_layers(model: nn.Module, example: Tensor) -> LayerInfo:
    """Trace ``model`` on ``example`` ``(1, 3, H, W)`` and list the layers whose output is spatial.

    A TorchScript module has none: hooks cannot be put on it, so it can only predict."""
    if isinstance(model, torch.jit.ScriptModule):
        return LayerInfo(default="", candidates=())
    order: list[tuple[str, Tensor]] = []
    handles = []

    def record(name: str) -> object:
        def hook(module: nn.Module, args: object, out: object) -> None:
            if _is_spatial(out):
                assert isinstance(out, Tensor)
                order.append((name, out))

        return hook

    try:
        for name, module in model.named_modules():
            if name and not isinstance(module, _SKIP):
                handles.append(module.register_forward_hook(record(name)))
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()

    if not order:
        raise ValueError("the model has no layer with a spatial output to explain")
    names: list[str] = []
    channels: dict[str, int] = {}
    for name, out in order:
        if name not in names:
            names.append(name)
            channels[name] = int(as_spatial(out).shape[1])
    default = _vit_default(model) or _outermost_of_last(order)
    return LayerInfo(default=default, candidates=(default, *[n for n in names if n != default]), channels=channels)


def _outermost_of_last(order: list[tuple[str, Tensor]]) -> str:
    """Among the modules that returned the very last spatial tensor, the one with the shortest name."""
    last = order[-1][1]
    same = [name for name, out in order if out is last or (out.data_ptr() == last.data_ptr()
                                                           and out.shape == last.shape)]
    return min(same, key=lambda n: (n.count("."), len(n)))


def _vit_default(model: nn.Module) -> str | None:
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) and hasattr(layers[-1], "ln_1"):
        names = list(layers._modules)
        return f"encoder.layers.{names[-1]}.ln_1"
    return None
