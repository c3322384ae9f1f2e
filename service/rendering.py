"""CAM maps to what a client asked for: a greyscale PNG, a colour overlay, or a float array.

PNG and overlay outputs are rendered one target at a time, in bands of rows, straight into one uint8
buffer of the output size: a 4000x3000 upload explained for five targets once made five float copies
of the whole image (and int64 colour indices), gigabytes per request. Now the working set is the
output buffer (1 or 3 bytes a pixel) plus a band of about a million pixels, whatever the image size;
what stays behind per target is its PNG. Levels are uint8, and the overlay is one gather from a
table of every (level, channel, pixel) blend. These run on the host in numpy, single-threaded: only
the small maps (and the image, band by band) leave the device, and no intra-op thread pool competes
with the model thread.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from service.cam.engine import normalize_by_peak
from service.colormaps import check_colormap, lookup_table
from service.errors import InvalidArgument, PayloadTooLarge
from service.imaging import encode_png
from service.preprocess import Geometry, resample_weights, to_input_size, to_original

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


# Output pixels per band: bounds the temporaries of one render (a few tens of MB) at any image size.
BAND_PIXELS = 1 << 20


def _png(fmt: Output, pixels: np.ndarray) -> Heatmap:
    return Heatmap(fmt, pixels.shape[1], pixels.shape[0], encode_png(pixels))


def resample(maps: Tensor, size: Size, geom: Geometry, input_size: tuple[int, int]) -> Tensor:
    """``(T, h, w)`` feature maps -> ``(T, H, W)`` float at the requested size, peak 1 per non-empty map.

    Materialises every map at full size: for arrays, which are small (``MAX_ARRAY_PIXELS``)."""
    if size == "feature":
        return maps
    # Resampling lowers the peak a little; rescale so it is exactly 1 again.
    sized = to_input_size(maps, input_size) if size == "input" else to_original(maps, geom)
    return normalize_by_peak(sized.clamp(0, 1))[0]


Taps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _two_taps(weights: Tensor) -> Taps:
    """Bilinear weights ``(n_out, n_in)`` hold at most two non-zeros a row: their columns and values."""
    w = weights.cpu().numpy()
    cols = np.argsort(-w, axis=1, kind="stable")[:, :2] if w.shape[1] > 1 else np.zeros((len(w), 2), np.int64)
    vals = np.take_along_axis(w, cols, axis=1) if w.shape[1] > 1 else np.concatenate([w, 0 * w], axis=1)
    return cols[:, 0], cols[:, 1], vals[:, 0].astype(np.float32), vals[:, 1].astype(np.float32)


@functools.lru_cache(maxsize=64)
def _host_taps(geom: Geometry, feature: tuple[int, int]) -> tuple[Taps, Taps]:
    """The two taps a row of ``wy`` and of ``wx``, as read-only host arrays, for one geometry.

    Cached because a service sees few image sizes, and deriving them (an argsort over each weight
    matrix) cost as much as the rest of rendering a small heatmap."""
    wy, wx = resample_weights(geom, feature, torch.device("cpu"))
    out = _two_taps(wy), _two_taps(wx)
    for a in (*out[0], *out[1]):
        a.flags.writeable = False
    return out


class _Levels:
    """One ``(h, w)`` map as uint8 levels at the output size, produced a band of rows at a time, on the host.

    The resampled map is ``wy @ map @ wx.T``. Each output column of ``map @ wx.T`` (only ``h`` rows)
    mixes at most two of the map's columns, and each output row of the band at most two of those rows,
    so both products are two scaled gathers (no BLAS, whose spinning threads fight the model thread
    for the cores). The peak comes from a first pass over the bands, so the
    full-size float map is never held."""

    def __init__(self, cam: Tensor, spec: HeatmapSpec, geom: Geometry, input_size: tuple[int, int]) -> None:
        host = cam.detach().float().cpu()
        if spec.size == "feature":
            self.height, self.width = host.shape
            self._cols = host.numpy()
            self._taps = (np.arange(self.height), np.arange(self.height),
                          np.ones(self.height, np.float32), np.zeros(self.height, np.float32))
        else:
            g = Geometry(input_size, input_size, (0, 0, *input_size)) if spec.size == "input" else geom
            self._taps, (a, b, wa, wb) = _host_taps(g, (host.shape[0], host.shape[1]))
            self.height, self.width = g.original
            m = host.numpy()
            self._cols = m[:, a] * wa  # (h, W)
            self._cols += m[:, b] * wb
        self.rows = max(1, BAND_PIXELS // max(1, self.width))
        bands = self.bands()
        # A map that fits in one band (most do) keeps its float band for `band`, not computing it twice.
        self._whole = self._float_band(*bands[0]) if len(bands) == 1 else None
        if self._whole is not None:
            peak = float(self._whole.max()) if self._whole.size else 0.0
        else:
            peak = max((float(self._float_band(t, b).max()) for t, b in bands), default=0.0)
        self._scale = 255.0 / peak if peak > 0 else 0.0  # an all-zero map stays zero

    def bands(self) -> list[tuple[int, int]]:
        return [(r, min(r + self.rows, self.height)) for r in range(0, self.height, self.rows)]

    def _float_band(self, top: int, bottom: int) -> np.ndarray:
        a, b, wa, wb = (t[top:bottom] for t in self._taps)
        band: np.ndarray = self._cols[a] * wa[:, None]
        band += self._cols[b] * wb[:, None]
        np.clip(band, 0.0, 1.0, out=band)
        return band

    def band(self, top: int, bottom: int) -> np.ndarray:
        """``(bottom - top, W)`` uint8 levels."""
        if self._whole is not None and (top, bottom) == (0, self.height):
            band, self._whole = self._whole, None  # scaled in place below, so used once
        else:
            band = self._float_band(top, bottom)
        band *= self._scale
        np.rint(band, out=band)
        return band.astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _blend_table(colormap: str, alpha: float) -> np.ndarray:
    """``table[level * 768 + channel * 256 + pixel]``: the overlay value of ``pixel`` under heat
    ``level``, rounded once from the exact float blend. 196 kB; makes the blend one gather."""
    lut = lookup_table(colormap).numpy().astype(np.float64)  # (256, 3)
    pixel = np.arange(256, dtype=np.float64)
    table = (1 - alpha) * pixel[None, None, :] + alpha * lut[:, :, None]  # (level, channel, pixel)
    return np.clip(np.rint(table), 0, 255).astype(np.uint8).ravel()


_CHANNEL = np.array([0, 256, 512], dtype=np.int32)


def _overlay(levels: _Levels, image: Tensor, spec: HeatmapSpec, out: np.ndarray) -> None:
    table = _blend_table(spec.colormap, spec.alpha)
    on_host = image.device.type == "cpu"
    pixels = image.numpy() if on_host else None
    for top, bottom in levels.bands():
        band = pixels[top:bottom] if pixels is not None else image[top:bottom].cpu().numpy()
        index = (levels.band(top, bottom).astype(np.int32) * 768)[..., None] + _CHANNEL
        index += band
        np.take(table, index, out=out[top:bottom])


# What an overlay draws over a detection's or a segment's map: a colour no colormap's blend reaches
# at full strength (the blend keeps part of the image), so the drawing stays legible over any heat.
MARK_COLOUR = (255, 0, 255)


@dataclass(frozen=True)
class Marks:
    """What one target explained, in the output image's pixels: a detection's ``box`` ``(x0, y0, x1, y1)``
    with its ``label``, or a region's ``outline`` (``(H, W)`` bool, the region's boundary pixels)."""

    box: tuple[float, float, float, float] | None = None
    label: str | None = None
    outline: np.ndarray | None = None


def outline(region: np.ndarray) -> np.ndarray:
    """The boundary pixels of a bool region: in it, with a 4-neighbour outside it (or off the image)."""
    padded = np.pad(region, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge: np.ndarray = region & ~inner
    return edge


def _draw(out: np.ndarray, marks: Marks) -> None:
    """Draw ``marks`` into the overlay ``out`` ``(H, W, 3)`` in place."""
    if marks.outline is not None:
        out[marks.outline] = MARK_COLOUR
    if marks.box is None:
        return
    h, w = out.shape[:2]
    x0, y0, x1, y1 = marks.box
    # Pixel edges of the box, clipped to the image; a box is at least one pixel wide.
    left, top = min(max(int(np.floor(x0)), 0), w - 1), min(max(int(np.floor(y0)), 0), h - 1)
    right, bottom = min(max(int(np.ceil(x1)) - 1, left), w - 1), min(max(int(np.ceil(y1)) - 1, top), h - 1)
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: the label is drawn in the mark's colour only
    if marks.label and min(h, w) >= 128:  # on a small map the text would hide what it names
        # Above the box when there is room, else just inside it; drawn first so the box's edges stay whole.
        bbox = draw.textbbox((0, 0), marks.label)
        th = bbox[3] - bbox[1] + 2
        tx, ty = left + 1, top - th if top >= th else top + 2
        bbox = draw.textbbox((tx, ty), marks.label)
        draw.rectangle(bbox, fill=(0, 0, 0))
        draw.text((tx, ty), marks.label, fill=MARK_COLOUR)
    draw.rectangle((left, top, right, bottom), outline=MARK_COLOUR, width=1 if min(h, w) < 128 else 2)
    out[...] = np.asarray(image)


def output_size(spec: HeatmapSpec, geom: Geometry, input_size: tuple[int, int],
                feature: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of the heatmaps for this image; ``feature`` is the layer's grid when known."""
    if spec.size == "original":
        return geom.original
    if spec.size == "input":
        return input_size
    return feature or (0, 0)


