"""CAM maps to what a client asked for: a greyscale PNG, a colour overlay, or a float array.

Resampling and colouring run on the maps' device; only the final uint8 pixels (or the requested
floats) are copied to the host, then PNG-encoded there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from service.cam.engine import normalize_by_peak
from service.colormaps import check_colormap, lookup_table
from service.errors import InvalidArgument, PayloadTooLarge
from service.imaging import encode_png
from service.preprocess import Geometry, to_input_size, to_original

Output = Literal["png", "overlay", "array"]
Size = Literal["original", "input", "feature"]
OUTPUTS: tuple[str, ...] = get_args(Output)
# An array heatmap is JSON text, about 7 bytes a pixel: a 40-megapixel upload would be a 300 MB answer.
MAX_ARRAY_PIXELS = 1 << 20
SIZES: tuple[str, ...] = get_args(Size)


@dataclass(frozen=True)
class HeatmapSpec:
    output: Output = "png"
    size: Size = "original"
    colormap: str = "jet"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise InvalidArgument("output", f"`output` must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.size not in SIZES:
            raise InvalidArgument("size", f"`size` must be one of {', '.join(SIZES)}, got {self.size!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidArgument("alpha", f"`alpha` must be between 0 and 1, got {self.alpha}")
        if self.output == "overlay" and self.size == "feature":
            raise InvalidArgument("size", "`output=overlay` needs `size` original or input, got 'feature'")
        check_colormap(self.colormap)


@dataclass(frozen=True)
class Heatmap:
    """``data``: PNG bytes for png/overlay; for array, a ``(height, width)`` float32 array in [0, 1].
    How either travels (base64, nested lists, binary tensors) is the front-end's business."""

    format: Output
    width: int
    height: int
    data: bytes | np.ndarray


def _png(fmt: Output, pixels: np.ndarray) -> Heatmap:
    return Heatmap(fmt, pixels.shape[1], pixels.shape[0], encode_png(pixels))


def resample(maps: Tensor, size: Size, geom: Geometry, input_size: tuple[int, int]) -> Tensor:
    """``(T, h, w)`` feature maps -> ``(T, H, W)`` at the requested size, peak 1 per non-empty map."""
    if size == "feature":
        return maps
    # Resampling lowers the peak a little; rescale so it is exactly 1 again.
    sized = to_input_size(maps, input_size) if size == "input" else to_original(maps, geom)
    return normalize_by_peak(sized.clamp(0, 1))[0]


def render(maps: Tensor, spec: HeatmapSpec, geom: Geometry, input_size: tuple[int, int],
           image: Tensor | None = None) -> list[Heatmap]:
    """Render ``(T, h, w)`` maps. ``image`` is needed for overlays: ``(H, W, 3)`` uint8 pixels at the
    requested size (the original upload, or the model-input pixels), on the maps' device."""
    h, w = {"original": geom.original, "input": input_size}.get(spec.size, tuple(maps.shape[1:]))
    if spec.output == "array" and h * w > MAX_ARRAY_PIXELS:  # checked before resampling to that size
        raise PayloadTooLarge(f"an array heatmap of {w}x{h} is over {MAX_ARRAY_PIXELS} values; ask for "
                              "`size=input` or `size=feature`, or for a png")
    sized = resample(maps.float(), spec.size, geom, input_size)
    t = sized.shape[0]
    if spec.output == "array":
        host = sized.cpu().numpy()
        return [Heatmap("array", w, h, host[i]) for i in range(t)]
    levels = (sized * 255).round().to(torch.uint8)
    if spec.output == "png":
        host = levels.cpu().numpy()
        return [_png("png", host[i]) for i in range(t)]
    if image is None or tuple(image.shape[:2]) != (h, w):
        raise ValueError("overlay needs the image at the heatmap's size")
    colour = lookup_table(spec.colormap, sized.device)[levels.long()].float()  # (T, H, W, 3)
    blended = (1 - spec.alpha) * image.float()[None] + spec.alpha * colour
    host = blended.round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return [_png("overlay", host[i]) for i in range(t)]
