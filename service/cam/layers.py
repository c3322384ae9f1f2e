"""Where to look: the default target layer, the candidates a user may name, and how each one is laid out.

Found by tracing one forward pass of two images of one size rather than by a table of architectures, so
any CNN gets a sensible default: the outermost module that produces the last spatial feature map (resnet
``layer4``, densenet/vgg/mobilenet/efficientnet/convnext ``features``). torchvision vision transformers
are special: after the last block only the class token reaches the head, so the gradient on the patch
tokens there is zero; the input norm of the last block is used instead.

Each layer's layout is decided once, at that trace, and stored with the layer (:class:`Layout`); every
use goes through :func:`to_nchw`. The layouts: ``nchw`` (convolutions), ``nhwc`` (Swin stages, ConvNeXt's
inner MLP), ``tokens`` ``(N, prefix + h*w, C)`` (ViT, DeiT with its distillation token, register tokens)
and ``lnd`` ``(prefix + h*w, N, C)`` (OpenAI CLIP). The batch axis is the one of size two; the grid is
the pair of axes whose sizes fit the input's height and width at one stride. Where a 4-D shape fits both
``nchw`` and ``nhwc`` (a ``(N, 32, 32, 32)`` output) the module decides: a convolution, batch norm or
pooling is ``nchw``; an element-wise module keeps its input's layout; a container keeps the layout of the
child that produced its output; a model's configured ``layout`` settles the rest. A layer whose layout
stays unknown is not a candidate.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from service.errors import InvalidArgument

if TYPE_CHECKING:
    from service.cam.runtime import Runtime

log = logging.getLogger("camserve.layers")

LAYOUTS = ("nchw", "nhwc", "tokens", "lnd")
# Adaptive pools only resample the map they receive; the map before them is the one to explain.
_SKIP = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.Identity,
         nn.Dropout)
# Modules whose 4-D output is channels-first by definition.
_CHANNELS_FIRST = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.MaxPool2d,
                   nn.AvgPool2d, nn.LocalResponseNorm, nn.Upsample, nn.PixelShuffle)
# Modules that act on the last dimension: on a 4-D tensor that dimension is the channels.
_CHANNELS_LAST = (nn.LayerNorm, nn.Linear)
# Tokens before the patch grid: a class token, a distillation token, register tokens.
_MAX_PREFIX = 8
# Patch sizes a token grid may have: any integer stride would fit almost any token count.
_MAX_PATCH = 64


@dataclass(frozen=True)
class Layout:
    """How one layer's output maps onto an image grid: ``kind`` (one of :data:`LAYOUTS`), the ``(h, w)``
    grid, the ``channels`` per cell and, for token layouts, the ``prefix`` tokens before the grid."""

    kind: str
    grid: tuple[int, int]
    channels: int
    prefix: int = 0

    def describe(self) -> dict[str, object]:
        return {"layout": self.kind, "grid": list(self.grid), "channels": self.channels, "prefix": self.prefix}


def to_nchw(t: Tensor, layout: Layout) -> Tensor:
    """``t``: one layer's output, with any leading dimensions before it -> ``(..., N, C, h, w)``, a view."""
    if layout.kind == "nchw":
        return t
    if layout.kind == "nhwc":
        return t.movedim(-1, -3)
    if layout.kind == "lnd":
        t = t.transpose(-3, -2)
    h, w = layout.grid
    if t.shape[-2] - layout.prefix != h * w:
        raise InvalidArgument("layer", f"a layer traced with {layout.prefix} + {h}x{w} tokens returned "
                              f"{t.shape[-2]} tokens; serve the model at the input size it was traced at")
    grid = t[..., layout.prefix:, :]
    return grid.reshape(*grid.shape[:-2], h, w, grid.shape[-1]).movedim(-1, -3)


def from_nchw(a: Tensor, layout: Layout) -> Tensor | None:
    """The inverse of :func:`to_nchw` on ``(N, C, h, w)``, or ``None`` where it cannot be undone (the
    prefix tokens of a token layout are not in the map)."""
    if layout.kind == "nchw":
        return a
    if layout.kind == "nhwc":
        return a.movedim(-3, -1)
    return None


