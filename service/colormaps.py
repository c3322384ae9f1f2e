"""Colormaps as 256-entry lookup tables, built on the model's device.

``jet`` is the classic piecewise-linear map, computed. ``turbo``, ``viridis`` and ``inferno`` are
given by 33 evenly spaced anchor colours (read off the published maps) and interpolated linearly,
within a few levels of the full 256-entry tables, which keeps matplotlib out of the service.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from service.errors import InvalidArgument

_ANCHORS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "turbo": (
        (48, 18, 59), (57, 42, 115), (64, 64, 162), (68, 86, 199), (70, 107, 227), (70, 128, 246),
        (66, 148, 255), (55, 168, 250), (40, 188, 235), (28, 205, 216), (24, 221, 194), (31, 233, 175),
        (50, 242, 152), (78, 249, 125), (109, 254, 98), (139, 255, 75), (164, 252, 60), (185, 246, 53),
        (205, 236, 52), (223, 223, 55), (238, 207, 58), (248, 190, 57), (253, 172, 52), (254, 150, 43),
        (251, 126, 33), (244, 102, 23), (235, 80, 14), (223, 63, 8), (208, 47, 5), (190, 33, 2),
        (169, 22, 1), (146, 11, 1), (122, 4, 3),
    ),
    "viridis": (
        (68, 1, 84), (71, 13, 96), (72, 24, 106), (72, 35, 116), (71, 45, 123), (69, 55, 129),
        (66, 64, 134), (62, 73, 137), (59, 82, 139), (55, 91, 141), (51, 99, 141), (47, 107, 142),
        (44, 114, 142), (41, 122, 142), (38, 130, 142), (35, 137, 142), (33, 145, 140), (31, 152, 139),
        (31, 160, 136), (34, 167, 133), (40, 174, 128), (50, 182, 122), (63, 188, 115), (78, 195, 107),
        (94, 201, 98), (112, 207, 87), (132, 212, 75), (152, 216, 62), (173, 220, 48), (194, 223, 35),
        (216, 226, 25), (236, 229, 27), (253, 231, 37),
    ),
    "inferno": (
        (0, 0, 4), (4, 3, 18), (11, 7, 36), (21, 11, 55), (33, 12, 74), (47, 10, 91),
        (61, 9, 101), (74, 12, 107), (87, 16, 110), (100, 21, 110), (113, 25, 110), (125, 30, 109),
        (138, 34, 106), (151, 39, 102), (163, 44, 97), (176, 49, 91), (188, 55, 84), (199, 62, 76),
        (210, 70, 68), (219, 80, 59), (228, 90, 49), (235, 102, 40), (241, 115, 29), (246, 128, 19),
        (249, 142, 9), (251, 157, 7), (252, 172, 17), (251, 188, 33), (249, 203, 53), (245, 219, 76),
        (242, 234, 105), (243, 246, 138), (252, 255, 164),
    ),
}

COLORMAPS: tuple[str, ...] = ("jet", *_ANCHORS)


def _jet(x: Tensor) -> Tensor:
    channels = [(1.5 - (4 * x - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)]
    return torch.stack(channels, dim=1)


def check_colormap(name: str) -> str:
    if name not in COLORMAPS:
        raise InvalidArgument("colormap", f"`colormap` must be one of {', '.join(COLORMAPS)}, got {name!r}")
    return name


@functools.lru_cache(maxsize=32)
def lookup_table(name: str, device: torch.device | str = "cpu") -> Tensor:
    """The ``(256, 3)`` uint8 table of colormap ``name``, built once per device."""
    check_colormap(name)
    x = torch.linspace(0, 1, 256, device=device)
    if name == "jet":
        return (_jet(x) * 255).round().to(torch.uint8)
    anchors = torch.tensor(_ANCHORS[name], dtype=torch.float32, device=device)  # (33, 3)
    pos = x * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo)[:, None]
    return (anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).round().to(torch.uint8)
