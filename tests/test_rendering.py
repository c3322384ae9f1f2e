"""Rendering: banded uint8 output equal to the float maths, bounded memory, heavy renders on their own pool."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from service.cam import CamQuery
from service.colormaps import lookup_table
from service.errors import PayloadTooLarge
from service.imaging import encode_png
from service.pipeline import Pipeline
from service.preprocess import Preprocess
from service.rendering import HeatmapSpec, render, resample
from tests.api.models import tiny_model

PRE = Preprocess(resize=40, crop=(32, 32))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _maps(t: int = 3, h: int = 7, w: int = 5) -> torch.Tensor:
    maps = torch.rand(t, h, w, generator=torch.Generator().manual_seed(0))
    maps[-1] = 0  # an all-zero map stays zero
    return maps / maps.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)


def _float_reference(maps, spec, geom, image):
    """The maths the renderer must reproduce: float resample, peak 1, levels, colour, float blend."""
    levels = (resample(maps, spec.size, geom, PRE.input_size) * 255).round().long()
    if spec.output == "png":
        return levels.to(torch.uint8).numpy()
    colour = lookup_table(spec.colormap)[levels].float()
    return ((1 - spec.alpha) * image.float()[None] + spec.alpha * colour).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("output", ["png", "overlay"])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("band_pixels", [300, 1 << 20])  # many bands even on a small image; one band
def test_banded_render_matches_the_float_maths(monkeypatch, output, alpha, band_pixels):
    monkeypatch.setattr("service.rendering.BAND_PIXELS", band_pixels)
    geom = PRE.geometry(45, 61)
    image = torch.randint(0, 256, (45, 61, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    maps = _maps()
    spec = HeatmapSpec(output, "original", "turbo", alpha)  # type: ignore[arg-type]
    got = np.stack([_decode(h.data) for h in render(maps, spec, geom, PRE.input_size, image)])  # type: ignore[arg-type]
    want = _float_reference(maps, spec, geom, image)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float rounding at exact halves
    if output == "overlay" and alpha == 0.0:
        np.testing.assert_array_equal(got[0], image.numpy())
    if output == "png":
        assert got[0].max() == 255 and got[-1].max() == 0


def test_png_round_trips_grey_and_rgb():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 1, 3), (7, 5), (9, 4, 3), (300, 2000, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(_decode(encode_png(pixels)), pixels)


_MEMORY_PROBE = """
import resource, sys, torch
from service.preprocess import Preprocess
from service.rendering import HeatmapSpec, render
pre = Preprocess(resize=224, crop=(224, 224))
h, w = 1500, 2000
geom = pre.geometry(h, w)
image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)
maps = torch.rand(5, 7, 7)
render(maps[:1, :2, :2], HeatmapSpec("overlay", "original"), pre.geometry(8, 8), (224, 224),
       torch.zeros(8, 8, 3, dtype=torch.uint8))  # imports and caches warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = render(maps, HeatmapSpec("overlay", "original"), geom, (224, 224), image)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, sum(len(o.data) for o in out))
"""


@pytest.mark.slow
def test_five_overlays_of_a_large_image_take_a_bounded_working_set():
    # 5 targets at 2000x1500: the float pipeline took about 50 bytes per output pixel (750 MB);
    # banded uint8 rendering needs one 9 MB output buffer, one band, and the PNGs it returns.
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grew, png_bytes = map(int, done.stdout.split())
    assert grew < png_bytes + 120 * 2**20, (grew, png_bytes)


def _pipeline(render_pool=None) -> Pipeline:
    return Pipeline(tiny_model(), ThreadPoolExecutor(1, thread_name_prefix="cpu"), render_pool)


def test_heavy_requests_render_on_the_render_pool():
    names: list[str] = []
    pipeline = _pipeline(ThreadPoolExecutor(1, thread_name_prefix="render"))
    finish = pipeline.finish

    def record(*args, **kwargs):
        names.append(threading.current_thread().name)
        return finish(*args, **kwargs)

    pipeline.finish = record  # type: ignore[method-assign]
    big = encode_png(np.zeros((1200, 1800, 3), np.uint8))  # 2.16 M pixels x 2 targets: heavy
    small = encode_png(np.zeros((40, 60, 3), np.uint8))
    spec = HeatmapSpec("png", "original")
    asyncio.run(pipeline.run([big], top_k=1, query=CamQuery(classes=(0, 1)), spec=spec, max_pixels=10**8))
    asyncio.run(pipeline.run([small], top_k=1, query=CamQuery(classes=(0, 1)), spec=spec, max_pixels=10**8))
    # The small one is finished inline or in the CPU pool, never behind the heavy renders.
    assert names[0].startswith("render") and not names[1].startswith("render"), names


@pytest.mark.parametrize("size", ["original", "input"])
def test_render_pixels_are_bounded_at_every_size(size):
    pipeline = _pipeline()
    image = encode_png(np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(PayloadTooLarge, match="heatmap pixels"):
        asyncio.run(pipeline.run([image] * 3, top_k=1, query=CamQuery(classes=(0, 1)), spec=HeatmapSpec("png", size),
                                 max_pixels=10**8, max_render_pixels=5000))