@dataclass(frozen=True)
class LayerInfo:
    """The layers of a model that CAM can target, default first, with their layouts."""

    default: str
    candidates: tuple[str, ...]
    layouts: Mapping[str, Layout] = field(default_factory=dict, compare=False)
    # Other names of candidates: an exported graph's tensors under the PyTorch module path that produced them.
    aliases: Mapping[str, str] = field(default_factory=dict, compare=False)

    @functools.cached_property
    def channels(self) -> dict[str, int]:
        """Layer -> channels of its map (read per request, so computed once)."""
        return {name: lay.channels for name, lay in self.layouts.items()}

    def layout(self, name: str) -> Layout:
        return self.layouts[name]

    def with_default(self, name: str) -> LayerInfo:
        return LayerInfo(default=name, candidates=(name, *[c for c in self.candidates if c != name]),
                         layouts=self.layouts, aliases=self.aliases)

    def describe(self) -> list[dict[str, object]]:
        """One entry per candidate, default first: its name, layout, grid, channels and other names."""
        other: dict[str, list[str]] = {}
        for alias, name in self.aliases.items():
            other.setdefault(name, []).append(alias)
        return [{"name": name, **self.layouts[name].describe(), "aliases": other.get(name, [])}
                for name in self.candidates]

    def resolve(self, name: str | None) -> str:
        if not self.candidates:
            raise InvalidArgument("layer", "this model cannot be explained: no layer output can be reached "
                                  "(TorchScript runs no Python forward hooks); serve it from a python:, torchvision:, "
                                  "timm: or onnx: source to use /explain")
        if name is None:
            return self.default
        if name in self.candidates:
            return name
        if name in self.aliases:
            return self.aliases[name]
        shown = ", ".join(self.candidates[:25])
        more = f" (and {len(self.candidates) - 25} more)" if len(self.candidates) > 25 else ""
        raise InvalidArgument("layer", f"`layer` must name a spatial layer of the model, got {name!r}; "
                              f"valid layers: {shown}{more}")


