"""Bytes to a validated RGB image, and heatmaps back to PNG bytes.

Decoding checks the pixel count from the header before any pixel is decoded, so a decompression
bomb costs a header read, not its full size in memory.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidImage, PayloadTooLarge

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# High-bit-depth modes that ``Image.convert("RGB")`` would clip instead of rescale.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an encoded image into ``(H, W, 3)`` uint8 RGB, EXIF orientation applied.

    Raises :class:`InvalidImage` for anything that is not a complete image in a supported format
    and :class:`PayloadTooLarge` when its header announces more than ``max_pixels`` pixels.
    """
    return load_rgb(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read and check only the header (cheap: no pixel is decoded); :func:`load_rgb` decodes."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image is too large: {exc}") from None
    except Exception as exc:  # PIL's plugins raise many types on hostile headers (struct.error, IndexError...)
        raise InvalidImage(f"cannot read the image header: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    if w == 0 or h == 0:
        raise InvalidImage(f"image has no pixels ({w}x{h})")
    return im


def load_rgb(im: Image.Image) -> np.ndarray:
    """Decode an image opened by :func:`open_image` into ``(H, W, 3)`` uint8 RGB."""
    try:
        im.seek(0)  # GIF, TIFF, MPO: the first frame
        im.load()
        return _to_rgb(ImageOps.exif_transpose(im) or im)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image is too large: {exc}") from None
    except Exception as exc:  # as above: any failure to decode untrusted bytes is the client's bad image
        raise InvalidImage(f"the image data is corrupt or truncated: {exc}") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in _WIDE_MODES:
        arr = np.asarray(im, dtype=np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        if im.mode == "F":  # floats: either 0..1 or 0..255 by convention; the data says which
            top = 1.0 if peak <= 1.0 else 255.0
        else:  # 32-bit ints hold 16-bit data (PNG) or 8-bit data; the data says which
            top = _WIDE_MODES[im.mode] if im.mode != "I" or peak > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels often hold black; white is what a viewer shows behind them.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        im = canvas
    return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy: torch refuses read-only arrays


def encode_png(pixels: np.ndarray) -> bytes:
    """``(H, W)`` greyscale or ``(H, W, 3)`` RGB uint8 -> PNG bytes."""
    buf = io.BytesIO()
    # Level 1: heatmaps are smooth, so the size barely changes and encoding is several times faster.
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
