"""Bytes to a validated RGB image, and heatmaps back to PNG bytes.

Decoding checks the pixel count from the header before any pixel is decoded, so a decompression
bomb costs a header read, not its full size in memory.
"""

from __future__ import annotations

import io
import struct
import zlib

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
    # A writable copy (torch refuses read-only arrays); an RGB image needs no convert, which copies too.
    return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_BAND_BYTES = 4 << 20


def encode_png(pixels: np.ndarray) -> bytes:
    """``(H, W)`` greyscale or ``(H, W, 3)`` RGB uint8 -> PNG bytes.

    Written here rather than by Pillow, whose encoder tries all five PNG filters on every row: on a
    12-megapixel overlay that was 8 of every 10 seconds of rendering. Every row gets the ``Sub``
    filter (each byte minus the one a pixel to its left, which suits smooth heatmaps and photos
    alike), computed in numpy, and zlib level 1 compresses the rows a band at a time, so the
    temporaries stay a few MB whatever the image size."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"encode_png takes (H, W) or (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else 3
    rows = pixels.reshape(height, width * channels)
    z = zlib.compressobj(1)
    parts = [b"\x89PNG\r\n\x1a\n",
             _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0))]
    idat = []
    step = max(1, _PNG_BAND_BYTES // max(1, width * channels))
    for top in range(0, height, step):
        band = rows[top:top + step]
        filtered = np.empty((band.shape[0], band.shape[1] + 1), dtype=np.uint8)
        filtered[:, 0] = 1  # filter type Sub
        filtered[:, 1:channels + 1] = band[:, :channels]
        np.subtract(band[:, channels:], band[:, :-channels], out=filtered[:, channels + 1:])  # wraps mod 256
        idat.append(z.compress(filtered.tobytes()))
    idat.append(z.flush())
    parts += [_chunk(b"IDAT", b"".join(idat)), _chunk(b"IEND", b"")]
    return b"".join(parts)
