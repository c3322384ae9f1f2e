"""Letterbox preprocessing (fit inside the input with the aspect ratio kept, pad the rest) and every way back
to the upload's pixels: boxes, masks and heatmaps, checked against maths written out here independently."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from service.preprocess import Geometry, Preprocess, to_input_size, to_original
from service.task_results import _mask_to_original, box_to_input, box_to_original, mask_to_input

UPLOAD = (200, 300)  # height, width: 2:3
INPUT = (320, 320)


def _pre(where: str, fill: tuple[int, int, int] = (124, 116, 104)) -> Preprocess:
    return Preprocess(resize=INPUT, crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), letterbox=where,
                      fill=fill)


def _image(shape: tuple[int, int] = UPLOAD, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


@pytest.mark.parametrize(("where", "pad"), [("center", (53, 0)), ("top-left", (0, 0))])
def test_the_image_fits_inside_with_its_ratio_and_the_rest_is_fill(where, pad):
    pre = _pre(where)
    geom = pre.geometry(*UPLOAD)
    # 300 wide fits 320 exactly: scale 16/15, so 200 high becomes 213 (213.3 rounded); 107 rows of padding.
    assert geom.resized == (213, 320)
    assert geom.crop == (-pad[0], -pad[1], 320, 320)
    img = _image()
    got = pre.resized_uint8(img, geom)
    assert got.shape == (3, 320, 320)
    resized = TF.resize(img.permute(2, 0, 1), [213, 320], interpolation=InterpolationMode.BILINEAR, antialias=True)
    top = pad[0]
    assert torch.equal(got[:, top : top + 213], resized)
    fill = torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1, 1)
    padding = torch.ones(320, dtype=torch.bool)
    padding[top : top + 213] = False
    assert (got[:, padding] == fill).all()
    assert padding.sum() == 107


def test_a_tall_upload_is_padded_left_and_right():
    geom = _pre("center").geometry(400, 100)
    assert geom.resized == (320, 80)
    assert geom.crop == (0, -120, 320, 320)


def test_a_square_upload_is_the_plain_resize():
    """What keeps a square-input model's figures: a square upload is resized exactly as before, no padding."""
    img = _image((256, 256), seed=3)
    plain = Preprocess(resize=64, crop=(64, 64))
    boxed = Preprocess(resize=(64, 64), crop=None, letterbox="center", fill=(114, 114, 114))
    assert boxed.geometry(256, 256) == plain.geometry(256, 256) == Geometry((256, 256), (64, 64), (0, 0, 64, 64))
    assert torch.equal(boxed.resized_uint8(img, boxed.geometry(256, 256)),
                       plain.resized_uint8(img, plain.geometry(256, 256)))


