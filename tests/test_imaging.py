"""Decoding: every supported kind of image becomes RGB; anything else is a clean domain error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import InvalidImage, PayloadTooLarge
from service.imaging import decode_image, encode_png

PIXELS = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PIXELS).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_encoded("PNG"), _encoded("JPEG"), _encoded("GIF"), _encoded("BMP")]


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_random_bytes_decode_or_fail_cleanly(data):
    try:
        out = decode_image(data, max_pixels=10**6)
    except (InvalidImage, PayloadTooLarge):
        return
    assert out.dtype == np.uint8
    assert out.ndim == 3
    assert out.shape[2] == 3


@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 600))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_headers_and_truncations_fail_cleanly(seed, flips, cut):
    data = bytearray(seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    data = bytes(data[: max(1, len(data) - cut)])
    try:
        out = decode_image(data, max_pixels=10**6)
    except (InvalidImage, PayloadTooLarge):
        return
    assert out.shape[2] == 3


def test_sixteen_bit_greyscale_keeps_its_range():
    grey = np.linspace(0, 65535, 32 * 8, dtype=np.uint16).reshape(8, 32)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), max_pixels=10**6)
    assert out[..., 0].min() == 0
    assert out[..., 0].max() == 255


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # black, fully transparent
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    assert (decode_image(buf.getvalue(), max_pixels=100) == 255).all()


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(PayloadTooLarge, match=r"32x24"):
        decode_image(_encoded("PNG"), max_pixels=100)


def test_png_round_trip():
    assert (decode_image(encode_png(PIXELS), max_pixels=10**6) == PIXELS).all()


@pytest.mark.parametrize(("values", "expected"), [(0.5, 128), (100.0, 100)])
def test_float_images_keep_their_scale(values, expected):
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), values, np.float32), mode="F").save(buf, format="TIFF")
    assert decode_image(buf.getvalue(), max_pixels=100)[0, 0, 0] == expected