def render(maps: Tensor, spec: HeatmapSpec, geom: Geometry, input_size: tuple[int, int],
           image: Tensor | None = None, marks: Sequence[Marks | None] | None = None) -> list[Heatmap]:
    """Render ``(T, h, w)`` maps. ``image`` is needed for overlays: ``(H, W, 3)`` uint8 pixels at the
    requested size (the original upload, or the model-input pixels), on the maps' device. ``marks``: per
    target, what to draw over its overlay (a box, an outline); png and array maps are data and stay bare."""
    h, w = output_size(spec, geom, input_size, (int(maps.shape[1]), int(maps.shape[2])))
    if spec.output == "array":
        if h * w > MAX_ARRAY_PIXELS:  # checked before resampling to that size
            raise PayloadTooLarge(f"an array heatmap of {w}x{h} is over {MAX_ARRAY_PIXELS} values; ask for "
                                  "`size=input` or `size=feature`, or for a png")
        host = resample(maps.float(), spec.size, geom, input_size).cpu().numpy()
        return [Heatmap("array", w, h, host[i]) for i in range(maps.shape[0])]
    if spec.output == "overlay" and (image is None or tuple(image.shape[:2]) != (h, w)):
        raise ValueError("overlay needs the image at the heatmap's size")
    # One host buffer, reused by every target: each is encoded before the next is drawn into it.
    out = np.empty((h, w, 3) if spec.output == "overlay" else (h, w), dtype=np.uint8)
    heatmaps = []
    for t, cam in enumerate(maps):
        levels = _Levels(cam, spec, geom, input_size)
        if spec.output == "overlay":
            assert image is not None
            _overlay(levels, image, spec, out)
            drawn = marks[t] if marks is not None else None
            if drawn is not None:
                _draw(out, drawn)
        else:
            for top, bottom in levels.bands():
                out[top:bottom] = levels.band(top, bottom)
        heatmaps.append(_png(spec.output, out))
    return heatmaps