def test_a_crop_larger_than_the_image_still_pads_with_zeros_as_torchvision():
    """The classifier path: unchanged, torchvision's center_crop, for the default fill."""
    img = _image((20, 30), seed=4)
    pre = Preprocess(resize=(20, 30), crop=(32, 32))
    got = pre.resized_uint8(img, pre.geometry(20, 30))
    assert torch.equal(got, TF.center_crop(img.permute(2, 0, 1), [32, 32]))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"resize": 320, "crop": None, "letterbox": "center"}, "needs `crop`"),
    ({"resize": (320, 320), "crop": (224, 224), "letterbox": "center"}, "takes no crop"),
    ({"resize": 256, "crop": (224, 224), "letterbox": "top-left"}, "`letterbox = false` for a resize and crop"),
    ({"resize": (320, 320), "crop": None, "letterbox": "middle"}, "`letterbox` must be one of center, top-left"),
    ({"resize": (320, 320), "crop": None, "fill": (0, 0, 256)}, "`fill` must be 3 integers from 0 to 255"),
])
def test_bad_letterboxes_say_what(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        Preprocess(**kwargs)


@pytest.mark.parametrize("where", ["center", "top-left"])
def test_boxes_go_to_the_input_and_back(where):
    geom = _pre(where).geometry(*UPLOAD)
    top = 53 if where == "center" else 0
    sx, sy = 320 / 300, 213 / 200  # the resize, axis by axis
    box = (30.0, 40.0, 120.0, 190.0)
    x0, y0, x1, y1 = box_to_input(box, geom)
    assert (x0, y0, x1, y1) == pytest.approx((30 * sx, 40 * sy + top, 120 * sx, 190 * sy + top))
    assert box_to_original((x0, y0, x1, y1), geom) == pytest.approx(box, abs=0.01)
    # A box reaching into the padding ends at the upload's edge; one wholly in it is empty.
    assert box_to_original((10.0, top + 200.0, 50.0, top + 300.0), geom) == pytest.approx(
        (10 / sx, 200 / sy, 50 / sx, 200.0), abs=0.01)
    assert box_to_original((10.0, top + 250.0, 50.0, 320.0), geom)[1::2] == (200.0, 200.0)


@pytest.mark.parametrize("where", ["center", "top-left"])
def test_masks_go_to_the_input_and_back(where):
    geom = _pre(where).geometry(*UPLOAD)
    top = 53 if where == "center" else 0
    mask = np.zeros(UPLOAD, dtype=bool)
    mask[50:150, 100:250] = True
    into = mask_to_input(mask, geom, torch.device("cpu")).numpy()
    assert into.shape == INPUT
    expected = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(213, 320), mode="nearest")[0, 0]
    assert np.array_equal(into[top : top + 213], expected.bool().numpy())
    assert not into[:top].any() and not into[top + 213 :].any()  # nothing of the upload lands in the padding
    # The model's mask over the input, back on the upload: the padding's classes never reach it.
    classes = torch.full(INPUT, 7, dtype=torch.uint8)
    classes[top : top + 213] = torch.from_numpy(into[top : top + 213].astype(np.uint8))
    back = _mask_to_original(classes, geom)
    assert back.shape == UPLOAD
    assert 7 not in back
    assert (back.astype(bool) != mask).mean() < 0.01  # nearest both ways: at most a pixel row at the edges


def _bilinear_at(maps: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``maps`` ``(T, h, w)`` over an input of ``size``, sampled bilinearly at input-pixel positions (grid_sample,
    align_corners=False, border clamped: F.interpolate's rule)."""
    gy = ys / size[0] * 2 - 1
    gx = xs / size[1] * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].float()
    return F.grid_sample(maps[:, None].float(), grid.expand(len(maps), -1, -1, -1), mode="bilinear",
                         padding_mode="border", align_corners=False)[:, 0]


@pytest.mark.parametrize("where", ["center", "top-left"])
def test_a_heatmap_on_the_upload_is_the_input_map_cropped_to_the_image_and_resized(where):
    geom = _pre(where).geometry(*UPLOAD)
    top = 53 if where == "center" else 0
    maps = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(1))
    maps[1, :3] = 5.0  # heat only in the top rows' cells: padding for a centred letterbox
    got = to_original(maps, geom)
    assert got.shape == (2, *UPLOAD)
    # Exactly: each upload pixel's centre, through the resize and past the padding, sampled on the map.
    ys = (torch.arange(UPLOAD[0]) + 0.5) * 213 / 200 + top
    xs = (torch.arange(UPLOAD[1]) + 0.5) * 320 / 300
    torch.testing.assert_close(got, _bilinear_at(maps, ys, xs, INPUT), atol=1e-5, rtol=0)
    # The same, to within resampling twice: the input-size map cut to the image's rows, then resized.
    region = to_input_size(maps, INPUT)[:, top : top + 213]
    twice = F.interpolate(region[None], size=UPLOAD, mode="bilinear", align_corners=False)[0]
    assert (got - twice).abs().max() < 0.05 * maps.max()
    # Not the whole input squashed onto the upload: that would lay the padding's heat over the image.
    squashed = F.interpolate(to_input_size(maps, INPUT)[None], size=UPLOAD, mode="bilinear", align_corners=False)[0]
    assert (got - squashed).abs().max() > 0.5
    if where == "center":
        # The padding's heat (cells of rows 0..47, the padding ends at 53) reaches the image's first rows only
        # through bilinear sampling at its edge; one cell in, none is left.
        assert float(got[1, 3:].max()) < float(maps[1, 3:].max()) + 1e-5
