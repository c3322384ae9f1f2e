"""Model input preparation on the model's device, and its inverse for heatmaps.

``Preprocess`` resizes (shorter side, or an exact size), center-crops and normalises a uint8 image
tensor. ``Geometry`` remembers what that did to one image so a heatmap computed on the model input
can be laid back onto the original pixel grid, with zero where the crop cut the image away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from: original ``(H, W)``, resized ``(H, W)``, crop ``(top, left, h, w)``."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]


@dataclass(frozen=True)
class Preprocess:
    """``resize``: shorter side (int) or exact ``(h, w)``; ``crop``: center crop ``(h, w)`` or None."""

    resize: int | tuple[int, int] | None = 256
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop is None and not isinstance(self.resize, tuple):
            raise ValueError("preprocess needs `crop`, or `resize` as [height, width], so that every "
                             "image has the same input size")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"`std` must be positive, got {list(self.std)}")

    @property
    def input_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        assert isinstance(self.resize, tuple)
        return self.resize

    def geometry(self, height: int, width: int) -> Geometry:
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

    def resized_uint8(self, image: Tensor, geom: Geometry) -> Tensor:
        """``(H, W, 3)`` uint8 -> ``(3, h, w)`` uint8 model-input pixels (resized and cropped)."""
        chw = image.permute(2, 0, 1)
        if geom.resized != geom.original:
            chw = TF.resize(chw, list(geom.resized), antialias=True)
        top, left, ch, cw = geom.crop
        if (top, left) != (0, 0) or (ch, cw) != geom.resized:
            # A crop larger than the image pads with zeros, as torchvision's center_crop does.
            chw = TF.crop(chw, top, left, ch, cw)
        return chw

    def normalize(self, pixels: Tensor) -> Tensor:
        """``(..., 3, h, w)`` uint8 -> float32 normalised."""
        mean = torch.tensor(self.mean, device=pixels.device).view(3, 1, 1) * 255
        std = torch.tensor(self.std, device=pixels.device).view(3, 1, 1) * 255
        return (pixels.float() - mean) / std


def to_input_size(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(T, h, w)`` -> ``(T, H, W)`` bilinear."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def to_original(maps: Tensor, geom: Geometry) -> Tensor:
    """``(T, h, w)`` maps over the model input -> ``(T, H, W)`` on the original image's pixel grid.

    One bilinear resample: each original pixel centre is carried through the resize and the crop
    into the map's coordinates; pixels the crop removed get zero.
    """
    (oh, ow), (rh, rw), (top, left, ch, cw) = geom.original, geom.resized, geom.crop
    dev = maps.device
    # Pixel centres of the original, in crop coordinates, then in grid_sample's [-1, 1] range.
    xs = ((torch.arange(ow, device=dev) + 0.5) * (rw / ow) - left) / cw * 2 - 1
    ys = ((torch.arange(oh, device=dev) + 0.5) * (rh / oh) - top) / ch * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    t = maps.shape[0]
    out = F.grid_sample(maps[:, None].float(), grid.expand(t, oh, ow, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)[:, 0]
    inside = (xs.abs() <= 1)[None, :] & (ys.abs() <= 1)[:, None]
    return out * inside
