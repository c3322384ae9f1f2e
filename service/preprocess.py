"""Model input preparation on the model's device, and its inverse for heatmaps.

``Preprocess`` resizes (shorter side, an exact size, or to fit inside the input size with the aspect ratio
kept: a letterbox), center-crops or pads, and normalises a uint8 image tensor. ``Geometry`` remembers what that
did to one image so a heatmap computed on the model input can be laid back onto the original pixel grid, with
zero where the crop cut the image away and nothing of the padding a letterbox added.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Where a letterbox puts the resized image in the input: in the middle (YOLO's), or at the top-left corner
# with the padding below and to the right (torchvision's detectors, whose batching pads that way).
LETTERBOX = ("center", "top-left")


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from: original ``(H, W)``, resized ``(H, W)``, crop ``(top, left, h, w)``.

    The crop is the model input's window in the resized image's pixels. A window reaching outside the resized
    image (negative ``top``/``left``, or past its far edge) is padding: a center crop larger than the image, or
    a letterbox, whose window is the whole input with the image at ``(-top, -left)``."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]


@dataclass(frozen=True)
class Preprocess:
    """``resize``: shorter side (int) or exact ``(h, w)``; ``crop``: center crop ``(h, w)`` or None;
    ``interpolation``: the resize filter (``bilinear``, ``bicubic`` or ``nearest``); ``letterbox``: None, or
    where the image goes when it is resized to fit inside ``resize`` ``(h, w)`` with its aspect ratio kept
    (``center`` or ``top-left``); ``fill``: the RGB value of any padding, a letterbox's or a crop's larger than
    the image."""

    resize: int | tuple[int, int] | None = 256
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    letterbox: str | None = None
    fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.crop is None and not isinstance(self.resize, tuple):
            raise ValueError("preprocess needs `crop`, or `resize` as [height, width], so that every "
                             "image has the same input size")
        if self.letterbox is not None:
            if self.letterbox not in LETTERBOX:
                raise ValueError(f"`letterbox` must be one of {', '.join(LETTERBOX)} or false, got "
                                 f"{self.letterbox!r}")
            if self.crop is not None or not isinstance(self.resize, tuple):
                raise ValueError(f"`letterbox` fits the image inside `resize` as [height, width] and takes no crop, "
                                 f"got resize {self.resize!r} and crop {self.crop!r} (`letterbox = false` for a "
                                 "resize and crop)")
        if len(self.fill) != 3 or any(not 0 <= v <= 255 for v in self.fill):
            raise ValueError(f"`fill` must be 3 integers from 0 to 255, got {list(self.fill)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"`std` must be positive, got {list(self.std)}")

    @property
    def input_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        assert isinstance(self.resize, tuple)
        return self.resize

    def geometry(self, height: int, width: int) -> Geometry:
        if self.letterbox is not None:
            return self._letterbox(height, width)
        if isinstance(self.resize, tuple):
            rh, rw = self.resize
        elif self.resize is None:
            rh, rw = height, width
        else:
            # torchvision's rule for an int size: the shorter side becomes `resize`, ratio kept.
            short, long = sorted((height, width))
            other = int(self.resize * long / short)
            rh, rw = (self.resize, other) if height <= width else (other, self.resize)
        ch, cw = self.crop or (rh, rw)
        top, left = round((rh - ch) / 2), round((rw - cw) / 2)
        return Geometry((height, width), (rh, rw), (top, left, ch, cw))

    def _letterbox(self, height: int, width: int) -> Geometry:
        """The image scaled by one factor to fit inside the input, placed in it; the window is the whole input."""
        assert isinstance(self.resize, tuple)
        ih, iw = self.resize
        scale = min(ih / height, iw / width)
        # The side that fits exactly is the input's own; the other is rounded, and at least a pixel.
        rh, rw = min(ih, max(1, round(height * scale))), min(iw, max(1, round(width * scale)))
        top, left = ((ih - rh) // 2, (iw - rw) // 2) if self.letterbox == "center" else (0, 0)
        return Geometry((height, width), (rh, rw), (-top, -left, ih, iw))

    def resized_uint8(self, image: Tensor, geom: Geometry) -> Tensor:
        """``(H, W, 3)`` uint8 -> ``(3, h, w)`` uint8 model-input pixels (resized, cropped or padded)."""
        chw = image.permute(2, 0, 1)
        if geom.resized != geom.original:
            chw = TF.resize(chw, list(geom.resized), interpolation=InterpolationMode(self.interpolation),
                            antialias=True)
        top, left, ch, cw = geom.crop
        (rh, rw) = geom.resized
        if top >= 0 and left >= 0 and top + ch <= rh and left + cw <= rw:
            if (top, left) != (0, 0) or (ch, cw) != geom.resized:
                chw = TF.crop(chw, top, left, ch, cw)
            return chw
        # The window reaches past the image (a letterbox, a crop larger than the image): the overlap on `fill`.
        out = torch.empty((3, ch, cw), dtype=chw.dtype, device=chw.device)
        for c, v in enumerate(self.fill):
            out[c].fill_(v)  # a scalar per channel: no small tensor copied to the device
        y0, x0, y1, x1 = max(0, top), max(0, left), min(rh, top + ch), min(rw, left + cw)
        if y1 > y0 and x1 > x0:
            out[:, y0 - top : y1 - top, x0 - left : x1 - left] = chw[:, y0:y1, x0:x1]
        return out

    def normalize(self, pixels: Tensor) -> Tensor:
        """``(..., 3, h, w)`` uint8 -> float32 normalised, in the memory format of ``pixels``."""
        scale, shift = _affine(self.mean, self.std, pixels.device)
        # (x - mean) / std as one fused multiply-add, with constants made once per device: a lone resnet18
        # request spent 0.7 ms here, a third of it building the two small tensors.
        return torch.addcmul(shift, pixels.float(), scale)

    def denormalize(self, x: Tensor) -> Tensor:
        """``(..., 3, h, w)`` normalised float -> uint8 pixels (clipped), the inverse of :meth:`normalize`."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1) * 255
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1) * 255
        return (x.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, each ``(3, 1, 1)``, with ``x * scale + shift == (x - 255 mean) / (255 std)``."""
    m = torch.tensor(mean, dtype=torch.float64, device=device).view(3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float64, device=device).view(3, 1, 1) * 255
    return (1 / s).float(), (-m / s).float()


def _axis_weights(n_out: int, n_in: int, scale: float, offset: float, extent: float,
                  device: torch.device) -> Tensor:
    """``(n_out, n_in)`` bilinear weights along one axis.

    Output pixel ``i`` has its centre at ``(i + 0.5) * scale - offset`` in a span of length ``extent``
    covered by the ``n_in`` map cells (align_corners=False, border clamped, as ``F.interpolate``);
    centres outside the span get a zero row: that is the part the crop cut away.
    """
    # Built where it is used: no host-to-device copy for a new geometry.
    pos = (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * scale - offset  # in the span's pixels
    src = (pos / extent * n_in - 0.5).clamp(0, n_in - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    rows = torch.arange(n_out, device=device)
    w.index_put_((rows, lo), 1 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    inside = (pos >= 0) & (pos <= extent)
    return (w * inside[:, None]).float()


@functools.lru_cache(maxsize=256)
def resample_weights(geom: Geometry, feature: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(H, h)`` and ``(W, w)`` bilinear weights from a ``feature`` grid to ``geom.original``: the
    resampled map is ``wy @ map @ wx.T``, so a caller can compute it a band of rows at a time."""
    (oh, ow), (rh, rw), (top, left, ch, cw) = geom.original, geom.resized, geom.crop
    return (_axis_weights(oh, feature[0], rh / oh, top, ch, device),
            _axis_weights(ow, feature[1], rw / ow, left, cw, device))


def to_input_size(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(T, h, w)`` -> ``(T, H, W)`` bilinear, as ``F.interpolate(align_corners=False)``."""
    return to_original(maps, Geometry(size, size, (0, 0, *size)))


def to_original(maps: Tensor, geom: Geometry) -> Tensor:
    """``(T, h, w)`` maps over the model input -> ``(T, H, W)`` on the original image's pixel grid.

    Bilinear resampling is separable, so it is two small matrix products with weights that depend
    only on the geometry and are cached: each original pixel centre is carried through the resize and
    the crop into the map's coordinates, and pixels the crop removed get zero. Two matmuls instead of a
    dozen tensor ops keep the per-image cost low on CPU, and they run wherever ``maps`` lives.
    """
    wy, wx = resample_weights(geom, (maps.shape[1], maps.shape[2]), maps.device)
    return wy @ maps.float() @ wx.T