def _fits(a: int, b: int, height: int, width: int) -> bool:
    """Whether an ``(a, b)`` grid is the input ``(height, width)`` at one stride, give or take a cell of
    rounding on each axis (valid convolutions, ceil-mode pools)."""
    if a * b <= 1 or a > height or b > width:
        return False

    def strides(n: int, size: int) -> tuple[float, float]:  # the strides that put n +- 1 cells on size pixels
        return size / (n + 1), (size / (n - 1) if n > 1 else math.inf)

    lo_a, hi_a = strides(a, height)
    lo_b, hi_b = strides(b, width)
    return max(lo_a, lo_b) <= min(hi_a, hi_b)


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int, int] | None:
    """``(prefix, h, w)``: the fewest extra tokens that leave a patch grid of the input's shape, exactly
    the input size over one patch size (2 to 64), rounded down on both axes or up on both."""
    for prefix in range(_MAX_PREFIX + 1):
        cells = n_tokens - prefix
        if cells < 4:
            return None
        for stride in range(2, min(max(height, width), _MAX_PATCH) + 1):
            for h, w in ((height // stride, width // stride), (-(-height // stride), -(-width // stride))):
                if h * w == cells and h > 1 and w > 1:
                    return prefix, h, w
    return None


def _tokens(out: Tensor, kind: str, batch: int, size: tuple[int, int]) -> Layout | None:
    """A 3-D ``out`` read as ``tokens`` ``(N, L, C)`` or ``lnd`` ``(L, N, C)``, if a patch grid fits."""
    shape = tuple(out.shape)
    if len(shape) != 3 or shape[0 if kind == "tokens" else 1] != batch:
        return None
    grid = token_grid(shape[1] if kind == "tokens" else shape[0], *size) if shape[2] > 1 else None
    return Layout(kind, (grid[1], grid[2]), shape[2], grid[0]) if grid is not None else None


def _by_shape(out: Tensor, batch: int, size: tuple[int, int]) -> list[Layout]:
    """Every layout the output's shape allows."""
    shape = tuple(out.shape)
    found = []
    if len(shape) == 4 and shape[0] == batch:
        if _fits(shape[2], shape[3], *size):
            found.append(Layout("nchw", (shape[2], shape[3]), shape[1]))
        if _fits(shape[1], shape[2], *size):
            found.append(Layout("nhwc", (shape[1], shape[2]), shape[3]))
    elif len(shape) == 3:
        for kind in ("tokens", "lnd"):
            lay = _tokens(out, kind, batch, size)
            if lay is not None:
                found.append(lay)
    return found


def _decide(module: nn.Module, out: Tensor, first_input: object, known: Mapping[int, Layout], batch: int,
            size: tuple[int, int], override: str | None) -> Layout | None:
    options = _by_shape(out, batch, size)
    if len(options) <= 1:
        return options[0] if options else None
    kinds = {lay.kind: lay for lay in options}
    if id(out) in known and known[id(out)].kind in kinds:  # a container returning its child's output
        return kinds[known[id(out)].kind]
    if isinstance(module, _CHANNELS_FIRST):
        return kinds.get("nchw")
    # Exact types: a subclass may move the axes first (timm's LayerNorm2d normalises NCHW channels).
    if type(module) in _CHANNELS_LAST:
        return kinds.get("nhwc")
    if isinstance(first_input, Tensor) and first_input.shape == out.shape and id(first_input) in known:
        return kinds.get(known[id(first_input)].kind)  # element-wise: activations, residual blocks
    return kinds.get(override) if override is not None else None


def _trace(model: nn.Module, x: Tensor, layout: str | None
           ) -> tuple[list[tuple[str, Tensor]], list[str], dict[int, Layout]]:
    """One forward of ``x``: the spatial outputs in call order, the layers of unknown layout, the layouts
    by tensor."""
    batch = int(x.shape[0])
    size = (int(x.shape[2]), int(x.shape[3]))
    known: dict[int, Layout] = {id(x): Layout("nchw", size, int(x.shape[1]))}
    order: list[tuple[str, Tensor]] = []
    unknown: list[str] = []
    handles = []

    def record(name: str) -> object:
        def hook(module: nn.Module, args: tuple[object, ...], out: object) -> None:
            if not isinstance(out, Tensor) or out.dim() not in (3, 4):
                return
            lay = _decide(module, out, args[0] if args else None, known, batch, size, layout)
            if lay is None:
                if _by_shape(out, batch, size):
                    unknown.append(name)
                return
            known[id(out)] = lay
            order.append((name, out))

        return hook

    try:
        for name, module in model.named_modules():
            if name and not isinstance(module, _SKIP):
                handles.append(module.register_forward_hook(record(name)))
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order, unknown, known


def find_layers(model: nn.Module, example: Tensor, layout: str | None = None) -> LayerInfo:
    """Trace ``model`` on two copies of ``example`` ``(1, 3, H, W)`` and list the layers whose output is
    spatial, each with its :class:`Layout`; ``layout`` decides the outputs whose shape fits more than one
    layout and whose module does not settle it.

    A TorchScript module has none: hooks cannot be put on it, so it can only predict."""
    if isinstance(model, torch.jit.ScriptModule):
        return LayerInfo(default="", candidates=())
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    # Two images make the batch axis the one of size two (CLIP's sequence-first outputs have it second). A
    # model that only runs one image at a time is traced on one.
    try:
        order, unknown, known = _trace(model, example[:1].expand(2, *example.shape[1:]).contiguous(), layout)
    except Exception as exc:
        try:
            order, unknown, known = _trace(model, example[:1], layout)
        except Exception:
            raise exc from None
        log.info("the model fails on a batch of two images (%s); its layers were traced on one", exc)
    if unknown:
        log.info("%d layers have a shape that fits more than one layout and are not listed (set `layout` to "
                 "choose): %s", len(unknown), ", ".join(unknown[:10]))
    if not order:
        raise ValueError("the model has no layer with a spatial output to explain")
    # A module called more than once per forward (a head shared by feature-pyramid levels) has no one map.
    calls = Counter(name for name, _ in order)
    repeated = sorted(name for name, n in calls.items() if n > 1)
    if repeated:
        log.info("%d layers run more than once per forward and are not listed: %s", len(repeated),
                 ", ".join(repeated[:10]))
        order = [(name, out) for name, out in order if calls[name] == 1]
        if not order:
            raise ValueError("the model has no layer with a spatial output that runs once per forward")
    names: list[str] = []
    layouts: dict[str, Layout] = {}
    for name, out in order:
        names.append(name)
        layouts[name] = known[id(out)]
    default = _vit_default(model, layouts) or _outermost_of_last(order)
    return LayerInfo(default=default, candidates=(default, *[n for n in names if n != default]), layouts=layouts)


def find_runtime_layers(runtime: Runtime, example: Tensor, layout: str | None = None) -> LayerInfo:
    """:func:`find_layers` for a model run by a :class:`~service.cam.runtime.Runtime`: its intermediate outputs
    on two copies of ``example``, each laid out by its shape, or where that fits two layouts by the runtime's
    hint, else by ``layout``; the last spatial one is the default."""
    x = example[:1].expand(2, *example.shape[1:]).contiguous()
    size = (int(x.shape[2]), int(x.shape[3]))
    names = list(runtime.outputs())
    _, outs = runtime.run(x, names)
    hints = runtime.layout_hints()
    layouts: dict[str, Layout] = {}
    for name, out in zip(names, outs, strict=True):
        options = {lay.kind: lay for lay in _by_shape(out, 2, size)}
        if len(options) == 1:
            layouts[name] = next(iter(options.values()))
        elif hints.get(name) in options:
            layouts[name] = options[hints[name]]
        elif layout in options:
            layouts[name] = options[layout]
    if not layouts:
        return LayerInfo(default="", candidates=())
    ordered = list(layouts)
    aliases = {alias: name for alias, name in runtime.aliases().items() if name in layouts}
    return LayerInfo(default=ordered[-1], candidates=(ordered[-1], *ordered[:-1]), layouts=layouts, aliases=aliases)


def _outermost_of_last(order: list[tuple[str, Tensor]]) -> str:
    """Among the modules that returned the very last spatial tensor, the one with the shortest name."""
    last = order[-1][1]
    same = [name for name, out in order if out is last or (out.data_ptr() == last.data_ptr()
                                                           and out.shape == last.shape)]
    return min(same, key=lambda n: (n.count("."), len(n)))


def _vit_default(model: nn.Module, layouts: Mapping[str, Layout]) -> str | None:
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) and hasattr(layers[-1], "ln_1"):
        names = list(layers._modules)
        name = f"encoder.layers.{names[-1]}.ln_1"
        return name if name in layouts else None
    return None
